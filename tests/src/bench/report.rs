//! The report: `<out>/<date>.md` (`<date>-quick.md` for a quick run, so
//! it never replaces a full one) with its SVG plots beside it, all
//! hand-built strings. Tables show the median and min–max of each figure
//! per mode with ratios to the bare kernel and to the fallback; a
//! generated section lists every comparison where eBPF is not ahead of
//! iptables with the mechanism that explains it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::client::{CONNECT_THREADS, REQUEST_BYTES, UDP_PAYLOAD};
use super::machine::Machine;
use super::plan::{Metric, Mode, Part, Peer, Plan, Route, Scale};
use super::progress::Interference;
use super::results::Results;
use super::stats::{Summary, ratio};
use super::svg::{self, Panel, Point, Series};

/// What the report is written from.
pub struct Context<'a> {
    pub plan: &'a Plan,
    pub machine: &'a Machine,
    pub results: &'a Results,
    pub elapsed: Duration,
    pub interference: Option<Interference>,
    /// The command that reproduces the run.
    pub command: String,
}

/// Writes the report and its plots into `out`; returns the report's path.
pub fn write(out: &Path, ctx: &Context) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let stem = match ctx.plan.quick {
        true => format!("{}-quick", ctx.machine.date),
        false => ctx.machine.date.clone(),
    };
    let mut figures = Vec::new();
    for (slug, svg) in figures_of(ctx) {
        let name = format!("{stem}-{slug}.svg");
        std::fs::write(out.join(&name), svg).with_context(|| format!("writing {name}"))?;
        figures.push((slug, name));
    }
    let raw = format!("{stem}.json");
    let json = serde_json::to_string_pretty(&ctx.results.to_json()).context("rendering")?;
    std::fs::write(out.join(&raw), json + "\n").with_context(|| format!("writing {raw}"))?;
    let path = out.join(format!("{stem}.md"));
    std::fs::write(&path, markdown(ctx, &figures, &raw))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A scale axis: one dimension grown, the others at the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dimension {
    Pus,
    Acls,
    Targets,
}

impl Dimension {
    const ALL: [Dimension; 3] = [Dimension::Pus, Dimension::Acls, Dimension::Targets];

    fn slug(self) -> &'static str {
        match self {
            Dimension::Pus => "pus",
            Dimension::Acls => "acls",
            Dimension::Targets => "targets",
        }
    }

    fn axis(self) -> &'static str {
        match self {
            Dimension::Pus => "PUs",
            Dimension::Acls => "ACLs of the PU",
            Dimension::Targets => "target networks",
        }
    }

    fn x(self, s: Scale) -> usize {
        match self {
            Dimension::Pus => s.pus,
            Dimension::Acls => s.acls,
            Dimension::Targets => s.targets,
        }
    }

    fn on_axis(self, s: Scale) -> bool {
        let base = Scale::BASE;
        match self {
            Dimension::Pus => s.acls == base.acls && s.targets == base.targets,
            Dimension::Acls => s.pus == base.pus && s.targets == base.targets,
            Dimension::Targets => s.pus == base.pus && s.acls == base.acls,
        }
    }
}

/// The metrics shown against scale.
const SCALE_METRICS: [Metric; 6] = [
    Metric::TcpThroughput(Peer::Acl),
    Metric::UdpDelivered(Peer::Target),
    Metric::ConnRate(Peer::Target),
    Metric::ConnP99(Peer::Target),
    Metric::ConnRate(Peer::Acl),
    Metric::ConnP99(Peer::Acl),
];

const ESTABLISHED: [Metric; 8] = [
    Metric::TcpThroughput(Peer::Acl),
    Metric::TcpThroughput(Peer::Target),
    Metric::UdpDelivered(Peer::Acl),
    Metric::UdpDelivered(Peer::Target),
    Metric::UdpSent(Peer::Acl),
    Metric::UdpSent(Peer::Target),
    Metric::UdpSendtoDelivered(Peer::Acl),
    Metric::UdpSendtoDelivered(Peer::Target),
];

const CONNECTIONS: [Metric; 13] = [
    Metric::ConnRate(Peer::Target),
    Metric::ConnP50(Peer::Target),
    Metric::ConnP99(Peer::Target),
    Metric::PastTrap,
    Metric::ConnRate(Peer::Acl),
    Metric::ConnP50(Peer::Acl),
    Metric::ConnP99(Peer::Acl),
    Metric::InConnRate(Peer::Target),
    Metric::InConnP50(Peer::Target),
    Metric::InConnP99(Peer::Target),
    Metric::InConnRate(Peer::Acl),
    Metric::InConnP50(Peer::Acl),
    Metric::InConnP99(Peer::Acl),
];

/// Scenario 3 through the identity handshake (its own setup).
const HANDSHAKE: [Metric; 5] = [
    Metric::HsConnRate,
    Metric::HsConnP50,
    Metric::HsConnP99,
    Metric::HsRefused,
    Metric::HsBypassed,
];

/// Issue 6: requests direct, then through the PU's proxy (its own setup).
const PROXY: [Metric; 6] = [
    Metric::ReqRate(Route::Direct),
    Metric::ReqP50(Route::Direct),
    Metric::ReqP99(Route::Direct),
    Metric::ReqRate(Route::Proxy),
    Metric::ReqP50(Route::Proxy),
    Metric::ReqP99(Route::Proxy),
];

const FOOTPRINT: [Metric; 4] = [
    Metric::Rss,
    Metric::KernelMemory,
    Metric::Rules,
    Metric::OpenFiles,
];

impl Context<'_> {
    fn get(&self, scale: Scale, mode: Mode, metric: Metric) -> Option<Summary> {
        self.results.summary(scale, mode, metric)
    }

    /// The scales of the plan on `dim`'s axis, by size.
    fn axis(&self, dim: Dimension) -> Vec<Scale> {
        let mut scales: Vec<Scale> = self
            .plan
            .setups
            .iter()
            .map(|s| s.scale)
            .filter(|s| dim.on_axis(*s))
            .collect();
        scales.sort_by_key(|s| dim.x(*s));
        scales.dedup();
        scales
    }

    /// A figure's cell: median (min–max), or why there is none.
    fn cell(&self, scale: Scale, mode: Mode, metric: Metric) -> String {
        match self.get(scale, mode, metric) {
            Some(s) => s.show(metric.unit()),
            None if self.results.unmeasured(scale, mode).is_some()
                && self.plan.yields(scale, mode, metric) =>
            {
                "N/A†".into()
            }
            None => "–".into(),
        }
    }

    /// Whether a row for `metric` at `scale` belongs in a datapath table:
    /// the run meant to measure it.
    fn planned(&self, scale: Scale, metric: Metric) -> bool {
        Mode::DATAPATHS
            .iter()
            .any(|&m| self.plan.yields(scale, m, metric))
    }

    fn ratio_of(&self, a: (Scale, Mode), b: (Scale, Mode), metric: Metric) -> String {
        self.ratio_across((a.0, a.1, metric), (b.0, b.1, metric))
    }

    /// The ratio of two figures' medians, "–" when either is missing.
    fn ratio_across(&self, a: (Scale, Mode, Metric), b: (Scale, Mode, Metric)) -> String {
        match (self.get(a.0, a.1, a.2), self.get(b.0, b.1, b.2)) {
            (Some(x), Some(y)) => ratio(x.median, y.median),
            _ => "–".into(),
        }
    }
}

fn markdown(ctx: &Context, figures: &[(&str, String)], raw: &str) -> String {
    let mut md = String::new();
    let _ = write_markdown(&mut md, ctx, figures, raw);
    md
}

fn write_markdown(
    md: &mut String,
    ctx: &Context,
    figures: &[(&str, String)],
    raw: &str,
) -> std::fmt::Result {
    let m = ctx.machine;
    let plan = ctx.plan;
    let kind = if plan.quick { " (quick run)" } else { "" };
    writeln!(
        md,
        "# Benchmarks: eBPF datapath vs iptables fallback vs bare kernel — {}{kind}\n",
        m.date
    )?;
    writeln!(md, "- **Commit**: `{}`", m.commit)?;
    if !m.changed.is_empty() {
        const SHOWN: usize = 12;
        let mut list: Vec<String> = m
            .changed
            .iter()
            .take(SHOWN)
            .map(|f| format!("`{f}`"))
            .collect();
        if m.changed.len() > SHOWN {
            list.push(format!("and {} more", m.changed.len() - SHOWN));
        }
        writeln!(
            md,
            "- **Uncommitted changes** when the run started: {}",
            list.join(", ")
        )?;
    }
    writeln!(
        md,
        "- **Machine**: {} × {}, {} RAM, Linux {}, {}",
        m.cpus, m.cpu_model, m.memory, m.kernel, m.iptables
    )?;
    let secs = ctx.elapsed.as_secs();
    writeln!(
        md,
        "- **Run**: {}, {} repetitions of every probe and reload (tables show the median and the \
         min–max range; start-up, shutdown and footprint are one reading per setup, marked n=1), \
         probes of {:.0} s, took {}m{:02}s",
        if plan.quick { "quick" } else { "full" },
        plan.reps,
        plan.probe_time.as_secs_f64(),
        secs / 60,
        secs % 60
    )?;
    match ctx.interference {
        Some(i) => {
            let verdict = if i.others + i.stolen > 0.10 {
                "**noisy**: other work competed for the CPUs, so the figures carry that noise"
            } else {
                "quiet"
            };
            writeln!(
                md,
                "- **Other load**: processes other than the benchmark used {:.0}% of the machine's \
                 CPU time during the run, the hypervisor took {:.0}% — {verdict}",
                i.others * 100.0,
                i.stolen * 100.0
            )?;
        }
        None => writeln!(md, "- **Other load**: unknown (/proc/stat unreadable)")?,
    }
    writeln!(
        md,
        "- **Reproduce**: `{}` from the workspace root, as root, on a quiet machine",
        ctx.command
    )?;
    writeln!(md, "- **Raw values**: [{raw}]({raw})\n")?;
    writeln!(
        md,
        "Modes: **bare** — no agent, the kernel alone; **iptables** — the fallback datapath \
         (per-PU chains and ipsets); **eBPF** — cgroup connect hooks, LPM maps and a fixed \
         handful of netfilter rules. Ratios are of medians: for rates above 1× is faster, for \
         times, memory and rules below 1× is less. †: not measurable, see \
         [Not measured](#not-measured-na).\n"
    )?;

    headline(md, ctx)?;

    writeln!(md, "## 1. Established flows\n")?;
    writeln!(
        md,
        "One TCP flow (bulk writes of 128 KiB) and one connected UDP socket sending {UDP_PAYLOAD}-byte \
         datagrams, from a process inside the PU's cgroup over a veth pair, to the ACL peer (an \
         accept ACL, no trap) and to the target peer (its first packet trapped and accepted by the \
         agent, then the connection-mark fast path); and datagrams from an unconnected socket \
         (`sendto`), which the eBPF datapath judges per datagram. One PU, one ACL, one target \
         network.\n"
    )?;
    mode_table(md, ctx, Scale::BASE, &ESTABLISHED)?;

    writeln!(md, "## 2. Scale\n")?;
    writeln!(
        md,
        "The figures of scenarios 1 and 3 for the *last* configured PU as the policy grows: \
         more PUs (each with its own cgroup and ACL), more ACLs on the PU (distinct /32s, the \
         ACL covering the peer last), more target networks (distinct /24s). The bare kernel's \
         figure (no policy at all) is the reference.\n"
    )?;
    for dim in Dimension::ALL {
        scale_section(md, ctx, dim, figures)?;
    }

    writeln!(md, "## 3. Connection rate\n")?;
    writeln!(
        md,
        "New TCP connections from {CONNECT_THREADS} threads inside the PU, each closed with a \
         reset at once, for the probe's duration; latency is connect() to established. To the \
         target peer every SYN is trapped to the agent and accepted there; to the ACL peer no \
         connection is trapped. Incoming: the same from the peer's namespace (bound to the \
         peer's address) to a server inside the PU's cgroup on its listening port — from the \
         target peer every SYN is trapped on the network side, from the ACL peer a network \
         ACL accepts it. Past the trap: connections to the target peer the client completed \
         whose SYN the kernel never queued to the agent (the growth of the `app-syn` queues' \
         counters, read before and after each run, subtracted from the connections): a check \
         that no connection skips the trap — one reusing the addresses and ports of a \
         connection closed moments earlier finds its conntrack entry, whose mark the \
         datapaths' first rule forgets at the new SYN (datapath/handshake.rs); should that \
         fail, the rate above would include them.\n"
    )?;
    mode_table(md, ctx, Scale::BASE, &CONNECTIONS)?;
    handshake_section(md, ctx)?;
    proxy_section(md, ctx)?;

    control_section(md, ctx, figures)?;
    footprint_section(md, ctx, figures)?;
    findings(md, ctx)?;
    not_measured(md, ctx)?;
    method(md, ctx)?;
    Ok(())
}

/// One row per metric at one scale: every mode, and the ratios.
fn mode_table(
    md: &mut String,
    ctx: &Context,
    scale: Scale,
    metrics: &[Metric],
) -> std::fmt::Result {
    writeln!(
        md,
        "| measure | bare | iptables | eBPF | iptables ÷ bare | eBPF ÷ bare | eBPF ÷ iptables |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
    for &metric in metrics {
        let r = |a, b| ctx.ratio_of((scale, a), (scale, b), metric);
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            metric.name(),
            ctx.cell(scale, Mode::Bare, metric),
            ctx.cell(scale, Mode::Iptables, metric),
            ctx.cell(scale, Mode::Ebpf, metric),
            r(Mode::Iptables, Mode::Bare),
            r(Mode::Ebpf, Mode::Bare),
            r(Mode::Ebpf, Mode::Iptables),
        )?;
    }
    writeln!(md)
}

/// The largest scale on `dim`'s axis where `metric` was measured for
/// either datapath.
/// The largest scales on `dim`'s axis where `metric` was measured for
/// both datapaths, and — when larger — for only one of them (the other
/// did not get that far).
fn largest(ctx: &Context, dim: Dimension, metric: Metric) -> Vec<Scale> {
    let measured = |s: Scale, all: bool| {
        let mut modes = Mode::DATAPATHS.iter();
        let has = |&m: &Mode| ctx.get(s, m, metric).is_some();
        if all { modes.all(has) } else { modes.any(has) }
    };
    let axis = ctx.axis(dim);
    let both = axis.iter().rev().copied().find(|&s| measured(s, true));
    let either = axis.iter().rev().copied().find(|&s| measured(s, false));
    let mut scales: Vec<Scale> = both.into_iter().collect();
    if let Some(s) = either
        && either.map(|e| dim.x(e)) > both.map(|b| dim.x(b))
    {
        scales.push(s);
    }
    scales
}

/// Scenario 3 through the identity handshake: its figures under each
/// datapath, against the bare kernel's and the same datapath's through
/// the trap without identity (the base setup's, to the target peer).
fn handshake_section(md: &mut String, ctx: &Context) -> std::fmt::Result {
    writeln!(md, "### Through the identity handshake\n")?;
    writeln!(
        md,
        "The same probe from the PU to a server in a PU on the peer host, whose namespace runs \
         an agent of the same datapath too; both agents have `[identity]` (key pairs that trust \
         each other, the client PU's application policy and the server PU's network policy \
         allowing each other's labels) and each host is the other's target network. Each \
         connection's SYN is signed on the client host and verified on the server host, its \
         SYN-ACK signed there and verified back, and the server's first ACK authorises it: five \
         packets in user space, two on the client host and three on the server host. The bare kernel and \"without identity\" are \
         the trap figures above (no agent; the same datapath's agent accepting the trapped SYN \
         without a token). The rate counts the connections whose SYN-ACK host A's agent \
         verified (its `status` → `trap.handshake.allowed`, read before and after each run); \
         latency is the client's, over every connection it completed. Refused: what both \
         agents counted as refused (every reason but steps and successes) during one run; a run \
         that fills the bounded handshake table shows there and in the notes. Past the \
         handshake: connections the client completed that host A's agent never verified, a \
         check as the trap's \"past the trap\" (the client closes with a reset, so the kernel \
         reuses ports at once, and a new SYN may find a closed connection's conntrack entry); \
         each run starts with both hosts' conntrack tables flushed.\n"
    )?;
    writeln!(
        md,
        "| measure | bare (trap, no agent) | iptables | eBPF | iptables ÷ bare | eBPF ÷ bare | \
         iptables ÷ iptables without identity | eBPF ÷ eBPF without identity | eBPF ÷ iptables |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let base = Scale::BASE;
    for metric in HANDSHAKE {
        let plain = metric.without_identity();
        let against = |mode: Mode, of: Mode| match plain {
            Some(p) => ctx.ratio_across((base, mode, metric), (base, of, p)),
            None => "–".into(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            metric.name(),
            plain.map_or_else(|| "–".into(), |p| ctx.cell(base, Mode::Bare, p)),
            ctx.cell(base, Mode::Iptables, metric),
            ctx.cell(base, Mode::Ebpf, metric),
            against(Mode::Iptables, Mode::Bare),
            against(Mode::Ebpf, Mode::Bare),
            against(Mode::Iptables, Mode::Iptables),
            against(Mode::Ebpf, Mode::Ebpf),
            ctx.ratio_of((base, Mode::Ebpf), (base, Mode::Iptables), metric),
        )?;
    }
    writeln!(md)
}

/// Issue 6: requests through the PU's proxy against its direct requests,
/// under each mode, and the proxy's cost as a ratio per mode.
fn proxy_section(md: &mut String, ctx: &Context) -> std::fmt::Result {
    writeln!(md, "### Through the PU's proxy\n")?;
    if !ctx.plan.setups.iter().any(|s| s.part == Part::Proxy) {
        return writeln!(md, "Not part of this run.\n");
    }
    writeln!(
        md,
        "Requests from {CONNECT_THREADS} threads inside the PU, each a new connection: connect, \
         {REQUEST_BYTES} bytes, their echo read back, close with a reset (the echo server on the \
         peer host answers and closes first); latency is connect() to the echo's last byte. \
         Direct: to the ACL peer, accepted by the PU's ACL. Through the proxy: to the PU's \
         dependent service (an address no ACL accepts), which the datapath redirects to the \
         PU's proxy port on loopback — iptables with a nat `REDIRECT` rule, eBPF by rewriting \
         the destination in its connect hook — where the harness's test proxy (written for \
         iptables: a thread per connection, `getsockopt(SO_ORIGINAL_DST)`, onward from a socket \
         carrying the proxy mark) connects on to the service and relays. Under the bare kernel \
         nothing redirects: its figure through the proxy is the same proxy reached at its \
         loopback address by the client itself and forwarding to the service without asking, \
         so iptables ÷ bare and eBPF ÷ bare on those rows are what the redirection (and the \
         agent's policy) add to the proxy's own cost. The proxy's count of accepted \
         connections is read around each run: requests that completed without it, or direct \
         ones that reached it, are named in the notes.\n"
    )?;
    mode_table(md, ctx, Scale::BASE, &PROXY)?;
    writeln!(
        md,
        "| through the proxy ÷ direct | bare (proxy by address) | iptables | eBPF |"
    )?;
    writeln!(md, "|---|---:|---:|---:|")?;
    let base = Scale::BASE;
    for (what, direct, proxied) in [
        (
            "request rate",
            Metric::ReqRate(Route::Direct),
            Metric::ReqRate(Route::Proxy),
        ),
        (
            "request latency p50",
            Metric::ReqP50(Route::Direct),
            Metric::ReqP50(Route::Proxy),
        ),
        (
            "request latency p99",
            Metric::ReqP99(Route::Direct),
            Metric::ReqP99(Route::Proxy),
        ),
    ] {
        let r = |mode| ctx.ratio_across((base, mode, proxied), (base, mode, direct));
        writeln!(
            md,
            "| {what} | {} | {} | {} |",
            r(Mode::Bare),
            r(Mode::Iptables),
            r(Mode::Ebpf)
        )?;
    }
    writeln!(md)
}

fn headline(md: &mut String, ctx: &Context) -> std::fmt::Result {
    writeln!(md, "## Headline\n")?;
    writeln!(md, "| measure | bare | iptables | eBPF | eBPF ÷ iptables |")?;
    writeln!(md, "|---|---:|---:|---:|---:|")?;
    let base = Scale::BASE;
    let mut rows: Vec<(String, Scale, Metric)> = [
        Metric::TcpThroughput(Peer::Acl),
        Metric::UdpDelivered(Peer::Target),
        Metric::UdpSendtoDelivered(Peer::Acl),
        Metric::ConnRate(Peer::Target),
        Metric::ConnP99(Peer::Target),
        Metric::HsConnRate,
        Metric::ReqRate(Route::Proxy),
    ]
    .into_iter()
    .map(|m| (m.name(), base, m))
    .collect();
    let at = |dim: Dimension, metric: Metric, what: &str| {
        largest(ctx, dim, metric)
            .into_iter()
            .map(|s| (format!("{what} at {} {}", dim.x(s), dim.axis()), s, metric))
            .collect::<Vec<_>>()
    };
    rows.extend(
        [
            at(
                Dimension::Pus,
                Metric::ConnRate(Peer::Target),
                &Metric::ConnRate(Peer::Target).name(),
            ),
            at(
                Dimension::Pus,
                Metric::ConnRate(Peer::Acl),
                &Metric::ConnRate(Peer::Acl).name(),
            ),
            at(
                Dimension::Acls,
                Metric::ConnRate(Peer::Acl),
                &Metric::ConnRate(Peer::Acl).name(),
            ),
            at(Dimension::Pus, Metric::Startup, "start-up"),
            at(Dimension::Pus, Metric::AddPu, "configure one more PU"),
            at(Dimension::Acls, Metric::UpdatePu, "update a PU"),
            at(
                Dimension::Targets,
                Metric::TargetChange,
                "one target network change",
            ),
            at(Dimension::Pus, Metric::Rss, "agent memory"),
            at(Dimension::Pus, Metric::KernelMemory, "kernel memory"),
            at(Dimension::Pus, Metric::Rules, "netfilter rules"),
            at(
                Dimension::Pus,
                Metric::OpenFiles,
                "agent open file descriptors",
            ),
        ]
        .into_iter()
        .flatten(),
    );
    for (what, scale, metric) in rows {
        // The handshake's bare kernel is the trap's (no agent, no token).
        let reference = metric.without_identity().unwrap_or(metric);
        let bare = match ctx.get(base, Mode::Bare, reference) {
            Some(_) if scale == base || metric.higher_is_better() => {
                ctx.cell(base, Mode::Bare, reference)
            }
            _ => "–".into(),
        };
        writeln!(
            md,
            "| {what} | {bare} | {} | {} | {} |",
            ctx.cell(scale, Mode::Iptables, metric),
            ctx.cell(scale, Mode::Ebpf, metric),
            ctx.ratio_of((scale, Mode::Ebpf), (scale, Mode::Iptables), metric),
        )?;
    }
    writeln!(md)
}

fn figure_link(
    md: &mut String,
    figures: &[(&str, String)],
    slug: &str,
    what: &str,
) -> std::fmt::Result {
    if let Some((_, name)) = figures.iter().find(|(s, _)| *s == slug) {
        writeln!(md, "![{what}]({name})\n")?;
    }
    Ok(())
}

fn scale_section(
    md: &mut String,
    ctx: &Context,
    dim: Dimension,
    figures: &[(&str, String)],
) -> std::fmt::Result {
    let scales: Vec<Scale> = ctx
        .axis(dim)
        .into_iter()
        .filter(|&s| SCALE_METRICS.iter().any(|&metric| ctx.planned(s, metric)))
        .collect();
    writeln!(md, "### {}\n", capitalised(dim.axis()))?;
    if scales.is_empty() {
        return writeln!(md, "Not part of this run.\n");
    }
    writeln!(
        md,
        "| {} | measure | bare (no policy) | iptables | eBPF | eBPF ÷ iptables | eBPF ÷ bare |",
        dim.axis()
    )?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|")?;
    for &metric in &SCALE_METRICS {
        for &scale in &scales {
            let base = Scale::BASE;
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                dim.x(scale),
                metric.name(),
                ctx.cell(base, Mode::Bare, metric),
                ctx.cell(scale, Mode::Iptables, metric),
                ctx.cell(scale, Mode::Ebpf, metric),
                ctx.ratio_of((scale, Mode::Ebpf), (scale, Mode::Iptables), metric),
                ctx.ratio_of((scale, Mode::Ebpf), (base, Mode::Bare), metric),
            )?;
        }
    }
    writeln!(md)?;
    figure_link(
        md,
        figures,
        dim.slug(),
        &format!("cost against {}", dim.axis()),
    )
}

/// (metric, dimension, what the row says with N)
const CONTROL_ROWS: [(Metric, Dimension, &str); 10] = [
    (Metric::Startup, Dimension::Pus, "start-up with N PUs"),
    (
        Metric::Status,
        Dimension::Pus,
        "a status request with N PUs",
    ),
    (Metric::AddPu, Dimension::Pus, "configure PU N+1"),
    (Metric::DeletePu, Dimension::Pus, "delete PU N+1"),
    (Metric::UpdatePu, Dimension::Pus, "update the last of N PUs"),
    (Metric::Shutdown, Dimension::Pus, "shutdown with N PUs"),
    (Metric::Startup, Dimension::Acls, "start-up, PU with N ACLs"),
    (Metric::UpdatePu, Dimension::Acls, "update a PU with N ACLs"),
    (
        Metric::Startup,
        Dimension::Targets,
        "start-up with N target networks",
    ),
    (
        Metric::TargetChange,
        Dimension::Targets,
        "one target change among N",
    ),
];

fn control_section(md: &mut String, ctx: &Context, figures: &[(&str, String)]) -> std::fmt::Result {
    writeln!(md, "## 4. Control plane\n")?;
    writeln!(
        md,
        "Start-up: from starting the agent to its \"enforcer ready\" (every PU configured). \
         Reloads: from SIGHUP with the changed config file to the reload applied (the agent's \
         log line, then checked against `status` → `reloads.applied`); each reload re-reads and \
         validates the whole file. Add/delete, update and target changes alternate between two \
         configs, so every repetition is a real change.\n"
    )?;
    writeln!(md, "| operation | N | iptables | eBPF | eBPF ÷ iptables |")?;
    writeln!(md, "|---|---:|---:|---:|---:|")?;
    for (metric, dim, what) in CONTROL_ROWS {
        for scale in ctx.axis(dim) {
            if !ctx.planned(scale, metric) {
                continue;
            }
            writeln!(
                md,
                "| {what} | {} | {} | {} | {} |",
                dim.x(scale),
                ctx.cell(scale, Mode::Iptables, metric),
                ctx.cell(scale, Mode::Ebpf, metric),
                ctx.ratio_of((scale, Mode::Ebpf), (scale, Mode::Iptables), metric),
            )?;
        }
    }
    writeln!(md)?;
    figure_link(md, figures, "control", "control-plane cost against scale")
}

fn footprint_section(
    md: &mut String,
    ctx: &Context,
    figures: &[(&str, String)],
) -> std::fmt::Result {
    writeln!(md, "## 5. Footprint\n")?;
    writeln!(
        md,
        "Read once per setup after its probes: the agent's VmRSS; kernel memory — for eBPF the \
         `memlock` of the agent's BPF maps (from /proc/PID/fdinfo, each map once), for iptables \
         ipset's \"Size in memory\" of every set (the memory of rules themselves has no kernel \
         counter and is not included: see the rule count); the number of netfilter rules in \
         both families; the file descriptors the agent holds open.\n"
    )?;
    writeln!(
        md,
        "| scale | RSS iptables | RSS eBPF | kernel memory iptables (sets) | kernel memory eBPF (maps) | rules iptables | rules eBPF | open fds iptables | open fds eBPF |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for dim in Dimension::ALL {
        for scale in ctx.axis(dim) {
            if dim != Dimension::Pus && scale == Scale::BASE {
                continue;
            }
            if !ctx.planned(scale, Metric::Rss) {
                continue;
            }
            let c = |mode, metric| {
                ctx.get(scale, mode, metric).map_or_else(
                    || ctx.cell(scale, mode, metric),
                    |s| metric.unit().format(s.median),
                )
            };
            writeln!(
                md,
                "| {} {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                dim.x(scale),
                dim.axis(),
                c(Mode::Iptables, Metric::Rss),
                c(Mode::Ebpf, Metric::Rss),
                c(Mode::Iptables, Metric::KernelMemory),
                c(Mode::Ebpf, Metric::KernelMemory),
                c(Mode::Iptables, Metric::Rules),
                c(Mode::Ebpf, Metric::Rules),
                c(Mode::Iptables, Metric::OpenFiles),
                c(Mode::Ebpf, Metric::OpenFiles),
            )?;
        }
    }
    writeln!(md)?;
    figure_link(md, figures, "footprint", "footprint against PUs")
}

/// Where eBPF stands against iptables for one figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Ahead,
    /// Within 5%, or within each other's interquartile range.
    OnPar,
    Behind,
}

impl Standing {
    fn name(self) -> &'static str {
        match self {
            Standing::Ahead => "ahead",
            Standing::OnPar => "on par",
            Standing::Behind => "behind",
        }
    }
}

/// Ahead or behind needs a median more than 5% apart *and* interquartile
/// ranges that do not overlap (with n=1, the single readings).
fn standing(metric: Metric, ebpf: Summary, iptables: Summary) -> Standing {
    let relative = (ebpf.median - iptables.median).abs() / iptables.median.abs().max(1e-12);
    let overlap = ebpf.q1 <= iptables.q3 && iptables.q1 <= ebpf.q3;
    let better = match metric.higher_is_better() {
        true => ebpf.median > iptables.median,
        false => ebpf.median < iptables.median,
    };
    if relative <= 0.05 || overlap {
        Standing::OnPar
    } else if better {
        Standing::Ahead
    } else {
        Standing::Behind
    }
}

/// Why eBPF is not ahead for a kind of figure: the mechanism, from the
/// code of both datapaths.
fn why(metric: Metric) -> &'static str {
    match metric {
        Metric::UdpSendtoDelivered(_) => {
            "Unconnected UDP is judged per datagram in the eBPF datapath: its sendmsg hook runs for \
             every `sendto` (a hash, two LPM lookups and the ACL walk), because no socket-level \
             verdict can cover datagrams to changing peers. iptables judges the first datagram of \
             each conntrack flow and accepts the rest by connection mark, like a connected socket."
        }
        Metric::TcpThroughput(_) | Metric::UdpDelivered(_) | Metric::UdpSent(_) => {
            "Established flows take a short path in both datapaths: after its first packet a flow \
             is accepted by its connection mark — by iptables after an excluded-set lookup and \
             about five rules of `TRI-App`/`TRI-Net`, by eBPF after two fixed rules. No per-PU \
             rule, ACL or target set is consulted, so neither grows with PUs, ACLs or networks. \
             The difference is per packet: every packet a PU sends also passes eBPF's \
             `cgroup_skb` egress program (it judges ICMP and other protocols, and completes \
             pending flow-log lines from a connection's first packet: two header loads and one \
             array read for TCP/UDP), which iptables does not have. It shows with small \
             datagrams, and it vanishes in bulk TCP, where a packet is a 64 KiB GSO segment and \
             copying dominates."
        }
        Metric::ConnRate(Peer::Target)
        | Metric::ConnP50(Peer::Target)
        | Metric::ConnP99(Peer::Target)
        | Metric::PastTrap => {
            "Every new connection to a target network waits for the agent's verdict in user space \
             (NFQUEUE) in both datapaths, through the same consumer (one thread woken by \
             `poll(2)`, batch verdicts). That round trip is far above either datapath's \
             classification (a walk of the cgroup hooks and PU chain, or a hash and LPM lookup), \
             so it sets the rate and the latency alike for both; eBPF's cheaper classification \
             shows here only where the iptables walk grows long (many PUs or ACLs)."
        }
        Metric::HsConnRate
        | Metric::HsConnP50
        | Metric::HsConnP99
        | Metric::HsRefused
        | Metric::HsBypassed => {
            "Through the identity handshake five packets of each connection reach user space — \
             the SYN and the SYN-ACK on both hosts, copied whole, and the server's first ACK — \
             and each host's consumer signs one token and verifies the other's (Ed25519), judges \
             the labels against the PU's identity policy and rewrites the packet. That work is the \
             same code in both datapaths (the trap consumer and its handshake engine), it runs on \
             both hosts' agents sharing the machine's two CPUs, and it dwarfs either datapath's \
             classification; the datapath only decides which packets are queued, and both queue \
             the same ones."
        }
        Metric::InConnRate(_) | Metric::InConnP50(_) | Metric::InConnP99(_) => {
            "An incoming connection is judged at its SYN on the network side: iptables walks \
             `TRI-Net` to the PU's chain (found by its port set) and the PU's network ACL rules; \
             eBPF's TC ingress program on the veth parses every packet, looks the PU up by port \
             and the source in the LPM trie and writes the mark the fixed rules act on. From a \
             target network the SYN then waits for the agent's verdict in both, through the same \
             consumer, which sets the rate; from an ACL peer the connection's own set-up \
             dominates with a small policy."
        }
        Metric::ReqRate(Route::Proxy)
        | Metric::ReqP50(Route::Proxy)
        | Metric::ReqP99(Route::Proxy) => {
            "A redirected connection costs each datapath little and differently: iptables sends \
             its SYN through the nat OUTPUT redirect chain (a proxy-set lookup and `REDIRECT`, \
             which sets up conntrack NAT) and then translates every packet of the connection both \
             ways, and the proxy's `SO_ORIGINAL_DST` reads the conntrack entry; eBPF rewrites the \
             destination once in the connect hook (one trie lookup), files the original by \
             socket cookie and again by client address in sock_ops, and answers the \
             proxy's `getsockopt` from that map — no NAT, no per-packet work. Either is small beside what the path costs \
             itself: a second connection (proxy to service), the proxy's accept, its thread per \
             connection and the relaying copies, all on the same two CPUs — the same under both \
             datapaths, and it sets the rate and the latency (the bare kernel's proxy reached by \
             its address shows that cost alone)."
        }
        Metric::ConnRate(Peer::Acl)
        | Metric::ConnP50(Peer::Acl)
        | Metric::ConnP99(Peer::Acl)
        | Metric::ReqRate(Route::Direct)
        | Metric::ReqP50(Route::Direct)
        | Metric::ReqP99(Route::Direct) => {
            "A new connection to an ACL peer is judged once, at its SYN: iptables walks \
             `TRI-Pid-App` (one `-m cgroup` rule per PU, in order) and the PU's ACL rules (one per \
             ACL and protocol, each a set lookup); eBPF runs the connect hook (a hash lookup, an \
             LPM lookup, a `bpf_setsockopt`). With a few PUs and ACLs the iptables walk is a \
             handful of rules, as cheap as the hook; the connection's own set-up (two namespaces, \
             conntrack, the reset) dominates either way."
        }
        Metric::Startup | Metric::Shutdown => {
            "eBPF pays a fixed cost at start (loading and verifying its object, pinning its maps, \
             installing its fixed rules) and at shutdown (unpinning, removing them) that iptables \
             does not pay with few PUs; past that, iptables configures the PUs in batches of 250 \
             (one `ipset restore` and one `iptables-restore` per family each), and the kernel \
             looks every set up by name in a list of all sets, so its cost still grows faster \
             than the PUs; eBPF pays a few map writes and one cgroup attachment per hook."
        }
        Metric::AddPu | Metric::DeletePu | Metric::UpdatePu | Metric::TargetChange => {
            "A reload first re-reads, validates and diffs the whole config file — the same work \
             for both datapaths — and with few PUs, ACLs or networks that dominates; the datapath \
             part is small either way (map writes, or one `ipset restore` plus an \
             `iptables-restore` per family on a small rule set). Target changes are set updates in \
             both: an LPM trie write or an ipset add/del, neither of which depends on the set's \
             size."
        }
        Metric::Status => {
            "A status reads the datapath's counters. The eBPF datapath reads one per-CPU map entry \
             per PU; the iptables datapath runs `iptables-save -c` for both families and reads \
             each save once (`save::counts_by_chain`), so its cost grows with the rules. With few \
             PUs both are quick and the agent's own work dominates."
        }
        Metric::Rss => {
            "The eBPF agent keeps the loaded object (programs, BTF, relocation data) and its map \
             handles in memory; the iptables agent keeps only the policy, which it renders to text \
             on demand."
        }
        Metric::KernelMemory => {
            "The eBPF hash and array maps are preallocated at full capacity (16384 PU slots, \
             per-CPU counters) whatever the number of PUs, while ipsets grow with their content; \
             with few PUs the sets are smaller. The iptables figure counts sets only — its rules' \
             memory has no counter and is left out, which favours iptables."
        }
        Metric::Rules => "eBPF keeps a fixed handful of rules whatever the policy.",
        Metric::OpenFiles => {
            "The eBPF agent holds descriptors for its maps, its programs and the ring buffer it \
             reads — a fixed few dozen; the iptables agent holds little more than its control \
             socket. The links that attach the hooks to each PU's cgroup are held by their pins \
             on bpffs, not by descriptors: a count that grows with the PUs here would mean the \
             agent holds one per link again, which capped it at about 5000 PUs under a 20000 \
             open-files limit before commit 60b94f7."
        }
    }
}

fn findings(md: &mut String, ctx: &Context) -> std::fmt::Result {
    writeln!(md, "## Where eBPF is not ahead of the fallback, and why\n")?;
    writeln!(
        md,
        "Every figure measured for both datapaths, compared: eBPF is *ahead* when its median is \
         better by more than 5% and the two interquartile ranges do not overlap, *behind* when \
         worse by the same test, *on par* otherwise. Generated from the figures above; the \
         reasons are the mechanisms in the two datapaths' code.\n"
    )?;
    let mut scales: Vec<Scale> = ctx.plan.setups.iter().map(|s| s.scale).collect();
    scales.sort();
    scales.dedup();
    let metrics = ESTABLISHED
        .iter()
        .chain(&CONNECTIONS)
        .chain(&HANDSHAKE)
        .chain(&PROXY)
        .copied()
        .filter(|m| !m.counts_failures())
        .chain([
            Metric::Startup,
            Metric::Status,
            Metric::Shutdown,
            Metric::AddPu,
            Metric::DeletePu,
            Metric::UpdatePu,
            Metric::TargetChange,
        ])
        .chain(FOOTPRINT);
    let mut counts = [0usize; 3];
    let mut reasons: Vec<(&'static str, Vec<FigureItems>)> = Vec::new();
    for metric in metrics {
        for &scale in &scales {
            let (Some(e), Some(i)) = (
                ctx.get(scale, Mode::Ebpf, metric),
                ctx.get(scale, Mode::Iptables, metric),
            ) else {
                continue;
            };
            let standing = standing(metric, e, i);
            counts[standing as usize] += 1;
            if standing == Standing::Ahead {
                continue;
            }
            let item = format!(
                "{} {} ({})",
                standing.name(),
                short(scale),
                ratio(e.median, i.median)
            );
            let reason = why(metric);
            let group = match reasons.iter_mut().position(|(r, _)| *r == reason) {
                Some(at) => &mut reasons[at].1,
                None => {
                    reasons.push((reason, Vec::new()));
                    &mut reasons.last_mut().expect("just pushed").1
                }
            };
            match group.iter_mut().find(|(m, _)| *m == metric) {
                Some((_, items)) => items.push(item),
                None => group.push((metric, vec![item])),
            }
        }
    }
    let [ahead, on_par, behind] = counts;
    writeln!(
        md,
        "Of {} comparisons eBPF is ahead in {ahead}, on par in {on_par} and behind in {behind}. \
         Every comparison where it is not ahead, by figure (eBPF ÷ iptables in brackets):\n",
        ahead + on_par + behind
    )?;
    for (reason, metrics) in reasons {
        for (metric, items) in metrics {
            writeln!(md, "- **{}**: {}", metric.name(), items.join(", "))?;
        }
        writeln!(md, "\n  *Why:* {reason}\n")?;
    }
    Ok(())
}

/// One figure's comparisons where eBPF is not ahead, as shown.
type FigureItems = (Metric, Vec<String>);

/// A scale as the one dimension that differs from the base.
fn short(scale: Scale) -> String {
    let base = Scale::BASE;
    match (
        scale.pus != base.pus,
        scale.acls != base.acls,
        scale.targets != base.targets,
    ) {
        (false, false, false) => "at the base (1 PU, 1 ACL, 1 target)".into(),
        (true, false, false) => format!("at {} PUs", scale.pus),
        (false, true, false) => format!("at {} ACLs", scale.acls),
        (false, false, true) => format!("at {} targets", scale.targets),
        _ => format!("at {scale}"),
    }
}

fn not_measured(md: &mut String, ctx: &Context) -> std::fmt::Result {
    writeln!(md, "## Not measured (N/A)\n")?;
    for (scale_mode, why) in ctx.results.all_unmeasured() {
        let (scale, mode) = scale_mode;
        writeln!(
            md,
            "- † {} at {scale}: N/A — not measured, because {why}. This is a finding about the \
             datapath at this scale, not a gap in the harness.",
            mode.name()
        )?;
    }
    for line in [
        "IPv6: N/A — not yet measured, because the benchmark world is IPv4-only for now; both \
         datapaths handle IPv6 through the same code as IPv4 (iptables: the same rules in \
         ip6tables; eBPF: IPv4-mapped keys in the same maps).",
        "The bare kernel in scenarios 4 and 5: N/A — there is no agent, no control plane and \
         nothing held in the kernel.",
        "Kernel memory of iptables rules: N/A — no kernel interface reports it per rule set; \
         the rule count stands in for it.",
    ] {
        writeln!(md, "- {line}")?;
    }
    writeln!(md)?;
    if !ctx.results.notes.is_empty() {
        writeln!(md, "### Notes from the run\n")?;
        for note in &ctx.results.notes {
            writeln!(md, "- {note}")?;
        }
        writeln!(md)?;
    }
    Ok(())
}

fn method(md: &mut String, ctx: &Context) -> std::fmt::Result {
    writeln!(md, "## Method\n")?;
    let budget = ctx.plan.start_budget.as_secs();
    for line in [
        "`cargo xtask bench` builds the workspace for release and runs `target/release/bench run \
         --agent target/release/enforcer`. For each mode the runner makes two network namespaces \
         joined by a veth pair (`enfbench<pid>…`), servers in the peer namespace, and one cgroup \
         v2 directory per PU; it removes all of it on every path, Ctrl-C included."
            .to_owned(),
        "Each mode has a world of its own, identical to the others. For each setup (a policy \
         scale) the runner starts the release agent of each datapath in its world with \
         `--netns` and `--instance` of its own and `--datapath iptables|ebpf`, waits for it to \
         be ready, then runs every probe the stated number of times from a client process \
         started inside the last PU's cgroup (the runner's own binary as `bench client …`), the \
         modes taking turns at every repetition so that a change in the machine's background \
         load hits every mode alike; then the control-plane reloads, likewise in turns; then it \
         reads the footprint and stops the agents with SIGTERM. While one mode is measured the \
         other agents are idle."
            .to_owned(),
        "The identity handshake's setup starts two agents per datapath in its world: one in the \
         PU's namespace (host A) and one in the peer namespace (host B), for a PU of its own \
         whose process (the runner's binary as `bench client accept`) is the server; key pairs \
         are made for the run with the agent's keygen code. Its agents' start-up and shutdown \
         are shown in the progress, not counted as the base scale's."
            .to_owned(),
        "The proxy scenario (issue 6) starts one agent per datapath in its world with a config \
         of one PU (an accept ACL for the ACL peer, a `proxy_port`, the service's address and \
         port as a dependent service) and `[host] cgroup` at a cgroup of the world; the test \
         proxy of `tests/src/proxy.rs` listens on the proxy port on a socket made in that \
         cgroup (by `nettool hold-listener`, which must sit beside the runner) and runs as \
         threads of the runner, outside the PU. Its agents' start-up and shutdown are shown in \
         the progress, not counted as the base scale's."
            .to_owned(),
        format!(
            "An agent that is not ready within {budget} s is killed and cleaned up, and its \
             setup reported as not measurable (†)."
        ),
        match ctx.results.nofile {
            Some(limit) => format!(
                "The agents ran with an open-files limit of {limit} (the runner asks for 2²⁰, \
                 as a service unit with `LimitNOFILE=infinity` would get, and otherwise raises \
                 the soft limit to the hard one)."
            ),
            None => "The agents' open-files limit could not be read.".to_owned(),
        },
        "TCP throughput: bytes written over the time from the first write until the peer, \
         having read everything, closed the connection. UDP: datagrams the peer's socket \
         received (delivered) and datagrams `send` accepted (sent), per second of sending, \
         after one datagram and a 100 ms pause so that a trapped flow has its verdict."
            .to_owned(),
        "The two CPUs are shared by the client, the servers, the agent and the kernel's packet \
         processing, so absolute figures are those of this small machine; the ratios are the \
         point. Compare runs by their ratios, and check the other-load line in the header."
            .to_owned(),
    ] {
        writeln!(md, "- {line}")?;
    }
    writeln!(md)
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().collect::<String>() + chars.as_str())
        .unwrap_or_default()
}

/// The SVG figures: one per scale dimension (traffic), control plane,
/// footprint.
fn figures_of(ctx: &Context) -> Vec<(&'static str, String)> {
    let mut figures = Vec::new();
    for dim in Dimension::ALL {
        let panels: Vec<Panel> = SCALE_METRICS
            .iter()
            .map(|&m| panel(ctx, dim, m, m.name(), true))
            .collect();
        if has_data(&panels) {
            let title = format!("Traffic of the last PU against {}", dim.axis());
            figures.push((dim.slug(), svg::figure(&title, &panels)));
        }
    }
    let control: Vec<Panel> = [
        (Metric::Startup, Dimension::Pus),
        (Metric::Status, Dimension::Pus),
        (Metric::AddPu, Dimension::Pus),
        (Metric::UpdatePu, Dimension::Pus),
        (Metric::UpdatePu, Dimension::Acls),
        (Metric::Startup, Dimension::Acls),
        (Metric::TargetChange, Dimension::Targets),
        (Metric::Startup, Dimension::Targets),
    ]
    .iter()
    .map(|&(m, dim)| {
        panel(
            ctx,
            dim,
            m,
            format!("{} by {}", m.name(), dim.axis()),
            false,
        )
    })
    .collect();
    if has_data(&control) {
        figures.push((
            "control",
            svg::figure("Control plane against scale", &control),
        ));
    }
    let footprint: Vec<Panel> = FOOTPRINT
        .iter()
        .map(|&m| panel(ctx, Dimension::Pus, m, m.name(), false))
        .collect();
    if has_data(&footprint) {
        figures.push((
            "footprint",
            svg::figure("Footprint against PUs", &footprint),
        ));
    }
    figures
}

fn has_data(panels: &[Panel]) -> bool {
    panels
        .iter()
        .any(|p| p.series.iter().any(|s| !s.points.is_empty()))
}

/// One panel: a line per datapath along `dim`, and the bare kernel as a
/// dashed reference when `with_bare`.
fn panel(ctx: &Context, dim: Dimension, metric: Metric, title: String, with_bare: bool) -> Panel {
    let axis = ctx.axis(dim);
    let point = |scale: Scale, s: Summary| Point {
        x: dim.x(scale) as f64,
        median: s.median,
        min: s.min,
        max: s.max,
    };
    let mut series: Vec<Series> = [(Mode::Iptables, "#d62728"), (Mode::Ebpf, "#1f77b4")]
        .into_iter()
        .map(|(mode, color)| Series {
            name: mode.name(),
            color,
            dashed: false,
            points: axis
                .iter()
                .filter_map(|&s| ctx.get(s, mode, metric).map(|v| point(s, v)))
                .collect(),
        })
        .collect();
    let xs: Vec<f64> = series.iter().flat_map(|s| &s.points).map(|p| p.x).collect();
    if with_bare
        && let Some(bare) = ctx.get(Scale::BASE, Mode::Bare, metric)
        && !xs.is_empty()
    {
        let (lo, hi) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        let flat = |x| Point {
            x,
            median: bare.median,
            min: bare.min,
            max: bare.max,
        };
        series.push(Series {
            name: "bare (no policy)",
            color: "#555555",
            dashed: true,
            points: vec![flat(lo), flat(hi)],
        });
    }
    Panel {
        title,
        x_label: dim.axis().to_owned(),
        unit: metric.unit(),
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(v: &[f64]) -> Summary {
        Summary::of(v).unwrap()
    }

    #[test]
    fn standing_needs_a_clear_margin() {
        let rate = Metric::ConnRate(Peer::Acl);
        let time = Metric::Startup;
        let (a, b) = (summary(&[10.0, 11.0, 12.0]), summary(&[20.0, 21.0, 22.0]));
        assert_eq!(standing(rate, b, a), Standing::Ahead);
        assert_eq!(standing(rate, a, b), Standing::Behind);
        assert_eq!(standing(time, a, b), Standing::Ahead);
        let close = summary(&[10.2, 10.3, 10.4]);
        assert_eq!(standing(rate, close, a), Standing::OnPar);
        let wide = summary(&[5.0, 11.0, 15.0, 17.0, 25.0]);
        assert_eq!(standing(rate, wide, a), Standing::OnPar);
        // An outlier widens min–max but not the interquartile range.
        let outlier = summary(&[2.0, 20.0, 21.0, 22.0, 23.0]);
        assert_eq!(standing(rate, outlier, a), Standing::Ahead);
    }

    fn test_machine() -> Machine {
        Machine {
            date: "2026-01-01".into(),
            commit: "abc1234".into(),
            changed: Vec::new(),
            cpus: 2,
            cpu_model: "Test CPU".into(),
            memory: "1.0 GiB".into(),
            kernel: "6.18".into(),
            iptables: "iptables v1.8.9 (nf_tables)".into(),
        }
    }

    /// Three runs of `metric` in `mode` at the base scale, 1 % either side
    /// of `v`.
    fn three_runs(results: &mut Results, mode: Mode, metric: Metric, v: f64) {
        for x in [v * 0.99, v, v * 1.01] {
            results.add(Scale::BASE, mode, metric, x);
        }
    }

    /// A report's context, without interference, for `command` that took
    /// `secs` seconds.
    fn test_context<'a>(
        plan: &'a Plan,
        machine: &'a Machine,
        results: &'a Results,
        secs: u64,
        command: &str,
    ) -> Context<'a> {
        Context {
            plan,
            machine,
            results,
            elapsed: Duration::from_secs(secs),
            interference: None,
            command: command.into(),
        }
    }

    #[test]
    fn the_handshake_is_compared_with_the_bare_kernel_and_the_trap_without_identity() {
        let plan = Plan::new(true, &[Part::Base, Part::Handshake]);
        let base = Scale::BASE;
        let mut results = Results::default();
        let mut add = |mode, metric, v| three_runs(&mut results, mode, metric, v);
        // The trap without identity (the base setup's figures).
        add(Mode::Bare, Metric::ConnRate(Peer::Target), 40e3);
        add(Mode::Iptables, Metric::ConnRate(Peer::Target), 20e3);
        add(Mode::Ebpf, Metric::ConnRate(Peer::Target), 25e3);
        add(Mode::Bare, Metric::ConnP99(Peer::Target), 0.002);
        add(Mode::Iptables, Metric::ConnP99(Peer::Target), 0.004);
        // Through the handshake.
        add(Mode::Iptables, Metric::HsConnRate, 8e3);
        add(Mode::Ebpf, Metric::HsConnRate, 6e3);
        add(Mode::Iptables, Metric::HsConnP99, 0.02);
        add(Mode::Ebpf, Metric::HsRefused, 0.0);
        add(Mode::Iptables, Metric::HsBypassed, 300.0);
        let machine = test_machine();
        let ctx = test_context(
            &plan,
            &machine,
            &results,
            61,
            "cargo xtask bench --quick --only handshake",
        );
        let md = markdown(&ctx, &[], "x.json");
        // Bare 40 k, iptables 8 k (0.2× bare, 0.4× its 20 k without
        // identity), eBPF 6 k (0.15× bare, 0.24× its 25 k), eBPF ÷
        // iptables 0.75.
        let rate = "| new TCP connections through the identity handshake | 40.0 k conn/s (39.6–40.4) \
                    | 8.00 k conn/s (7.92–8.08) | 6.00 k conn/s (5.94–6.06) | 0.20× | 0.15× \
                    | 0.40× | 0.24× | 0.75× |";
        assert!(md.contains(rate), "{md}");
        // Latency: iptables 20 ms against 2 ms bare and 4 ms without
        // identity; eBPF measured nothing.
        assert!(
            md.contains(
                "| identity handshake connect latency p99 | 2.00 ms (1.98–2.02) \
                 | 20.0 ms (19.8–20.2) | – | 10.0× | – | 5.00× | – | – |"
            ),
            "{md}"
        );
        // Refusals have no reference without identity.
        assert!(
            md.contains("| handshakes refused per probe (both agents) | – | – | 0 (0–0) | – | – | – | – | – |"),
            "{md}"
        );
        assert!(
            md.contains("| connections past the handshake per probe | – | 300 (297–303) | – | – | – | – | – | – |"),
            "{md}"
        );
        // The headline's bare column is the trap's.
        assert!(
            md.contains(
                "| new TCP connections through the identity handshake | 40.0 k conn/s (39.6–40.4) \
                 | 8.00 k conn/s (7.92–8.08) | 6.00 k conn/s (5.94–6.06) | 0.75× |"
            ),
            "{md}"
        );
        assert!(!md.contains("identity handshake: N/A"), "{md}");
        assert!(plan.yields(base, Mode::Ebpf, Metric::HsConnRate));
        assert!(!plan.yields(base, Mode::Bare, Metric::HsConnRate));
    }

    #[test]
    fn the_proxy_is_compared_with_the_direct_path_per_mode_and_across_datapaths() {
        let plan = Plan::new(true, &[Part::Proxy]);
        let mut results = Results::default();
        let mut add = |mode, metric, v| three_runs(&mut results, mode, metric, v);
        for (mode, direct, proxied) in [
            (Mode::Bare, 10e3, 5e3),
            (Mode::Iptables, 9e3, 4e3),
            (Mode::Ebpf, 9e3, 4.4e3),
        ] {
            add(mode, Metric::ReqRate(Route::Direct), direct);
            add(mode, Metric::ReqRate(Route::Proxy), proxied);
        }
        add(Mode::Iptables, Metric::ReqP50(Route::Direct), 0.0001);
        add(Mode::Iptables, Metric::ReqP50(Route::Proxy), 0.0003);
        let machine = test_machine();
        let ctx = test_context(
            &plan,
            &machine,
            &results,
            30,
            "cargo xtask bench --quick --only proxy",
        );
        let md = markdown(&ctx, &[], "x.json");
        assert!(md.contains("### Through the PU's proxy"), "{md}");
        // Through the proxy: iptables 0.80× the bare proxy by address,
        // eBPF 0.88×, eBPF ÷ iptables 1.10×.
        assert!(
            md.contains(
                "| requests through the proxy → dependent service | 5.00 k conn/s (4.95–5.05) \
                 | 4.00 k conn/s (3.96–4.04) | 4.40 k conn/s (4.36–4.44) | 0.80× | 0.88× | 1.10× |"
            ),
            "{md}"
        );
        // Proxy ÷ direct, per mode; eBPF has no p50.
        assert!(
            md.contains("| request rate | 0.50× | 0.44× | 0.49× |"),
            "{md}"
        );
        assert!(
            md.contains("| request latency p50 | – | 3.00× | – |"),
            "{md}"
        );
        // In the headline, and in the findings with its reason: eBPF is
        // ahead through the proxy here, on par on the direct path.
        assert!(md.contains("| requests through the proxy → dependent service | 5.00 k conn/s"));
        assert!(
            md.contains("- **requests direct → ACL peer**: on par at the base"),
            "{md}"
        );
        assert!(!md.contains("- **requests through the proxy"), "{md}");
        // Without the part, the section says so.
        let other = Plan::new(true, &[Part::Base]);
        let ctx = Context {
            plan: &other,
            ..ctx
        };
        let md = markdown(&ctx, &[], "x.json");
        assert!(
            md.contains("### Through the PU's proxy\n\nNot part of this run."),
            "{md}"
        );
    }

    #[test]
    fn a_report_covers_every_section_and_marks_what_was_not_measured() {
        let plan = Plan::new(true, &[Part::Base, Part::Pus]);
        let mut results = Results::default();
        let base = Scale::BASE;
        for (mode, rate) in [
            (Mode::Bare, 30e3),
            (Mode::Iptables, 20e3),
            (Mode::Ebpf, 25e3),
        ] {
            three_runs(&mut results, mode, Metric::ConnRate(Peer::Acl), rate);
        }
        results.add(base, Mode::Ebpf, Metric::Startup, 0.5);
        results.add(base, Mode::Iptables, Metric::Startup, 0.1);
        let big = Scale { pus: 100, ..base };
        results.set_unmeasured(big, Mode::Iptables, "it was too slow".into());
        results.add(big, Mode::Ebpf, Metric::Startup, 0.7);
        let machine = test_machine();
        let ctx = test_context(
            &plan,
            &machine,
            &results,
            61,
            "sudo -E cargo xtask bench --quick",
        );
        let figures = figures_of(&ctx);
        let names: Vec<(&str, String)> = figures
            .iter()
            .map(|(slug, _)| (*slug, format!("x-{slug}.svg")))
            .collect();
        let md = markdown(&ctx, &names, "x.json");
        for heading in [
            "## Headline",
            "## 1. Established flows",
            "## 2. Scale",
            "## 3. Connection rate",
            "## 4. Control plane",
            "## 5. Footprint",
            "## Where eBPF is not ahead",
            "## Not measured (N/A)",
            "## Method",
        ] {
            assert!(md.contains(heading), "{heading} missing:\n{md}");
        }
        assert!(md.contains(
            "| new TCP connections → ACL peer | 30.0 k conn/s (29.7–30.3) | 20.0 k conn/s"
        ));
        assert!(md.contains("1.25×"), "eBPF ÷ iptables:\n{md}");
        assert!(md.contains("N/A†"));
        // The headline shows the largest scale both datapaths reached, and
        // the larger one only eBPF reached.
        assert!(md.contains("| start-up at 1 PUs | – | 100 ms (n=1) | 500 ms (n=1) | 5.00× |"));
        assert!(md.contains("| start-up at 100 PUs | – | N/A† | 700 ms (n=1) | – |"));
        assert!(md.contains("it was too slow"));
        assert!(
            md.contains(
                "- **start-up to ready**: behind at the base (1 PU, 1 ACL, 1 target) (5.00×)"
            ),
            "{md}"
        );
        assert!(md.contains("![cost against PUs](x-pus.svg)"));
        assert!(md.contains("took 1m01s"));
        assert!(md.contains("[x.json](x.json)"));
    }
}
