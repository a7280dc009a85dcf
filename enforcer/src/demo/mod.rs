//! `enforcer demo`: the agent at work on a world of its own.
//!
//! The demo builds a throwaway world — two new network namespaces joined
//! by a veth, echo servers in one, a cgroup for the demo's PU (see
//! [`world`]) — writes the embedded demo policy ([`world::CONFIG`]) to a
//! temporary file, and starts the agent (`enforcer run`, this same binary)
//! in the host namespace. Then, about once a second, it makes one TCP
//! connection of each [`world::Kind`] from client processes inside the PU and
//! outside it, and shows a live table of what happened and of the agent's
//! and the kernel's counters. On Ctrl-C, SIGTERM, SIGHUP or after
//! `--duration`, it stops the traffic, prints a summary that checks the
//! counters against the traffic (trapped by the agent = queued by the
//! kernel = connections to the target network), stops the agent (which
//! removes its datapath state), removes the world and its files, and
//! checks that none of it is left.
//!
//! Safety: everything it makes is named `enfdemo<pid>…`; it never touches
//! the host's own network namespace or its root cgroup. The signals that
//! stop it are only recorded and looked at by the main loop, so a second
//! Ctrl-C cannot interrupt the clean-up; the agent and the clients
//! run in process groups of their own, so Ctrl-C in the terminal reaches
//! only the demo. Every object is an RAII guard, removed on every path,
//! errors included. After a failure the temporary directory with the
//! agent's log is kept, and the log's tail is shown.

mod agent;
mod report;
mod traffic;
mod world;

use std::io::{IsTerminal as _, Write as _};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::agent::InstanceName;
use crate::agent::host::Mounts;
use crate::policy::{DatapathChoice, Keyword as _};
use agent::{Agent, Launch};
use report::AgentView;
use traffic::Tally;
use world::World;

pub use traffic::client;

/// The prefix of every name the demo gives: namespaces, cgroup, agent
/// instance (its pins and control socket) and temporary directory are all
/// `enfdemo<pid>…`.
pub const PREFIX: &str = "enfdemo";

/// What `enforcer demo` is told.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Stop after this long; `None`: run until a signal.
    pub duration: Option<Duration>,
    /// The datapath the agent is started with.
    pub datapath: DatapathChoice,
}

/// Runs the demo; fails when something could not be done or the summary's
/// check failed.
pub fn run(options: &DemoOptions) -> Result<()> {
    // First: a Ctrl-C from now on stops the demo in order.
    let signals = Signals::catch()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root: it creates network namespaces, a cgroup and eBPF programs");
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    let mounts = Mounts::read()?;
    let cgroup2 = mounts.cgroup2.clone().context(
        "no cgroup v2 mount in /proc/self/mounts: the demo's PU is a cgroup v2 directory \
         (`cargo xtask setup` mounts one)",
    )?;
    let base = format!("{PREFIX}{}", std::process::id());
    let instance: InstanceName = base.parse().map_err(|e: String| anyhow!(e))?;
    let mut files = Files::create(&base)?;
    let mut made = World::paths(&base, &cgroup2);
    made.push(instance.pin_dir(&mounts.bpffs_or_default()));
    made.push(instance.control_socket());
    let result = with_files(&Setup {
        signals: &signals,
        exe: &exe,
        cgroup2: &cgroup2,
        base: &base,
        instance: &instance,
        files: &files,
        options,
    });
    if result.is_err() {
        files.keep();
        println!(
            "\n--- the last lines of the agent's log ({}, kept) ---\n{}\n---",
            files.log().display(),
            tail(&files.log())
        );
    } else {
        made.push(files.dir.clone());
    }
    drop(files);
    let left: Vec<String> = made
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !left.is_empty() {
        println!("left behind: {}", left.join(", "));
    }
    result?;
    if !left.is_empty() {
        bail!("the demo left {} behind", left.join(", "));
    }
    println!("nothing of the demo is left on the machine");
    Ok(())
}

/// What [`with_files`] works with.
struct Setup<'a> {
    signals: &'a Signals,
    exe: &'a Path,
    cgroup2: &'a Path,
    base: &'a str,
    instance: &'a InstanceName,
    files: &'a Files,
    options: &'a DemoOptions,
}

/// Builds the world, runs the agent and the traffic, and tears both down
/// again.
fn with_files(s: &Setup) -> Result<()> {
    println!("enforcer demo: building a world of its own (the host's network is not touched)");
    let world = World::build(s.base, s.cgroup2)?;
    let config = s.files.config();
    std::fs::write(&config, world.config())
        .with_context(|| format!("writing {}", config.display()))?;
    println!(
        "  namespaces  {} (agent, clients), {} (echo servers)\n  \
         PU cgroup   {}\n  config      {}\n  agent log   {}",
        world.host().name(),
        world.peer().name(),
        world.cgroup().display(),
        config.display(),
        s.files.log().display(),
    );
    println!(
        "starting the agent: --datapath {}, instance {}",
        s.options.datapath.as_str(),
        s.instance
    );
    let (mut agent, first) = Agent::start(&Launch {
        exe: s.exe,
        config: &config,
        netns: world.host(),
        instance: s.instance,
        datapath: s.options.datapath,
        log: &s.files.log(),
    })?;
    let datapath = first.datapath.kind.to_string();
    println!(
        "datapath: {datapath} ({})\nagent pid {}; traffic every second; the table shows \
         sent/connected/blocked per kind\n",
        first.datapath.reason,
        agent.pid().map_or_else(|| "?".into(), |p| p.to_string()),
    );
    let finished = drive(s, &world, &mut agent, &datapath);
    let items = finished
        .as_ref()
        .ok()
        .map(|f| report::check(&f.tally, &f.agent));
    if let (Ok(f), Some(items)) = (&finished, &items) {
        print!("\n{}", report::summary(f.elapsed, &datapath, items));
    }

    println!("\nstopping the agent (SIGTERM; it removes what it made)");
    let stopped = agent.stop();
    if let Ok(stopped) = &stopped {
        println!("  the agent exited ({})", stopped.status);
        if stopped.cleaned_up {
            println!("  `enforcer cleanup` removed what it may have left");
        }
    }
    drop(world);
    println!("  removed the namespaces, the cgroup and the echo servers");

    finished?;
    let stopped = stopped?;
    if !stopped.status.success() {
        bail!("the agent exited with {}", stopped.status);
    }
    if let Some(failed) = items.iter().flatten().find(|i| !i.ok) {
        bail!("the summary's check failed: {}", failed.what);
    }
    Ok(())
}

/// How the traffic ended.
struct Finished {
    elapsed: u64,
    tally: Tally,
    /// The agent's last report, taken after the traffic stopped.
    agent: AgentView,
}

/// Sends the traffic and shows the table every second until a signal,
/// the duration, or a failure; then stops the traffic and takes the
/// agent's final counters.
fn drive(s: &Setup, world: &World, agent: &mut Agent, datapath: &str) -> Result<Finished> {
    let stop = AtomicBool::new(false);
    let tally = Mutex::new(Tally::default());
    let mut screen = Screen::new();
    let started = Instant::now();
    let limit = s.options.duration;
    std::thread::scope(|scope| {
        let traffic = scope.spawn(|| traffic::rounds(world, s.exe, &stop, &tally));
        let ended: Result<()> = loop {
            let elapsed = started.elapsed();
            let tick = Duration::from_secs(elapsed.as_secs() + 1);
            if let Some(signal) = s.signals.wait(tick.saturating_sub(elapsed)) {
                screen.say(&format!("{signal}: stopping"));
                break Ok(());
            }
            if let Err(e) = agent.check_running() {
                break Err(e);
            }
            if traffic.is_finished() {
                break Err(anyhow!("the traffic stopped"));
            }
            let secs = started.elapsed().as_secs();
            let status = agent.status().map(|r| AgentView::new(&r));
            let snapshot = tally.lock().expect("tally lock").clone();
            screen.show(
                secs,
                datapath,
                &snapshot,
                status.as_ref().map_err(|e| format!("{e:#}")),
            );
            if limit.is_some_and(|limit| started.elapsed() >= limit) {
                break Ok(());
            }
        };
        stop.store(true, Ordering::Relaxed);
        // The traffic's own error says more than "the traffic stopped".
        traffic
            .join()
            .map_err(|_| anyhow!("the traffic thread panicked"))??;
        ended?;
        let view = AgentView::new(&agent.status().context("the agent's final status")?);
        let tally = tally.lock().expect("tally lock").clone();
        let elapsed = started.elapsed().as_secs();
        screen.show(elapsed, datapath, &tally, Ok(&view));
        Ok(Finished {
            elapsed,
            tally,
            agent: view,
        })
    })
}

/// Where the table goes: redrawn in place on a terminal, one line per
/// second otherwise.
struct Screen {
    tty: bool,
    /// Lines of the table drawn last, to move back over.
    drawn: usize,
    /// The line printed last (not on a terminal), not to repeat it.
    last: String,
}

impl Screen {
    fn new() -> Self {
        Self {
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            last: String::new(),
        }
    }

    /// A line of its own below the table; the next table is drawn anew
    /// below it.
    fn say(&mut self, text: &str) {
        println!("{text}");
        self.drawn = 0;
    }

    fn show(
        &mut self,
        elapsed: u64,
        datapath: &str,
        tally: &Tally,
        agent: Result<&AgentView, String>,
    ) {
        let agent = agent.as_deref().map_err(String::as_str);
        let mut out = std::io::stdout().lock();
        if self.tty {
            if self.drawn > 0 {
                // Up to the table's first line, and clear from there.
                let _ = write!(out, "\x1b[{}A\r\x1b[J", self.drawn);
            }
            let table = report::table(elapsed, datapath, tally, agent);
            self.drawn = table.lines().count();
            let _ = write!(out, "{table}");
        } else {
            let line = report::line(elapsed, datapath, tally, agent);
            if line != self.last {
                let _ = writeln!(out, "{line}");
                self.last = line;
            }
        }
        let _ = out.flush();
    }
}

/// The signal that asked the demo to stop; 0 while none has.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    // An atomic store is async-signal-safe.
    STOP_SIGNAL.store(signal, Ordering::Relaxed);
}

/// SIGINT, SIGTERM and SIGHUP, caught by a handler that only records
/// them; the main loop looks ([`Signals::wait`]). Caught signals return to
/// their default action in a child at `exec`, so the agent and the clients
/// handle signals as usual (a blocked mask, by contrast, would be
/// inherited).
struct Signals;

impl Signals {
    fn catch() -> Result<Self> {
        let action = SigAction::new(
            SigHandler::Handler(on_stop_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only stores to an atomic.
            unsafe { sigaction(signal, &action) }
                .with_context(|| format!("installing a {signal} handler"))?;
        }
        Ok(Self)
    }

    /// Waits up to `timeout` for one of the signals; the one that came.
    fn wait(&self, timeout: Duration) -> Option<Signal> {
        let deadline = Instant::now() + timeout;
        loop {
            let signal = STOP_SIGNAL.load(Ordering::Relaxed);
            if signal != 0 {
                return Signal::try_from(signal).ok();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

/// The demo's temporary directory, `<tmp>/enfdemo<pid>`: the agent's
/// config and log. Removed on drop unless kept (after a failure).
struct Files {
    dir: PathBuf,
    keep: bool,
}

impl Files {
    fn create(base: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(base);
        // A directory left by a failed demo that had this pid is reused.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir, keep: false })
    }

    fn config(&self) -> PathBuf {
        self.dir.join("enforcer.toml")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
        {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// The last lines of a file (the agent's log).
fn tail(path: &Path) -> String {
    const LINES: usize = 30;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}
