//! The headers of a trapped packet, read defensively: the addresses,
//! protocol and ports (the 5-tuple) plus the TCP flags, for the log.
//!
//! The kernel copies at most the consumer's copy range of each packet, and
//! a packet may be malformed, so every read is bounds-checked: a short
//! buffer yields a [`PacketError`] or an [`L4::Truncated`], never a panic.
//! The consumer gives a verdict to every packet, parsed or not; the TCP
//! flags tell it where a connection's set-up stands.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The network and transport headers of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The IP protocol number of the transport header (after any IPv6
    /// extension headers).
    pub protocol: u8,
    pub l4: L4,
}

/// What the transport header said, as far as it could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        src: u16,
        dst: u16,
        flags: TcpFlags,
    },
    Udp {
        src: u16,
        dst: u16,
    },
    /// A protocol without ports (ICMP, …).
    Other,
    /// A fragment other than the first: it carries no transport header.
    LaterFragment,
    /// The copied bytes end inside the transport header.
    Truncated,
}

/// The TCP flags byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    const NAMES: [(u8, &'static str); 6] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
    ];
}

impl TcpFlags {
    /// A connection's first packet: SYN without ACK.
    pub fn is_syn_only(self) -> bool {
        self.0 & 0x12 == 0x02
    }

    /// A SYN or a SYN-ACK.
    pub fn has_syn(self) -> bool {
        self.0 & 0x02 != 0
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Self::NAMES
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, name)| *name);
        match names.next() {
            None => f.write_str("-"),
            Some(first) => {
                f.write_str(first)?;
                names.try_for_each(|name| write!(f, ",{name}"))
            }
        }
    }
}

/// Why a packet's network header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    UnknownVersion(u8),
    #[error("IPv{version} header truncated ({len} bytes copied)")]
    Truncated { version: u8, len: usize },
    #[error("IPv4 header length {0} is below the minimum of 20")]
    BadIhl(usize),
}

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Reads the headers of an IPv4 or IPv6 packet.
pub fn parse(packet: &[u8]) -> Result<Headers, PacketError> {
    match packet.first().map(|b| b >> 4) {
        None => Err(PacketError::Empty),
        Some(4) => parse_v4(packet),
        Some(6) => parse_v6(packet),
        Some(version) => Err(PacketError::UnknownVersion(version)),
    }
}

fn parse_v4(p: &[u8]) -> Result<Headers, PacketError> {
    let truncated = PacketError::Truncated {
        version: 4,
        len: p.len(),
    };
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(PacketError::BadIhl(ihl));
    }
    let header = p.get(..ihl).ok_or(truncated)?;
    let protocol = header[9];
    let src = Ipv4Addr::from(array::<4>(&header[12..16]));
    let dst = Ipv4Addr::from(array::<4>(&header[16..20]));
    // Fragment offset in 8-byte units; non-zero means a later fragment.
    let offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let l4 = if offset != 0 {
        L4::LaterFragment
    } else {
        transport(protocol, &p[ihl..])
    };
    Ok(Headers {
        src: src.into(),
        dst: dst.into(),
        protocol,
        l4,
    })
}

fn parse_v6(p: &[u8]) -> Result<Headers, PacketError> {
    let header = p.get(..40).ok_or(PacketError::Truncated {
        version: 6,
        len: p.len(),
    })?;
    let src = Ipv6Addr::from(array::<16>(&header[8..24]));
    let dst = Ipv6Addr::from(array::<16>(&header[24..40]));
    let (protocol, l4) = v6_transport(p);
    Ok(Headers {
        src: src.into(),
        dst: dst.into(),
        protocol,
        l4,
    })
}

/// The transport protocol and header of an IPv6 packet, through its
/// extension headers; a later fragment has none to read.
fn v6_transport(p: &[u8]) -> (u8, L4) {
    for step in V6Chain::new(p) {
        match step {
            V6Step::Extension {
                header: V6Step::FRAGMENT,
                at,
                ..
            } => {
                // The fragment offset, in 8-byte units: non-zero is a
                // later fragment. The step's length says all 8 bytes are
                // there.
                if be16(p, at + 2).unwrap_or(0) >> 3 != 0 {
                    return (p[at], L4::LaterFragment);
                }
            }
            V6Step::Extension { .. } => {}
            V6Step::Transport { protocol, at } => return (protocol, transport(protocol, &p[at..])),
            V6Step::Truncated { header } => return (header, L4::Truncated),
        }
    }
    unreachable!("an IPv6 header chain ends in a transport or truncated step")
}

/// One step along an IPv6 packet's header chain, after the fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6Step {
    /// An extension header of type `header` at offset `at`, `len` bytes
    /// long, all of them within the packet.
    Extension { header: u8, at: usize, len: usize },
    /// The transport header (or any protocol that is not an extension
    /// header) of type `protocol` at offset `at`. Ends the chain.
    Transport { protocol: u8, at: usize },
    /// An extension header of type `header` that does not fit the
    /// packet. Ends the chain.
    Truncated { header: u8 },
}

impl V6Step {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AUTH: u8 = 51;
    pub const DEST_OPTS: u8 = 60;
}

/// The header chain of an IPv6 packet (`p` from its first byte, at least
/// its 40-byte fixed header), step by step. Every extension step moves on
/// by at least 8 bytes and is checked against the packet's end, so the
/// walk ends within the buffer, with a `Transport` or `Truncated` step.
/// The one walk both the trap's reader and the handshake's packet changes
/// (`identity::wire`) use.
pub struct V6Chain<'a> {
    p: &'a [u8],
    next: Option<(u8, usize)>,
}

impl<'a> V6Chain<'a> {
    pub fn new(p: &'a [u8]) -> Self {
        Self {
            p,
            next: p.get(6).map(|&next| (next, 40)),
        }
    }
}

impl Iterator for V6Chain<'_> {
    type Item = V6Step;

    fn next(&mut self) -> Option<V6Step> {
        let (header, at) = self.next.take()?;
        let p = self.p;
        let len = match header {
            V6Step::HOP_BY_HOP | V6Step::ROUTING | V6Step::DEST_OPTS => {
                p.get(at + 1).map(|&n| (usize::from(n) + 1) * 8)
            }
            V6Step::AUTH => p.get(at + 1).map(|&n| (usize::from(n) + 2) * 4),
            V6Step::FRAGMENT => Some(8),
            protocol => return Some(V6Step::Transport { protocol, at }),
        };
        match len.filter(|&len| at + len <= p.len()) {
            Some(len) => {
                self.next = Some((p[at], at + len));
                Some(V6Step::Extension { header, at, len })
            }
            None => Some(V6Step::Truncated { header }),
        }
    }
}

fn transport(protocol: u8, l4: &[u8]) -> L4 {
    let ports = || Some((be16(l4, 0)?, be16(l4, 2)?));
    match protocol {
        TCP => match (ports(), l4.get(13)) {
            (Some((src, dst)), Some(&flags)) => L4::Tcp {
                src,
                dst,
                flags: TcpFlags(flags),
            },
            _ => L4::Truncated,
        },
        UDP => match ports() {
            Some((src, dst)) => L4::Udp { src, dst },
            None => L4::Truncated,
        },
        _ => L4::Other,
    }
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// The first `N` bytes of a slice the caller has checked is long enough.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

impl fmt::Display for Headers {
    /// `tcp 10.0.0.1:40000 -> 10.0.0.2:80 [SYN]`, `proto 1 10.0.0.1 -> 10.0.0.2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (src, dst) = (self.src, self.dst);
        match self.l4 {
            L4::Tcp {
                src: sport,
                dst: dport,
                flags,
            } => write!(
                f,
                "tcp {} -> {} [{flags}]",
                std::net::SocketAddr::new(src, sport),
                std::net::SocketAddr::new(dst, dport)
            ),
            L4::Udp {
                src: sport,
                dst: dport,
            } => write!(
                f,
                "udp {} -> {}",
                std::net::SocketAddr::new(src, sport),
                std::net::SocketAddr::new(dst, dport)
            ),
            L4::Other => write!(f, "proto {} {src} -> {dst}", self.protocol),
            L4::LaterFragment => write!(f, "proto {} {src} -> {dst} (fragment)", self.protocol),
            L4::Truncated => write!(f, "proto {} {src} -> {dst} (truncated)", self.protocol),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 header (no options) followed by `l4`.
    fn v4(protocol: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0];
        p.extend(frag.to_be_bytes());
        p.extend([64, protocol, 0, 0]);
        p.extend([10, 0, 0, 1, 10, 0, 0, 2]);
        p.extend(l4);
        p
    }

    /// An IPv6 header followed by `rest` (extension headers and/or L4).
    fn v6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, next, 64];
        p.extend("fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend("fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend(rest);
        p
    }

    /// A TCP header from 40000 to 80 with `flags`.
    fn tcp(flags: u8) -> Vec<u8> {
        let mut h = vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags];
        h.extend([0xff, 0xff, 0, 0, 0, 0]);
        h
    }

    #[test]
    fn reads_an_ipv4_tcp_syn() {
        let h = parse(&v4(TCP, 0, &tcp(0x02))).unwrap();
        assert_eq!(h.to_string(), "tcp 10.0.0.1:40000 -> 10.0.0.2:80 [SYN]");
        let h = parse(&v4(TCP, 0, &tcp(0x12))).unwrap();
        assert_eq!(
            h.l4,
            L4::Tcp {
                src: 40000,
                dst: 80,
                flags: TcpFlags(0x12)
            }
        );
        assert_eq!(h.to_string(), "tcp 10.0.0.1:40000 -> 10.0.0.2:80 [SYN,ACK]");
    }

    #[test]
    fn reads_ipv4_options_udp_and_portless_protocols() {
        let mut p = v4(UDP, 0, &[0, 53, 0x30, 0x39, 0, 8, 0, 0]);
        // IHL 6: one 4-byte option word before the UDP header.
        p[0] = 0x46;
        p.splice(20..20, [1, 1, 1, 1]);
        assert_eq!(
            parse(&p).unwrap().to_string(),
            "udp 10.0.0.1:53 -> 10.0.0.2:12345"
        );
        assert_eq!(
            parse(&v4(1, 0, &[8, 0, 0, 0])).unwrap().to_string(),
            "proto 1 10.0.0.1 -> 10.0.0.2"
        );
    }

    #[test]
    fn reads_ipv6_through_extension_headers() {
        let h = parse(&v6(TCP, &tcp(0x10))).unwrap();
        assert_eq!(h.to_string(), "tcp [fd00::1]:40000 -> [fd00::2]:80 [ACK]");
        // Hop-by-hop (8 bytes) then a first fragment (offset 0) then UDP.
        let mut rest = vec![44, 0, 1, 4, 0, 0, 0, 0];
        rest.extend([UDP, 0, 0, 0, 0, 0, 0, 7]);
        rest.extend([0, 53, 0, 53, 0, 8, 0, 0]);
        let h = parse(&v6(0, &rest)).unwrap();
        assert_eq!((h.protocol, h.l4), (UDP, L4::Udp { src: 53, dst: 53 }));
    }

    #[test]
    fn later_fragments_have_no_ports() {
        let h = parse(&v4(TCP, 0x00b9, &[1, 2, 3])).unwrap();
        assert_eq!(h.l4, L4::LaterFragment);
        let frag = [TCP, 0, 0x05, 0xc9, 0, 0, 0, 7];
        let h = parse(&v6(44, &frag)).unwrap();
        assert_eq!((h.protocol, h.l4), (TCP, L4::LaterFragment));
        assert!(h.to_string().ends_with("(fragment)"), "{h}");
    }

    #[test]
    fn truncated_packets_never_panic() {
        let full4 = v4(TCP, 0, &tcp(0x02));
        let full6 = v6(
            0,
            &[TCP, 0, 1, 4, 0, 0, 0, 0]
                .into_iter()
                .chain(tcp(2))
                .collect::<Vec<_>>(),
        );
        for full in [&full4, &full6] {
            for len in 0..full.len() {
                // Every prefix parses to an error or a truncated/partial
                // result; none reads out of bounds.
                let _ = parse(&full[..len]).map(|h| h.to_string());
            }
        }
        assert_eq!(parse(&[]), Err(PacketError::Empty));
        assert_eq!(
            parse(&full4[..19]),
            Err(PacketError::Truncated {
                version: 4,
                len: 19
            })
        );
        assert_eq!(parse(&full4[..33]).unwrap().l4, L4::Truncated);
        assert_eq!(parse(&full6[..47]).unwrap().l4, L4::Truncated);
        assert_eq!(parse(&full6[..60]).unwrap().l4, L4::Truncated);
        assert_eq!(parse(&[0x41; 40]), Err(PacketError::BadIhl(4)));
        assert_eq!(parse(&[0x20; 40]), Err(PacketError::UnknownVersion(2)));
    }

    #[test]
    fn a_header_length_beyond_the_copy_is_truncated() {
        let mut p = v4(TCP, 0, &tcp(2));
        p[0] = 0x4f; // a 60-byte header claimed, 40 bytes in all
        assert_eq!(
            parse(&p),
            Err(PacketError::Truncated {
                version: 4,
                len: 40
            })
        );
    }
}
