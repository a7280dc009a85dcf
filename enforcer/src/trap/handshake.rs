//! The identity handshake as the trap consumer runs it (docs/identity.md):
//! for each trapped packet, by its direction (its queue) and TCP flags,
//! the step it is, the verdict, and the per-connection state between the
//! steps. The cryptography and policy are [`crate::identity`]'s; this
//! module keeps the state, finds the PU, changes the packets and logs.
//!
//! | packet | side | step |
//! |---|---|---|
//! | SYN, outgoing | initiator | the PU's token attached (fresh for every transmission), packet replaced; the nonce remembered |
//! | SYN, incoming | responder | token taken and verified, the receiving PU's network policy for its port; allowed: stripped, the peer remembered; no token: the PU's network ACLs, as for an external peer; else dropped |
//! | SYN-ACK, outgoing | responder | the PU's answer token (bound to the SYN's nonce) attached |
//! | SYN-ACK, incoming | initiator | token verified against the nonce sent, the PU's application policy for the peer's port; allowed: stripped and the connection authorised; no token: the PU's application ACLs; else dropped |
//! | first ACK, incoming | responder | the connection authorised |
//!
//! "Authorised" is the trap's verdict contract ([`super`]): the kind
//! `Authorised` in the packet mark and NF_REPEAT, which the datapath saves
//! into the connection mark, so no later packet of the connection reaches
//! user space. A step that does not decide the connection yet (SYN, the
//! responder's SYN-ACK) lets its packet on with NF_ACCEPT and no mark:
//! the next packet of the handshake must reach the trap too.
//!
//! UDP (the seed's signature datagrams, [`crate::identity::wire`]):
//!
//! | packet | side | step |
//! |---|---|---|
//! | a flow's first datagram, outgoing | initiator | held in user space (the original dropped); a handshake datagram (signature + SYN token, same addresses and ports) injected with the `Injected` mark |
//! | handshake datagram, SYN token, incoming | responder | token verified, the receiving PU's network policy for its port; allowed: the answer (signature + SYN-ACK token bound to the nonce) injected with the `Authorised` mark, which the datapath saves into the flow's connection mark; a verified identity refused: a signed refusal (bound to the nonce) injected with `Injected`, its conntrack entry deleted after it, and the flow remembered as refused; the datagram itself dropped |
//! | handshake datagram, SYN-ACK or refusal token, incoming | initiator | verified against the nonce sent; a token that does not verify is dropped and counted and the wait goes on; a SYN-ACK: the PU's application policy for the peer's port; allowed: the held datagrams injected with the `Authorised` mark; a refusal or a refused SYN-ACK: dropped, the flow remembered as refused and its conntrack entry deleted ([`Engine::take_refused`]); the answer itself dropped |
//! | no answer within [`UDP_ANSWER_WAIT_MS`] | initiator | a peer without an agent: the held datagrams judged by the PU's application ACLs (accepted: injected with `Authorised`) |
//! | an ordinary datagram, incoming (also one carrying the signature elsewhere than at the payload start) | responder | a flow refused lately: dropped; else a peer without an agent: the PU's network ACLs |
//!
//! Which incoming datagrams get here: the global rule traps every one
//! from a target UDP network that carries the signature *anywhere*, and
//! before the accepts of decided connections (SPEC, "Global steering");
//! the PU chains trap an undecided flow's first ones. A trapped datagram
//! of a decided flow (its connection mark `Authorised` or
//! `ExternalAccepted`, looked up in conntrack by the consumer) is its
//! application's data: the consumer lets it on unchanged before this
//! engine reads it (`decided-flow-data`, [`super::decided`]).
//! An undecided flow's datagram is a handshake step only when its payload
//! *starts* with the signature ([`wire::udp_token`]); with the signature
//! elsewhere it is no handshake, and it is decided as the flow's
//! ordinary datagram (the last row): dropped while the flow is refused or
//! its own handshake waits, else judged by the receiving PU's network
//! ACLs; to a port of no PU, dropped (`unknown-pu`); copied short (longer
//! than the copy range), dropped (`bad-packet`). Never let on as it is:
//! NF_ACCEPT skips the rest of the chain, the PU's rules with it, so a
//! peer without an identity could carry any datagram past a PU's policy
//! by putting the signature in it.
//!
//! A refused identity never falls back to the ACLs: the responder's
//! signed refusal tells the initiator the peer has an agent that said no
//! (without it the initiator's wait would end as if the peer had none,
//! and the ACLs judge); should the initiator not get or not verify it,
//! the responder still drops the flow's later datagrams, for as long as
//! they keep coming ([`REFUSED_IN_MS`] after the last). Only a token that
//! verified makes the responder answer or remember: a stranger's or a
//! forged one costs it no state and gets no answer — such an initiator is,
//! to the responder, a peer without an agent.
//!
//! Why the held datagram is copied and dropped rather than left in the
//! kernel queue until the answer: a batch verdict covers every lower id of
//! its queue, so a packet left waiting would be decided by the next batch;
//! and the conntrack entry of a queued packet is unconfirmed, so the
//! injected handshake's entry (same addresses and ports) would win the
//! clash at confirmation and a mark set on the queued one be lost. The
//! copy is re-sent through a raw socket whose `Authorised` mark the
//! datapath's first rule saves into the (confirmed) entry of the flow.
//!
//! Memory is bounded: the connection table holds at most
//! [`MAX_CONNECTIONS`] handshakes in progress and forgets each
//! [`HANDSHAKE_TIMEOUT_MS`] after it began; when full, a new SYN is
//! refused (`table-full`) rather than an entry forgotten early.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::datapath::queues::Direction;
use crate::flowlog::{
    self, DEFAULT_POLICY_ID, FlowAction, FlowDirection, FlowObserve, FlowRecord, FlowSender,
    HandshakeLog,
};
use crate::identity::token::{self, Claims, Nonce};
use crate::identity::{Handshaker, Keys, Reason, TokenError, Window, wire};
use crate::policy::{self, Acl, ObserveMode, PuId};

use super::lookup::{Key, PuIdentity, PuIndex};
use super::packet::{self, L4};

/// Handshakes in progress at most.
pub const MAX_CONNECTIONS: usize = 1 << 16;
/// How long a handshake may take from its first SYN (covering the
/// kernel's SYN retransmissions at 1, 3, 7, 15 and 31 s).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 60_000;
/// SYN nonces remembered per connection: a SYN-ACK may answer an earlier
/// transmission than the last.
const MAX_SENT: usize = 4;
/// Decided connections remembered, and for how long: see [`Recent`].
const DECIDED_CAPACITY: usize = 1 << 16;
const DECIDED_MS: u64 = 10_000;
/// How long an initiator waits for the answer to its UDP handshake
/// before judging the peer as one without an agent.
pub const UDP_ANSWER_WAIT_MS: u64 = 1_000;
/// How long an initiator drops a refused UDP flow's datagrams before its
/// next datagram tries a new handshake: as long as the responder's
/// conntrack entry of the flow may live ([`REFUSED_IN_MS`], conntrack's
/// UDP stream timeout). A refused SYN-ACK leaves that entry authorised on
/// the responder's host; a new handshake while it lives would reach the
/// responder's application as the flow's data, go unanswered, and end the
/// initiator's wait as if the peer had no agent — its ACLs judging.
const REFUSED_OUT_MS: u64 = REFUSED_IN_MS;
/// How long a responder drops the datagrams of a UDP flow whose identity
/// it refused, after the last one: conntrack's UDP stream timeout, the
/// longest an initiator that fell back to its ACLs keeps the flow
/// authorised between two datagrams.
pub const REFUSED_IN_MS: u64 = 120_000;
/// Refused UDP flows remembered, per side.
const REFUSED_CAPACITY: usize = 4096;
/// UDP flows waiting for an answer at most.
const MAX_UDP_WAITS: usize = 4096;
/// Datagrams held per waiting flow, and in all (each at most the copy
/// range, 4 KiB: at most 4 MiB held).
const MAX_HELD_PER_FLOW: usize = 16;
const MAX_HELD: usize = 1024;
/// Cgroups remembered as in no PU's tree (see [`Engine::cgroup_below`]).
const MAX_OUTSIDE: usize = 4096;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN_RST: u8 = 0x05;

/// What starting the handshake needs: the keys (loaded with the config),
/// the token window, and where decisions are logged.
#[derive(Debug)]
pub struct Setup {
    pub keys: Keys,
    pub window: Window,
    pub flow_log: Option<FlowSender>,
}

/// What the consumer does with one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The connection is accepted: `Authorised` in the mark, NF_REPEAT.
    Authorise,
    /// This packet goes on; the connection is not decided yet.
    Pass,
    /// The packet is replaced by `packet` (whole, lengths and checksums
    /// fixed), then authorised or passed.
    Rewrite {
        packet: Vec<u8>,
        authorise: bool,
    },
    Drop,
}

/// Why a packet got its verdict: one counter each, in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// A verified identity that the PU's policy allows.
    Allowed,
    /// A verified identity that no rule of the policy allows.
    NotAllowedByPolicy,
    /// No token; an ACL accepted the peer as an external one.
    ExternalAllowed,
    /// No token and no ACL accepting the peer: refused.
    NoToken,
    /// A token that does not parse.
    BadToken,
    /// A token whose signature does not verify.
    BadSignature,
    UntrustedKey,
    Replayed,
    Expired,
    FromTheFuture,
    /// A token of another step, or answering another SYN.
    WrongHandshake,
    ReplayCacheFull,
    /// A handshake packet that could not be read (not whole, malformed
    /// options, a marker without a token).
    BadPacket,
    /// A SYN refused because the connection table is full.
    TableFull,
    /// No PU found for the packet (or its socket could not be found).
    UnknownPu,
    /// A packet of a handshake this agent does not know (never began, or
    /// timed out).
    UnknownConnection,
    /// Tokens attached to outgoing SYNs and SYN-ACKs.
    TokensSent,
    /// Outgoing SYNs and SYN-ACKs sent without a token (no option space,
    /// data in the SYN): the peer judges them as tokenless.
    SentWithoutToken,
    /// Handshakes completed: the connection mark set.
    Authorised,
    /// The OS gave no randomness for a nonce.
    NoRandomness,
    /// UDP datagrams held while their flow's handshake runs.
    Held,
    /// UDP datagrams refused because the hold is full.
    HoldFull,
    /// UDP handshakes the peer's agent refused, in a signed refusal.
    RefusedByPeer,
    /// UDP datagrams of a flow refused lately, dropped without a new
    /// handshake (initiator) or without the ACLs (responder).
    RefusedFlow,
    /// Incoming datagrams of a decided flow (connection mark `Authorised`
    /// or `ExternalAccepted`) that the signature rule trapped because
    /// their data carries the signature: let on unchanged, unread.
    DecidedFlowData,
}

impl Counted {
    pub const ALL: [Counted; 25] = [
        Counted::Allowed,
        Counted::NotAllowedByPolicy,
        Counted::ExternalAllowed,
        Counted::NoToken,
        Counted::BadToken,
        Counted::BadSignature,
        Counted::UntrustedKey,
        Counted::Replayed,
        Counted::Expired,
        Counted::FromTheFuture,
        Counted::WrongHandshake,
        Counted::ReplayCacheFull,
        Counted::BadPacket,
        Counted::TableFull,
        Counted::UnknownPu,
        Counted::UnknownConnection,
        Counted::TokensSent,
        Counted::SentWithoutToken,
        Counted::Authorised,
        Counted::NoRandomness,
        Counted::Held,
        Counted::HoldFull,
        Counted::RefusedByPeer,
        Counted::RefusedFlow,
        Counted::DecidedFlowData,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Counted::Allowed => "allowed",
            Counted::NotAllowedByPolicy => "not-allowed-by-policy",
            Counted::ExternalAllowed => "external-allowed",
            Counted::NoToken => "no-token",
            Counted::BadToken => "bad-token",
            Counted::BadSignature => "bad-signature",
            Counted::UntrustedKey => "untrusted-key",
            Counted::Replayed => "replayed",
            Counted::Expired => "expired",
            Counted::FromTheFuture => "from-the-future",
            Counted::WrongHandshake => "wrong-handshake",
            Counted::ReplayCacheFull => "replay-cache-full",
            Counted::BadPacket => "bad-packet",
            Counted::TableFull => "table-full",
            Counted::UnknownPu => "unknown-pu",
            Counted::UnknownConnection => "unknown-connection",
            Counted::TokensSent => "tokens-sent",
            Counted::SentWithoutToken => "sent-without-token",
            Counted::Authorised => "authorised",
            Counted::NoRandomness => "no-randomness",
            Counted::Held => "held",
            Counted::HoldFull => "hold-full",
            Counted::RefusedByPeer => "refused-by-peer",
            Counted::RefusedFlow => "refused-flow",
            Counted::DecidedFlowData => "decided-flow-data",
        }
    }

    /// The counter of a verification's or a policy's reason.
    fn of(reason: Reason) -> Self {
        match reason {
            Reason::Allowed => Counted::Allowed,
            Reason::NotAllowedByPolicy => Counted::NotAllowedByPolicy,
            Reason::NoToken => Counted::NoToken,
            Reason::BadToken(TokenError::BadSignature) => Counted::BadSignature,
            Reason::BadToken(_) => Counted::BadToken,
            Reason::UntrustedKey => Counted::UntrustedKey,
            Reason::Replayed => Counted::Replayed,
            Reason::Expired => Counted::Expired,
            Reason::FromTheFuture => Counted::FromTheFuture,
            Reason::WrongHandshake => Counted::WrongHandshake,
            Reason::ReplayCacheFull => Counted::ReplayCacheFull,
            Reason::RefusedByPeer => Counted::RefusedByPeer,
        }
    }
}

/// The handshake's counters, shared with `status`.
#[derive(Debug, Default)]
pub struct HandshakeCounters {
    counts: [AtomicU64; Counted::ALL.len()],
}

impl HandshakeCounters {
    fn add(&self, what: Counted) {
        self.counts[what as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, what: Counted) -> u64 {
        self.counts[what as usize].load(Ordering::Relaxed)
    }

    /// Every counter by name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        Counted::ALL
            .iter()
            .map(|&c| (c.as_str().to_owned(), self.get(c)))
            .collect()
    }
}

/// Finds the cgroup of the socket that sends an outgoing packet.
pub trait SocketCgroups {
    /// The cgroup id of the `protocol` socket that sends from `local` to
    /// `remote`; `None` when there is no such socket or it cannot be
    /// looked up.
    fn cgroup(&mut self, protocol: u8, local: SocketAddr, remote: SocketAddr) -> Option<u64>;
}

/// A connection, as this host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    local: SocketAddr,
    remote: SocketAddr,
}

/// Where a handshake is.
#[derive(Debug, Clone)]
enum Conn {
    /// This side sent the SYN for PU `pu`, with these nonces (newest
    /// last).
    Initiating { pu: PuId, sent: Vec<Nonce> },
    /// This side allowed the SYN of `peer` to PU `pu`; `reply` is the
    /// token minted with the decision, for the first SYN-ACK.
    Responding {
        pu: PuId,
        peer: Claims,
        reply: Option<Vec<u8>>,
    },
    /// This side accepted a tokenless SYN by an ACL.
    External,
}

#[derive(Debug)]
struct Slot {
    conn: Conn,
    /// When the handshake is forgotten (ms, the engine's clock).
    expires: u64,
}

/// The connection table: bounded, and forgetting by age.
#[derive(Debug)]
struct Table {
    capacity: usize,
    slots: HashMap<ConnKey, Slot>,
    /// Forget times in insertion order (a clock that moves forward), so
    /// expiry pops from the front. A record whose slot was removed or
    /// replaced meanwhile is skipped.
    expiry: VecDeque<(u64, ConnKey)>,
}

impl Table {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            slots: HashMap::new(),
            expiry: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: u64) {
        while let Some(&(at, key)) = self.expiry.front() {
            if at > now {
                break;
            }
            self.expiry.pop_front();
            if self.slots.get(&key).is_some_and(|s| s.expires == at) {
                self.slots.remove(&key);
            }
        }
        // Removed and re-inserted keys leave stale records behind: keep
        // the queue within a bound of the table's.
        if self.expiry.len() > 2 * self.capacity.max(1) {
            let slots = &self.slots;
            self.expiry
                .retain(|(at, key)| slots.get(key).is_some_and(|s| s.expires == *at));
        }
    }

    fn get_mut(&mut self, key: &ConnKey) -> Option<&mut Conn> {
        self.slots.get_mut(key).map(|s| &mut s.conn)
    }

    /// Inserts or replaces; `false` when full (nothing changed).
    fn insert(&mut self, key: ConnKey, conn: Conn, now: u64) -> bool {
        if let Some(slot) = self.slots.get_mut(&key) {
            slot.conn = conn;
            return true;
        }
        if self.slots.len() >= self.capacity {
            return false;
        }
        let expires = now.saturating_add(HANDSHAKE_TIMEOUT_MS);
        self.slots.insert(key, Slot { conn, expires });
        self.expiry.push_back((expires, key));
        true
    }

    fn remove(&mut self, key: &ConnKey) {
        self.slots.remove(key);
    }

    fn len(&self) -> usize {
        self.slots.len()
    }
}

/// Connections remembered for a while, bounded: when full, the oldest
/// is forgotten. Two uses:
/// - connections decided lately: a packet of one that the datapath
///   trapped before the connection mark took effect — a second ACK racing
///   the verdict on the first, a SYN-ACK retransmitted because the ACK was
///   lost — is authorised again, not dropped as a packet of an unknown
///   handshake. Forgetting one early only costs such a packet a drop (TCP
///   sends it again); no entry ever lets a connection through that was
///   not decided.
/// - UDP flows refused lately (each side its own): their datagrams are
///   dropped. Forgetting one early lets the next datagram be judged
///   again: a new handshake (initiator), or the ACLs (responder, which
///   refreshes an entry with every datagram it drops).
#[derive(Debug)]
struct Recent {
    ttl: u64,
    capacity: usize,
    keys: HashMap<ConnKey, u64>,
    order: VecDeque<(u64, ConnKey)>,
}

impl Recent {
    fn new(ttl: u64, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            keys: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn forget_one(&mut self) {
        if let Some((at, key)) = self.order.pop_front()
            && self.keys.get(&key) == Some(&at)
        {
            self.keys.remove(&key);
        }
    }

    /// Remembers `key` (again: its time starts anew).
    fn insert(&mut self, key: ConnKey, now: u64) {
        while self.order.front().is_some_and(|&(at, _)| at <= now) {
            self.forget_one();
        }
        // A key remembered again leaves its old record behind: drop the
        // stale ones before they crowd out live keys (one flow refreshed
        // by every datagram must not make the others forgotten).
        if self.order.len() >= 2 * self.capacity {
            let keys = &self.keys;
            self.order.retain(|(at, key)| keys.get(key) == Some(at));
        }
        while self.keys.len() >= self.capacity && !self.keys.contains_key(&key) {
            self.forget_one();
        }
        let expires = now.saturating_add(self.ttl);
        self.keys.insert(key, expires);
        self.order.push_back((expires, key));
    }

    fn contains(&self, key: &ConnKey, now: u64) -> bool {
        self.keys.get(key).is_some_and(|&at| at > now)
    }

    /// Forgets `key` (its record in the order is then skipped).
    fn remove(&mut self, key: &ConnKey) {
        self.keys.remove(key);
    }
}

/// One agent's handshake engine, owned by the trap thread.
#[derive(Debug)]
pub struct Engine {
    handshaker: Handshaker,
    table: Table,
    decided: Recent,
    /// UDP flows of this side's PUs that the peer refused (or whose
    /// answer this side refused): dropped without a new handshake.
    refused_out: Recent,
    /// UDP flows to this side's PUs whose identity this side refused:
    /// dropped rather than judged by the ACLs.
    refused_in: Recent,
    /// Cgroups found in no PU's tree, for the index of this generation.
    outside: (u64, HashSet<u64>),
    counters: Arc<HandshakeCounters>,
    flow_log: Option<FlowSender>,
    /// UDP flows whose handshake datagram is out, by flow.
    udp_waits: HashMap<ConnKey, UdpWait>,
    /// Datagrams held in all the waits.
    held: usize,
    /// Packets to inject, taken by the consumer after each step.
    outbox: Vec<Outgoing>,
    /// UDP flows (local, remote) refused after their conntrack entry saw
    /// an answer: the consumer has the entries forgotten ([`Self::take_refused`]).
    refused: Vec<(SocketAddr, SocketAddr)>,
}

/// A packet the engine sends itself: a UDP handshake datagram, or a held
/// datagram released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The whole IP packet, checksums set.
    pub packet: Vec<u8>,
    /// Sent with the `Authorised` kind in its mark (the datapath saves it
    /// into the flow's connection mark), else with `Injected` (let out,
    /// nothing saved).
    pub authorise: bool,
}

/// A UDP flow of this side's PU waiting for the answer to its handshake.
#[derive(Debug)]
struct UdpWait {
    pu: PuId,
    nonce: Nonce,
    /// The flow's datagrams as the application sent them (whole).
    held: Vec<Vec<u8>>,
    uid: Option<u32>,
    expires: u64,
}

/// The packet being decided, with what the steps share.
struct Trapped<'a> {
    /// Which way the packet goes (its queue).
    direction: Direction,
    /// Which end of its connection the PU is: the packet's direction, but
    /// for a SYN-ACK, which travels against its connection.
    side: Direction,
    bytes: &'a [u8],
    uid: Option<u32>,
    src: SocketAddr,
    dst: SocketAddr,
    key: ConnKey,
}

impl Trapped<'_> {
    /// The connection's direction, as its flow-log line has it.
    fn flow_direction(&self) -> FlowDirection {
        match self.side {
            Direction::App => FlowDirection::App,
            Direction::Net => FlowDirection::Net,
        }
    }

    /// The connection's source and destination (initiator, responder).
    fn ends(&self) -> (SocketAddr, SocketAddr) {
        match self.side {
            Direction::App => (self.key.local, self.key.remote),
            Direction::Net => (self.key.remote, self.key.local),
        }
    }

    /// The peer's address.
    fn peer(&self) -> IpAddr {
        self.key.remote.ip()
    }
}

/// What a decision logs.
struct Logged<'a> {
    pu: &'a PuId,
    identity: &'a PuIdentity,
    protocol: u8,
    policy_id: String,
    observe: FlowObserve,
    allowed: bool,
    reason: &'a str,
    peer: Option<&'a Claims>,
}

impl Engine {
    pub fn new(setup: Setup, counters: Arc<HandshakeCounters>) -> Self {
        Self::with_capacity(setup, counters, MAX_CONNECTIONS)
    }

    fn with_capacity(setup: Setup, counters: Arc<HandshakeCounters>, capacity: usize) -> Self {
        Self {
            handshaker: Handshaker::new(setup.keys, setup.window),
            table: Table::new(capacity),
            decided: Recent::new(DECIDED_MS, DECIDED_CAPACITY),
            refused_out: Recent::new(REFUSED_OUT_MS, REFUSED_CAPACITY),
            refused_in: Recent::new(REFUSED_IN_MS, REFUSED_CAPACITY),
            outside: (0, HashSet::new()),
            counters,
            flow_log: setup.flow_log,
            udp_waits: HashMap::new(),
            held: 0,
            outbox: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// The UDP flows refused since the last call whose conntrack entry
    /// must go. A refused flow's datagrams were dropped, but an answer
    /// from the peer (its agent's, or a peer without an agent echoing the
    /// handshake) went through conntrack: the entry has seen a reply, and
    /// a datapath that traps only a flow's *new* datagrams (eBPF) would
    /// let the next ones through unjudged. Without the entry, the next
    /// datagram is a new flow's, trapped and judged again.
    pub fn take_refused(&mut self) -> Vec<(SocketAddr, SocketAddr)> {
        std::mem::take(&mut self.refused)
    }

    /// The packets to inject since the last call, in order.
    pub fn take_outgoing(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    /// Whether UDP handshakes wait for answers (the consumer then calls
    /// [`Self::tick`] at least every 100 ms or so).
    pub fn waiting(&self) -> bool {
        !self.udp_waits.is_empty()
    }

    /// Ends the UDP waits past their time: no answer came, so the peer
    /// has no agent and the PU's application ACLs judge the held
    /// datagrams, as an external peer's.
    pub fn tick(&mut self, pus: &PuIndex, now_ms: u64) {
        let due: Vec<ConnKey> = self
            .udp_waits
            .iter()
            .filter(|(_, w)| w.expires <= now_ms)
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            let Some(wait) = self.udp_waits.remove(&key) else {
                continue;
            };
            self.held -= wait.held.len();
            let identity = identity_of(pus, &wait.pu);
            let p = Trapped {
                direction: Direction::App,
                side: Direction::App,
                bytes: &[],
                uid: wait.uid,
                src: key.local,
                dst: key.remote,
                key,
            };
            if self.external(&p, &wait.pu, &identity, UDP, &identity.application_acls) {
                self.release(key, wait.held, now_ms);
            } else {
                self.refused.push((key.local, key.remote));
            }
        }
    }

    /// Sends the held datagrams of an authorised flow.
    fn release(&mut self, key: ConnKey, held: Vec<Vec<u8>>, now_ms: u64) {
        self.decided.insert(key, now_ms);
        self.counters.add(Counted::Authorised);
        self.outbox.extend(held.into_iter().map(|packet| Outgoing {
            packet,
            authorise: true,
        }));
    }

    /// A reload's keys and window; the replay cache and the handshakes in
    /// progress are kept.
    pub fn set_keys(&mut self, keys: Keys, window: Window) {
        self.handshaker.set_keys(keys, window);
    }

    /// Counts a datagram the consumer let on as a decided flow's data
    /// without asking the engine ([`super::decided`]).
    pub fn count_decided_flow_data(&self) {
        self.counters.add(Counted::DecidedFlowData);
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.table.len()
    }

    /// Decides one trapped packet. `direction` comes from its queue
    /// (`None`: a queue outside the layout), `uid` is the owning socket's
    /// (outgoing packets), `now_ms` the wall clock in ms since the epoch.
    pub fn decide(
        &mut self,
        direction: Option<Direction>,
        bytes: &[u8],
        uid: Option<u32>,
        pus: &PuIndex,
        now_ms: u64,
        sockets: &mut dyn SocketCgroups,
    ) -> Action {
        self.table.expire(now_ms);
        let Some(direction) = direction else {
            return self.count(Counted::BadPacket, Action::Drop);
        };
        let Ok(headers) = packet::parse(bytes) else {
            return self.count(Counted::BadPacket, Action::Drop);
        };
        let (sport, dport, flags) = match headers.l4 {
            L4::Tcp { src, dst, flags } => (src, dst, Some(flags.0)),
            L4::Udp { src, dst } => (src, dst, None),
            _ => return self.count(Counted::BadPacket, Action::Drop),
        };
        let (src, dst) = (
            SocketAddr::new(headers.src, sport),
            SocketAddr::new(headers.dst, dport),
        );
        let key = match direction {
            Direction::App => ConnKey {
                local: src,
                remote: dst,
            },
            Direction::Net => ConnKey {
                local: dst,
                remote: src,
            },
        };
        let reverse = |d| match d {
            Direction::App => Direction::Net,
            Direction::Net => Direction::App,
        };
        let side = match flags {
            Some(f) if f & (SYN | ACK) == SYN | ACK => reverse(direction),
            _ => direction,
        };
        let p = Trapped {
            direction,
            side,
            bytes,
            uid,
            src,
            dst,
            key,
        };
        let Some(flags) = flags else {
            return self.udp(&p, pus, now_ms, sockets);
        };
        match (direction, flags & (SYN | ACK | FIN_RST)) {
            (Direction::App, SYN) => self.initiate(&p, pus, now_ms, sockets),
            (Direction::Net, SYN) => self.respond(&p, pus, now_ms, sockets),
            (Direction::App, f) if f == SYN | ACK => self.answer(&p, pus, now_ms),
            (Direction::Net, f) if f == SYN | ACK => self.complete(&p, pus, now_ms),
            (_, ACK) => self.acknowledge(&p, now_ms),
            // Nothing else is trapped; never more than a drop.
            _ => self.count(Counted::BadPacket, Action::Drop),
        }
    }

    fn count(&self, what: Counted, action: Action) -> Action {
        self.counters.add(what);
        action
    }

    /// The PU of an outgoing packet: by its socket's uid, then (when
    /// linux-process PUs are found by cgroup) its socket's cgroup, then
    /// its source port, then the host PU. An outgoing packet of a PU
    /// found by cgroup whose socket cannot be found is refused rather
    /// than attributed to the host PU, whose identity would be wrong.
    fn app_pu(
        &mut self,
        p: &Trapped,
        protocol: u8,
        pus: &PuIndex,
        sockets: &mut dyn SocketCgroups,
    ) -> Option<PuId> {
        let mut key = Key {
            direction: Some(Direction::App),
            protocol,
            local_port: Some(p.key.local.port()),
            uid: p.uid,
            cgroup: None,
        };
        let by_uid = p.uid.is_some_and(|uid| pus.knows_uid(uid));
        if pus.has_process_cgroups() && !by_uid {
            let cgroup = sockets.cgroup(protocol, p.key.local, p.key.remote)?;
            if !pus.knows_cgroup(cgroup)
                && let Some(id) = self.cgroup_below(pus, cgroup)
            {
                return Some(id);
            }
            key.cgroup = Some(cgroup);
        }
        pus.find(&key).cloned()
    }

    /// The PU of an incoming packet: by its destination port in the
    /// configured port sets; else, when linux-process PUs are found by
    /// cgroup, by the cgroup of the socket listening there (a port
    /// discovered while the PU runs); else the host PU.
    fn net_pu(
        &mut self,
        p: &Trapped,
        protocol: u8,
        pus: &PuIndex,
        sockets: &mut dyn SocketCgroups,
    ) -> Option<PuId> {
        let key = Key {
            direction: Some(Direction::Net),
            protocol,
            local_port: Some(p.key.local.port()),
            uid: None,
            cgroup: None,
        };
        if let Some(id) = pus.find_specific(&key) {
            return Some(id.clone());
        }
        if pus.has_process_cgroups()
            && let Some(cgroup) = sockets.cgroup(protocol, p.key.local, p.key.remote)
        {
            if let Some(id) = pus.process_pu_of_cgroup_known(cgroup) {
                return Some(id.clone());
            }
            if let Some(id) = self.cgroup_below(pus, cgroup) {
                return Some(id);
            }
        }
        pus.find(&key).cloned()
    }

    /// The linux-process PU whose cgroup tree holds `cgroup`, a cgroup the
    /// index does not know: a walk of the PUs' directories, remembered when
    /// it finds none (a cgroup never moves to another parent, so the
    /// answer holds until the index changes) — the host PU's processes
    /// would otherwise cost a walk per connection.
    fn cgroup_below(&mut self, pus: &PuIndex, cgroup: u64) -> Option<PuId> {
        if self.outside.0 != pus.generation() {
            self.outside = (pus.generation(), HashSet::new());
        }
        if self.outside.1.contains(&cgroup) {
            return None;
        }
        let found = pus.cgroup_below(cgroup).cloned();
        if found.is_none() {
            if self.outside.1.len() >= MAX_OUTSIDE {
                self.outside.1.clear();
            }
            self.outside.1.insert(cgroup);
        }
        found
    }

    /// Initiator, outgoing SYN: attach a fresh token.
    fn initiate(
        &mut self,
        p: &Trapped,
        pus: &PuIndex,
        now_ms: u64,
        sockets: &mut dyn SocketCgroups,
    ) -> Action {
        let Some(pu) = self.app_pu(p, TCP, pus, sockets) else {
            tracing::debug!(src = %p.src, dst = %p.dst, "handshake: no PU for an outgoing SYN; dropped");
            return self.count(Counted::UnknownPu, Action::Drop);
        };
        let identity = identity_of(pus, &pu);
        let Ok(sent) = self.handshaker.syn(&identity.labels, now_ms) else {
            tracing::error!("handshake: no randomness for a nonce; SYN dropped");
            return self.count(Counted::NoRandomness, Action::Drop);
        };
        let mut nonces = match self.table.get_mut(&p.key) {
            Some(Conn::Initiating {
                pu: known, sent, ..
            }) if *known == pu => std::mem::take(sent),
            _ => Vec::new(),
        };
        if nonces.len() == MAX_SENT {
            nonces.remove(0);
        }
        nonces.push(sent.nonce);
        let conn = Conn::Initiating { pu, sent: nonces };
        if !self.table.insert(p.key, conn, now_ms) {
            tracing::warn!(src = %p.src, dst = %p.dst, "handshake table full; SYN dropped");
            return self.count(Counted::TableFull, Action::Drop);
        }
        self.attach(p.bytes, &sent.token, false)
    }

    /// An outgoing SYN or SYN-ACK with `token` attached; unmarked when it
    /// cannot carry one.
    fn attach(&self, bytes: &[u8], token: &[u8], authorise: bool) -> Action {
        match wire::attach_token(bytes, token) {
            Ok(packet) => self.count(Counted::TokensSent, Action::Rewrite { packet, authorise }),
            Err(e) => {
                tracing::debug!(error = %e, "handshake: sent without a token");
                self.counters.add(Counted::SentWithoutToken);
                if authorise {
                    Action::Authorise
                } else {
                    Action::Pass
                }
            }
        }
    }

    /// Responder, incoming SYN: verify and judge.
    fn respond(
        &mut self,
        p: &Trapped,
        pus: &PuIndex,
        now_ms: u64,
        sockets: &mut dyn SocketCgroups,
    ) -> Action {
        let Some(pu) = self.net_pu(p, TCP, pus, sockets) else {
            // A marked SYN is trapped whatever its port (SPEC, "Global
            // steering"); to a port of no PU it is none of the
            // handshake's business, and goes on as its sender's
            // application made it. An unmarked one came through a PU's
            // rules: without the PU it cannot be judged.
            self.counters.add(Counted::UnknownPu);
            return match wire::take_token(p.bytes) {
                Ok(Some(taken)) => Action::Rewrite {
                    packet: taken.stripped,
                    authorise: false,
                },
                _ => Action::Drop,
            };
        };
        let identity = identity_of(pus, &pu);
        let taken = match self.take_token(p, &pu, &identity, "SYN") {
            Ok(taken) => taken,
            Err(action) => return action,
        };
        let Some(taken) = taken else {
            // A peer without an agent: an external peer.
            let accepted = self.external(p, &pu, &identity, TCP, &identity.network_acls);
            if !accepted {
                return Action::Drop;
            }
            if !self.table.insert(p.key, Conn::External, now_ms) {
                return self.count(Counted::TableFull, Action::Drop);
            }
            return Action::Pass;
        };
        let step = match self.judge_opening(p, &pu, &identity, TCP, &taken.token, now_ms) {
            Ok(step) => step,
            Err(action) => return action,
        };
        let (true, Some(peer)) = (step.decision.is_allowed(), step.peer) else {
            return Action::Drop;
        };
        let conn = Conn::Responding {
            pu,
            peer,
            reply: step.reply.map(|sent| sent.token),
        };
        if !self.table.insert(p.key, conn, now_ms) {
            return self.count(Counted::TableFull, Action::Drop);
        }
        Action::Rewrite {
            packet: taken.stripped,
            authorise: false,
        }
    }

    /// Responder, outgoing SYN-ACK: attach the answer.
    fn answer(&mut self, p: &Trapped, pus: &PuIndex, now_ms: u64) -> Action {
        let (pu, answering, reply) = match self.table.get_mut(&p.key) {
            Some(Conn::Responding { pu, peer, reply }) => (pu.clone(), peer.nonce, reply.take()),
            // A connection this agent did not judge (its SYN was not
            // trapped: a process outside every PU, say): not the
            // handshake's. A tokenless peer gets a tokenless answer.
            Some(Conn::External) | Some(Conn::Initiating { .. }) | None => {
                return Action::Pass;
            }
        };
        let identity = identity_of(pus, &pu);
        let token = match reply {
            Some(token) => token,
            None => match self
                .handshaker
                .syn_ack(&identity.labels, &answering, now_ms)
            {
                Ok(sent) => sent.token,
                Err(_) => return self.count(Counted::NoRandomness, Action::Drop),
            },
        };
        self.attach(p.bytes, &token, false)
    }

    /// Initiator, incoming SYN-ACK: verify and judge; the connection is
    /// decided here.
    fn complete(&mut self, p: &Trapped, pus: &PuIndex, now_ms: u64) -> Action {
        let (pu, sent) = match self.table.get_mut(&p.key) {
            Some(Conn::Initiating { pu, sent, .. }) => (pu.clone(), sent.clone()),
            _ => {
                // A connection decided already (its SYN-ACK sent again)
                // stays authorised; one that is not a handshake of this
                // agent (a process outside every PU connecting) goes on.
                // Either way without a token, which the application
                // would otherwise read as data.
                let authorise = self.decided.contains(&p.key, now_ms);
                return match wire::take_token(p.bytes) {
                    Ok(Some(taken)) => Action::Rewrite {
                        packet: taken.stripped,
                        authorise,
                    },
                    Ok(None) if authorise => Action::Authorise,
                    Ok(None) => Action::Pass,
                    Err(_) => self.count(Counted::BadPacket, Action::Drop),
                };
            }
        };
        let identity = identity_of(pus, &pu);
        let taken = match self.take_token(p, &pu, &identity, "SYN-ACK") {
            Ok(taken) => taken,
            Err(action) => return action,
        };
        let Some(taken) = taken else {
            if !self.external(p, &pu, &identity, TCP, &identity.application_acls) {
                return Action::Drop;
            }
            self.finish(p.key, now_ms);
            return self.count(Counted::Authorised, Action::Authorise);
        };
        // The nonce it answers, among the SYNs sent (a retransmission's
        // answer may come late); verification checks the binding.
        let claimed = token::parse(&taken.token)
            .ok()
            .and_then(|t| t.claims.peer_nonce);
        let nonce = claimed
            .filter(|n| sent.contains(n))
            .or_else(|| sent.last().copied())
            .unwrap_or_default();
        let port = p.key.remote.port();
        let step =
            self.handshaker
                .on_syn_ack(Some(&taken.token), &nonce, &identity.policy, port, now_ms);
        self.log_step(p, &pu, &identity, TCP, &step.decision, step.peer.as_ref());
        if !step.decision.is_allowed() {
            return Action::Drop;
        }
        self.finish(p.key, now_ms);
        self.count(
            Counted::Authorised,
            Action::Rewrite {
                packet: taken.stripped,
                authorise: true,
            },
        )
    }

    /// A handshake is over and its connection authorised: its entry makes
    /// room, the connection is remembered as decided.
    fn finish(&mut self, key: ConnKey, now_ms: u64) {
        self.table.remove(&key);
        self.decided.insert(key, now_ms);
    }

    /// The first ACK: the responder's handshake is complete (the
    /// initiator's was at the SYN-ACK; its ACK only comes here when the
    /// datapath traps it before the connection mark is set).
    fn acknowledge(&mut self, p: &Trapped, now_ms: u64) -> Action {
        match (p.direction, self.table.get_mut(&p.key)) {
            (Direction::Net, Some(Conn::Responding { .. } | Conn::External)) => {
                self.finish(p.key, now_ms);
                self.count(Counted::Authorised, Action::Authorise)
            }
            _ if self.decided.contains(&p.key, now_ms) => Action::Authorise,
            _ => {
                tracing::debug!(src = %p.src, dst = %p.dst, "handshake: ACK of no known handshake dropped");
                self.count(Counted::UnknownConnection, Action::Drop)
            }
        }
    }

    /// A trapped UDP datagram: an outgoing one starts (or waits for) its
    /// flow's handshake; an incoming handshake datagram is a step of one;
    /// any other incoming datagram is a peer's without an agent, judged by
    /// the network ACLs.
    fn udp(
        &mut self,
        p: &Trapped,
        pus: &PuIndex,
        now_ms: u64,
        sockets: &mut dyn SocketCgroups,
    ) -> Action {
        match (p.direction, wire::udp_token(p.bytes)) {
            (Direction::App, _) => self.udp_initiate(p, pus, now_ms, sockets),
            (Direction::Net, Ok(Some(token))) => {
                let token = token.to_vec();
                // On a flow waiting for its answer, any handshake datagram
                // is judged as the answer (a peer echoing our own SYN
                // token back is dropped as the wrong step, never taken
                // as a SYN to answer, and the wait goes on).
                let kind = token::parse(&token).map(|t| t.claims.kind);
                let answer = matches!(kind, Ok(token::Kind::SynAck | token::Kind::Refusal));
                if self.udp_waits.contains_key(&p.key) || answer {
                    self.udp_complete(p, pus, &token, now_ms)
                } else {
                    self.udp_respond(p, pus, &token, now_ms, sockets)
                }
            }
            (Direction::Net, Ok(None)) => {
                // A flow decided already, whose datagram raced the mark.
                if self.decided.contains(&p.key, now_ms) {
                    return Action::Authorise;
                }
                // This side's own handshake on the flow waits for its
                // answer: the peer has not seen the application's data,
                // and taking its datagram by the ACLs would authorise
                // the flow before the handshake decided it.
                if self.udp_waits.contains_key(&p.key) {
                    return self.count(Counted::WrongHandshake, Action::Drop);
                }
                // The identity of the flow's sender was refused: it has an
                // agent, so it is not judged as a peer without one. Each
                // datagram keeps the refusal alive.
                if self.refused_in.contains(&p.key, now_ms) {
                    self.refused_in.insert(p.key, now_ms);
                    return self.count(Counted::RefusedFlow, Action::Drop);
                }
                let Some(pu) = self.net_pu(p, UDP, pus, sockets) else {
                    return self.count(Counted::UnknownPu, Action::Drop);
                };
                let identity = identity_of(pus, &pu);
                if self.external(p, &pu, &identity, UDP, &identity.network_acls) {
                    Action::Authorise
                } else {
                    Action::Drop
                }
            }
            (Direction::Net, Err(e)) => {
                tracing::debug!(error = %e, src = %p.src, "handshake: unreadable UDP datagram dropped");
                self.count(Counted::BadPacket, Action::Drop)
            }
        }
    }

    /// Initiator, an outgoing datagram: held while its flow's handshake
    /// runs; the first starts it.
    fn udp_initiate(
        &mut self,
        p: &Trapped,
        pus: &PuIndex,
        now_ms: u64,
        sockets: &mut dyn SocketCgroups,
    ) -> Action {
        if self.decided.contains(&p.key, now_ms) {
            return Action::Authorise;
        }
        if self.refused_out.contains(&p.key, now_ms) {
            return self.count(Counted::RefusedFlow, Action::Drop);
        }
        // Re-sent whole later: a datagram copied short cannot be.
        let whole = match wire::udp_whole(p.bytes) {
            Ok(whole) => whole,
            Err(e) => {
                tracing::debug!(error = %e, src = %p.src, dst = %p.dst, "handshake: a datagram that cannot be held dropped");
                return self.count(Counted::BadPacket, Action::Drop);
            }
        };
        if let Some(wait) = self.udp_waits.get_mut(&p.key) {
            if wait.held.len() >= MAX_HELD_PER_FLOW || self.held >= MAX_HELD {
                return self.count(Counted::HoldFull, Action::Drop);
            }
            wait.held.push(whole);
            self.held += 1;
            return self.count(Counted::Held, Action::Drop);
        }
        let Some(pu) = self.app_pu(p, UDP, pus, sockets) else {
            return self.count(Counted::UnknownPu, Action::Drop);
        };
        if self.udp_waits.len() >= MAX_UDP_WAITS || self.held >= MAX_HELD {
            tracing::warn!(src = %p.src, dst = %p.dst, "UDP handshake hold full; datagram dropped");
            return self.count(Counted::HoldFull, Action::Drop);
        }
        let identity = identity_of(pus, &pu);
        let Ok(sent) = self.handshaker.syn(&identity.labels, now_ms) else {
            return self.count(Counted::NoRandomness, Action::Drop);
        };
        let Ok(packet) = wire::udp_handshake(p.key.local, p.key.remote, &sent.token) else {
            return self.count(Counted::BadPacket, Action::Drop);
        };
        self.outbox.push(Outgoing {
            packet,
            authorise: false,
        });
        self.counters.add(Counted::TokensSent);
        self.udp_waits.insert(
            p.key,
            UdpWait {
                pu,
                nonce: sent.nonce,
                held: vec![whole],
                uid: p.uid,
                expires: now_ms.saturating_add(UDP_ANSWER_WAIT_MS),
            },
        );
        self.held += 1;
        self.count(Counted::Held, Action::Drop)
    }

    /// Responder, an incoming handshake datagram: verify and judge; when
    /// allowed, answer with the `Authorised` mark (the flow is decided
    /// here); a verified identity refused gets a signed refusal. The
    /// datagram itself never reaches the application.
    fn udp_respond(
        &mut self,
        p: &Trapped,
        pus: &PuIndex,
        token: &[u8],
        now_ms: u64,
        sockets: &mut dyn SocketCgroups,
    ) -> Action {
        let Some(pu) = self.net_pu(p, UDP, pus, sockets) else {
            return self.count(Counted::UnknownPu, Action::Drop);
        };
        let identity = identity_of(pus, &pu);
        let step = match self.judge_opening(p, &pu, &identity, UDP, token, now_ms) {
            Ok(step) => step,
            Err(action) => return action,
        };
        let (true, Some(reply)) = (step.decision.is_allowed(), step.reply) else {
            if let Some(peer) = step.peer {
                self.refuse_udp(p, &identity, &peer.nonce, now_ms);
            }
            return Action::Drop;
        };
        match wire::udp_handshake(p.key.local, p.key.remote, &reply.token) {
            Ok(packet) => {
                self.outbox.push(Outgoing {
                    packet,
                    authorise: true,
                });
                self.counters.add(Counted::TokensSent);
                self.refused_in.remove(&p.key);
                self.decided.insert(p.key, now_ms);
                self.count(Counted::Authorised, Action::Drop)
            }
            Err(_) => self.count(Counted::BadPacket, Action::Drop),
        }
    }

    /// Responder: the flow of a verified identity its policy refused is
    /// remembered as refused, and the initiator gets a signed refusal
    /// bound to its SYN's `nonce`. The refusal goes out with `Injected`
    /// (nothing saved into the connection), and the conntrack entry it
    /// makes is deleted after it ([`Self::take_refused`]): on a datapath
    /// that traps only a flow's new datagrams (eBPF) the initiator's next
    /// ones would otherwise pass as the entry's replies, unjudged.
    fn refuse_udp(&mut self, p: &Trapped, identity: &PuIdentity, nonce: &Nonce, now_ms: u64) {
        self.refused_in.insert(p.key, now_ms);
        let Ok(sent) = self.handshaker.refusal(&identity.labels, nonce, now_ms) else {
            self.counters.add(Counted::NoRandomness);
            return;
        };
        match wire::udp_handshake(p.key.local, p.key.remote, &sent.token) {
            Ok(packet) => {
                self.outbox.push(Outgoing {
                    packet,
                    authorise: false,
                });
                self.counters.add(Counted::TokensSent);
                self.refused.push((p.key.local, p.key.remote));
            }
            Err(_) => self.counters.add(Counted::BadPacket),
        }
    }

    /// Initiator, the answer: verify it against the nonce sent; a SYN-ACK
    /// is judged by the application policy (allowed, the held datagrams
    /// go out), a refusal refuses. Only an answer that verifies ends the
    /// wait.
    fn udp_complete(&mut self, p: &Trapped, pus: &PuIndex, token: &[u8], now_ms: u64) -> Action {
        // The flow is the initiator's (its log line says `app`).
        let p = &Trapped {
            side: Direction::App,
            ..*p
        };
        let Some(wait) = self.udp_waits.get(&p.key) else {
            tracing::debug!(src = %p.src, dst = %p.dst, "handshake: a UDP answer to no wait dropped");
            return self.count(Counted::UnknownConnection, Action::Drop);
        };
        let (pu, nonce) = (wait.pu.clone(), wait.nonce);
        let identity = identity_of(pus, &pu);
        let refusal = token::parse(token).is_ok_and(|t| t.claims.kind == token::Kind::Refusal);
        let step = if refusal {
            self.handshaker.on_refusal(Some(token), &nonce, now_ms)
        } else {
            let port = p.key.remote.port();
            self.handshaker
                .on_syn_ack(Some(token), &nonce, &identity.policy, port, now_ms)
        };
        self.log_step(p, &pu, &identity, UDP, &step.decision, step.peer.as_ref());
        if step.peer.is_none() {
            // Not the peer's agent speaking for this handshake (a
            // stranger's token, a forged or replayed one, an answer to
            // another nonce, our own SYN echoed back): anyone who can
            // send from the peer's address could, so it decides nothing.
            // The wait goes on until an answer that verifies, or the
            // timeout.
            return Action::Drop;
        }
        let Some(wait) = self.udp_waits.remove(&p.key) else {
            return Action::Drop;
        };
        self.held -= wait.held.len();
        if step.decision.is_allowed() {
            self.release(p.key, wait.held, now_ms);
        } else {
            self.refused_out.insert(p.key, now_ms);
            self.refused.push((p.key.local, p.key.remote));
        }
        Action::Drop
    }

    /// Judges a peer without a token by `acls`, as an external peer;
    /// counts and logs the decision. Whether it is accepted.
    fn external(
        &self,
        p: &Trapped,
        pu: &PuId,
        identity: &PuIdentity,
        protocol: u8,
        acls: &[Acl],
    ) -> bool {
        // The connection's destination port: the peer's for an outgoing
        // connection, the PU's for an incoming one (as the datapaths'
        // ACLs match `--dports`).
        let port = Some(p.ends().1.port());
        let acl = policy::deciding(acls, p.peer(), protocol, port);
        let accepted = acl.is_some_and(|acl| acl.action == policy::Action::Accept);
        let counted = if accepted {
            Counted::ExternalAllowed
        } else {
            Counted::NoToken
        };
        self.counters.add(counted);
        self.log(
            p,
            Logged {
                pu,
                identity,
                protocol,
                policy_id: acl.map_or(DEFAULT_POLICY_ID.to_owned(), |a| a.policy_id.to_string()),
                observe: match acl.map(|a| a.observe) {
                    Some(ObserveMode::Apply) => FlowObserve::ObserveApply,
                    _ => FlowObserve::None,
                },
                allowed: accepted,
                reason: Counted::NoToken.as_str(),
                peer: None,
            },
        );
        accepted
    }

    /// The token a TCP `what` (SYN or SYN-ACK) of `pu` carries, stripped
    /// from it; an unreadable segment is refused, logged and counted, and
    /// `Err` carries its drop.
    fn take_token(
        &self,
        p: &Trapped,
        pu: &PuId,
        identity: &PuIdentity,
        what: &str,
    ) -> Result<Option<wire::Taken>, Action> {
        wire::take_token(p.bytes).map_err(|e| {
            tracing::debug!(error = %e, src = %p.src, "handshake: unreadable {what} dropped");
            self.log_refusal(p, pu, identity, TCP, Counted::BadPacket);
            self.count(Counted::BadPacket, Action::Drop)
        })
    }

    /// Responder: the opening token of a TCP SYN or a UDP handshake
    /// datagram for `pu`'s port, verified and judged by its network
    /// policy, the decision counted and logged. `Err` carries the action
    /// when no step could be made (no randomness for the answer's nonce).
    fn judge_opening(
        &mut self,
        p: &Trapped,
        pu: &PuId,
        identity: &PuIdentity,
        protocol: u8,
        token: &[u8],
        now_ms: u64,
    ) -> Result<crate::identity::handshake::Step, Action> {
        let step = self
            .handshaker
            .on_syn(
                Some(token),
                &identity.labels,
                &identity.policy,
                p.key.local.port(),
                now_ms,
            )
            .map_err(|_| self.count(Counted::NoRandomness, Action::Drop))?;
        self.log_step(
            p,
            pu,
            identity,
            protocol,
            &step.decision,
            step.peer.as_ref(),
        );
        Ok(step)
    }

    fn log_step(
        &self,
        p: &Trapped,
        pu: &PuId,
        identity: &PuIdentity,
        protocol: u8,
        decision: &crate::identity::Decision,
        peer: Option<&Claims>,
    ) {
        let counted = Counted::of(decision.reason);
        self.counters.add(counted);
        if !decision.is_allowed() {
            tracing::info!(
                pu = %pu,
                src = %p.src,
                dst = %p.dst,
                reason = %decision.reason,
                "handshake refused"
            );
        }
        self.log(
            p,
            Logged {
                pu,
                identity,
                protocol,
                policy_id: decision
                    .policy_id
                    .as_ref()
                    .map_or(DEFAULT_POLICY_ID.to_owned(), |id| id.to_string()),
                observe: FlowObserve::None,
                allowed: decision.is_allowed(),
                reason: counted.as_str(),
                peer,
            },
        );
    }

    fn log_refusal(
        &self,
        p: &Trapped,
        pu: &PuId,
        identity: &PuIdentity,
        protocol: u8,
        why: Counted,
    ) {
        self.log(
            p,
            Logged {
                pu,
                identity,
                protocol,
                policy_id: DEFAULT_POLICY_ID.to_owned(),
                observe: FlowObserve::None,
                allowed: false,
                reason: why.as_str(),
                peer: None,
            },
        );
    }

    fn log(&self, p: &Trapped, what: Logged) {
        let Some(flow_log) = &self.flow_log else {
            return;
        };
        let (src, dst) = p.ends();
        let record = FlowRecord {
            time: flowlog::now(),
            pu: what.pu.to_string(),
            policy_id: what.policy_id,
            action: if what.allowed {
                FlowAction::Accept
            } else {
                FlowAction::Reject
            },
            observe: what.observe,
            protocol: flowlog::protocol_name(what.protocol),
            src: flowlog::endpoint(src.ip(), src.port()),
            dst: flowlog::endpoint(dst.ip(), dst.port()),
            direction: p.flow_direction(),
            handshake: Some(HandshakeLog {
                reason: what.reason.to_owned(),
                labels: what.identity.labels.to_string(),
                peer_labels: what.peer.map(|c| c.labels.to_string()),
                peer_agent: what.peer.map(|c| c.key_id.to_string()),
            }),
        };
        // The writer gone means the agent is stopping.
        let _ = flow_log.send(record);
    }
}

/// The PU's identity, or none (no labels, no rules, no ACLs: it refuses
/// every peer) when the index has none for it.
fn identity_of(pus: &PuIndex, pu: &PuId) -> Arc<PuIdentity> {
    pus.identity(pu).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests;
