//! Every program of the eBPF datapath's object passes this kernel's
//! verifier (loaded, not attached), with the verifier's log in the failure,
//! and with room to spare: each verifies in well under the verifier's
//! instruction limit, so a change that multiplies the paths the verifier
//! walks fails here, with every program's count, before it fails a load.

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    CgroupSkb, CgroupSockAddr, CgroupSockopt, ProgramInfo, SchedClassifier, SkLookup, SockOps,
    SocketFilter,
};
use enforcer_common::maps::{
    HOST_PROGRAMS, PROG_EGRESS, PROG_EXPOSED_LOOKUP, PROG_HOST_EGRESS, PROG_HOST_MARK_GUARD,
    PROG_INGRESS, PROG_MARK_GUARD, PU_PROGRAMS, RULE_FILTERS,
};
use enforcer_common::proxy::{PROG_PROXY_ORIGINAL_DST, PROG_PROXY_SOCKOPS, PROXY_SOCK_PROGRAMS};
use enforcer_tests::privilege;

/// The verifier's limit on instructions processed per program.
const VERIFIER_LIMIT: u32 = 1_000_000;
/// The most any program may take: a tenth of the limit. Each takes a few
/// thousand today; the ACL walk unrolled took up to the whole limit.
const BUDGET: u32 = VERIFIER_LIMIT / 10;

#[test]
fn every_datapath_program_passes_the_verifier() -> Result<()> {
    let Some(_env) = privilege::require() else {
        return Ok(());
    };
    let mut bpf = aya::EbpfLoader::new()
        .verifier_log_level(aya::VerifierLogLevel::VERBOSE)
        .load(enforcer::bpf::datapath_object()?)
        .context("loading the datapath object")?;
    let mut processed = Vec::new();
    for name in PU_PROGRAMS
        .into_iter()
        .chain(HOST_PROGRAMS)
        .chain(PROXY_SOCK_PROGRAMS)
    {
        let prog: &mut CgroupSockAddr = bpf.program_mut(name).context(name)?.try_into()?;
        prog.load().with_context(|| format!("verifying {name}"))?;
        processed.push((name, verified(name, prog.info()?)?));
    }
    let ingress: &mut SchedClassifier = bpf
        .program_mut(PROG_INGRESS)
        .context(PROG_INGRESS)?
        .try_into()?;
    ingress
        .load()
        .with_context(|| format!("verifying {PROG_INGRESS}"))?;
    processed.push((PROG_INGRESS, verified(PROG_INGRESS, ingress.info()?)?));
    let lookup: &mut SkLookup = bpf
        .program_mut(PROG_EXPOSED_LOOKUP)
        .context(PROG_EXPOSED_LOOKUP)?
        .try_into()?;
    lookup
        .load()
        .with_context(|| format!("verifying {PROG_EXPOSED_LOOKUP}"))?;
    processed.push((
        PROG_EXPOSED_LOOKUP,
        verified(PROG_EXPOSED_LOOKUP, lookup.info()?)?,
    ));
    for name in [PROG_EGRESS, PROG_HOST_EGRESS] {
        let egress: &mut CgroupSkb = bpf.program_mut(name).context(name)?.try_into()?;
        egress.load().with_context(|| format!("verifying {name}"))?;
        processed.push((name, verified(name, egress.info()?)?));
    }
    let sockops: &mut SockOps = bpf
        .program_mut(PROG_PROXY_SOCKOPS)
        .context(PROG_PROXY_SOCKOPS)?
        .try_into()?;
    sockops
        .load()
        .with_context(|| format!("verifying {PROG_PROXY_SOCKOPS}"))?;
    processed.push((
        PROG_PROXY_SOCKOPS,
        verified(PROG_PROXY_SOCKOPS, sockops.info()?)?,
    ));
    for name in [
        PROG_MARK_GUARD,
        PROG_HOST_MARK_GUARD,
        PROG_PROXY_ORIGINAL_DST,
    ] {
        let guard: &mut CgroupSockopt = bpf.program_mut(name).context(name)?.try_into()?;
        guard.load().with_context(|| format!("verifying {name}"))?;
        processed.push((name, verified(name, guard.info()?)?));
    }
    for name in RULE_FILTERS {
        let filter: &mut SocketFilter = bpf.program_mut(name).context(name)?.try_into()?;
        filter.load().with_context(|| format!("verifying {name}"))?;
        processed.push((name, verified(name, filter.info()?)?));
    }

    let report = processed
        .iter()
        .map(|(name, count)| format!("{name}: {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("instructions processed by the verifier: {report}");
    if processed.iter().any(|&(_, count)| count > BUDGET) {
        bail!(
            "a program takes more than {BUDGET} of the verifier's {VERIFIER_LIMIT} \
             instructions: {report}"
        );
    }
    Ok(())
}

/// How many instructions the verifier processed for a loaded program
/// (`verified_insns` of its info, kernel 5.16 and later).
fn verified(name: &str, info: ProgramInfo) -> Result<u32> {
    info.verified_instruction_count()
        .with_context(|| format!("the kernel reports no verified instruction count for {name}"))
}
