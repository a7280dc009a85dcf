//! The trap: the NFQUEUE consumer that gives a verdict to every packet the
//! datapath sends to user space.
//!
//! Both datapaths queue connection set-up packets to the same queue
//! numbers ([`queues::all`]) and honour one verdict contract: the
//! consumer accepts a packet by writing [`Kind::Authorised`] into the kind
//! sub-field of its mark (every other bit kept) and returning NF_REPEAT.
//! The packet then runs through the hook again, where the datapath's first
//! rule saves the kind into the connection mark, and the next accepts every
//! packet of a connection that carries it — so no later packet of the
//! connection reaches the queue. `tests/tests/kernel_facts.rs`
//! (`nfqueue_round_trip`) proves the mechanism on the real kernel.
//!
//! In this slice every trapped packet is accepted; the identity handshake
//! that will decide instead comes later. The consumer reads only headers
//! (a copy range of [`COPY_RANGE`] bytes) and logs each packet's 5-tuple
//! at debug level.
//!
//! One thread serves every queue through one netlink socket. It must be
//! started after the agent entered its network namespace: the socket binds
//! the queues of the namespace its creating thread is in.

mod kernel;
pub mod packet;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use enforcer_common::marks::{Kind, MarkLayout};
use serde::{Deserialize, Serialize};

use crate::datapath::queues;
use crate::policy::QueueSettings;

pub use kernel::{KernelQueueStats, read as read_kernel_stats};

/// Bytes of each packet copied to user space: the largest IPv4 header (60)
/// plus the largest TCP header (60) fit, and so do IPv6 with a short
/// extension header and TCP. The consumer needs headers only.
pub const COPY_RANGE: u16 = 128;

/// How long the consumer sleeps when no packet is waiting. The nfq socket
/// is non-blocking (`nfq` does not expose its descriptor, so it cannot be
/// polled or woken), which bounds both the stop latency and the extra
/// delay of a packet arriving on an idle queue by this.
const IDLE_WAIT: Duration = Duration::from_millis(1);

/// What the consumer counted, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrapStats {
    /// Packets received from every queue.
    pub received: u64,
    /// Verdicts sent back to the kernel.
    pub verdicts: u64,
    /// Verdicts the kernel refused (the packet stays queued until the
    /// socket closes).
    pub verdict_errors: u64,
    /// Failed receives (other than "nothing waiting").
    pub receive_errors: u64,
    /// Each bound queue, in queue order.
    pub queues: Vec<QueueStats>,
}

/// One queue's share of [`TrapStats`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    pub queue: u16,
    /// The range the queue belongs to (see [`queues::QueueRange::name`]).
    pub range: String,
    pub received: u64,
    pub verdicts: u64,
    pub verdict_errors: u64,
}

/// The consumer's counters, shared between its thread and `status`.
#[derive(Debug)]
pub struct TrapCounters {
    queues: Vec<QueueCounters>,
    receive_errors: AtomicU64,
}

#[derive(Debug)]
struct QueueCounters {
    queue: u16,
    range: &'static str,
    received: AtomicU64,
    verdicts: AtomicU64,
    verdict_errors: AtomicU64,
}

impl TrapCounters {
    /// Zeroed counters for every queue of the layout.
    pub(crate) fn new(settings: &QueueSettings) -> Self {
        let queues = queues::ranges(settings)
            .into_iter()
            .flat_map(|range| range.queues().map(move |queue| (queue, range.name)))
            .map(|(queue, range)| QueueCounters {
                queue,
                range,
                received: AtomicU64::new(0),
                verdicts: AtomicU64::new(0),
                verdict_errors: AtomicU64::new(0),
            })
            .collect();
        Self {
            queues,
            receive_errors: AtomicU64::new(0),
        }
    }

    /// The counters of `queue`; the queues are contiguous and sorted.
    fn of(&self, queue: u16) -> Option<&QueueCounters> {
        let first = self.queues.first()?.queue;
        self.queues.get(usize::from(queue.checked_sub(first)?))
    }

    /// A consistent-enough copy: each counter is read once, and totals are
    /// the sums of the per-queue values read.
    pub fn snapshot(&self) -> TrapStats {
        let queues: Vec<QueueStats> = self
            .queues
            .iter()
            .map(|q| QueueStats {
                queue: q.queue,
                range: q.range.to_owned(),
                received: q.received.load(Ordering::Relaxed),
                verdicts: q.verdicts.load(Ordering::Relaxed),
                verdict_errors: q.verdict_errors.load(Ordering::Relaxed),
            })
            .collect();
        TrapStats {
            received: queues.iter().map(|q| q.received).sum(),
            verdicts: queues.iter().map(|q| q.verdicts).sum(),
            verdict_errors: queues.iter().map(|q| q.verdict_errors).sum(),
            receive_errors: self.receive_errors.load(Ordering::Relaxed),
            queues,
        }
    }
}

/// The running consumer: one thread bound to every queue of the layout.
#[derive(Debug)]
pub struct TrapConsumer {
    counters: Arc<TrapCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TrapConsumer {
    /// Binds every queue of `settings` (with its maximum length and
    /// fail-open flag) on a new thread and starts giving verdicts. Returns
    /// once every queue is bound, or with the error of the first that
    /// could not be (e.g. another program holds it).
    pub fn start(settings: &QueueSettings, marks: MarkLayout) -> Result<Self> {
        let counters = Arc::new(TrapCounters::new(settings));
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = std::sync::mpsc::sync_channel(1);
        let settings = settings.clone();
        let thread = std::thread::Builder::new()
            .name("trap".into())
            .spawn({
                let (counters, stop) = (counters.clone(), stop.clone());
                move || match bind(&settings) {
                    Ok(queue) => {
                        bound_tx.send(Ok(())).ok();
                        serve(queue, marks, &counters, &stop);
                    }
                    Err(e) => {
                        bound_tx.send(Err(e)).ok();
                    }
                }
            })
            .context("spawning the trap thread")?;
        let bound = bound_rx
            .recv()
            .map_err(|_| anyhow!("the trap thread ended before binding its queues"))
            .and_then(|bound| bound);
        if let Err(e) = bound {
            // The thread has returned (the socket is closed); reap it.
            thread.join().ok();
            return Err(e);
        }
        Ok(Self {
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// The counters, for `status`; they stay readable after [`Self::stop`].
    pub fn counters(&self) -> Arc<TrapCounters> {
        self.counters.clone()
    }

    /// Stops the thread and closes the socket, which unbinds every queue.
    /// Returns within about a millisecond of the current packet's verdict.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the trap thread panicked");
        }
    }
}

/// Opens the netlink socket and binds every queue.
fn bind(settings: &QueueSettings) -> Result<nfq::Queue> {
    let mut queue = nfq::Queue::open().context("opening the NFQUEUE netlink socket")?;
    let numbers = queues::all(settings);
    for &n in &numbers {
        let configure = |queue: &mut nfq::Queue| -> std::io::Result<()> {
            queue.bind(n)?;
            queue.set_copy_range(n, COPY_RANGE)?;
            queue.set_queue_max_len(n, settings.queue_length)?;
            queue.set_fail_open(n, settings.fail_open)
        };
        configure(&mut queue).with_context(|| {
            format!("binding NFQUEUE {n} (is another agent or program bound to it?)")
        })?;
    }
    queue.set_nonblocking(true);
    let (first, last) = (numbers.first(), numbers.last());
    tracing::info!(
        queues = numbers.len(),
        first = ?first,
        last = ?last,
        max_len = settings.queue_length,
        fail_open = settings.fail_open,
        copy_range = COPY_RANGE,
        "trap bound its queues"
    );
    Ok(queue)
}

/// Gives every received packet its verdict until `stop` is set.
fn serve(mut queue: nfq::Queue, marks: MarkLayout, counters: &TrapCounters, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut msg = match queue.recv() {
            Ok(msg) => msg,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(IDLE_WAIT);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                counters.receive_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "receiving from NFQUEUE failed");
                // Do not spin on a persistent error.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let number = msg.get_queue_num();
        let counted = counters.of(number);
        if let Some(q) = counted {
            q.received.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(
            queue = number,
            mark = format_args!("{:#x}", msg.get_nfmark()),
            packet = %describe(msg.get_payload()),
            "trapped packet accepted"
        );
        msg.set_nfmark(marks.with_kind(msg.get_nfmark(), Kind::Authorised));
        msg.set_verdict(nfq::Verdict::Repeat);
        match queue.verdict(msg) {
            Ok(()) => {
                if let Some(q) = counted {
                    q.verdicts.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                if let Some(q) = counted {
                    q.verdict_errors.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(queue = number, error = %e, "sending a verdict failed");
            }
        }
    }
}

/// The packet's headers for the log, or why they could not be read.
fn describe(payload: &[u8]) -> String {
    match packet::parse(payload) {
        Ok(headers) => headers.to_string(),
        Err(e) => format!("unreadable ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::queue_settings as settings;

    #[test]
    fn counters_are_kept_per_queue() {
        let counters = TrapCounters::new(&settings(false, 2, 10));
        counters
            .of(12)
            .unwrap()
            .received
            .fetch_add(3, Ordering::Relaxed);
        counters
            .of(12)
            .unwrap()
            .verdicts
            .fetch_add(2, Ordering::Relaxed);
        counters
            .of(10)
            .unwrap()
            .received
            .fetch_add(1, Ordering::Relaxed);
        assert!(counters.of(9).is_none() && counters.of(14).is_none());
        let stats = counters.snapshot();
        assert_eq!((stats.received, stats.verdicts), (4, 2));
        let q12 = &stats.queues[2];
        assert_eq!(
            (q12.queue, q12.range.as_str(), q12.received),
            (12, "net", 3)
        );
    }

    #[test]
    fn unreadable_packets_are_described_not_refused() {
        assert_eq!(describe(&[]), "unreadable (empty packet)");
        assert!(describe(&[0x45, 0, 0]).starts_with("unreadable (IPv4 header truncated"));
    }
}
