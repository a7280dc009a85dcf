//! The mark layout: every packet and connection mark the enforcer sets or
//! matches, in one 6-bit field of the 32-bit mark.
//!
//! The seed used whole values (0xEEEE, 0xEEEF, 0x40, 0x40000062) that
//! overlap each other and other users' bits — kube-proxy owns 0x4000 and
//! 0x8000, Calico defaults to 0xffff0000. Here the enforcer owns only
//! `0x3f << shift` (default shift 8: mask 0x3f00), split in two sub-fields:
//!
//! | bits (shift 8) | mask   | field | values |
//! |----------------|--------|-------|--------|
//! | 8–10           | 0x0700 | kind: what the connection or socket *is* | 1 authorised by the handshake (seed 0xEEEE), 2 external flow accepted (seed 0xEEEF), 3 proxy traffic (seed 0x40), 4 injected by the agent (seed 0x40000062) |
//! | 11–13          | 0x3800 | class: what eBPF decided for this packet | 1 trap TCP set-up, 2 trap UDP, 3 accepted by an ACL, 4 refused unless conntrack knows the flow, 5 a flow conntrack knows |
//!
//! This is the one table of the agent's mark values and masks; rules,
//! programs, the trap consumer and the README refer to it. At the default
//! shift (8), every value and the mask it is matched under:
//!
//! | meaning | seed value | value / mask | written into |
//! |---------|------------|--------------|--------------|
//! | the whole field | — | `0x3f00` | — |
//! | kind: authorised by the handshake | 0xEEEE | `0x0100/0x0700` | packet mark (the trap consumer's verdict), then connection mark (`CONNMARK --save-mark --nfmask 0x700 --ctmask 0x700`) |
//! | kind: external flow accepted by an ACL | 0xEEEF | `0x0200/0x0700` | connection mark (iptables ACL accept) |
//! | kind: proxy traffic | 0x40 | `0x0300/0x0700` | socket mark (the proxy's) |
//! | kind: injected by the agent | 0x40000062 | `0x0400/0x0700` | socket mark (the agent's own sockets); accepted first in OUTPUT, never trapped |
//! | class: trap TCP set-up | — | `0x0800/0x3800` | socket mark (eBPF connect hook), packet mark (eBPF TC ingress) |
//! | class: trap UDP | — | `0x1000/0x3800` | the same |
//! | class: accepted by an ACL | — | `0x1800/0x3800` | the same |
//! | class: refused unless the flow is established | — | `0x2000/0x3800` | packet mark (eBPF TC ingress, for a host or container PU); a fixed rule in INPUT drops it unless conntrack has the flow |
//! | class: an ICMP packet of a flow conntrack knows | — | `0x2800/0x3800` | packet mark (a fixed rule in OUTPUT, ESTABLISHED or RELATED ICMP); read by eBPF cgroup_skb egress, which runs after netfilter |
//!
//! With shift `s` each value and mask is the one above shifted left by
//! `s - 8` (shift 16: field `0x3f0000`, authorised `0x10000/0x70000`). The
//! seed's per-PU net_cls values (`0x1111` base, `100 + n`) are no packet
//! marks here: PUs are found by cgroup (eBPF programs, `-m cgroup
//! --path`), and on a net_cls cgroup v1 host by the socket's class id
//! (`-m cgroup --cgroup`, tc handle `1111:<100 + n>`; the agent's
//! `datapath::netcls`), which lives outside the mark altogether.
//!
//! Kinds are mutually exclusive, so they are values, not bits; each is
//! matched as `value/kind_mask`. The class is set by the eBPF programs
//! (socket mark from a cgroup hook, `skb->mark` from TC) and read by the
//! fixed netfilter rules. Every write preserves the bits outside the
//! field, so other users' marks survive: kube-proxy's `0x4000`
//! (masquerade) and `0x8000` (drop) and Calico's `0xffff0000` lie outside
//! the default field (`tests/tests/marks.rs` shows kube-proxy's bits kept
//! on the agent's packets and connections, on both datapaths).
//!
//! `shift` is configurable (`[marks] shift` in the config) so the field can
//! move out of the way of another system on the host.

/// Width of the enforcer's field.
pub const FIELD_BITS: u32 = 6;
/// Default position of the field: bits 8–13, mask 0x3f00.
pub const DEFAULT_SHIFT: u32 = 8;
/// Largest shift that keeps the field inside 32 bits.
pub const MAX_SHIFT: u32 = 32 - FIELD_BITS;

const KIND_BITS: u32 = 3;

/// What a connection or socket is. Stored in the kind sub-field.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The identity handshake authorised this connection (seed 0xEEEE).
    Authorised = 1,
    /// An ACL accepted this external flow (seed 0xEEEF).
    ExternalAccepted = 2,
    /// Traffic of a proxy: never redirected again (seed 0x40).
    Proxy = 3,
    /// A packet the agent injects itself (seed 0x40000062).
    Injected = 4,
}

/// What the eBPF classification decided for a packet. Stored in the class
/// sub-field.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// TCP connection set-up with a target network: trap to user space.
    TrapTcp = 1,
    /// UDP with a target network: trap to user space.
    TrapUdp = 2,
    /// An accept ACL matched.
    AclAccept = 3,
    /// The network side of a host or container PU refused the packet —
    /// unless it belongs to a flow conntrack knows (a reply to what the
    /// PU sent, an ICMP error about it): TC runs before conntrack and
    /// cannot tell, so a fixed rule in INPUT drops it when it is neither
    /// ESTABLISHED nor RELATED, as the fallback's PU chain does.
    RefuseNew = 4,
    /// An outgoing ICMP packet conntrack calls ESTABLISHED or RELATED (an
    /// echo reply, an error about a flow it knows): written by a fixed
    /// rule in OUTPUT, read by the cgroup_skb egress program, which runs
    /// after netfilter but cannot see conntrack itself. The fallback's PU
    /// chain accepts such packets; egress lets them out on this class,
    /// never on the ICMP type alone.
    KnownFlow = 5,
}

/// The field's position. All values and masks derive from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkLayout {
    shift: u32,
}

impl Default for MarkLayout {
    fn default() -> Self {
        Self {
            shift: DEFAULT_SHIFT,
        }
    }
}

impl MarkLayout {
    /// `None` when the field would not fit in 32 bits.
    pub const fn new(shift: u32) -> Option<Self> {
        if shift <= MAX_SHIFT {
            Some(Self { shift })
        } else {
            None
        }
    }

    pub const fn shift(self) -> u32 {
        self.shift
    }

    /// Every bit the enforcer owns.
    pub const fn field_mask(self) -> u32 {
        ((1 << FIELD_BITS) - 1) << self.shift
    }

    pub const fn kind_mask(self) -> u32 {
        ((1 << KIND_BITS) - 1) << self.shift
    }

    pub const fn class_mask(self) -> u32 {
        ((1 << (FIELD_BITS - KIND_BITS)) - 1) << (self.shift + KIND_BITS)
    }

    /// The value of a kind, to match under [`Self::kind_mask`].
    pub const fn kind(self, kind: Kind) -> u32 {
        (kind as u32) << self.shift
    }

    /// The value of a class, to match under [`Self::class_mask`].
    pub const fn class(self, class: Class) -> u32 {
        (class as u32) << (self.shift + KIND_BITS)
    }

    /// `mark` with its kind sub-field replaced and every other bit kept.
    pub const fn with_kind(self, mark: u32, kind: Kind) -> u32 {
        (mark & !self.kind_mask()) | self.kind(kind)
    }

    /// `mark` with its class sub-field replaced and every other bit kept.
    pub const fn with_class(self, mark: u32, class: Class) -> u32 {
        (mark & !self.class_mask()) | self.class(class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_avoids_kube_proxy_and_calico_bits() {
        let l = MarkLayout::default();
        assert_eq!(l.field_mask(), 0x3f00);
        assert_eq!(l.kind_mask(), 0x0700);
        assert_eq!(l.class_mask(), 0x3800);
        assert_eq!(l.field_mask() & (0x4000 | 0x8000 | 0xffff_0000), 0);
        assert_eq!(l.kind(Kind::Authorised), 0x100);
        assert_eq!(l.kind(Kind::Injected), 0x400);
        assert_eq!(l.class(Class::TrapTcp), 0x800);
        assert_eq!(l.class(Class::AclAccept), 0x1800);
    }

    #[test]
    fn writes_keep_foreign_bits() {
        let l = MarkLayout::default();
        let foreign = 0x4000 | 0xabcd_0000 | 0x3f;
        let m = l.with_class(l.with_kind(foreign, Kind::Proxy), Class::TrapUdp);
        assert_eq!(m & !l.field_mask(), foreign);
        assert_eq!(m & l.kind_mask(), l.kind(Kind::Proxy));
        assert_eq!(m & l.class_mask(), l.class(Class::TrapUdp));
        // Replacing a kind clears the old one.
        let m2 = l.with_kind(m, Kind::Authorised);
        assert_eq!(m2 & l.kind_mask(), l.kind(Kind::Authorised));
    }

    #[test]
    fn shift_is_bounded() {
        assert!(MarkLayout::new(MAX_SHIFT).is_some());
        assert!(MarkLayout::new(MAX_SHIFT + 1).is_none());
        assert_eq!(MarkLayout::new(24).unwrap().field_mask(), 0x3f00_0000);
    }
}
