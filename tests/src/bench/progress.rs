//! One progress line per step on stderr, and the run's interruption:
//! SIGINT, SIGTERM and SIGHUP only set a flag that every wait looks at,
//! so that an interrupted run still goes through every `Drop` (agent,
//! namespaces, cgroups) instead of dying with them in place.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// From now on SIGINT, SIGTERM and SIGHUP interrupt the run in order.
pub fn catch_signals() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(signal, &action)? };
    }
    Ok(())
}

/// Fails once a signal asked the run to stop.
pub fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, but returns early (with an error) when interrupted.
pub fn pause(duration: Duration) -> Result<()> {
    let end = Instant::now() + duration;
    while Instant::now() < end {
        interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    interrupted()
}

/// Counts steps and prints one line for each.
pub struct Progress {
    done: usize,
    total: usize,
    started: Instant,
    cpu_at_start: Option<CpuTimes>,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Self {
            done: 0,
            total,
            started: Instant::now(),
            cpu_at_start: CpuTimes::read(),
        }
    }

    /// `[ 3/40  0:42] what … outcome`
    pub fn step(&mut self, what: &str, outcome: &str) {
        self.done += 1;
        let width = self.total.to_string().len();
        let secs = self.started.elapsed().as_secs();
        eprintln!(
            "[{:>width$}/{}  {}:{:02}] {what} … {outcome}",
            self.done,
            self.total,
            secs / 60,
            secs % 60
        );
        let _ = std::io::stderr().flush();
    }

    /// Counts steps that will not run (a setup that could not start).
    pub fn skip(&mut self, steps: usize, what: &str) {
        if steps == 0 {
            return;
        }
        self.done += steps - 1;
        self.step(what, &format!("skipped {steps} steps"));
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// How much of the machine others used while the run went on.
    pub fn interference(&self) -> Option<Interference> {
        let (start, end) = (self.cpu_at_start?, CpuTimes::read()?);
        let ours = own_cpu_seconds();
        let capacity = self.elapsed().as_secs_f64() * start.cpus as f64;
        if capacity <= 0.0 {
            return None;
        }
        let busy = end.busy - start.busy;
        Some(Interference {
            others: ((busy - ours).max(0.0) / capacity),
            stolen: (end.steal - start.steal) / capacity,
        })
    }
}

/// Shares (0–1) of the machine's CPU time during a run.
#[derive(Debug, Clone, Copy)]
pub struct Interference {
    /// Used by processes other than the benchmark, its agents and clients.
    pub others: f64,
    /// Taken by the hypervisor.
    pub stolen: f64,
}

/// Machine-wide CPU seconds from /proc/stat.
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    /// user + nice + system (not interrupts: the benchmark's own packets
    /// are processed in softirq context).
    busy: f64,
    steal: f64,
    cpus: usize,
}

impl CpuTimes {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let mut lines = stat.lines();
        let total: Vec<f64> = lines
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let cpus = lines
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let field = |i: usize| total.get(i).copied().unwrap_or(0.0) / hz;
        Some(Self {
            busy: field(0) + field(1) + field(2),
            steal: field(7),
            cpus: cpus.max(1),
        })
    }
}

/// CPU seconds of this process and its reaped children (agents, clients).
fn own_cpu_seconds() -> f64 {
    let usage = |who| {
        // SAFETY: getrusage fills the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut u) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN)
}
