//! Where the token rides: the handshake's packet changes, pure functions
//! on whole IP packets (IPv4 and IPv6 through one code path).
//!
//! TCP: the sender's agent marks a SYN or SYN-ACK with TCP option 34 and
//! carries the token as the segment's payload, as the seed's peers do (a
//! signature does not fit the 40 bytes of option space). The receiver's
//! agent takes the token out and strips the option and payload, so the
//! application's stack sees an ordinary SYN. The payload sits in sequence
//! space after the SYN, but the sender's kernel never sent it and the
//! receiver's kernel never sees it, so both agree on the sequence numbers.
//! Each change fixes the IP length, the TCP data offset and both
//! checksums; incoming checksums are not trusted (a locally sent packet
//! may carry only a partial one under checksum offload), they are
//! recomputed.
//!
//! UDP: a handshake datagram is the seed's signature
//! (`n30njxq7bmiwr6dtxq`) followed by a token; the agent builds it whole
//! and injects it, and traps the answers by the signature.
//!
//! Packets are read strictly: the IP length must match the buffer (the
//! consumer must copy whole packets), fragments and IPsec AH are refused
//! (a token cannot be taken from part of a segment, and AH covers the
//! bytes a strip changes), TCP options must be well-formed. Nothing here
//! panics on any input; every refusal is a [`WireError`].

use std::net::{IpAddr, SocketAddr};

use super::token::MAX_TOKEN_LEN;
use crate::trap::packet::{V6Chain, V6Step};

/// The TCP option that says "a token follows as payload" (the seed's).
pub const MARKER_OPTION: u8 = 34;
/// What starts a UDP handshake datagram's payload (the seed's signature).
pub const UDP_SIGNATURE: &[u8] = b"n30njxq7bmiwr6dtxq";

const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
/// The option as inserted: two NOPs keep the 4-byte alignment.
const MARKER_BLOCK: [u8; 4] = [1, 1, MARKER_OPTION, 2];
const MAX_TCP_HEADER: usize = 60;

/// Why a packet could not be read or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not an IPv4 or IPv6 packet")]
    NotIp,
    #[error("the IP header is malformed or truncated")]
    BadIpHeader,
    #[error("the IP length says {claimed} bytes but {len} were copied")]
    LengthMismatch { claimed: usize, len: usize },
    #[error("a fragment")]
    Fragment,
    #[error("protected by IPsec AH")]
    Authenticated,
    #[error("not {0}")]
    WrongProtocol(&'static str),
    #[error("the transport header is malformed or truncated")]
    BadTransportHeader,
    #[error("the TCP options are malformed")]
    BadOptions,
    #[error("not a SYN or SYN-ACK")]
    NotSyn,
    #[error("the SYN already carries data")]
    SynWithData,
    #[error("the SYN already carries the marker option")]
    AlreadyMarked,
    #[error("no room left for the marker option")]
    NoOptionSpace,
    #[error("the marker option is there but no token follows")]
    MarkerWithoutToken,
    #[error("the token is larger than a token can be")]
    TokenTooLarge,
    #[error("the packet would exceed the IP length limit")]
    TooLarge,
}

/// Where the parts of a packet are.
#[derive(Debug, Clone, Copy)]
struct Layout {
    v6: bool,
    /// Offset of the transport header.
    l4: usize,
    protocol: u8,
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

/// Checks the IP header(s) and finds the transport header.
fn layout(p: &[u8]) -> Result<Layout, WireError> {
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl {
                return Err(WireError::BadIpHeader);
            }
            let claimed = usize::from(be16(p, 2).ok_or(WireError::BadIpHeader)?);
            if claimed != p.len() {
                return Err(WireError::LengthMismatch {
                    claimed,
                    len: p.len(),
                });
            }
            // More-fragments flag or a fragment offset.
            if be16(p, 6).ok_or(WireError::BadIpHeader)? & 0x3fff != 0 {
                return Err(WireError::Fragment);
            }
            Ok(Layout {
                v6: false,
                l4: ihl,
                protocol: p[9],
            })
        }
        Some(6) => {
            if p.len() < 40 {
                return Err(WireError::BadIpHeader);
            }
            let claimed = 40 + usize::from(be16(p, 4).ok_or(WireError::BadIpHeader)?);
            if claimed != p.len() {
                return Err(WireError::LengthMismatch {
                    claimed,
                    len: p.len(),
                });
            }
            for step in V6Chain::new(p) {
                match step {
                    V6Step::Extension {
                        header: V6Step::FRAGMENT,
                        ..
                    } => return Err(WireError::Fragment),
                    V6Step::Extension {
                        header: V6Step::AUTH,
                        ..
                    } => return Err(WireError::Authenticated),
                    V6Step::Extension { .. } => {}
                    V6Step::Transport { protocol, at } => {
                        return Ok(Layout {
                            v6: true,
                            l4: at,
                            protocol,
                        });
                    }
                    V6Step::Truncated { .. } => return Err(WireError::BadIpHeader),
                }
            }
            Err(WireError::BadIpHeader)
        }
        _ => Err(WireError::NotIp),
    }
}

/// The one's-complement sum of `bytes` as 16-bit words, added to `sum`.
fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([pair[0], pair[1]])));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The transport checksum of `p` (its field taken as zero) over the
/// pseudo-header of its IP version.
fn transport_checksum(p: &[u8], at: Layout, checksum_at: usize) -> u16 {
    let l4 = &p[at.l4..];
    let len = l4.len() as u32;
    let mut sum = if at.v6 {
        let s = sum_words(0, &p[8..40]);
        sum_words(s, &len.to_be_bytes())
    } else {
        let s = sum_words(0, &p[12..20]);
        sum_words(s, &(len as u16).to_be_bytes())
    };
    sum = sum_words(sum, &[0, at.protocol]);
    sum = sum_words(sum, &l4[..checksum_at]);
    sum = sum_words(sum, &l4[checksum_at + 2..]);
    fold(sum)
}

/// Sets the IP length fields to the buffer's length and recomputes the
/// IPv4 header and transport checksums. The caller keeps the length
/// within 65535 (IPv4) or 65575 (IPv6).
fn finish(p: &mut [u8], at: Layout) {
    if at.v6 {
        let payload = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&payload.to_be_bytes());
    } else {
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[10..12].fill(0);
        let sum = fold(sum_words(0, &p[..at.l4]));
        p[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let checksum_at = if at.protocol == TCP { 16 } else { 6 };
    let mut sum = transport_checksum(p, at, checksum_at);
    // UDP sends a zero sum as all ones (zero means "none").
    if at.protocol == UDP && sum == 0 {
        sum = 0xffff;
    }
    p[at.l4 + checksum_at..at.l4 + checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
}

fn max_len(at: Layout) -> usize {
    if at.v6 { 40 + 65535 } else { 65535 }
}

/// A TCP segment's header fields this module needs.
struct Tcp {
    at: Layout,
    /// Header length (data offset) in bytes.
    header: usize,
    flags: u8,
}

fn tcp(p: &[u8]) -> Result<Tcp, WireError> {
    let at = layout(p)?;
    if at.protocol != TCP {
        return Err(WireError::WrongProtocol("TCP"));
    }
    let seg = &p[at.l4..];
    let header = seg
        .get(12)
        .map(|b| usize::from(b >> 4) * 4)
        .ok_or(WireError::BadTransportHeader)?;
    if header < 20 || header > seg.len() {
        return Err(WireError::BadTransportHeader);
    }
    Ok(Tcp {
        at,
        header,
        flags: seg[13],
    })
}

/// The options as (offset in the option bytes, kind, length) until the
/// end-of-list option; refuses an option running past the header.
fn options(opts: &[u8]) -> Result<Vec<(usize, u8, usize)>, WireError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => {
                out.push((i, 1, 1));
                i += 1;
            }
            kind => {
                let len = usize::from(*opts.get(i + 1).ok_or(WireError::BadOptions)?);
                if len < 2 || i + len > opts.len() {
                    return Err(WireError::BadOptions);
                }
                out.push((i, kind, len));
                i += len;
            }
        }
    }
    Ok(out)
}

/// Marks a SYN or SYN-ACK with the marker option and appends `token` as
/// its payload.
pub fn attach_token(packet: &[u8], token: &[u8]) -> Result<Vec<u8>, WireError> {
    let seg = tcp(packet)?;
    if seg.flags & TCP_SYN == 0 {
        return Err(WireError::NotSyn);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(WireError::TokenTooLarge);
    }
    let (l4, header) = (seg.at.l4, seg.header);
    if packet.len() != l4 + header {
        return Err(WireError::SynWithData);
    }
    let opts = &packet[l4 + 20..l4 + header];
    let list = options(opts)?;
    if list.iter().any(|&(_, kind, _)| kind == MARKER_OPTION) {
        return Err(WireError::AlreadyMarked);
    }
    // The marker goes right after the last option: anything after an
    // end-of-list option is ignored by the receiver. Old padding is
    // dropped, new padding is end-of-list bytes.
    let used = list.last().map_or(0, |&(at, _, len)| at + len);
    let mut new_opts = opts[..used].to_vec();
    new_opts.extend(MARKER_BLOCK);
    while !new_opts.len().is_multiple_of(4) {
        new_opts.push(0);
    }
    let new_header = 20 + new_opts.len();
    if new_header > MAX_TCP_HEADER {
        return Err(WireError::NoOptionSpace);
    }
    if l4 + new_header + token.len() > max_len(seg.at) {
        return Err(WireError::TooLarge);
    }
    let mut out = Vec::with_capacity(l4 + new_header + token.len());
    out.extend(&packet[..l4 + 20]);
    out.extend(&new_opts);
    out.extend(token);
    let words = new_header / 4;
    out[l4 + 12] = (words as u8) << 4 | (out[l4 + 12] & 0x0f);
    finish(&mut out, seg.at);
    Ok(out)
}

/// A token taken out of a SYN or SYN-ACK, and the packet without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub token: Vec<u8>,
    /// The packet as its sender's application sent it: no marker option,
    /// no payload, lengths and checksums fixed.
    pub stripped: Vec<u8>,
}

/// Takes the token out of a marked SYN or SYN-ACK. `Ok(None)`: a TCP
/// segment without the marker, i.e. a peer that sent no token.
pub fn take_token(packet: &[u8]) -> Result<Option<Taken>, WireError> {
    let seg = tcp(packet)?;
    let (l4, header) = (seg.at.l4, seg.header);
    let opts = &packet[l4 + 20..l4 + header];
    let list = options(opts)?;
    let mut markers = list
        .iter()
        .enumerate()
        .filter(|&(_, &(_, kind, _))| kind == MARKER_OPTION);
    let Some((marker_index, &(marker_at, _, marker_len))) = markers.next() else {
        return Ok(None);
    };
    if markers.next().is_some() {
        return Err(WireError::BadOptions);
    }
    if seg.flags & TCP_SYN == 0 {
        return Err(WireError::NotSyn);
    }
    let token = &packet[l4 + header..];
    if token.is_empty() {
        return Err(WireError::MarkerWithoutToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(WireError::TokenTooLarge);
    }
    // Remove the marker and, to keep the 4-byte alignment, the NOPs just
    // before it (the block `attach_token` inserts); drop the old end-of-
    // list padding and pad anew with end-of-list bytes where needed.
    // Only NOP options count: a byte 1 inside another option's data is
    // not one.
    let (mut start, end) = (marker_at, marker_at + marker_len);
    let before = list[..marker_index].iter().rev();
    for &(at, kind, _) in before {
        if (end - start).is_multiple_of(4) || kind != 1 || at + 1 != start {
            break;
        }
        start = at;
    }
    let used = list.last().map_or(0, |&(at, _, len)| at + len);
    let kept = opts[..start].iter().chain(&opts[end..used]);
    let mut new_opts: Vec<u8> = kept.copied().collect();
    while !new_opts.len().is_multiple_of(4) {
        new_opts.push(0);
    }
    let mut stripped = Vec::with_capacity(l4 + 20 + new_opts.len());
    stripped.extend(&packet[..l4 + 20]);
    stripped.extend(&new_opts);
    let words = (20 + new_opts.len()) / 4;
    stripped[l4 + 12] = (words as u8) << 4 | (stripped[l4 + 12] & 0x0f);
    finish(&mut stripped, seg.at);
    Ok(Some(Taken {
        token: token.to_vec(),
        stripped,
    }))
}

/// The token of a UDP handshake datagram. `Ok(None)`: a UDP datagram
/// whose payload does not start with the signature (ordinary data, even
/// if the signature appears later in it).
pub fn udp_token(packet: &[u8]) -> Result<Option<&[u8]>, WireError> {
    let at = layout(packet)?;
    if at.protocol != UDP {
        return Err(WireError::WrongProtocol("UDP"));
    }
    let seg = &packet[at.l4..];
    let len = usize::from(be16(seg, 4).ok_or(WireError::BadTransportHeader)?);
    if len < 8 || len != seg.len() {
        return Err(WireError::BadTransportHeader);
    }
    let Some(token) = seg[8..].strip_prefix(UDP_SIGNATURE) else {
        return Ok(None);
    };
    if token.is_empty() {
        return Err(WireError::MarkerWithoutToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(WireError::TokenTooLarge);
    }
    Ok(Some(token))
}

/// A whole UDP handshake datagram from `src` to `dst` carrying `token`,
/// ready to inject (TTL/hop limit 64; IPv4 with don't-fragment).
pub fn udp_handshake(src: SocketAddr, dst: SocketAddr, token: &[u8]) -> Result<Vec<u8>, WireError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(WireError::TokenTooLarge);
    }
    let udp_len = 8 + UDP_SIGNATURE.len() + token.len();
    let mut p = Vec::with_capacity(40 + udp_len);
    let at = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend([0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, UDP, 0, 0]);
            p.extend(s.octets());
            p.extend(d.octets());
            Layout {
                v6: false,
                l4: 20,
                protocol: UDP,
            }
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend([0x60, 0, 0, 0, 0, 0, UDP, 64]);
            p.extend(s.octets());
            p.extend(d.octets());
            Layout {
                v6: true,
                l4: 40,
                protocol: UDP,
            }
        }
        _ => return Err(WireError::NotIp),
    };
    p.extend(src.port().to_be_bytes());
    p.extend(dst.port().to_be_bytes());
    p.extend((udp_len as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend(UDP_SIGNATURE);
    p.extend(token);
    finish(&mut p, at);
    Ok(p)
}

/// A UDP datagram as a copy to send again: it must be whole (the IP
/// length matching the bytes, not a fragment); its checksums are
/// recomputed, since a locally sent packet may carry only a partial one.
pub fn udp_whole(packet: &[u8]) -> Result<Vec<u8>, WireError> {
    let at = layout(packet)?;
    if at.protocol != UDP {
        return Err(WireError::WrongProtocol("UDP"));
    }
    let len = usize::from(be16(packet, at.l4 + 4).ok_or(WireError::BadTransportHeader)?);
    if len < 8 || len != packet.len() - at.l4 {
        return Err(WireError::BadTransportHeader);
    }
    let mut p = packet.to_vec();
    finish(&mut p, at);
    Ok(p)
}

/// Whether the IPv4 header and transport checksums of `packet` hold.
pub fn checksums_valid(packet: &[u8]) -> bool {
    let Ok(at) = layout(packet) else {
        return false;
    };
    if !at.v6 && fold(sum_words(0, &packet[..at.l4])) != 0 {
        return false;
    }
    let checksum_at = match at.protocol {
        TCP if packet.len() >= at.l4 + 20 => 16,
        UDP if packet.len() >= at.l4 + 8 => 6,
        _ => return false,
    };
    let stored = be16(packet, at.l4 + checksum_at);
    let computed = transport_checksum(packet, at, checksum_at);
    stored == Some(computed) || (at.protocol == UDP && computed == 0 && stored == Some(0xffff))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A TCP header with `flags` and `options` (padded by the caller).
    fn tcp_header(flags: u8, options: &[u8]) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let words = (20 + options.len()) / 4;
        let mut h = vec![0x9c, 0x40, 0x01, 0xbb, 0, 0, 0x10, 0, 0, 0, 0, 0];
        h.push((words as u8) << 4);
        h.extend([flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        h.extend(options);
        h
    }

    /// A whole IPv4 or IPv6 packet around `l4` with valid checksums.
    /// IPv6 gets a hop-by-hop header first, to exercise the walk.
    pub(crate) fn ip(v6: bool, protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = if v6 {
            let mut p = vec![0x60, 0, 0, 0, 0, 0, 0, 64];
            p.extend("fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
            p.extend("fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
            p.extend([protocol, 0, 1, 4, 0, 0, 0, 0]);
            p
        } else {
            let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, protocol, 0, 0];
            p.extend([10, 0, 0, 1, 10, 0, 0, 2]);
            p
        };
        p.extend(l4);
        let at = layout_unchecked(&p);
        finish(&mut p, at);
        p
    }

    fn layout_unchecked(p: &[u8]) -> Layout {
        let mut q = p.to_vec();
        if p[0] >> 4 == 6 {
            q[4..6].copy_from_slice(&((p.len() - 40) as u16).to_be_bytes());
        } else {
            let total = p.len() as u16;
            q[2..4].copy_from_slice(&total.to_be_bytes());
        }
        layout(&q).unwrap()
    }

    /// MSS, SACK-permitted, timestamps, NOP, window scale: Linux's SYN.
    pub(crate) const LINUX_SYN_OPTIONS: [u8; 20] = [
        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];

    pub(crate) fn syn(v6: bool, flags: u8) -> Vec<u8> {
        ip(v6, TCP, &tcp_header(flags, &LINUX_SYN_OPTIONS))
    }

    #[test]
    fn a_token_rides_a_syn_and_strips_back_to_the_original() {
        let token: Vec<u8> = (0..=255).collect();
        for v6 in [false, true] {
            for flags in [0x02, 0x12] {
                let original = syn(v6, flags);
                assert!(checksums_valid(&original));
                let marked = attach_token(&original, &token).unwrap();
                assert!(checksums_valid(&marked), "v6={v6}");
                assert_eq!(marked.len(), original.len() + 4 + token.len());
                let taken = take_token(&marked).unwrap().unwrap();
                assert_eq!(taken.token, token);
                assert_eq!(taken.stripped, original, "v6={v6} flags={flags:#x}");
                assert!(checksums_valid(&taken.stripped));
                // The marker is an ordinary, well-formed option.
                let at = layout(&marked).unwrap();
                let header = usize::from(marked[at.l4 + 12] >> 4) * 4;
                let opts = options(&marked[at.l4 + 20..at.l4 + header]).unwrap();
                assert!(opts.iter().any(|&(_, k, l)| k == MARKER_OPTION && l == 2));
            }
        }
    }

    #[test]
    fn a_marker_placed_elsewhere_is_stripped_with_alignment_kept() {
        // Another implementation's placement: marker first, then MSS,
        // then two bytes of padding.
        let opts = [MARKER_OPTION, 2, 2, 4, 5, 0xb4, 0, 0];
        let mut l4 = tcp_header(0x02, &opts);
        l4.extend(b"token");
        let marked = ip(false, TCP, &l4);
        let taken = take_token(&marked).unwrap().unwrap();
        assert_eq!(taken.token, b"token");
        let at = layout(&taken.stripped).unwrap();
        let header = usize::from(taken.stripped[at.l4 + 12] >> 4) * 4;
        assert_eq!(header % 4, 0);
        assert_eq!(&taken.stripped[at.l4 + 20..], &[2, 4, 5, 0xb4]);
        assert!(checksums_valid(&taken.stripped));
    }

    #[test]
    fn the_marker_goes_before_an_end_of_list_option() {
        // Found by the fuzzer: MSS, SACK-permitted, timestamps, then
        // end-of-list and padding. A marker appended after the end of the
        // list would be invisible to the receiver.
        let opts = [
            2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1,
        ];
        for v6 in [false, true] {
            let original = ip(v6, TCP, &tcp_header(0x02, &opts));
            let marked = attach_token(&original, b"token").unwrap();
            let at = layout(&marked).unwrap();
            // Same header length: the marker took the padding's place.
            assert_eq!(marked[at.l4 + 12] >> 4, 10);
            let taken = take_token(&marked).unwrap().unwrap();
            assert_eq!(taken.token, b"token");
            assert_eq!(&taken.stripped[at.l4 + 20..], &opts[..16]);
            assert!(checksums_valid(&taken.stripped));
        }
    }

    #[test]
    fn only_nop_options_before_the_marker_are_removed_with_it() {
        // Found by the fuzzer: the bytes before the marker are 1s, but
        // inside another option's data (an option of kind 4, length 6).
        let opts = [4, 6, 0, 0, 1, 1, MARKER_OPTION, 2];
        let mut l4 = tcp_header(0x02, &opts);
        l4.extend(b"token");
        let taken = take_token(&ip(true, TCP, &l4)).unwrap().unwrap();
        let at = layout(&taken.stripped).unwrap();
        assert_eq!(&taken.stripped[at.l4 + 20..], &[4, 6, 0, 0, 1, 1, 0, 0]);
        assert!(checksums_valid(&taken.stripped));
        assert_eq!(take_token(&taken.stripped), Ok(None));
    }

    #[test]
    fn unmarked_segments_have_no_token() {
        assert_eq!(take_token(&syn(false, 0x02)), Ok(None));
        assert_eq!(take_token(&syn(true, 0x10)), Ok(None));
    }

    #[test]
    fn what_cannot_be_marked_or_stripped_is_refused() {
        let token = [7u8; 100];
        let ack = syn(false, 0x10);
        assert_eq!(attach_token(&ack, &token), Err(WireError::NotSyn));
        let marked = attach_token(&syn(false, 0x02), &token).unwrap();
        assert_eq!(attach_token(&marked, &token), Err(WireError::SynWithData));
        let full_options = [1u8; 40];
        let crowded = ip(false, TCP, &tcp_header(0x02, &full_options));
        assert_eq!(
            attach_token(&crowded, &token),
            Err(WireError::NoOptionSpace)
        );
        let premarked = ip(false, TCP, &tcp_header(0x02, &MARKER_BLOCK));
        assert_eq!(
            attach_token(&premarked, &token),
            Err(WireError::AlreadyMarked)
        );
        assert_eq!(take_token(&premarked), Err(WireError::MarkerWithoutToken));
        assert_eq!(
            attach_token(&syn(false, 2), &vec![0; MAX_TOKEN_LEN + 1]),
            Err(WireError::TokenTooLarge)
        );
        // An option whose length runs past the header.
        let broken = ip(false, TCP, &tcp_header(0x02, &[2, 9, 5, 0xb4]));
        assert_eq!(take_token(&broken), Err(WireError::BadOptions));
        let udp = ip(false, UDP, &[0, 1, 0, 2, 0, 8, 0, 0]);
        assert_eq!(take_token(&udp), Err(WireError::WrongProtocol("TCP")));
        // A whole packet is needed: a short copy, a fragment.
        let mut short = syn(false, 2);
        short.pop();
        assert!(matches!(
            take_token(&short),
            Err(WireError::LengthMismatch { .. })
        ));
        let mut frag = syn(false, 2);
        frag[6] = 0x20; // more fragments
        assert_eq!(take_token(&frag), Err(WireError::Fragment));
        assert_eq!(take_token(&[]), Err(WireError::NotIp));
        // Every prefix of a marked packet is refused, none panics.
        for v6 in [false, true] {
            let marked = attach_token(&syn(v6, 2), &token).unwrap();
            for len in 0..marked.len() {
                assert!(take_token(&marked[..len]).is_err(), "prefix {len}");
            }
        }
    }

    #[test]
    fn udp_handshakes_build_and_parse_in_both_families() {
        let token = b"a token".to_vec();
        for (src, dst) in [
            ("10.0.0.1:4000", "10.0.0.2:53"),
            ("[fd00::1]:4000", "[fd00::2]:53"),
        ] {
            let p = udp_handshake(src.parse().unwrap(), dst.parse().unwrap(), &token).unwrap();
            assert!(checksums_valid(&p), "{src}");
            assert_eq!(udp_token(&p), Ok(Some(&token[..])));
            let headers = crate::trap::packet::parse(&p).unwrap();
            assert_eq!(headers.to_string(), format!("udp {src} -> {dst}"));
        }
        let mixed = udp_handshake(
            "10.0.0.1:1".parse().unwrap(),
            "[fd00::2]:1".parse().unwrap(),
            &token,
        );
        assert_eq!(mixed, Err(WireError::NotIp));
        // The signature elsewhere in the payload is ordinary data.
        let mut l4 = vec![0, 1, 0, 2, 0, 0, 0, 0, b'x'];
        l4.extend(UDP_SIGNATURE);
        let len = l4.len() as u16;
        l4[4..6].copy_from_slice(&len.to_be_bytes());
        assert_eq!(udp_token(&ip(true, UDP, &l4)), Ok(None));
        let mut bare = vec![0, 1, 0, 2, 0, 0, 0, 0];
        bare.extend(UDP_SIGNATURE);
        let len = bare.len() as u16;
        bare[4..6].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            udp_token(&ip(false, UDP, &bare)),
            Err(WireError::MarkerWithoutToken)
        );
        let mut bad_len = bare.clone();
        bad_len[5] = 7;
        assert_eq!(
            udp_token(&ip(false, UDP, &bad_len)),
            Err(WireError::BadTransportHeader)
        );
    }
}
