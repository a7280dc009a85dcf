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
