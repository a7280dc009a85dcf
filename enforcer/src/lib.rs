//! The enforcer agent as a library: the policy model, kernel object
//! naming, and (later) the datapaths and the trap. `main.rs` is a thin CLI
//! over it.

pub mod agent;
pub mod bpf;
pub mod cli;
pub mod control;
pub mod datapath;
pub mod naming;
pub mod policy;
pub mod trap;
