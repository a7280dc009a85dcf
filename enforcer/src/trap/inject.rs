//! Sending the packets the handshake makes itself (UDP handshake
//! datagrams, and held datagrams released): whole IP packets through raw
//! sockets (`IPPROTO_RAW`, the header included) in the agent's network
//! namespace, each with a mark of the agent's own kind.
//!
//! Why raw sockets with `SO_MARK` and not an NFQUEUE trick: a packet the
//! agent makes has no queued packet to ride on (the handshake datagram is
//! an extra packet), and a held datagram cannot stay queued (see
//! [`super::handshake`]). The mark is what lets it through the datapath:
//! `Injected` is accepted first on the way out and never trapped (SPEC,
//! "Global steering"); `Authorised` is saved into the flow's connection
//! mark by the datapath's first rule, exactly as the trap's verdict
//! contract does for a queued packet, so no later packet of the flow is
//! trapped. One socket per family and kind, opened at the first need
//! (`CAP_NET_RAW` and, for the mark, `CAP_NET_ADMIN`: the agent's).
//!
//! Also here: [`Conntrack`], which deletes the conntrack entries of UDP
//! flows the handshake refused (see `Engine::take_refused`) and reads the
//! connection mark of a trapped datagram's flow (see
//! `super::decided`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, Result, bail};
use enforcer_common::marks::{Kind, MarkLayout};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The raw sockets, by (IPv6?, authorise?).
#[derive(Debug, Default)]
pub struct Injector {
    sockets: [Option<Socket>; 4],
}

impl Injector {
    /// Sends `packet` (a whole IPv4 or IPv6 packet) with the `Authorised`
    /// kind in its mark, or else `Injected`.
    pub fn send(&mut self, marks: MarkLayout, packet: &[u8], authorise: bool) -> Result<()> {
        let (v6, dst) = match packet.first().map(|b| b >> 4) {
            Some(4) if packet.len() >= 20 => {
                let d: [u8; 4] = packet[16..20].try_into().expect("4 bytes");
                (false, IpAddr::V4(Ipv4Addr::from(d)))
            }
            Some(6) if packet.len() >= 40 => {
                let d: [u8; 16] = packet[24..40].try_into().expect("16 bytes");
                (true, IpAddr::V6(Ipv6Addr::from(d)))
            }
            _ => bail!("not an IP packet"),
        };
        let slot = usize::from(v6) * 2 + usize::from(authorise);
        if self.sockets[slot].is_none() {
            let kind = if authorise {
                Kind::Authorised
            } else {
                Kind::Injected
            };
            self.sockets[slot] = Some(open(v6, marks.with_kind(0, kind))?);
        }
        let socket = self.sockets[slot].as_ref().expect("opened above");
        // Port 0: the kernel takes the addresses from the header.
        let to = SockAddr::from(SocketAddr::new(dst, 0));
        socket
            .send_to(packet, &to)
            .with_context(|| format!("sending a {} byte packet to {dst}", packet.len()))?;
        Ok(())
    }
}

fn open(v6: bool, mark: u32) -> Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
        .context("opening a raw socket to inject handshake packets")?;
    socket
        .set_mark(mark)
        .context("setting the injected packets' mark (SO_MARK)")?;
    Ok(socket)
}

/// ctnetlink (linux/netfilter/nfnetlink_conntrack.h): the subsystem, the
/// get and delete messages, the attributes of an original-direction
/// tuple, and the connection mark.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// The conntrack entries of UDP flows, through ctnetlink: the trap
/// thread deletes those of flows the handshake refused (see
/// `Engine::take_refused`) and reads the connection mark of an incoming
/// datagram's flow. One acknowledged message of a few dozen bytes each,
/// microseconds, so the trap thread does it itself before the packet's
/// verdict — the `conntrack` tool the datapaths' cut runs would hold the
/// trap up for milliseconds, and a thread of its own would leave a
/// refused flow open meanwhile.
#[derive(Debug, Default)]
pub struct Conntrack(Option<crate::netlink::Socket>);

impl Conntrack {
    /// Deletes the UDP entry whose original direction is `local` to
    /// `remote`; `Ok(false)` if there was none.
    pub fn forget_udp(&mut self, local: SocketAddr, remote: SocketAddr) -> Result<bool> {
        match self.request(IPCTNL_MSG_CT_DELETE, local, remote, |_| {}) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e).context("deleting a conntrack entry (ctnetlink)"),
        }
    }

    /// The connection mark of the UDP entry that has `src` to `dst` as
    /// either of its directions (the kernel looks the tuple up in both);
    /// `Ok(None)` if there is none — a flow's first datagram, whose entry
    /// is not confirmed while it waits in the queue, has none yet.
    pub fn udp_mark(&mut self, src: SocketAddr, dst: SocketAddr) -> Result<Option<u32>> {
        let mut mark = None;
        let result = self.request(IPCTNL_MSG_CT_GET, src, dst, |msg| {
            let Some((_, attrs)) = msg.netfilter() else {
                return;
            };
            // An entry without the mark attribute has mark 0.
            let found = attrs
                .map_while(Result::ok)
                .find(|a| a.kind == CTA_MARK)
                .map_or(Some(0), |a| a.be32());
            mark = mark.or(found);
        });
        match result {
            Ok(()) => Ok(mark),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).context("reading a conntrack entry (ctnetlink)"),
        }
    }

    /// One acknowledged ctnetlink request `kind` about the UDP tuple `src`
    /// to `dst`; its answers go to `answer`.
    fn request(
        &mut self,
        kind: u16,
        src: SocketAddr,
        dst: SocketAddr,
        answer: impl FnMut(&crate::netlink::Message),
    ) -> std::io::Result<()> {
        use crate::netlink::{Builder, NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST, nfnl_type};
        if self.0.is_none() {
            self.0 = Some(crate::netlink::Socket::open(NETLINK_NETFILTER, true)?);
        }
        let socket = self.0.as_ref().expect("opened above");
        let family = match src {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        let mut msg = Vec::new();
        let mut b = Builder::new(
            &mut msg,
            nfnl_type(NFNL_SUBSYS_CTNETLINK, kind),
            NLM_F_REQUEST | NLM_F_ACK,
        );
        // nfgenmsg: the family, NFNETLINK_V0, resource 0.
        b.bytes(&[family as u8, 0, 0, 0]);
        b.nested(CTA_TUPLE_ORIG, |t| {
            t.nested(CTA_TUPLE_IP, |ip| match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    ip.attr(CTA_IP_V4_SRC, &s.octets())
                        .attr(CTA_IP_V4_DST, &d.octets());
                }
                (s, d) => {
                    let v6 = |a: IpAddr| match a {
                        IpAddr::V6(a) => a.octets(),
                        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                    };
                    ip.attr(CTA_IP_V6_SRC, &v6(s)).attr(CTA_IP_V6_DST, &v6(d));
                }
            });
            t.nested(CTA_TUPLE_PROTO, |p| {
                p.attr(CTA_PROTO_NUM, &[17])
                    .attr(CTA_PROTO_SRC_PORT, &src.port().to_be_bytes())
                    .attr(CTA_PROTO_DST_PORT, &dst.port().to_be_bytes());
            });
        });
        b.finish();
        let result = socket.request_with(&mut msg, answer);
        if let Err(e) = &result
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            // A fresh socket next time: this one may hold a late answer.
            self.0 = None;
        }
        result
    }
}
