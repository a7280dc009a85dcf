//! One test body run on every datapath (or iptables flavour) and/or
//! address family: macros that turn a list of bodies into `#[test]`s
//! named `ebpf::v4::name`, `iptables::v6::name`, `ebpf::name`,
//! `nft::v4::name`, `v4::name`, … so every suite spells its matrix the
//! same way.
//!
//! A suite invokes them at its root, where the bodies are: each generated
//! test calls `crate::name`, which names the invoking suite's item.

/// `ebpf::{v4,v6}::name` and `iptables::{v4,v6}::name` for each
/// `fn name(Datapath, Family) -> anyhow::Result<()>`.
#[macro_export]
macro_rules! on_both_datapaths_and_families {
    ($($name:ident),+ $(,)?) => {
        $crate::on_datapaths_and_families!([$($name),+] ebpf Ebpf, iptables Iptables);
    };
}

/// [`on_both_datapaths_and_families!`] plus `auto_without_bpf::{v4,v6}::name`
/// (`--datapath auto` on a "kernel" without `bpf(2)`: the agent must fall
/// back to iptables and the same behaviour must hold) and
/// `iptables_legacy::{v4,v6}::name` (the fallback on the legacy iptables
/// flavour; the others detect nf_tables).
#[macro_export]
macro_rules! on_every_datapath_and_family {
    ($($name:ident),+ $(,)?) => {
        $crate::on_datapaths_and_families!(
            [$($name),+]
            ebpf Ebpf, iptables Iptables, auto_without_bpf AutoWithoutBpf,
            iptables_legacy IptablesLegacy
        );
    };
}

/// `module::{v4,v6}::name` for each `module Variant` pair (a module name
/// and a [`Datapath`](crate::agent::Datapath) variant) and each
/// `fn name(Datapath, Family) -> anyhow::Result<()>`: the datapaths a
/// suite picks by hand.
#[macro_export]
macro_rules! on_datapaths_and_families {
    ([$($name:ident),+ $(,)?] $($pairs:tt)+) => {
        $crate::on_datapaths_and_families!(@each [$($name),+] $($pairs)+);
    };
    // The names as one token tree, so each pair can repeat them all.
    (@each $names:tt $($module:ident $datapath:ident),+ $(,)?) => {
        $(mod $module {
            $crate::on_both_families!(
                @after $names ($crate::agent::Datapath::$datapath,)
            );
        })+
    };
}

/// `ebpf::name` and `iptables::name` for each
/// `fn name(Datapath) -> anyhow::Result<()>`.
#[macro_export]
macro_rules! on_both_datapaths {
    ($($name:ident),+ $(,)?) => {
        mod ebpf {
            $crate::matrix_tests!([$($name),+] ($crate::agent::Datapath::Ebpf));
        }
        mod iptables {
            $crate::matrix_tests!([$($name),+] ($crate::agent::Datapath::Iptables));
        }
    };
}

/// [`on_both_datapaths!`] plus `iptables_legacy::name`: the fallback
/// again, forced onto the legacy iptables tools (SPEC: the core of the
/// suite runs on each backend).
#[macro_export]
macro_rules! on_every_datapath {
    ($($name:ident),+ $(,)?) => {
        $crate::on_both_datapaths!($($name),+);
        mod iptables_legacy {
            $crate::matrix_tests!([$($name),+] ($crate::agent::Datapath::IptablesLegacy));
        }
    };
}

/// `nft::{v4,v6}::name` and `legacy::{v4,v6}::name` for each
/// `fn name(Backend, Family) -> anyhow::Result<()>`: a body about the
/// iptables flavours themselves, not about a datapath.
#[macro_export]
macro_rules! on_both_backends_and_families {
    ($($name:ident),+ $(,)?) => {
        mod nft {
            $crate::on_both_families!(
                @after [$($name),+] ($crate::netfilter::Backend::Nft,)
            );
        }
        mod legacy {
            $crate::on_both_families!(
                @after [$($name),+] ($crate::netfilter::Backend::Legacy,)
            );
        }
    };
}

/// `v4::name` and `v6::name` for each `fn name(Family) -> anyhow::Result<()>`.
#[macro_export]
macro_rules! on_both_families {
    ($($name:ident),+ $(,)?) => {
        $crate::on_both_families!(@after [$($name),+] ());
    };
    // The family after the arguments `$before` (a datapath and a comma).
    (@after $names:tt ($($before:tt)*)) => {
        mod v4 {
            $crate::matrix_tests!($names ($($before)* $crate::netfilter::Family::V4));
        }
        mod v6 {
            $crate::matrix_tests!($names ($($before)* $crate::netfilter::Family::V6));
        }
    };
}

/// One `#[test]` per name, calling `crate::name` with `$args`.
#[doc(hidden)]
#[macro_export]
// `crate` is meant: the bodies live in the invoking suite, not here.
#[allow(clippy::crate_in_macro_def)]
macro_rules! matrix_tests {
    ([$($name:ident),+] $args:tt) => {
        $(#[test] fn $name() -> anyhow::Result<()> { crate::$name $args })+
    };
}
