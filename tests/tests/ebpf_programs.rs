//! Every program of the eBPF datapath's object passes this kernel's
//! verifier (loaded, not attached), with the verifier's log in the failure.

use anyhow::{Context as _, Result};
use aya::programs::{CgroupSkb, CgroupSockAddr, SchedClassifier, SocketFilter};
use enforcer_common::maps::{PROG_EGRESS, PROG_INGRESS, PROG_UDP_TRAP, PU_PROGRAMS};
use enforcer_tests::privilege;

#[test]
fn every_datapath_program_passes_the_verifier() -> Result<()> {
    let Some(_env) = privilege::require() else {
        return Ok(());
    };
    let mut bpf = aya::EbpfLoader::new()
        .verifier_log_level(aya::VerifierLogLevel::VERBOSE)
        .load(enforcer::bpf::datapath_object()?)
        .context("loading the datapath object")?;
    for name in PU_PROGRAMS {
        let prog: &mut CgroupSockAddr = bpf.program_mut(name).context(name)?.try_into()?;
        prog.load().with_context(|| format!("verifying {name}"))?;
    }
    let ingress: &mut SchedClassifier = bpf
        .program_mut(PROG_INGRESS)
        .context(PROG_INGRESS)?
        .try_into()?;
    ingress
        .load()
        .with_context(|| format!("verifying {PROG_INGRESS}"))?;
    let egress: &mut CgroupSkb = bpf
        .program_mut(PROG_EGRESS)
        .context(PROG_EGRESS)?
        .try_into()?;
    egress
        .load()
        .with_context(|| format!("verifying {PROG_EGRESS}"))?;
    let udp_trap: &mut SocketFilter = bpf
        .program_mut(PROG_UDP_TRAP)
        .context(PROG_UDP_TRAP)?
        .try_into()?;
    udp_trap
        .load()
        .with_context(|| format!("verifying {PROG_UDP_TRAP}"))?;
    Ok(())
}
