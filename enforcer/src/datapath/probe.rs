//! Which datapath this kernel can run, and why (being written).

use super::DatapathKind;
use crate::policy::DatapathChoice;

/// The datapath to use and a sentence saying why, for the log and
/// `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub kind: DatapathKind,
    pub reason: String,
}

/// Resolves `auto` by probing the kernel; a forced `ebpf` on a kernel
/// that lacks a feature is an error naming the feature.
pub fn choose(choice: DatapathChoice) -> anyhow::Result<Choice> {
    match choice {
        DatapathChoice::Iptables => Ok(Choice {
            kind: DatapathKind::Iptables,
            reason: "forced by configuration".into(),
        }),
        _ => todo!(),
    }
}
