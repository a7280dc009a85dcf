//! The demo's traffic: rounds of one connection of every [`Kind`], each
//! made by a client process of its own (`enforcer demo-client ADDR`,
//! placed in the host namespace and, for the PU's kinds, in the PU's
//! cgroup — cgroup membership is per process), and the tally of how
//! they ended.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::world::{Kind, World};
use crate::sandbox::traffic::{Outcome, run_client, tcp_exchange};

/// How often a round starts, at most (a round whose connection is
/// blocked by a dropped SYN takes longer).
const ROUND: Duration = Duration::from_secs(1);

/// `enforcer demo-client ADDR`: one TCP exchange; the exit code is the
/// [`Outcome`].
pub fn client(to: SocketAddr) -> ExitCode {
    let outcome = tcp_exchange(to, b"enforcer demo\n");
    if let Outcome::Failed(why) = &outcome {
        eprintln!("{why}");
    }
    ExitCode::from(outcome.exit_code())
}

/// How the connections of one kind ended so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindTally {
    pub sent: u64,
    /// Connected and got their data echoed back.
    pub connected: u64,
    /// Refused (EPERM) or timed out.
    pub blocked: u64,
    /// Anything else.
    pub failed: u64,
    /// Why the last failed one failed.
    pub last_failure: Option<String>,
}

impl KindTally {
    fn record(&mut self, outcome: Outcome) {
        self.sent += 1;
        match outcome {
            Outcome::Exchanged => self.connected += 1,
            Outcome::Refused | Outcome::TimedOut => self.blocked += 1,
            Outcome::Failed(why) => {
                self.failed += 1;
                self.last_failure = Some(why);
            }
        }
    }
}

/// Every kind's tally, in [`Kind::ALL`] order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally(pub [KindTally; Kind::ALL.len()]);

impl Tally {
    pub fn of(&self, kind: Kind) -> &KindTally {
        &self.0[index(kind)]
    }

    fn record(&mut self, kind: Kind, outcome: Outcome) {
        self.0[index(kind)].record(outcome);
    }
}

fn index(kind: Kind) -> usize {
    Kind::ALL
        .iter()
        .position(|k| *k == kind)
        .expect("every kind is in Kind::ALL")
}

/// Makes rounds until `stop` is set (checked between rounds, so every kind
/// is sent equally often), recording each outcome in `tally`. `exe` is
/// this binary. Fails when a client cannot be started.
pub fn rounds(world: &World, exe: &Path, stop: &AtomicBool, tally: &Mutex<Tally>) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        for kind in Kind::ALL {
            let mut cmd = world.client(kind, exe)?;
            cmd.arg("demo-client")
                .arg(kind.peer().to_string())
                // Ctrl-C in the terminal is the demo's to handle.
                .process_group(0);
            let outcome = run_client(cmd)?;
            tally.lock().expect("tally lock").record(kind, outcome);
        }
        while !stop.load(Ordering::Relaxed) && started.elapsed() < ROUND {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_tallied_per_kind() {
        let mut tally = Tally::default();
        tally.record(Kind::Target, Outcome::Exchanged);
        tally.record(Kind::NoAcl, Outcome::Refused);
        tally.record(Kind::NoAcl, Outcome::TimedOut);
        tally.record(Kind::NoAcl, Outcome::Failed("reset".into()));
        assert_eq!(
            *tally.of(Kind::Target),
            KindTally {
                sent: 1,
                connected: 1,
                ..KindTally::default()
            }
        );
        let no_acl = tally.of(Kind::NoAcl);
        assert_eq!((no_acl.sent, no_acl.blocked, no_acl.failed), (3, 2, 1));
        assert_eq!(no_acl.last_failure.as_deref(), Some("reset"));
        assert_eq!(tally.of(Kind::Excluded).sent, 0);
    }
}
