//! The control socket: how `enforcer status` (and tests) ask a running
//! agent what it is doing.
//!
//! A Unix stream socket, by default `/run/enforcer/<instance>.sock`.
//! Filesystem sockets are not scoped to a network namespace, so a client
//! in the host's namespace reaches an agent running inside a test
//! namespace. The protocol is newline-delimited JSON: the client writes
//! one [`Request`] per line, the agent answers each with one [`Response`]
//! line, in order, on the same connection.
//!
//! ```text
//! → {"request":"status"}
//! ← {"status":{"instance":"enforcer","pid":4242,…}}
//! ← {"error":{"message":"…"}}            (a request it could not serve)
//! ```
//!
//! The field names of [`StatusReport`] are a stable interface: tests and
//! scripts parse `enforcer status --json`, which prints it as is.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::sys::stat::{Mode, umask};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

use crate::datapath::iptables::backend::BackendChoice;
use crate::datapath::probe::CgroupChoice;
use crate::datapath::{Counters, DatapathKind};
use crate::trap::{KernelQueueStats, TrapStats};

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Everything `enforcer status` shows.
    Status,
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusReport>),
    /// The request was not understood or could not be served.
    Error {
        message: String,
    },
}

/// What a running agent reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The `--instance` name.
    pub instance: String,
    pub pid: u32,
    /// The config file it loads (and re-reads on SIGHUP).
    pub config: String,
    /// This socket.
    pub control: String,
    pub datapath: DatapathStatus,
    /// `local-server`, `remote-container` or `sidecar`.
    pub mode: String,
    pub uptime_secs: u64,
    /// The PUs in force, in config order.
    pub pus: Vec<PuStatus>,
    /// The datapath's counters; `null` when they could not be read (the
    /// reason is in `problems`).
    pub counters: Option<Counters>,
    /// The trap consumer's own counts.
    pub trap: TrapStats,
    /// The kernel's view of the queues bound in the agent's namespace.
    pub kernel_queues: Vec<KernelQueueStats>,
    pub reloads: ReloadStats,
    /// What could not be gathered for this report, one sentence each.
    pub problems: Vec<String>,
}

/// The datapath in use and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathStatus {
    pub kind: DatapathKind,
    pub reason: String,
    /// The iptables flavour both datapaths' netfilter rules go through,
    /// and why.
    pub iptables: BackendChoice,
    /// Which cgroups identify linux-process PUs (cgroup v2 or net_cls
    /// v1), where, and why.
    pub cgroups: CgroupChoice,
}

/// One PU in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PuStatus {
    pub id: String,
    /// The config spelling: `linux-process`, `uid`, …
    pub kind: String,
    /// The version its policy is installed under (0 or 1; flips on update).
    pub version: u8,
    /// The listening ports its config lists: `80/tcp`, `8000:8080/tcp`.
    #[serde(default)]
    pub config_ports: Vec<String>,
    /// The ports port discovery found it listening on and keeps in its
    /// port set (configured ones included): `8081/tcp`.
    #[serde(default)]
    pub discovered_ports: Vec<String>,
}

/// What became of the SIGHUP reloads so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStats {
    /// Reloads applied completely (including those with nothing to do).
    pub applied: u64,
    /// Reloads refused before anything changed: unreadable or invalid
    /// config, or a change that needs a restart.
    pub refused: u64,
    /// Reloads a datapath operation failed in; the steps before it are in
    /// force.
    pub failed: u64,
    /// Why the last refused or failed reload was.
    pub last_error: Option<String>,
}

/// The longest request line the agent reads; requests are tiny.
const MAX_LINE: u64 = 64 * 1024;

/// How long a client waits for the agent.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client request failed. The underlying error is the `source`
/// (shown by `{:#}` through anyhow), not repeated in the message.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("no agent answers on {}", path.display())]
    NoAgent {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the agent on {}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent on {} sent an unreadable answer", path.display())]
    Protocol {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the agent on {} closed the connection without answering", path.display())]
    NoAnswer { path: PathBuf },
}

/// Sends one request to the agent on `path` and waits for its answer.
pub fn request(path: &Path, request: &Request) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ClientError::NoAgent {
            path: path.to_owned(),
            source,
        })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_string(request).expect("a request always serializes");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::NoAnswer {
            path: path.to_owned(),
        });
    }
    serde_json::from_str(&answer).map_err(|source| ClientError::Protocol {
        path: path.to_owned(),
        source,
    })
}

/// Makes sure no agent answers on `path` and no stale socket file is left
/// there, so that a new agent can bind it. Refuses when an agent answers:
/// a second agent of the same instance would tear down the first's state.
pub fn claim(path: &Path) -> Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "an agent already answers on {}; stop it first, or give this one another \
             --instance or --control",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // Connection refused: a file no one listens on, left by an agent
        // that did not stop cleanly.
        Err(_) if path.exists() => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale control socket {}", path.display())),
        Err(e) => Err(e).with_context(|| format!("checking the control socket {}", path.display())),
    }
}

/// The agent's listening socket.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ControlSocket {
    /// Binds `path` (after [`claim`]), creating its directory (mode 0700)
    /// if needed. The socket is readable and writable by its owner only
    /// (0600) from the moment it exists: status shows the whole policy.
    pub fn bind(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        // bind(2) creates the file with 0777 & ~umask. A chmod after it
        // would leave a window in which anyone may connect, and a 0700
        // directory only helps where the agent chose the directory
        // (`--control` can name any path, /tmp included). So the file is
        // born 0600 under a umask of 0o177, set around the bind alone.
        // The umask is process-wide: a file another thread creates in
        // that instant gets at most 0600 too, which is stricter, never
        // looser.
        let listener = {
            let _umask = Umask::set(0o177);
            UnixListener::bind(path)
        }
        .with_context(|| format!("binding the control socket {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers requests with `handler` until the task is aborted, one task
    /// per connection.
    pub async fn serve<H, F>(self, handler: H)
    where
        H: Fn(Request) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response> + Send,
    {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, handler).await {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a control connection failed");
                    // E.g. out of file descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Serialises this module's umask changes: two set-and-restore pairs
/// overlapping on two threads (tests bind sockets in parallel) could
/// otherwise leave the process with 0o177 for good.
static UMASK_LOCK: Mutex<()> = Mutex::new(());

/// The process umask set to a value until dropped, then restored (on
/// every path, errors included).
struct Umask {
    old: Mode,
    _lock: MutexGuard<'static, ()>,
}

impl Umask {
    fn set(mask: libc::mode_t) -> Self {
        let lock = UMASK_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        Self {
            old: umask(Mode::from_bits_truncate(mask)),
            _lock: lock,
        }
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        // Before the lock is released (fields drop after this body).
        umask(self.old);
    }
}

/// Removes the socket file; a missing one is fine.
pub fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the control socket {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Serves one connection: a response line for every request line.
async fn connection<H, F>(stream: UnixStream, handler: H) -> std::io::Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut read).take(MAX_LINE).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let response = if !line.ends_with('\n') && n as u64 == MAX_LINE {
            let message = format!("request line longer than {MAX_LINE} bytes");
            write_line(&mut write, &Response::Error { message }).await?;
            return Ok(());
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(request) => handler(request).await,
                Err(e) => Response::Error {
                    message: format!("unreadable request: {e}"),
                },
            }
        };
        write_line(&mut write, &response).await?;
    }
}

async fn write_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::datapath::PacketCounts;
    use crate::trap::QueueStats;

    pub(crate) fn sample_report() -> StatusReport {
        let total = PacketCounts {
            trapped: 3,
            accepted: 2,
            dropped: 1,
        };
        let counters = Counters {
            total,
            per_pu: [("web".to_owned(), total)].into(),
        };
        StatusReport {
            instance: "enforcer".into(),
            pid: 4242,
            config: "/etc/enforcer.toml".into(),
            control: "/run/enforcer/enforcer.sock".into(),
            datapath: DatapathStatus {
                kind: DatapathKind::Iptables,
                reason: "forced by configuration".into(),
                iptables: BackendChoice {
                    backend: crate::datapath::iptables::backend::Backend::Nft,
                    reason: "auto: 0 legacy rules, 12 nft rules".into(),
                },
                cgroups: CgroupChoice {
                    flavour: crate::datapath::probe::CgroupFlavour::NetClsV1,
                    mount: "/sys/fs/cgroup/net_cls".into(),
                    reason: "cgroups.version = v1; net_cls at /sys/fs/cgroup/net_cls \
                             (found in /proc/self/mounts)"
                        .into(),
                },
            },
            mode: "local-server".into(),
            uptime_secs: 61,
            pus: vec![PuStatus {
                id: "web".into(),
                kind: "linux-process".into(),
                version: 1,
                config_ports: vec!["80/tcp".into(), "8000:8080/tcp".into()],
                discovered_ports: vec!["80/tcp".into(), "9090/tcp".into()],
            }],
            counters: Some(counters),
            trap: TrapStats {
                received: 3,
                verdicts: 3,
                verdict_errors: 0,
                receive_errors: 0,
                queues: vec![QueueStats {
                    queue: 0,
                    range: "app-syn".into(),
                    received: 3,
                    verdicts: 3,
                    verdict_errors: 0,
                }],
                handshake: Some([("allowed".to_owned(), 2), ("replayed".to_owned(), 1)].into()),
            },
            kernel_queues: vec![KernelQueueStats {
                queue: 0,
                peer_portid: 77,
                waiting: 0,
                copy_mode: 2,
                copy_range: 128,
                queue_dropped: 0,
                user_dropped: 0,
                id_sequence: 3,
            }],
            reloads: ReloadStats {
                applied: 1,
                ..ReloadStats::default()
            },
            problems: vec![],
        }
    }

    #[test]
    fn status_round_trips_with_stable_field_names() {
        let response = Response::Status(Box::new(sample_report()));
        let text = serde_json::to_string(&response).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), response);

        // The names tests and scripts rely on.
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let status = &json["status"];
        assert_eq!(status["datapath"]["kind"], "iptables");
        assert_eq!(status["datapath"]["reason"], "forced by configuration");
        assert_eq!(status["mode"], "local-server");
        assert_eq!(status["pus"][0]["id"], "web");
        assert_eq!(status["pus"][0]["kind"], "linux-process");
        assert_eq!(status["pus"][0]["version"], 1);
        assert_eq!(status["counters"]["total"]["trapped"], 3);
        assert_eq!(status["counters"]["per_pu"]["web"]["dropped"], 1);
        assert_eq!(status["trap"]["received"], 3);
        assert_eq!(status["trap"]["queues"][0]["range"], "app-syn");
        assert_eq!(status["kernel_queues"][0]["id_sequence"], 3);
        assert_eq!(status["reloads"]["applied"], 1);
        assert_eq!(status["reloads"]["last_error"], serde_json::Value::Null);
        assert_eq!(status["uptime_secs"], 61);
    }

    #[test]
    fn requests_and_errors_have_their_documented_shape() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"request":"status"}"#
        );
        let error = Response::Error {
            message: "no".into(),
        };
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"error":{"message":"no"}}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
    }

    fn temp_socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "enforcer-control-{}-{name}.sock",
            std::process::id()
        ))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_gets_an_answer_per_request_line() {
        let path = temp_socket("serve");
        claim(&path).unwrap();
        let socket = ControlSocket::bind(&path).unwrap();
        let server = tokio::spawn(socket.serve(|request| async move {
            assert_eq!(request, Request::Status);
            Response::Status(Box::new(sample_report()))
        }));
        // A second agent on the same socket is refused.
        assert!(claim(&path).is_err());

        let client_path = path.clone();
        let answer = tokio::task::spawn_blocking(move || request(&client_path, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, Response::Status(Box::new(sample_report())));

        // Garbage gets an error line, and the connection stays usable.
        let mut stream = UnixStream::connect(&path).await.unwrap();
        stream
            .write_all(b"{nonsense\n{\"request\":\"status\"}\n")
            .await
            .unwrap();
        let mut lines = tokio::io::BufReader::new(stream).lines();
        let first: Response =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(
            matches!(first, Response::Error { message } if message.starts_with("unreadable request"))
        );
        let second: Response =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(matches!(second, Response::Status(_)));

        server.abort();
        remove(&path).unwrap();
        remove(&path).unwrap();
    }

    /// The process umask, read under the lock (reading it means setting it).
    fn current_umask() -> Mode {
        let guard = Umask::set(0o022);
        guard.old
    }

    #[tokio::test]
    async fn the_socket_is_owner_only_from_birth_and_the_umask_is_restored() {
        use std::os::unix::fs::PermissionsExt as _;
        let path = temp_socket("mode");
        claim(&path).unwrap();
        let before = current_umask();
        let socket = ControlSocket::bind(&path).unwrap();
        assert_eq!(current_umask(), before);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        // A failed bind (the path is taken) restores it too.
        assert!(ControlSocket::bind(&path).is_err());
        assert_eq!(current_umask(), before);
        drop(socket);
        remove(&path).unwrap();
    }

    #[test]
    fn no_agent_is_a_clear_error_naming_the_socket() {
        let path = temp_socket("absent");
        let err = request(&path, &Request::Status).unwrap_err();
        assert!(matches!(err, ClientError::NoAgent { .. }));
        assert!(
            err.to_string()
                .starts_with(&format!("no agent answers on {}", path.display()))
        );
        // A stale file (nobody listening) is claimed by removing it.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        claim(&path).unwrap();
        assert!(!path.exists());
    }
}
