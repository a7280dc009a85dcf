//! Running the netfilter tools: `iptables-restore` / `ip6tables-restore`,
//! `iptables-save` / `ip6tables-save`, `ipset` and `conntrack`, in the
//! calling thread's network namespace, and aborting sockets
//! ([`crate::datapath::sockdiag`]). The only I/O of the iptables datapath;
//! the eBPF datapath uses it for its fixed rules too.
//!
//! Every program gets a fixed argument list; rules and set contents go to
//! its stdin as restore text, so no policy string is ever a command-line
//! argument and nothing runs through a shell. `conntrack` arguments are
//! formatted from parsed addresses and numbers ([`conntrack`]). A failure names the command,
//! its exit status, its stderr and, when the tool names a line of its
//! input, that line.
//!
//! The tool names live in [`tools`], [`IPSET`] and [`CONNTRACK`] only.
//! Every restore and save names its [`Backend`] (the flavour chosen at
//! start, see [`super::backend`]), so no call can slip into the other
//! flavour; ipset and conntrack are the same for both.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::IpNet;
use tracing::debug;

use super::backend::Backend;
use super::rules::{Table, section};
use super::{save, sets};
use crate::datapath::conntrack::{self, Flow};
use crate::datapath::owner::PuSockets;
use crate::datapath::queues::Direction;
use crate::datapath::revoke::Listeners;
use crate::datapath::sockdiag;
use crate::naming;
use crate::policy::{IpFamily, PerFamily, Pu};

/// One flavour's restore and save programs.
#[derive(Debug, Clone)]
pub struct Tools {
    pub restore: PerFamily<&'static str>,
    pub save: PerFamily<&'static str>,
}

/// The flavour's own names, never the alternatives-selected
/// `iptables-restore`, which may be either.
pub const fn tools(backend: Backend) -> Tools {
    match backend {
        Backend::Nft => Tools {
            restore: PerFamily {
                v4: "iptables-nft-restore",
                v6: "ip6tables-nft-restore",
            },
            save: PerFamily {
                v4: "iptables-nft-save",
                v6: "ip6tables-nft-save",
            },
        },
        Backend::Legacy => Tools {
            restore: PerFamily {
                v4: "iptables-legacy-restore",
                v6: "ip6tables-legacy-restore",
            },
            save: PerFamily {
                v4: "iptables-legacy-save",
                v6: "ip6tables-legacy-save",
            },
        },
    }
}

/// The set tool, the same whatever the iptables flavour.
pub const IPSET: &str = "ipset";
/// The conntrack tool, the same whatever the iptables flavour.
pub const CONNTRACK: &str = "conntrack";

/// Applies restore text to the family's tables without flushing what is
/// there; each table section commits on its own. `--wait` waits for the
/// xtables lock that the legacy flavour and other tools take.
pub fn restore(backend: Backend, family: IpFamily, text: &str) -> Result<()> {
    let program = *tools(backend).restore.get(family);
    run(program, &["--noflush", "--wait"], Some(text)).map(drop)
}

/// One table of the family as `iptables-save` prints it, with packet and
/// byte counters when `counters` is set.
pub fn save(backend: Backend, family: IpFamily, table: Table, counters: bool) -> Result<String> {
    let mut args = vec!["-t", table.as_str()];
    if counters {
        args.push("-c");
    }
    run(tools(backend).save.get(family), &args, None)
}

/// Every table of the family that exists. Unlike a save with `-t`, this
/// never creates a table (the legacy flavour would).
pub fn save_all(backend: Backend, family: IpFamily) -> Result<String> {
    run(tools(backend).save.get(family), &[], None)
}

/// Applies `ipset restore` text. The tool stops at the first failing line,
/// keeping what the lines before it did.
pub fn ipset_restore(text: &str) -> Result<()> {
    run(IPSET, &["restore"], Some(text)).map(drop)
}

/// The names of every set in the namespace.
pub fn ipset_names() -> Result<Vec<String>> {
    let out = run(IPSET, &["list", "-n"], None)?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// Removes every chain, hook and set the agent made in this namespace,
/// in both families, with `backend`'s tools, and nothing else. Used by
/// `run` (leftovers of a crashed instance) and `cleanup`.
pub fn cleanup_all(backend: Backend) -> Result<()> {
    remove_everything(&System::new(backend))
}

/// The conntrack entries of `family` whose mark matches `value` under
/// `mask`: TCP and UDP ones, original direction.
pub fn conntrack_flows(family: IpFamily, value: u32, mask: u32) -> Result<Vec<Flow>> {
    let args = conntrack::list_args(family, value, mask);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(conntrack::parse_list(&run(CONNTRACK, &args, None)?))
}

/// Deletes the conntrack entry of `flow` while its mark still matches
/// `value` under `mask`; `Ok(false)` if there was none (it ended).
pub fn conntrack_delete(flow: &Flow, value: u32, mask: u32) -> Result<bool> {
    let args = conntrack::delete_args(flow, value, mask);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match run(CONNTRACK, &args, None) {
        Ok(_) => Ok(true),
        Err(e) if conntrack::nothing_deleted(&e.to_string()) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Forgets the UDP conntrack entries that the target UDP networks' change
/// from `old` to `new` makes stale ([`conntrack::no_longer_udp_target`]),
/// in both families, through `nf`. Returns how many were deleted. Shared
/// by both datapaths: the entry holds the trap's verdict in its mark on
/// either.
pub fn forget_udp_flows(nf: &dyn Netfilter, old: &[IpNet], new: &[IpNet]) -> Result<usize> {
    if old.iter().all(|net| new.contains(net)) {
        // Nothing removed: every end an old network covered, a new one does.
        return Ok(0);
    }
    let mut forgotten = 0;
    for family in IpFamily::ALL {
        // Every entry, whatever its mark (0 under mask 0).
        let flows = nf
            .conntrack_flows(family, 0, 0)
            .with_context(|| format!("listing the {family} conntrack entries"))?;
        for flow in flows
            .iter()
            .filter(|f| conntrack::no_longer_udp_target(f, old, new))
        {
            forgotten += usize::from(nf.conntrack_delete(flow, 0, 0)?);
        }
    }
    Ok(forgotten)
}

/// A PU's flow, with the side of its policy that judged it: `App` if the
/// PU sent its original direction (outgoing), `Net` if a peer did
/// (incoming, to one of its listening ports).
pub type SidedFlow = (Direction, Flow);

/// Aborts the PU's sockets ([`PuSockets`]) whose connection is one of
/// `flows`, on its side (the socket's local end and peer are the flow's,
/// [`Flow::ends`]). Returns how many.
pub fn abort_flow_sockets(pu: &PuSockets, flows: &[SidedFlow]) -> Result<usize> {
    let connected = |socket: &sockdiag::Socket| {
        flows.iter().any(|(side, flow)| {
            flow.protocol == socket.protocol && flow.ends(*side) == (socket.local, socket.remote)
        })
    };
    Ok(sockdiag::abort_sockets(pu, connected)?.len())
}

/// The flows of `flows` that the PU's sockets ([`PuSockets`]) carry on
/// their side ([`carries`]). Flows of other PUs, and a flow taken for the
/// wrong side (an incoming one as outgoing: its source port is the
/// peer's), are left out.
pub fn own_flows(pu: &PuSockets, flows: Vec<SidedFlow>) -> Result<Vec<SidedFlow>> {
    let sockets = sockdiag::pu_sockets(pu)?;
    Ok(flows
        .into_iter()
        .filter(|flow| sockets.iter().any(|socket| carries(socket, flow)))
        .collect())
}

/// Does `socket` carry `flow` on its side: the protocol, the local port
/// and address (or a wildcard bind), and the peer when the socket is
/// connected (an unconnected UDP socket sends to and receives from any)?
fn carries(socket: &sockdiag::Socket, (side, flow): &SidedFlow) -> bool {
    let (local, peer) = flow.ends(*side);
    let bound = socket.local.ip().to_canonical();
    socket.protocol == flow.protocol
        && socket.local.port() == local.port()
        && (bound.is_unspecified() || bound == local.ip())
        && (socket.remote.port() == 0 || socket.remote == peer)
}

/// The kernel calls the iptables datapath makes: the netfilter tools, and
/// cutting revoked connections. [`System`] does them for real; the
/// datapath's tests substitute a recording fake.
pub trait Netfilter: Send + Sync {
    fn restore(&self, family: IpFamily, text: &str) -> Result<()>;
    fn save(&self, family: IpFamily, table: Table, counters: bool) -> Result<String>;
    /// [`save_all`].
    fn save_all(&self, family: IpFamily) -> Result<String>;
    fn ipset_restore(&self, text: &str) -> Result<()>;
    fn ipset_names(&self) -> Result<Vec<String>>;
    /// [`conntrack_flows`].
    fn conntrack_flows(&self, family: IpFamily, value: u32, mask: u32) -> Result<Vec<Flow>>;
    /// [`conntrack_delete`].
    fn conntrack_delete(&self, flow: &Flow, value: u32, mask: u32) -> Result<bool>;
    /// [`abort_flow_sockets`].
    fn abort_flow_sockets(&self, pu: &PuSockets, flows: &[SidedFlow]) -> Result<usize>;
    /// [`own_flows`].
    fn own_flows(&self, pu: &PuSockets, flows: Vec<SidedFlow>) -> Result<Vec<SidedFlow>>;
    /// [`sockdiag::listeners`].
    fn listeners(&self, pu: &Pu) -> Result<Listeners>;
}

/// The real tools of one flavour, in the calling thread's network
/// namespace.
#[derive(Debug, Clone, Copy)]
pub struct System {
    backend: Backend,
}

impl System {
    pub fn new(backend: Backend) -> Self {
        Self { backend }
    }
}

impl Netfilter for System {
    fn restore(&self, family: IpFamily, text: &str) -> Result<()> {
        restore(self.backend, family, text)
    }

    fn save(&self, family: IpFamily, table: Table, counters: bool) -> Result<String> {
        save(self.backend, family, table, counters)
    }

    fn save_all(&self, family: IpFamily) -> Result<String> {
        save_all(self.backend, family)
    }

    fn ipset_restore(&self, text: &str) -> Result<()> {
        ipset_restore(text)
    }

    fn ipset_names(&self) -> Result<Vec<String>> {
        ipset_names()
    }

    fn conntrack_flows(&self, family: IpFamily, value: u32, mask: u32) -> Result<Vec<Flow>> {
        conntrack_flows(family, value, mask)
    }

    fn conntrack_delete(&self, flow: &Flow, value: u32, mask: u32) -> Result<bool> {
        conntrack_delete(flow, value, mask)
    }

    fn abort_flow_sockets(&self, pu: &PuSockets, flows: &[SidedFlow]) -> Result<usize> {
        abort_flow_sockets(pu, flows)
    }

    fn own_flows(&self, pu: &PuSockets, flows: Vec<SidedFlow>) -> Result<Vec<SidedFlow>> {
        own_flows(pu, flows)
    }

    fn listeners(&self, pu: &Pu) -> Result<Listeners> {
        sockdiag::listeners(pu).context("listing the listening sockets (sock_diag)")
    }
}

/// [`cleanup_all`] through any [`Netfilter`]: for each family, one save
/// of every table; in each of the agent's tables found there, unhook,
/// flush and delete every `TRI-` chain; then destroy every set with a
/// family prefix (rules no longer refer to them). Goes on after a failure
/// and reports every one.
pub(super) fn remove_everything(nf: &dyn Netfilter) -> Result<()> {
    let mut failures = Vec::new();
    for family in IpFamily::ALL {
        let attempt = || -> Result<()> {
            let saved = nf.save_all(family)?;
            let mut text = String::new();
            for table in Table::ALL {
                let Some(saved) = save::table(&saved, table) else {
                    continue;
                };
                let lines = save::teardown(saved, naming::is_agent_chain);
                if !lines.is_empty() {
                    text += &section(table, &lines);
                }
            }
            if !text.is_empty() {
                nf.restore(family, &text)?;
            }
            Ok(())
        };
        if let Err(e) = attempt() {
            failures.push(e.context(format!("removing the {family:?} chains")));
        }
    }
    let sets = || -> Result<()> {
        let names = nf.ipset_names()?;
        let ours: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|name| naming::is_agent_set(name))
            .collect();
        if !ours.is_empty() {
            nf.ipset_restore(&sets::destroy(ours))?;
        }
        Ok(())
    };
    if let Err(e) = sets() {
        failures.push(e.context("destroying the sets"));
    }
    match failures.len() {
        0 => Ok(()),
        _ => Err(anyhow!(
            "{}",
            failures
                .iter()
                .map(|e| format!("{e:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

/// Runs `program args…` with `input` on stdin; returns stdout.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    debug!(%command, "running");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{command}`"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A tool that fails early closes its stdin: the broken pipe is
        // not the error to report, its exit status and stderr are.
        if let Err(e) = stdin.write_all(text.as_bytes())
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            return Err(e).with_context(|| format!("writing to `{command}`"));
        }
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{command}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut message = format!("`{command}` failed ({}): {}", out.status, stderr.trim());
        if let Some((n, line)) = input.and_then(|text| failed_line(&stderr, text)) {
            message += &format!("\n  input line {n}: {line}");
        }
        bail!(message);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{command}` printed non-UTF-8"))
}

/// The input line a tool's error names: `Error occurred at line: 4`
/// (iptables-restore), `line 2: RULE_APPEND failed` (its nf_tables
/// flavour), `Error in line 1:` (ipset).
fn failed_line<'t>(stderr: &str, input: &'t str) -> Option<(usize, &'t str)> {
    let after = &stderr[stderr.find("line")? + "line".len()..];
    let digits: String = after
        .trim_start_matches([':', ' '])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let n: usize = digits.parse().ok()?;
    Some((n, input.lines().nth(n.checked_sub(1)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_failed_input_line_in_each_tools_words() {
        let input = "*mangle\n-A X -j Y\nCOMMIT\n";
        for stderr in [
            "iptables-restore v1.8.9 (nf_tables): Chain 'Y' does not exist\nError occurred at line: 2\n",
            "ip6tables-restore v1.8.9 (nf_tables): \nline 2: RULE_APPEND failed (Invalid argument): rule in chain X\n",
            "ipset v7.17: Error in line 2: The set with the given name does not exist\n",
        ] {
            assert_eq!(
                failed_line(stderr, input),
                Some((2, "-A X -j Y")),
                "{stderr}"
            );
        }
        assert_eq!(failed_line("no such thing", input), None);
        assert_eq!(failed_line("line 0", input), None);
        assert_eq!(failed_line("line 9", input), None);
    }

    #[test]
    fn each_flavour_names_its_own_tools() {
        let nft = tools(Backend::Nft);
        let legacy = tools(Backend::Legacy);
        assert_eq!(
            [nft.restore.v4, nft.restore.v6, nft.save.v4, nft.save.v6],
            [
                "iptables-nft-restore",
                "ip6tables-nft-restore",
                "iptables-nft-save",
                "ip6tables-nft-save"
            ]
        );
        assert_eq!(
            [
                legacy.restore.v4,
                legacy.restore.v6,
                legacy.save.v4,
                legacy.save.v6
            ],
            [
                "iptables-legacy-restore",
                "ip6tables-legacy-restore",
                "iptables-legacy-save",
                "ip6tables-legacy-save"
            ]
        );
    }

    #[test]
    fn a_failing_tool_is_reported_with_its_stderr() {
        let err = run("ls", &["/enforcer-no-such-path"], Some("ignored\n")).unwrap_err();
        let err = err.to_string();
        assert!(
            err.starts_with("`ls /enforcer-no-such-path` failed (exit status: 2): "),
            "{err}"
        );
        assert!(
            err.contains("enforcer-no-such-path") && err.contains("No such file"),
            "{err}"
        );
        let missing = run("enforcer-no-such-tool", &[], None).unwrap_err();
        assert!(format!("{missing:#}").contains("starting `enforcer-no-such-tool`"));
    }
}
