//! cgroup v2 directories made for one test, and processes placed in them.
//!
//! A [`Cgroup`] is a fresh directory under the cgroup v2 mount; dropping
//! it kills whatever still runs inside (`cgroup.kill`) and removes it.
//! [`Cgroup::command_in`] starts a program inside a namespace *and* this
//! cgroup: the child joins both between fork and exec.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{netns::Netns, unique_name};

#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/enft…`.
    pub fn new(cgroup2: &Path) -> Result<Self> {
        let path = cgroup2.join(unique_name());
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An open directory handle, as cgroup attach calls want it.
    pub fn dir(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("opening cgroup {}", self.path.display()))
    }

    /// A command that will run inside `ns` and inside this cgroup.
    pub fn command_in(&self, ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let netns =
            File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
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
