//! Network namespaces and the veth pairs that join them.
//!
//! A [`Netns`] is created with `ip netns add` and deleted on drop, which
//! also removes every interface, route, rule and set that lives in it.
//! Code runs inside it on a thread of its own ([`Netns::run`],
//! [`Netns::spawn`]); commands run inside it through `setns(2)` in the
//! child before `exec` ([`Netns::command`]), which — unlike
//! `ip netns exec` — leaves `/sys/fs/cgroup` and `/sys/fs/bpf` visible.

use std::ffi::OsStr;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{TEST_PREFIX, unique_name};
use crate::policy::IpFamily;

/// Where `ip netns add` puts a named namespace.
const NETNS_DIR: &str = "/run/netns";

/// A network namespace that exists as long as this value does.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name under [`TEST_PREFIX`], its
    /// loopback up.
    pub fn new() -> Result<Self> {
        Self::named(unique_name(TEST_PREFIX))
    }

    /// Creates the namespace `name`, its loopback up; fails if it exists.
    pub fn named(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, for `setns(2)` and `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Self::path_of(&self.name)
    }

    /// The file a namespace called `name` has while it exists.
    pub fn path_of(name: &str) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(name)
    }

    /// Runs `ip -n <ns> ARGS…` and fails with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that will run inside this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let ns = self.open()?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setns(2), which is async-signal-safe; the file is kept
        // alive by the closure itself.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `f` on a new thread that has entered this namespace, and
    /// returns its result. Sockets `f` creates belong to the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = self.open()?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(&ns)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow!("thread inside netns {} panicked", self.name))?
        })
    }

    /// Spawns a long-lived thread inside this namespace (servers).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let ns = self.open()?;
        Ok(std::thread::spawn(move || {
            enter(&ns)?;
            Ok(f())
        }))
    }

    /// The namespace file, open.
    pub(super) fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening {}", self.path().display()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_ok(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: could not delete netns {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread into the network namespace behind `ns`.
fn enter(ns: &File) -> Result<()> {
    // SAFETY: a plain syscall on a file descriptor we own.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One end of a [`veth_pair`]: its namespace's view of it.
#[derive(Debug, Clone)]
pub struct VethEnd {
    pub ifname: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

impl VethEnd {
    /// This end's address in one family.
    pub fn ip(&self, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => self.v4,
            IpFamily::V6 => self.v6,
        }
    }
}

/// Joins two namespaces with a veth pair and addresses both ends:
/// `10.<net>.0.1/24` + `fd00:<net>::1/64` on `a`, `.2` / `::2` on `b`.
/// The pair is created inside `a` with its peer placed in `b`, so it never
/// exists in the root namespace; it dies with the namespaces. Interface
/// names only have to be unique inside their namespace: `veth<net>a` in
/// `a`, `veth<net>b` in `b` (a namespace name would not fit in the 15
/// bytes of an interface name).
pub fn veth_pair(a: &Netns, b: &Netns, net: u8) -> Result<(VethEnd, VethEnd)> {
    let (if_a, if_b) = (format!("veth{net}a"), format!("veth{net}b"));
    a.ip(&[
        "link",
        "add",
        &if_a,
        "type",
        "veth",
        "peer",
        "name",
        &if_b,
        "netns",
        b.name(),
    ])?;
    let end = |ns: &Netns, ifname: &str, host: u8| -> Result<VethEnd> {
        let v4 = format!("10.{net}.0.{host}");
        let v6 = format!("fd00:{net}::{host}");
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", ifname])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            ifname,
            "nodad",
        ])?;
        ns.ip(&["link", "set", ifname, "up"])?;
        Ok(VethEnd {
            ifname: ifname.to_string(),
            v4: v4.parse()?,
            v6: v6.parse()?,
        })
    };
    Ok((end(a, &if_a, 1)?, end(b, &if_b, 2)?))
}

/// Runs a command and fails with its stderr when it exits non-zero.
pub fn run_ok(cmd: &mut Command) -> Result<()> {
    output_ok(cmd).map(drop)
}

/// Runs a command, returning its output, failing when it exits non-zero.
pub fn output_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Two namespaces joined by a veth pair: the usual two-host world.
/// `a` is at `10.1.0.1` / `fd00:1::1`, `b` at `10.1.0.2` / `fd00:1::2`.
pub struct TwoHosts {
    pub a_end: VethEnd,
    pub b_end: VethEnd,
    // Declared last: dropped after anything a user hangs on the ends.
    pub a: Netns,
    pub b: Netns,
}

impl TwoHosts {
    /// Two namespaces with unique names under [`TEST_PREFIX`].
    pub fn new() -> Result<Self> {
        Self::join(Netns::new()?, Netns::new()?)
    }

    /// Joins `a` and `b` with a veth pair on `10.1.0.0/24`.
    pub fn join(a: Netns, b: Netns) -> Result<Self> {
        let (a_end, b_end) = veth_pair(&a, &b, 1)?;
        Ok(Self { a_end, b_end, a, b })
    }
}
