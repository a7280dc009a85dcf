//! The agent the demo runs: `enforcer run` as a child process of the same
//! binary, in the demo's host namespace, under an instance of its own.
//!
//! It runs in a process group of its own, so that Ctrl-C in the terminal
//! reaches only the demo, which then stops it in order. [`Agent::stop`]
//! sends SIGTERM (the agent removes its datapath state) and waits; an
//! agent that does not exit in time is killed and `enforcer cleanup` runs
//! for its instance. Dropping a running [`Agent`] stops it the same way.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::agent::InstanceName;
use crate::control::{self, Request, Response, StatusReport};
use crate::policy::{DatapathChoice, Keyword as _};
use crate::sandbox::netns::{Netns, output_ok};

/// How long the agent may take to answer its first `status`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long it may take to clean up and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// What the agent is started with.
pub struct Launch<'a> {
    /// This binary: `enforcer`, or a test crate's copy of its CLI.
    pub exe: &'a Path,
    pub config: &'a Path,
    pub netns: &'a Netns,
    pub instance: &'a InstanceName,
    pub datapath: DatapathChoice,
    /// Where its stdout and stderr go.
    pub log: &'a Path,
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    exe: PathBuf,
    netns: String,
    instance: InstanceName,
}

impl Agent {
    /// Starts the agent and waits until it answers `status`; returns that
    /// first report too.
    pub fn start(launch: &Launch) -> Result<(Self, StatusReport)> {
        let log = File::create(launch.log)
            .with_context(|| format!("creating {}", launch.log.display()))?;
        let mut cmd = Command::new(launch.exe);
        cmd.arg("run")
            .arg("--config")
            .arg(launch.config)
            .args(["--netns", launch.netns.name()])
            .args(["--instance", launch.instance.as_str()])
            .args(["--datapath", launch.datapath.as_str()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", launch.exe.display()))?;
        let mut agent = Self {
            child: Some(child),
            exe: launch.exe.to_owned(),
            netns: launch.netns.name().to_owned(),
            instance: launch.instance.clone(),
        };
        let report = agent.wait_ready()?;
        Ok((agent, report))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn wait_ready(&mut self) -> Result<StatusReport> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_running()?;
            match self.status() {
                Ok(report) => return Ok(report),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "the agent did not answer status within {START_TIMEOUT:?}"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Fails if the agent has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("the agent was stopped")?;
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited ({status})");
        }
        Ok(())
    }

    /// The agent's `status`, over its control socket.
    pub fn status(&self) -> Result<StatusReport> {
        let socket = self.instance.control_socket();
        match control::request(&socket, &Request::Status)? {
            Response::Status(report) => Ok(*report),
            Response::Error { message } => bail!("the agent answered status with: {message}"),
        }
    }

    /// Stops the agent with SIGTERM and waits for it. An agent that does
    /// not exit within [`STOP_TIMEOUT`] is killed; then, as after an agent
    /// that exited by itself or failed, `enforcer cleanup` removes what it
    /// may have left.
    pub fn stop(&mut self) -> Result<Stopped> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent was stopped already");
        };
        let exited = child.try_wait()?;
        let stopped = match exited {
            Some(_) => exited,
            None => {
                let pid = Pid::from_raw(i32::try_from(child.id()).context("agent pid")?);
                // ESRCH: it exited just now; the wait below collects it.
                let _ = kill(pid, Signal::SIGTERM);
                wait_until(&mut child, Instant::now() + STOP_TIMEOUT)?
            }
        };
        match stopped {
            Some(status) if exited.is_none() && status.success() => Ok(Stopped {
                status,
                cleaned_up: false,
            }),
            Some(status) => {
                self.cleanup()
                    .with_context(|| format!("after the agent exited ({status})"))?;
                Ok(Stopped {
                    status,
                    cleaned_up: true,
                })
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                self.cleanup().context("after killing the agent")?;
                bail!(
                    "the agent did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it and \
                     ran `enforcer cleanup`"
                )
            }
        }
    }

    /// `enforcer cleanup` for the agent's instance, in its namespace.
    fn cleanup(&self) -> Result<()> {
        output_ok(
            Command::new(&self.exe)
                .args(["cleanup", "--instance", self.instance.as_str()])
                .args(["--netns", &self.netns]),
        )
        .map(drop)
        .context("running `enforcer cleanup`")
    }
}

/// How the agent ended.
#[derive(Debug, Clone, Copy)]
pub struct Stopped {
    pub status: ExitStatus,
    /// Whether `enforcer cleanup` ran after it (it had exited by itself,
    /// or failed).
    pub cleaned_up: bool,
}

/// Waits for `child` to exit until `deadline`; `None` if it still runs.
fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("enforcer demo: stopping the agent: {e:#}");
        }
    }
}
