//! The real agent, run by a test: `agent run` (the `enforcer` CLI built
//! into this crate as the `agent` binary) inside a test namespace, with a
//! config file and an instance name of the test's own.
//!
//! Dropping an [`Agent`] stops it with SIGTERM (the agent then cleans up),
//! waits for it, and falls back to SIGKILL plus `agent cleanup` if it does
//! not exit in time — so a failing test still leaves nothing behind.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::{netfilter::Backend, netns::Netns, unique_name};

/// Which datapath a test runs the agent with. Unless a variant names the
/// iptables flavour, the agent detects it (`auto`), which in a fresh
/// namespace — no rule in either flavour — is nf_tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datapath {
    Ebpf,
    Iptables,
    /// `--datapath auto` with `bpf(2)` denied by seccomp: the agent must
    /// fall back to iptables and say why.
    AutoWithoutBpf,
    /// The iptables datapath with `--iptables-backend legacy`.
    IptablesLegacy,
    /// The eBPF datapath with its fixed rules through the legacy flavour.
    EbpfLegacy,
}

impl Datapath {
    /// The `--datapath` argument.
    pub fn arg(self) -> &'static str {
        match self {
            Datapath::Ebpf | Datapath::EbpfLegacy => "ebpf",
            Datapath::Iptables | Datapath::IptablesLegacy => "iptables",
            Datapath::AutoWithoutBpf => "auto",
        }
    }

    /// Every `run` argument that selects this way of running.
    pub fn args(self) -> Vec<&'static str> {
        let mut args = vec!["--datapath", self.arg()];
        if self.backend() == Backend::Legacy {
            args.extend(["--iptables-backend", "legacy"]);
        }
        args
    }

    /// The iptables flavour the agent's rules go through.
    pub fn backend(self) -> Backend {
        match self {
            Datapath::IptablesLegacy | Datapath::EbpfLegacy => Backend::Legacy,
            Datapath::Ebpf | Datapath::Iptables | Datapath::AutoWithoutBpf => Backend::Nft,
        }
    }

    /// The datapath `status` must report.
    pub fn expected(self) -> &'static str {
        match self {
            Datapath::Ebpf | Datapath::EbpfLegacy => "ebpf",
            Datapath::Iptables | Datapath::AutoWithoutBpf | Datapath::IptablesLegacy => "iptables",
        }
    }

    /// Adjusts the agent's command for this way of running.
    pub fn prepare(self, cmd: &mut Command) {
        if self == Datapath::AutoWithoutBpf {
            crate::seccomp::deny_bpf(cmd);
        }
    }
}

/// What became of the agent's SIGHUP reloads so far (`status`'s
/// `reloads`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloads {
    pub applied: u64,
    pub refused: u64,
    pub failed: u64,
    /// Why the last refused or failed reload was.
    pub last_error: Option<String>,
}

impl Reloads {
    /// Reads `reloads` of a `status --json` answer.
    pub fn from_status(status: &serde_json::Value) -> Result<Self> {
        let reloads = &status["reloads"];
        let count = |key: &str| {
            reloads[key]
                .as_u64()
                .with_context(|| format!("status reloads.{key} in {status:#}"))
        };
        Ok(Self {
            applied: count("applied")?,
            refused: count("refused")?,
            failed: count("failed")?,
            last_error: reloads["last_error"].as_str().map(str::to_owned),
        })
    }

    /// Every reload with an outcome.
    pub fn total(&self) -> u64 {
        self.applied + self.refused + self.failed
    }
}

/// One thread of the agent, as `/proc/<pid>/task/<tid>/stat` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadState {
    pub tid: i32,
    pub name: String,
    /// `R`, `S`, `D`, `T` (stopped), ...
    pub state: char,
}

/// A running agent.
pub struct Agent {
    bin: PathBuf,
    instance: String,
    netns: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

impl Agent {
    /// Starts `bin run` in `ns` with `config` (TOML text) and waits until
    /// it answers `status`. `extra` goes on the command line.
    pub fn start(bin: &str, ns: &Netns, datapath: Datapath, config: &str) -> Result<Self> {
        Self::start_with(bin, ns, None, &datapath.args(), config, |cmd| {
            datapath.prepare(cmd)
        })
    }

    /// Like [`Agent::start`], as a given instance (an agent restarting
    /// after a crash takes over its own instance's state), with arbitrary
    /// `run` arguments and a hook to adjust the command (e.g. a seccomp
    /// filter before exec).
    pub fn start_with(
        bin: &str,
        ns: &Netns,
        instance: Option<&str>,
        args: &[&str],
        config: &str,
        adjust: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        let instance = instance.map_or_else(unique_name, str::to_string);
        let dir = std::env::temp_dir();
        let tag = unique_name();
        let config_path = dir.join(format!("{tag}.toml"));
        let log = dir.join(format!("{tag}.log"));
        std::fs::write(&config_path, config).context("writing the agent config")?;
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--config"])
            .arg(&config_path)
            .args(["--netns", ns.name(), "--instance", &instance])
            .args(args)
            .env("RUST_LOG", "info,enforcer=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log)?,
            ));
        adjust(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
        let mut agent = Self {
            bin: bin.into(),
            instance,
            netns: ns.name().to_string(),
            config: config_path,
            log,
            child: Some(child),
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the agent exited during start-up ({status}):\n{}",
                    self.log()
                );
            }
            if self.status().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not answer status within {START_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `agent status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = Command::new(&self.bin)
            .args(["status", "--json", "--instance", &self.instance])
            .output()
            .context("running agent status")?;
        if !out.status.success() {
            bail!(
                "agent status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing status --json")
    }

    /// The agent's reload counters, from `status`.
    pub fn reloads(&self) -> Result<Reloads> {
        let status = self.status()?;
        Reloads::from_status(&status)
    }

    /// Replaces the config file and sends SIGHUP; waits until `status`
    /// counts one more reload outcome (applied, refused or failed). The
    /// agent updates the counters once the reload is over, so whatever it
    /// applied is in force when this returns.
    pub fn reload(&self, config: &str) -> Result<()> {
        let before = self.reloads()?.total();
        std::fs::write(&self.config, config)?;
        self.signal(Signal::SIGHUP)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // A status that fails (the agent busy or gone) is retried until
            // the deadline; its error goes into the timeout's message.
            let last = self.reloads();
            if let Ok(now) = &last
                && now.total() > before
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "status did not count the reload within {START_TIMEOUT:?} \
                     (outcomes before: {before}, last status: {last:?}):\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        nix::sys::signal::kill(Pid::from_raw(self.pid()?), signal)?;
        Ok(())
    }

    /// The agent's process id (the `agent` binary itself: it enters its
    /// namespace in-process, no wrapper runs in between).
    pub fn pid(&self) -> Result<i32> {
        let child = self.child.as_ref().context("the agent is not running")?;
        Ok(child.id() as i32)
    }

    /// SIGSTOP, and waits until the kernel reports *every* thread of the
    /// agent stopped (`T` in `/proc/<pid>/task/*/stat`).
    ///
    /// `kill(2)` returns before the stop happens: a process-directed
    /// SIGSTOP wakes one thread (usually the main one), and only when that
    /// thread runs does it put the others into the group stop. Until then
    /// the trap thread goes on reading and giving verdicts — on a loaded
    /// machine for milliseconds, long enough for traffic sent "while
    /// frozen" to be served.
    pub fn freeze(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let threads = self.threads()?;
            if !threads.is_empty() && threads.iter().all(|t| t.state == 'T') {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent did not stop within {START_TIMEOUT:?} of SIGSTOP: {threads:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Every thread of the agent with its name and scheduler state, from
    /// `/proc/<pid>/task`.
    pub fn threads(&self) -> Result<Vec<ThreadState>> {
        let dir = format!("/proc/{}/task", self.pid()?);
        let mut threads = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
            let path = entry?.path();
            // A thread may end between the listing and the read.
            let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
                continue;
            };
            // "tid (comm) S ...": the name may hold spaces and parentheses,
            // the state follows the last ')'.
            let (head, tail) = stat
                .rsplit_once(')')
                .with_context(|| format!("parsing {}: {stat:?}", path.display()))?;
            let (tid, name) = head
                .split_once(" (")
                .with_context(|| format!("parsing {}: {stat:?}", path.display()))?;
            let state = tail
                .trim_start()
                .chars()
                .next()
                .with_context(|| format!("parsing {}: {stat:?}", path.display()))?;
            threads.push(ThreadState {
                tid: tid.parse()?,
                name: name.to_string(),
                state,
            });
        }
        Ok(threads)
    }

    /// Sends `signal` and waits for the agent to exit; returns its exit
    /// status.
    pub fn stop_with(&mut self, signal: Signal) -> Result<std::process::ExitStatus> {
        self.signal(signal)?;
        let mut child = self.child.take().context("the agent is not running")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the agent did not exit within {STOP_TIMEOUT:?} of {signal}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `agent cleanup` for this instance in its namespace.
    pub fn cleanup(&self) -> Result<()> {
        let out = Command::new(&self.bin)
            .args([
                "cleanup",
                "--instance",
                &self.instance,
                "--netns",
                &self.netns,
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "agent cleanup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() && self.stop_with(Signal::SIGTERM).is_err() {
            let _ = self.cleanup();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("--- agent log ({}) ---\n{}", self.instance, self.log());
            let _ = std::fs::remove_file(&self.log);
        }
        let _ = std::fs::remove_file(&self.config);
    }
}
