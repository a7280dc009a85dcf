//! The agent under test: the release `enforcer run` as a child process in
//! the benchmark's host namespace, with a config and an instance of its
//! own, and what the benchmark reads from it — when it is ready, when a
//! reload is applied, its memory and the kernel memory it holds.
//!
//! Readiness and reloads are timed from the agent's log ("enforcer
//! ready", "reload applied"), which it writes the moment the work is
//! done, and confirmed through the control socket (the PUs in force,
//! `reloads.applied`). Polling `status` for the timing itself would add a
//! status round trip to every figure — and on the iptables datapath a
//! status reads the counters with `iptables-save`, which at thousands of
//! PUs takes seconds (and may take longer than `enforcer status`'s own
//! 10 s timeout, hence the client here with a longer one).
//!
//! Dropping an [`Agent`] stops it with SIGTERM (it removes everything it
//! made) and, if it does not exit in time, kills it and runs
//! `enforcer cleanup` for its instance; an agent dropped before it was
//! ready (an error or Ctrl-C during start-up) is killed and cleaned up at
//! once.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use enforcer::agent::InstanceName;
use enforcer::control::{Request, Response, StatusReport};
use enforcer::sandbox::netns::{Netns, output_ok};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::plan::Mode;
use super::progress::interrupted;

/// How long a reload may take.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a `status` may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the agent may take to clean up and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the log is looked at while waiting.
const LOG_POLL: Duration = Duration::from_millis(1);
/// The agent's open-files limit where the runner may raise it that far
/// (`fs.nr_open`'s default; CAP_SYS_RESOURCE), as a service unit with
/// `LimitNOFILE=infinity` would run it; else the soft limit is raised to
/// the hard one. The eBPF agent keeps descriptors per PU, so this limit
/// caps the PU count it reaches (the report shows both).
const NOFILE: libc::rlim_t = 1 << 20;

/// What an agent is started with.
pub struct Launch<'a> {
    pub exe: &'a Path,
    pub netns: &'a Netns,
    pub mode: Mode,
    /// Where its config and log go.
    pub dir: &'a Path,
    pub instance: &'a InstanceName,
}

/// How a start ended.
pub enum Started {
    Ready(Agent),
    /// Not ready within the budget; the agent was killed and cleaned up.
    /// `progress` says how far it got, when that could be read.
    TimedOut {
        after: Duration,
        progress: Option<String>,
    },
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    exe: PathBuf,
    instance: InstanceName,
    netns: String,
    config: PathBuf,
    log: LogTail,
    /// Reloads it logged as applied.
    reloads: u64,
    /// Spawn to "enforcer ready".
    pub startup: Duration,
}

impl Agent {
    /// Starts the agent with `config` (TOML text) and waits until it is
    /// ready, at most `budget`.
    pub fn start(launch: &Launch, config: &str, budget: Duration) -> Result<Started> {
        let config_path = launch.dir.join(format!("{}.toml", launch.instance));
        let log_path = launch.dir.join(format!("{}.log", launch.instance));
        std::fs::write(&config_path, config).context("writing the agent config")?;
        let log = File::create(&log_path)?;
        let datapath = match launch.mode {
            Mode::Iptables => "iptables",
            Mode::Ebpf => "ebpf",
            Mode::Bare => bail!("the bare kernel runs no agent"),
        };
        let mut cmd = Command::new(launch.exe);
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(["--netns", launch.netns.name()])
            .args(["--instance", launch.instance.as_str()])
            .args(["--datapath", datapath])
            // Info: the lines timed here, without the trap's per-packet
            // debug lines.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            // Ctrl-C reaches the runner only; it stops the agent in order.
            .process_group(0);
        // SAFETY: runs in the forked child before exec; getrlimit(2) and
        // setrlimit(2) are async-signal-safe and nothing here allocates.
        unsafe {
            cmd.pre_exec(|| {
                let wanted = libc::rlimit {
                    rlim_cur: NOFILE,
                    rlim_max: NOFILE,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                        limit.rlim_cur = limit.rlim_max;
                        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    }
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", launch.exe.display()))?;
        let mut agent = Self {
            child: Some(child),
            exe: launch.exe.to_owned(),
            instance: launch.instance.clone(),
            netns: launch.netns.name().to_owned(),
            config: config_path,
            log: LogTail::open(&log_path)?,
            reloads: 0,
            startup: Duration::ZERO,
        };
        match agent.wait_for(&["enforcer ready"], &[], started + budget)? {
            Some(_) => {
                agent.startup = started.elapsed();
                Ok(Started::Ready(agent))
            }
            None => {
                let progress = agent.progress(launch);
                agent.kill_and_clean();
                Ok(Started::TimedOut {
                    after: started.elapsed(),
                    progress,
                })
            }
        }
    }

    /// The agent's `status`, and how long it took to answer.
    pub fn status(&self) -> Result<(StatusReport, Duration)> {
        let path = self.instance.control_socket();
        let sent = Instant::now();
        let mut stream = std::os::unix::net::UnixStream::connect(&path)
            .with_context(|| format!("connecting {}", path.display()))?;
        stream.set_read_timeout(Some(STATUS_TIMEOUT))?;
        stream.set_write_timeout(Some(STATUS_TIMEOUT))?;
        let mut request = serde_json::to_string(&Request::Status)?;
        request.push('\n');
        stream.write_all(request.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .with_context(|| {
                format!("waiting for the agent's status (up to {STATUS_TIMEOUT:?})")
            })?;
        let took = sent.elapsed();
        match serde_json::from_str(&answer).context("reading the agent's status")? {
            Response::Status(report) => Ok((*report, took)),
            Response::Error { message } => bail!("the agent answered: {message}"),
        }
    }

    /// Replaces the config and sends SIGHUP; returns the time from the
    /// signal to the reload applied.
    pub fn reload(&mut self, config: &str) -> Result<Duration> {
        std::fs::write(&self.config, config).context("writing the agent config")?;
        let sent = Instant::now();
        self.signal(Signal::SIGHUP)?;
        let outcome = self.wait_for(
            &["reload applied"],
            &["reload refused", "reload failed", "reload: nothing changed"],
            sent + RELOAD_TIMEOUT,
        )?;
        let took = sent.elapsed();
        if outcome.is_none() {
            bail!("no reload outcome within {RELOAD_TIMEOUT:?}");
        }
        self.reloads += 1;
        Ok(took)
    }

    /// Checks that `status` counts every reload the log said was applied.
    pub fn confirm_reloads(&self) -> Result<()> {
        let applied = self.status()?.0.reloads.applied;
        if applied != self.reloads {
            bail!(
                "status counts {applied} reloads applied, the log {}",
                self.reloads
            );
        }
        Ok(())
    }

    /// VmRSS of the agent process.
    pub fn rss_bytes(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/PID/status")?;
        Ok(kib * 1024)
    }

    /// The agent's open-files limit.
    pub fn open_files_limit(&self) -> Result<u64> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid()?))?;
        limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no open-files limit in /proc/PID/limits")
    }

    /// The descriptors the agent holds open.
    pub fn open_files(&self) -> Result<u64> {
        let dir = format!("/proc/{}/fd", self.pid()?);
        Ok(std::fs::read_dir(&dir)
            .with_context(|| format!("reading {dir}"))?
            .count() as u64)
    }

    /// The memlock the kernel charges for the agent's BPF maps: the sum
    /// over its map descriptors (`map_id` lines in fdinfo), each map once.
    pub fn map_memlock(&self) -> Result<u64> {
        let dir = format!("/proc/{}/fdinfo", self.pid()?);
        let mut seen = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let Ok(text) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
                seen.insert(id, memlock);
            }
        }
        Ok(seen.values().sum())
    }

    /// SIGTERM and wait: the agent removes what it made. Returns how long
    /// that took.
    pub fn stop(mut self) -> Result<Duration> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<Duration> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent is not running");
        };
        let sent = Instant::now();
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = sent + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!(
                        "the agent exited with {status} on SIGTERM: {}",
                        self.log.last_error()
                    );
                }
                return Ok(sent.elapsed());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.cleanup();
                bail!("the agent did not exit within {STOP_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pid(&self) -> Result<u32> {
        Ok(self
            .child
            .as_ref()
            .context("the agent is not running")?
            .id())
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid()? as i32), signal)?;
        Ok(())
    }

    /// Waits for a log line containing one of `good` (returned) or `bad`
    /// (an error quoting it); `None` at `deadline`. Fails if the agent
    /// exits or the run is interrupted.
    fn wait_for(
        &mut self,
        good: &[&str],
        bad: &[&str],
        deadline: Instant,
    ) -> Result<Option<String>> {
        loop {
            for line in self.log.new_lines()? {
                if good.iter().any(|g| line.contains(g)) {
                    return Ok(Some(line));
                }
                if bad.iter().any(|b| line.contains(b)) {
                    bail!("the agent logged: {line}");
                }
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("the agent exited ({status}): {}", self.log.last_error());
            }
            interrupted()?;
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(LOG_POLL);
        }
    }

    /// How far a start got: PUs with a process hook (iptables) or PUs the
    /// eBPF datapath logged as configured.
    fn progress(&self, launch: &Launch) -> Option<String> {
        match launch.mode {
            Mode::Ebpf => {
                let log = std::fs::read_to_string(&self.log.path).ok()?;
                Some(format!(
                    "{} PUs configured",
                    log.matches("PU configured").count()
                ))
            }
            Mode::Iptables => {
                let mut cmd = launch.netns.command("iptables").ok()?;
                cmd.args(["-t", "mangle", "-S", "TRI-Pid-App"]);
                let out = output_ok(&mut cmd).ok()?;
                let hooks = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A"))
                    .count();
                Some(format!("{hooks} PUs hooked"))
            }
            Mode::Bare => None,
        }
    }

    fn kill_and_clean(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cleanup();
    }

    /// `enforcer cleanup` for this instance in its namespace.
    fn cleanup(&self) {
        let mut cmd = Command::new(&self.exe);
        cmd.args(["cleanup", "--instance", self.instance.as_str()])
            .args(["--netns", &self.netns]);
        if let Err(e) = output_ok(&mut cmd) {
            eprintln!("warning: {e:#}");
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        // An agent still starting handles SIGTERM only once it is up,
        // which at scale can take minutes: kill it and clean up instead.
        if self.startup.is_zero() {
            self.kill_and_clean();
        } else if let Err(e) = self.stop_inner() {
            eprintln!("warning: stopping the agent: {e:#}");
        }
    }
}

/// The agent's log, read as it grows.
struct LogTail {
    path: PathBuf,
    file: File,
    /// A line not finished yet.
    partial: String,
}

impl LogTail {
    fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: File::open(path).with_context(|| format!("opening {}", path.display()))?,
            partial: String::new(),
        })
    }

    /// The complete lines written since the last call.
    fn new_lines(&mut self) -> Result<Vec<String>> {
        let mut bytes = Vec::new();
        self.file.read_to_end(&mut bytes)?;
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        Ok(done.lines().map(str::to_owned).collect())
    }

    /// The message of the last ERROR line of the log (or its last line),
    /// for an error message.
    fn last_error(&self) -> String {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) => return format!("(log unreadable: {e})"),
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let line = lines
            .iter()
            .rev()
            .find(|l| l.contains("ERROR"))
            .or(lines.last())
            .copied()
            .unwrap_or("(the log is empty)");
        // Drop the timestamp, level and target: `… ERROR enforcer::cli: msg`.
        line.split_once(": ")
            .map_or(line, |(_, msg)| msg)
            .to_owned()
    }
}
