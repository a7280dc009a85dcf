//! A PU's exposed services in the eBPF datapath (issue 6): its entries in
//! `EXPOSED` (TCP port → the PU's slot and proxy port), which TC ingress
//! reads to hand incoming connections to the proxy
//! (`enforcer-ebpf/src/exposed.rs` says how, and why without NAT).
//!
//! Building the entries is pure ([`entries`], [`check_free`]); [`Exposed`]
//! writes them and remembers what each slot wrote. [`attach_lookup`]
//! attaches the sk_lookup program that completes TC ingress's steering
//! for a SYN reusing a TIME_WAIT tuple, to the agent's network namespace. As in the fallback, a
//! PU without a `proxy_port` exposes nothing. Unlike the fallback, where
//! two PUs' redirect rules for one port would both be installed and the
//! first would win, a port is one PU's: a second PU exposing it is
//! refused before anything changes.

use std::{collections::BTreeMap, fs::File, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{SkLookup, links::FdLink},
};
use enforcer_common::maps::{ExposedService, PROG_EXPOSED_LOOKUP};
use tracing::debug;

use crate::policy::Pu;

/// A PU's exposed ports, each with its entry.
pub type Entries = BTreeMap<u16, ExposedService>;

/// The entries of `pu` in slot `slot`: every port of its exposed services
/// (ranges spelled out) to its proxy port; none without a proxy port.
pub fn entries(pu: &Pu, slot: u32) -> Entries {
    let Some(proxy) = pu.proxy_port else {
        return Entries::new();
    };
    pu.exposed_services
        .iter()
        .flat_map(|range| range.start()..=range.end())
        .map(|port| (port, ExposedService::new(slot, proxy.get())))
        .collect()
}

/// Refuses `pu` if one of `others` (PU `pu.id` itself skipped) exposes one
/// of its exposed ports already.
pub fn check_free<'a>(pu: &Pu, others: impl IntoIterator<Item = &'a Pu>) -> Result<()> {
    let mine = entries(pu, 0);
    for other in others {
        if other.id == pu.id {
            continue;
        }
        if let Some(port) = entries(other, 0).keys().find(|p| mine.contains_key(p)) {
            return Err(anyhow!(
                "exposed_services: port {port} of PU {} is exposed by PU {} already \
                 (one proxy per port)",
                pu.id,
                other.id
            ));
        }
    }
    Ok(())
}

/// Loads the sk_lookup program (`run`, with the rest of the object).
pub fn load_lookup(bpf: &mut Ebpf) -> Result<()> {
    let prog: &mut SkLookup = bpf
        .program_mut(PROG_EXPOSED_LOOKUP)
        .with_context(|| format!("program {PROG_EXPOSED_LOOKUP} missing from the object"))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("loading program {PROG_EXPOSED_LOOKUP}"))
}

/// Attaches the loaded sk_lookup program to the calling thread's network
/// namespace (the agent's) and pins the link in `links_dir`, so it
/// outlives a crashed agent as TC ingress does.
pub fn attach_lookup(bpf: &mut Ebpf, links_dir: &Path) -> Result<()> {
    let netns = File::open("/proc/thread-self/ns/net").context("opening the network namespace")?;
    let prog: &mut SkLookup = bpf
        .program_mut(PROG_EXPOSED_LOOKUP)
        .with_context(|| format!("program {PROG_EXPOSED_LOOKUP} missing from the object"))?
        .try_into()?;
    let id = prog
        .attach(&netns)
        .with_context(|| format!("attaching {PROG_EXPOSED_LOOKUP} to the network namespace"))?;
    let link = FdLink::from(prog.take_link(id)?);
    let pin = links_dir.join(PROG_EXPOSED_LOOKUP);
    link.pin(&pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// The `EXPOSED` map and what each slot wrote to it.
pub struct Exposed {
    map: HashMap<MapData, u16, ExposedService>,
    held: BTreeMap<u32, Entries>,
}

impl Exposed {
    pub fn new(map: HashMap<MapData, u16, ExposedService>) -> Self {
        Self {
            map,
            held: BTreeMap::new(),
        }
    }

    /// Makes `slot`'s entries `wanted`, all or nothing: each port is
    /// written in place (one write: a port in the old and new entries, or
    /// taken over from a PU being replaced, is never unmapped in between),
    /// then the ports `slot` no longer has are removed. On failure every
    /// written port gets its previous entry back.
    pub fn write(&mut self, slot: u32, wanted: Entries) -> Result<()> {
        let mut written: Vec<(u16, Option<ExposedService>)> = Vec::new();
        for (&port, entry) in &wanted {
            let before = self.map.get(&port, 0).ok();
            if let Err(e) = self.map.insert(port, entry, 0) {
                for (port, before) in written.into_iter().rev() {
                    let _ = match before {
                        Some(before) => self.map.insert(port, before, 0),
                        None => self.map.remove(&port),
                    };
                }
                return Err(anyhow!(e)).with_context(|| format!("exposing port {port}"));
            }
            written.push((port, before));
        }
        let old = self.held.insert(slot, wanted).unwrap_or_default();
        let wanted = &self.held[&slot];
        let gone: Vec<u16> = old
            .into_keys()
            .filter(|p| !wanted.contains_key(p))
            .collect();
        self.remove(slot, gone);
        Ok(())
    }

    /// Removes `slot`'s entries (each only while it is still the slot's).
    pub fn clear(&mut self, slot: u32) {
        let ports = self.held.remove(&slot).unwrap_or_default();
        self.remove(slot, ports.into_keys());
    }

    /// Writes `slot`'s entries again, as last written: after a replacing
    /// PU took some over and was then undone. Best effort.
    pub fn restore(&mut self, slot: u32) {
        for (port, entry) in self.held.get(&slot).into_iter().flatten() {
            if let Err(e) = self.map.insert(port, entry, 0) {
                debug!("restoring exposed port {port}: {e}");
            }
        }
    }

    fn remove(&mut self, slot: u32, ports: impl IntoIterator<Item = u16>) {
        for port in ports {
            let theirs = self.map.get(&port, 0).is_ok_and(|e| e.slot == slot);
            if theirs && let Err(e) = self.map.remove(&port) {
                debug!("removing exposed port {port}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Configuration;

    fn pus(text: &str) -> Vec<Pu> {
        let config = format!("mode = \"local-server\"\n{text}");
        Configuration::from_toml_str(&config)
            .expect("valid config")
            .pus
    }

    const TWO: &str = r#"
        [[pus]]
        id = "web"
        kind = "linux-process"
        cgroup = "web"
        proxy_port = 15001
        exposed_services = [8443, "9000:9002"]
        [[pus]]
        id = "db"
        kind = "linux-process"
        cgroup = "db"
        proxy_port = 15002
        exposed_services = [8443]
    "#;

    #[test]
    fn every_exposed_port_goes_to_the_proxy_port() {
        let pus = pus(TWO);
        let web = entries(&pus[0], 7);
        let ports: Vec<u16> = web.keys().copied().collect();
        assert_eq!(ports, [8443, 9000, 9001, 9002]);
        assert!(web.values().all(|e| *e == ExposedService::new(7, 15001)));
    }

    #[test]
    fn an_entry_has_no_hidden_padding() {
        // The kernel and the agent agree on 4 + 2 + 2 bytes (its Pod
        // impl relies on there being no padding the pad field does not
        // cover).
        assert_eq!(size_of::<ExposedService>(), 8);
        assert_eq!(ExposedService::new(3, 15001).pad, 0);
    }

    #[test]
    fn without_a_proxy_port_nothing_is_exposed() {
        // Validation refuses it; the entries would be none anyway, as the
        // fallback installs no proxy rule without a proxy port.
        let mut pu = pus(TWO).remove(0);
        pu.proxy_port = None;
        assert!(entries(&pu, 0).is_empty());
    }

    #[test]
    fn a_port_another_pu_exposes_is_refused() {
        let mut pus = pus(TWO);
        let err = check_free(&pus[0], &pus).unwrap_err().to_string();
        assert!(
            err.contains("port 8443 of PU web is exposed by PU db"),
            "{err}"
        );
        // A PU is never in conflict with itself (an update).
        assert!(check_free(&pus[0], &pus[..1]).is_ok());
        // Without a proxy port `db` exposes nothing.
        pus[1].proxy_port = None;
        assert!(check_free(&pus[0], &pus).is_ok());
    }
}
