//! cgroup v2 directories, and processes started in them.
//!
//! A [`Cgroup`] is a fresh directory directly under the cgroup v2 mount
//! (never the root cgroup itself), or below another one
//! ([`Cgroup::child`]); dropping it kills whatever still runs inside
//! (`cgroup.kill`, or each process of `cgroup.procs` on a cgroup v1
//! hierarchy, which has no `cgroup.kill`) and removes it. [`Cgroup::command_in`] starts a
//! program inside a network namespace *and* this cgroup: the child joins
//! both between fork and exec, so cgroup membership is its own.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::netns::Netns;
use super::{TEST_PREFIX, unique_name};

#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2>/<unique name under TEST_PREFIX>`.
    pub fn new(cgroup2: &Path) -> Result<Self> {
        Self::named(cgroup2, &unique_name(TEST_PREFIX))
    }

    /// Creates `<cgroup2>/<name>`; fails if it exists. `name` is one path
    /// component, so the cgroup is a child of the root, never the root.
    pub fn named(cgroup2: &Path, name: &str) -> Result<Self> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            bail!("{name:?} is not a cgroup directory name");
        }
        let path = cgroup2.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// Creates `<this cgroup>/<name>`, a cgroup below this one. Drop it
    /// before this one (a cgroup with children cannot be removed).
    pub fn child(&self, name: &str) -> Result<Self> {
        Self::named(&self.path, name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An open directory handle, as cgroup attach calls want it.
    pub fn dir(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("opening cgroup {}", self.path.display()))
    }

    /// A command that will run inside `ns` and inside this cgroup.
    pub fn command_in(&self, ns: &Netns, program: impl AsRef<OsStr>) -> Result<Command> {
        let netns = ns.open()?;
        let procs_path = self.path.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .with_context(|| format!("opening {}", procs_path.display()))?;
        let mut cmd = Command::new(program);
        // SAFETY: runs in the forked child before exec; setns(2) and
        // write(2) are async-signal-safe and nothing here allocates. Writing
        // "0" to cgroup.procs moves the writing process itself.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(mut kill) = OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.kill"))
        {
            let _ = kill.write_all(b"1");
        } else if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Killed processes leave the cgroup asynchronously: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    eprintln!(
                        "warning: could not remove cgroup {}: {e}",
                        self.path.display()
                    );
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
