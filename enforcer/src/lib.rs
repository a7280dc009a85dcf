//! The enforcer agent as a library: the policy model, kernel object
//! naming, netlink framing, the datapaths, the trap, identity (labels,
//! policy, handshake tokens and keys), the agent's wiring and its command
//! line, the demo, and the sandbox (throwaway namespaces and cgroups) the
//! demo and the kernel tests share. `main.rs` is a thin CLI over it.

pub mod agent;
pub mod bpf;
pub mod cli;
pub mod control;
pub mod datapath;
pub mod demo;
pub mod flowlog;
pub mod identity;
pub mod naming;
pub mod netlink;
pub mod policy;
pub mod sandbox;
pub mod trap;
