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
//! Also here: [`Forgetter`], which deletes the conntrack entries of UDP
//! flows the handshake refused (see `Engine::take_refused`), on a thread
//! of its own so that the `conntrack` tool never holds up the trap.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

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

/// UDP flows refused whose conntrack entry waits to be deleted, at most:
/// past it one is only logged (its next datagram may then pass on a
/// datapath that traps new flows only, until the entry expires).
const FORGET_QUEUE: usize = 1024;

/// Deletes refused UDP flows' conntrack entries (the `conntrack` tool,
/// as the datapaths' cut does), one at a time, on its own thread; it
/// ends when the trap thread drops this.
#[derive(Debug)]
pub struct Forgetter(SyncSender<(SocketAddr, SocketAddr)>);

impl Forgetter {
    pub fn start() -> Result<Self> {
        let (tx, rx) = sync_channel::<(SocketAddr, SocketAddr)>(FORGET_QUEUE);
        std::thread::Builder::new()
            .name("trap-forget".into())
            .spawn(move || {
                for (local, remote) in rx {
                    let flow = crate::datapath::conntrack::Flow {
                        protocol: 17,
                        src: local.ip(),
                        dst: remote.ip(),
                        sport: local.port(),
                        dport: remote.port(),
                    };
                    match crate::datapath::iptables::exec::conntrack_delete(&flow, 0, 0) {
                        Ok(_) => tracing::debug!(%local, %remote, "refused UDP flow forgotten"),
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), %local, %remote, "forgetting a refused UDP flow failed"),
                    }
                }
            })
            .context("spawning the conntrack forgetter")?;
        Ok(Self(tx))
    }

    /// Queues the flow from `local` to `remote` (this host's view).
    pub fn forget(&self, local: SocketAddr, remote: SocketAddr) {
        match self.0.try_send((local, remote)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(%local, %remote, "too many refused UDP flows to forget; this one stays in conntrack");
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("the conntrack forgetter ended");
            }
        }
    }
}
