//! The eBPF objects built from `enforcer-ebpf` and embedded in the agent.
//!
//! `build.rs` compiles every binary of the eBPF crate into OUT_DIR; this
//! module hands out their bytes, aligned the way aya's loader wants them.

use anyhow::{Result, bail};

/// The datapath's programs (`enforcer-ebpf/src/main.rs`).
pub fn datapath_object() -> Result<&'static [u8]> {
    non_empty(
        "enforcer",
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer")),
    )
}

/// The kernel-facts probes (`enforcer-ebpf/src/facts.rs`): small programs
/// that prove each kernel mechanism the eBPF datapath relies on.
pub fn kernel_facts_object() -> Result<&'static [u8]> {
    non_empty(
        "enforcer-facts",
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-facts")),
    )
}

/// Refuses an object left empty by a build with `AYA_BUILD_SKIP=1`.
fn non_empty(name: &str, bytes: &'static [u8]) -> Result<&'static [u8]> {
    if bytes.is_empty() {
        bail!(
            "the eBPF object `{name}` is empty: this binary was built with \
             AYA_BUILD_SKIP=1; rebuild without it (cargo xtask build)"
        );
    }
    Ok(bytes)
}
