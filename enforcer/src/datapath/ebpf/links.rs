//! Keeping TC ingress on every interface of the agent's network namespace,
//! including `lo` and interfaces that appear later (a veth created for a
//! new container, say): TC is per interface, and an interface without the
//! program is a hole in the network side of every PU's policy.
//!
//! A watcher thread — created on the datapath's own thread, so it lives in
//! the agent's network namespace — lists the interfaces every
//! [`RESCAN`] and attaches the pinned program to each one it has not seen,
//! pinning the link beside the others so it outlives a crashed agent.
//! Interfaces that disappear take their links with them.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{SchedClassifier, TcAttachType, links::FdLink};
use tracing::{info, warn};

/// How often the watcher looks for new interfaces.
pub const RESCAN: Duration = Duration::from_millis(200);

/// Names of the interfaces of the calling thread's network namespace
/// (`if_nameindex(3)` asks the kernel through a socket of this thread's
/// namespace, unlike `/sys/class/net`, which shows the namespace of
/// whoever mounted /sys).
pub fn interfaces() -> Result<Vec<String>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // or null on error; it is freed below with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            bail!("if_nameindex: {}", std::io::Error::last_os_error());
        }
        let mut names = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 {
            names.push(
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(names)
    }
}

/// Attaches the pinned ingress program to `ifname` and pins the link.
fn attach(program: &Path, links_dir: &Path, ifname: &str) -> Result<()> {
    let mut prog = SchedClassifier::from_pin(program)
        .with_context(|| format!("opening the pinned program {}", program.display()))?;
    let id = prog
        .attach(ifname, TcAttachType::Ingress)
        .with_context(|| format!("attaching TC ingress to {ifname}"))?;
    let link = FdLink::try_from(prog.take_link(id)?)?;
    let pin = links_dir.join(format!("ingress-{ifname}"));
    // A pin left by an interface of the same name that went away holds a
    // defunct link: replace it.
    match std::fs::remove_file(&pin) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the stale pin {}", pin.display()));
        }
        _ => {}
    }
    link.pin(&pin)
        .with_context(|| format!("pinning the TC link of {ifname}"))?;
    Ok(())
}

/// The running watcher; dropping it stops the thread (the links stay:
/// their pins hold them).
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Attaches to every current interface (an error if any fails), then
    /// keeps watching for new ones.
    pub fn start(program: PathBuf, links_dir: PathBuf) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for ifname in interfaces()? {
            attach(&program, &links_dir, &ifname)?;
            seen.insert(ifname);
        }
        info!(interfaces = ?seen, "TC ingress attached");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("links".into())
            .spawn({
                let stop = stop.clone();
                move || watch(&program, &links_dir, seen, &stop)
            })
            .context("spawning the interface watcher")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn watch(program: &Path, links_dir: &Path, mut seen: BTreeSet<String>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(RESCAN);
        let Ok(now) = interfaces() else { continue };
        // Interfaces that went away are forgotten (a new one may reuse the
        // name); one that could not be attached is tried again next time.
        seen = now
            .into_iter()
            .filter(|ifname| {
                seen.contains(ifname)
                    || match attach(program, links_dir, ifname) {
                        Ok(()) => {
                            info!(ifname, "TC ingress attached to a new interface");
                            true
                        }
                        Err(e) => {
                            warn!(ifname, "attaching TC ingress failed, will retry: {e:#}");
                            false
                        }
                    }
            })
            .collect();
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
