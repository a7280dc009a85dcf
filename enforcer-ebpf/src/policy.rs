//! Lookups shared by the hooks: which PU a task belongs to, whether an
//! address is in a global set, what a PU's ACLs say, the mark layout.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    cty::c_long,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_uid_gid,
        bpf_get_netns_cookie, bpf_loop,
    },
    maps::lpm_trie::Key,
};
use enforcer_common::{
    maps::{
        ACTION_ACCEPT, ACTION_REJECT, AclEntry, AclRule, FlowEvent, MAX_ACL_RULES,
        MAX_CGROUP_DEPTH, MAX_DEFERRED_FLOWS, NetKey, OBSERVE_CONTINUE, OBSERVE_NONE,
        POLICY_DEFAULT, PORT_OF_SERVICE, PROTO_ANY, PendingFlowKey, PortKey, PuCounts, RULE_LOG,
        SCOPE_BITS, acl_scope, family_scope, is_v4_mapped, net_acl_scope, port_slot,
    },
    marks::MarkLayout,
};

use crate::maps::{
    ACLS, FALLBACK_PU, FLOW_EVENTS, NETS, PENDING_COUNT, PENDING_FLOWS, PU_BY_CGROUP, PU_BY_UID,
    PU_COUNTS, PU_GENERATION, PU_PORTS,
};

/// The mark layout's shift; the loader sets it before loading.
#[unsafe(no_mangle)]
static MARK_SHIFT: u32 = enforcer_common::marks::DEFAULT_SHIFT;

/// The cookie of the agent's network namespace; the loader sets it.
#[unsafe(no_mangle)]
static NETNS_COOKIE: u64 = 0;

/// 1 when DNS is let through (sidecar mode); the loader sets it.
#[unsafe(no_mangle)]
static ALLOW_DNS: u32 = 0;

/// The agent's own thread group id (in the initial pid namespace); the
/// loader sets it.
#[unsafe(no_mangle)]
static AGENT_TGID: u32 = 0;

/// Cgroup hooks act on every process of the cgroup, whatever its network
/// namespace; the agent enforces in its own only (as its netfilter rules
/// do), so sockets of other namespaces are left alone.
#[inline(always)]
pub fn in_agent_netns(ctx: *mut core::ffi::c_void) -> bool {
    // SAFETY: `ctx` is the program's context; volatile for the patched
    // global as above.
    unsafe { bpf_get_netns_cookie(ctx) == core::ptr::read_volatile(&NETNS_COOKIE) }
}

#[inline(always)]
pub fn mark_layout() -> MarkLayout {
    // SAFETY: a plain read of a global the loader patched; volatile so the
    // compiler cannot fold in the default value.
    let shift = unsafe { core::ptr::read_volatile(&MARK_SHIFT) };
    // An impossible shift falls back to the default rather than failing
    // the connection; the loader validates it anyway.
    MarkLayout::new(shift).unwrap_or_default()
}

/// Which attachment a program runs from: a linux-process PU's own cgroup,
/// or the host scope (one cgroup, by default the cgroup v2 root, holding
/// every task a uid, host-service, host or container PU can claim).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    PuCgroup,
    Host,
}

/// The PU whose policy judges what a task sends, if it is this program's
/// to judge — SPEC's priority: the uid PU of the task's user, then the
/// linux-process PU of its cgroup, then the host-service PU whose port the
/// socket is bound to (`local_port`), then the namespace-wide PU (host or
/// container).
///
/// A cgroup program runs for the tasks of its cgroup and of every cgroup
/// below it, and programs linked to a cgroup and to an ancestor both run
/// (links always stack). A task in a PU's cgroup under the host scope
/// meets both the PU cgroup's programs and the host scope's: the host
/// scope's leave it alone, and the PU cgroup's judge it whole — by its uid
/// PU if it has one, else by the cgroup's PU. So every task is judged
/// exactly once, by one PU: `cgroup` is the task's PU cgroup lookup
/// ([`pu_of_cgroup`]), `uid` its user.
///
/// A PU cgroup is mapped in `PU_BY_CGROUP` only while its programs are
/// attached (the agent attaches before it maps, unmaps before it
/// detaches), so a task the host scope leaves alone is always judged.
#[inline(always)]
pub fn judging_pu(
    scope: Scope,
    cgroup: impl FnOnce() -> Option<u32>,
    uid: impl FnOnce() -> u32,
    local_port: Option<PortKey>,
) -> Option<u32> {
    let in_cgroup = cgroup();
    match scope {
        // No PU maps the cgroup (yet, or any more): the host scope judges.
        Scope::PuCgroup => {
            in_cgroup?;
            uid_pu(uid()).or(in_cgroup)
        }
        Scope::Host if in_cgroup.is_some() => None,
        Scope::Host => uid_pu(uid())
            .or_else(|| local_port.and_then(service_pu))
            .or_else(fallback_pu),
    }
}

/// The PU slot of the current task's cgroup: its own, or the nearest
/// ancestor that is a PU's cgroup (processes in sub-cgroups belong to the
/// PU above them).
#[inline(always)]
pub fn current_cgroup_pu() -> Option<u32> {
    // SAFETY: helpers without arguments that can fail; 0 means none (and
    // 0 for levels deeper than the task's cgroup).
    pu_of_cgroup(unsafe { bpf_get_current_cgroup_id() }, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// The current task's uid.
#[inline(always)]
pub fn current_uid() -> u32 {
    // SAFETY: a helper without arguments; the low half is the uid.
    unsafe { bpf_get_current_uid_gid() as u32 }
}

/// The uid PU of `uid`.
#[inline(always)]
fn uid_pu(uid: u32) -> Option<u32> {
    // SAFETY: a map lookup with a key on the stack.
    unsafe { PU_BY_UID.get(uid) }.copied()
}

/// The PU listening on a port (any kind): whose an incoming packet is.
#[inline(always)]
pub fn port_pu(key: PortKey) -> Option<u32> {
    // SAFETY: a map lookup with a key on the stack.
    unsafe { PU_PORTS.get(key) }.map(|&owner| port_slot(owner))
}

/// The host-service PU of a port: whose a socket bound to it is.
#[inline(always)]
fn service_pu(key: PortKey) -> Option<u32> {
    // SAFETY: a map lookup with a key on the stack.
    match unsafe { PU_PORTS.get(key) } {
        Some(&owner) if owner & PORT_OF_SERVICE != 0 => Some(port_slot(owner)),
        _ => None,
    }
}

/// The namespace-wide PU: the host PU, or the container PU.
#[inline(always)]
pub fn fallback_pu() -> Option<u32> {
    match FALLBACK_PU.get(0).copied() {
        Some(plus_one) if plus_one != 0 => Some(plus_one - 1),
        _ => None,
    }
}

/// The agent's thread group id: its own sockets are no PU's to guard.
#[inline(always)]
pub fn agent_tgid() -> u32 {
    // SAFETY: a plain read of a global the loader patched; volatile as
    // for the mark shift.
    unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

/// Whether DNS is let through whatever the ACLs (sidecar mode).
#[inline(always)]
pub fn allow_dns() -> bool {
    // SAFETY: a plain read of a global the loader patched; volatile as
    // for the mark shift.
    unsafe { core::ptr::read_volatile(&ALLOW_DNS) != 0 }
}

/// The PU slot of a cgroup, given its id and its ancestors' by level
/// (0 is the root).
#[inline(always)]
pub fn pu_of_cgroup(own: u64, ancestor: impl Fn(i32) -> u64) -> Option<u32> {
    // SAFETY: a map lookup with a key on the stack.
    if let Some(slot) = unsafe { PU_BY_CGROUP.get(own) } {
        return Some(*slot);
    }
    let mut level = MAX_CGROUP_DEPTH;
    while level > 0 {
        let id = ancestor(level as i32);
        // SAFETY: a map lookup with a key on the stack.
        if id != 0
            && let Some(slot) = unsafe { PU_BY_CGROUP.get(id) }
        {
            return Some(*slot);
        }
        level -= 1;
    }
    None
}

/// The full-length trie key of `addr` (IPv4-mapped for IPv4) in `scope`,
/// with the scope's family bit taken from the address.
#[inline(always)]
fn lookup_key(scope: u32, addr: [u8; 16]) -> Key<NetKey> {
    let scope = family_scope(scope, is_v4_mapped(&addr));
    Key::new(SCOPE_BITS + 128, NetKey::new(scope, addr))
}

/// Is `addr` (IPv4-mapped for IPv4) in the global set `scope`?
#[inline(always)]
pub fn in_set(scope: u32, addr: [u8; 16]) -> bool {
    NETS.get(lookup_key(scope, addr)).is_some()
}

/// Which of a PU's ACLs: application (destinations of its outgoing
/// traffic) or network (sources of its incoming traffic).
#[derive(Clone, Copy)]
pub enum Side {
    App,
    Net,
}

/// The ACL entry of the longest prefix covering `addr` among the PU's
/// ACLs of `side`, in the generation in force.
#[inline(always)]
pub fn acl_entry(side: Side, slot: u32, addr: [u8; 16]) -> Option<&'static AclEntry> {
    let generation = PU_GENERATION.get(slot).copied().unwrap_or(0);
    let scope = match side {
        Side::App => acl_scope(slot, generation),
        Side::Net => net_acl_scope(slot, generation),
    };
    ACLS.get(lookup_key(scope, addr))
}

/// What the ACLs decided.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AclVerdict {
    Accept,
    Reject,
}

/// Evaluates `count` rules of `entry` starting at `first`, in order, for a
/// connection of `proto` to `port`. Observe-continue rules only observe;
/// the first other match decides. A matching rule with [`RULE_LOG`] (the
/// deciding one, or an observe-continue one) puts `flow`, completed with
/// the rule's policy, action and observe mode, on the flow-log ring, or
/// holds it back in `defer` (see [`Deferral`]).
///
/// The rules are walked with the `bpf_loop` helper, so the verifier checks
/// the body ([`step`]) once per call site instead of once per unrolled
/// rule on every path that reaches it. Unrolled, the walk (up to
/// [`MAX_ACL_RULES`] rules, each match possibly logging) is multiplied by
/// every distinct state the caller arrives with — the packet parser's
/// exits, the first walk's exits before the second walk — which took TC
/// ingress past the verifier's million-instruction limit; walked by
/// `bpf_loop`, every program verifies in a few thousand instructions. (A
/// non-inlined subprogram does not help: the verifier re-walks it for
/// every caller state; measured, ingress still processed ~400k.)
#[inline(always)]
pub fn evaluate(
    entry: &AclEntry,
    first: u32,
    count: u32,
    port: u16,
    flow: &FlowEvent,
    defer: &mut Deferral,
) -> Option<AclVerdict> {
    let mut walk = Walk {
        entry,
        flow,
        defer: *defer,
        first,
        end: first.saturating_add(count),
        port,
        verdict: None,
    };
    // Indices below `first` are skipped in `step` rather than offset from
    // it: an index that is the helper's own counter, checked against a
    // constant, is one the verifier can prove in bounds.
    let loops = walk.end.min(MAX_ACL_RULES as u32);
    // SAFETY: `step` has the callback's signature (index, context) and
    // `walk`, its context, lives on this stack for the whole call. The
    // helper cannot fail for a valid callback and a count this small.
    unsafe {
        bpf_loop(
            loops,
            step as *mut c_void,
            (&raw mut walk).cast::<c_void>(),
            0,
        );
    }
    *defer = walk.defer;
    walk.verdict
}

/// One [`evaluate`] walk: its inputs, and the verdict once a rule decided.
struct Walk<'a> {
    entry: &'a AclEntry,
    flow: &'a FlowEvent,
    defer: Deferral,
    first: u32,
    end: u32,
    port: u16,
    verdict: Option<AclVerdict>,
}

/// The `bpf_loop` callback of [`evaluate`]: judges rule `index`. Returns 0
/// to go on to the next rule, 1 to stop (past the rules to evaluate, or
/// a rule decided).
extern "C" fn step(index: u64, ctx: *mut c_void) -> c_long {
    // SAFETY: `ctx` is the `Walk` evaluate passed.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    if index >= MAX_ACL_RULES as u64 || index >= u64::from(walk.end) {
        return 1;
    }
    if index < u64::from(walk.first) {
        return 0;
    }
    let rule: &AclRule = &walk.entry.rules[index as usize];
    if !rule_matches(rule, walk.flow.proto, walk.port) {
        return 0;
    }
    if rule.flags & RULE_LOG != 0 {
        log_flow(walk.flow, rule, &mut walk.defer);
    }
    if rule.observe == OBSERVE_CONTINUE {
        return 0;
    }
    walk.verdict = Some(if rule.action == ACTION_ACCEPT {
        AclVerdict::Accept
    } else {
        AclVerdict::Reject
    });
    1
}

/// Puts one flow event on the ring for a matching logged rule, or holds
/// it back in `defer`.
#[inline(always)]
fn log_flow(flow: &FlowEvent, rule: &AclRule, defer: &mut Deferral) {
    let event = completed(flow, rule.policy, rule.action, rule.observe);
    if !defer.hold(&event) {
        submit(&event);
    }
}

/// Puts the final drop's flow event on the ring: every connection refused
/// because nothing accepted it is logged (the fallback's final NFLOG rule
/// logs every new one too), as policy [`POLICY_DEFAULT`].
#[inline(always)]
pub fn log_final_drop(flow: &FlowEvent) {
    submit(&completed(
        flow,
        POLICY_DEFAULT,
        ACTION_REJECT,
        OBSERVE_NONE,
    ));
}

#[inline(always)]
fn completed(flow: &FlowEvent, policy: u32, action: u8, observe: u8) -> FlowEvent {
    let mut event = *flow;
    event.policy = policy;
    event.action = action;
    event.observe = observe;
    event
}

/// Puts one flow event on the ring; a full ring loses the event, never
/// the verdict.
#[inline(always)]
pub fn submit(event: &FlowEvent) {
    if let Some(mut entry) = FLOW_EVENTS.reserve::<FlowEvent>(0) {
        entry.write(*event);
        entry.submit(0);
    }
}

/// Where a decision's flow events go: straight to the ring, or (a connect
/// or sendmsg hook's, which runs before the kernel routes and binds the
/// socket) held back in `PENDING_FLOWS` under the socket's cookie until
/// the egress program sees the socket's first packet and fills in its
/// source address and port ([`take_pending`]).
#[derive(Clone, Copy)]
pub struct Deferral {
    /// The socket's cookie; 0 to emit at once.
    cookie: u64,
    /// Events held back so far.
    held: u32,
    /// Emit nothing: a re-check of a decision already logged.
    silent: bool,
}

impl Deferral {
    /// Emit at once.
    pub const fn none() -> Self {
        Self {
            cookie: 0,
            held: 0,
            silent: false,
        }
    }

    /// Hold back the events of `cookie`'s socket.
    pub const fn socket(cookie: u64) -> Self {
        Self {
            cookie,
            held: 0,
            silent: false,
        }
    }

    /// Emit nothing (the fallback's reverse ESTABLISHED accept of a UDP
    /// answer logs nothing either).
    pub const fn silent() -> Self {
        Self {
            cookie: 0,
            held: 0,
            silent: true,
        }
    }

    /// Holds `event` back; false if it must be emitted now (not deferring,
    /// or this decision already holds [`MAX_DEFERRED_FLOWS`]).
    #[inline(always)]
    fn hold(&mut self, event: &FlowEvent) -> bool {
        if self.silent {
            return true;
        }
        if self.cookie == 0 || self.held >= MAX_DEFERRED_FLOWS {
            return false;
        }
        let key = PendingFlowKey::new(self.cookie, self.held);
        if PENDING_FLOWS.insert(key, *event, 0).is_err() {
            return false;
        }
        self.held += 1;
        true
    }

    /// The decision is final. Let through, its events wait for the first
    /// packet: the entry after them is cleared (one an earlier decision
    /// on this socket left would be taken for this one's), and the
    /// pending count raised. Refused, no packet will ever leave: they go
    /// to the ring now, without a source.
    #[inline(always)]
    pub fn finish(self, refused: bool) {
        if self.held == 0 {
            return;
        }
        if refused {
            let mut index = 0;
            while index < MAX_DEFERRED_FLOWS {
                if index >= self.held {
                    break;
                }
                let key = PendingFlowKey::new(self.cookie, index);
                // SAFETY: a map lookup with a key on the stack; the value
                // is copied out before the entry is removed.
                if let Some(event) = unsafe { PENDING_FLOWS.get(key) } {
                    let event = *event;
                    submit(&event);
                }
                let _ = PENDING_FLOWS.remove(key);
                index += 1;
            }
            return;
        }
        let _ = PENDING_FLOWS.remove(PendingFlowKey::new(self.cookie, self.held));
        add_pending(1);
    }
}

/// Adds `delta` (wrapping) to the pending count, atomically: every CPU
/// shares it.
#[inline(always)]
fn add_pending(delta: u64) {
    if let Some(count) = PENDING_COUNT.get_ptr_mut(0) {
        // SAFETY: a pointer to the map's own value; the result is unused,
        // so this is BPF's plain atomic add, which every CPU version has.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, delta) };
    }
}

/// Emits the events held back for the socket `cookie`, with the source of
/// its first packet, `src`:`src_port`. Cheap while nothing is held back:
/// one array read.
#[inline(always)]
pub fn take_pending(
    cookie: impl FnOnce() -> u64,
    source: impl FnOnce() -> Option<([u8; 16], u16)>,
) {
    if PENDING_COUNT.get(0).copied().unwrap_or(0) == 0 {
        return;
    }
    let cookie = cookie();
    let first = PendingFlowKey::new(cookie, 0);
    // SAFETY: a map lookup with a key on the stack.
    if unsafe { PENDING_FLOWS.get(first) }.is_none() {
        return;
    }
    let Some((src, src_port)) = source() else {
        return;
    };
    let mut index = 0;
    while index < MAX_DEFERRED_FLOWS {
        let key = PendingFlowKey::new(cookie, index);
        // SAFETY: as above; the value is copied out before removal.
        let Some(event) = (unsafe { PENDING_FLOWS.get(key) }) else {
            break;
        };
        let mut event = *event;
        event.src = src;
        event.src_port = src_port;
        // Of two packets of one socket on two CPUs, only the one whose
        // removal succeeds emits, so each event is written once and the
        // count falls once per decision.
        if PENDING_FLOWS.remove(key).is_ok() {
            submit(&event);
            if index == 0 {
                // Adding all ones subtracts one.
                add_pending(u64::MAX);
            }
        }
        index += 1;
    }
}

#[inline(always)]
fn rule_matches(rule: &AclRule, proto: u8, port: u16) -> bool {
    (rule.proto == PROTO_ANY || rule.proto == proto) && rule.port_lo <= port && port <= rule.port_hi
}

/// Which counter of a PU to bump.
#[derive(Clone, Copy)]
pub enum Count {
    Trapped,
    Accepted,
    Dropped,
}

#[inline(always)]
pub fn count(slot: u32, what: Count) {
    if let Some(counts) = PU_COUNTS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from the map and is this CPU's own slot.
        let counts: &mut PuCounts = unsafe { &mut *counts };
        match what {
            Count::Trapped => counts.trapped += 1,
            Count::Accepted => counts.accepted += 1,
            Count::Dropped => counts.dropped += 1,
        }
    }
}
