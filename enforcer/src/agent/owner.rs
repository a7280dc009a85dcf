//! The one thread that owns the datapath.
//!
//! The [`Datapath`](crate::datapath::Datapath) trait is synchronous and its
//! operations must never overlap, so the [`Enforcement`] lives on a thread
//! of its own and everything else sends it jobs (mini-redis's "one owner"
//! shape): start-up, reloads, `status` and the final cleanup queue up and
//! run one at a time, and async code awaits their results without
//! blocking a runtime thread.
//!
//! A job that panics (a datapath bug, or an operation not written yet) is
//! caught and reported as an error, and the thread goes on: the agent can
//! still clean up.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;

use anyhow::{Result, anyhow};
use tokio::sync::oneshot;

use super::enforcement::Enforcement;

type Job = Box<dyn FnOnce(&mut Enforcement) + Send>;

/// A handle to the owner thread; the thread ends when the handle is
/// dropped and its queued jobs are done.
#[derive(Debug)]
pub struct DatapathOwner {
    jobs: mpsc::Sender<Job>,
}

impl DatapathOwner {
    pub fn spawn(mut enforcement: Enforcement) -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("datapath".into())
            .spawn(move || {
                for job in queue {
                    job(&mut enforcement);
                }
            })
            .map_err(|e| anyhow!("spawning the datapath thread: {e}"))?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the owner thread after every job queued before it, and
    /// returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Enforcement) -> T + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move |enforcement| {
            let outcome = catch_unwind(AssertUnwindSafe(|| f(enforcement)));
            done.send(outcome).ok();
        });
        self.jobs
            .send(job)
            .map_err(|_| anyhow!("the datapath thread has ended"))?;
        match result.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic)) => Err(anyhow!(
                "the datapath operation panicked: {}",
                panic_message(panic.as_ref())
            )),
            Err(_) => Err(anyhow!("the datapath thread ended during the operation")),
        }
    }
}

/// The message of a caught panic (`panic!` with a literal or a format).
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::super::enforcement::fake::FakeDatapath;
    use super::*;
    use crate::policy::Configuration;

    #[tokio::test]
    async fn jobs_run_in_order_and_a_panic_is_an_error() {
        let config = Configuration::from_toml_str("mode = \"sidecar\"").unwrap();
        let fake = FakeDatapath::default();
        let owner =
            DatapathOwner::spawn(Enforcement::new(Box::new(fake.clone()), &config)).unwrap();
        owner
            .call(move |e| e.start(&config))
            .await
            .unwrap()
            .unwrap();
        let err = owner
            .call(|_| -> () { panic!("not yet implemented") })
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the datapath operation panicked: not yet implemented"
        );
        // The thread survived the panic.
        owner.call(|e| e.cleanup()).await.unwrap().unwrap();
        assert_eq!(fake.calls(), ["run", "networks 0", "cleanup"]);
    }
}
