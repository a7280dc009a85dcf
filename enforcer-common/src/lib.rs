//! Types and constants shared by the eBPF programs (`enforcer-ebpf`) and
//! the user-space agent (`enforcer`).
//!
//! Everything here is `no_std`, `#[repr(C)]` where it crosses the kernel
//! boundary, and free of logic: the two sides must agree on layouts and
//! numbers, nothing else.
#![no_std]

pub mod facts;
pub mod maps;
pub mod marks;
pub mod proxy;
