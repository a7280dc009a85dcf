//! The enforcer agent as a library: the policy model, kernel object
//! naming, and (later) the datapaths and the trap. `main.rs` is a thin CLI
//! over it.

pub mod bpf;
pub mod datapath;
pub mod naming;
pub mod policy;
