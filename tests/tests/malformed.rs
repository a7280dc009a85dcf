//! Bad input at the network side of a PU's policy, on both datapaths and
//! both families (SPEC, "Bad input and faults"): a fragmented datagram gets
//! the same verdict as the same datagram unfragmented, IP options and IPv6
//! extension headers do not change the verdict, and a malformed or
//! truncated packet is never let through where a well-formed one would not
//! be — nor does it break the datapath.
//!
//! Host `a` runs the agent and a UDP receiver on the PU's port 8080; the
//! PU accepts UDP 8080 from the ACL peer's network only. Host `b` sends
//! hand-built IP packets from the ACL peer's address and from OTHER's
//! (neither in a target network), each with its own payload.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::Family,
    netns::{Netns, output_ok},
    on_both_datapaths_and_families,
    roles::{self, ACL_PEER, OTHER, TARGET_NETS, source},
    traffic::{UdpReceiver, send_raw_ip},
    world::PuWorld,
};
use socket2::{Domain, Socket, Type};

const PU_PORT: u16 = 8080;
const SRC_PORT: u16 = 40000;
const ARRIVES: Duration = Duration::from_secs(1);
const STAYS_AWAY: Duration = Duration::from_millis(300);

on_both_datapaths_and_families!(
    plain_datagrams_are_judged_by_their_source,
    ip_options_and_extension_headers_do_not_change_the_verdict,
    fragmented_datagrams_get_the_unfragmented_verdict,
    truncated_packets_never_pass_and_break_nothing,
);

fn config(cgroup: &Cgroup) -> String {
    Config::local_server()
        .target_tcp(TARGET_NETS)
        .target_udp(TARGET_NETS)
        .pu(Pu::process_of("dns", cgroup)
            .udp_ports([PU_PORT])
            .network_acl(Acl::accept("from-acl-peer", roles::networks(ACL_PEER)).udp([PU_PORT])))
        .to_toml()
}

/// The two hosts, the agent on `a` and the receiver on the PU's port.
struct World {
    agent: Agent,
    receiver: UdpReceiver,
    stage: PuWorld,
}

impl World {
    fn new(datapath: Datapath, family: Family) -> Result<Option<Self>> {
        let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OTHER])? else {
            return Ok(None);
        };
        let receiver =
            UdpReceiver::start(&stage.hosts.a, SocketAddr::new(stage.server_ip(), PU_PORT))?;
        let agent = stage.start(
            env!("CARGO_BIN_EXE_agent"),
            datapath,
            &config(&stage.cgroup),
        )?;
        Ok(Some(Self {
            agent,
            receiver,
            stage,
        }))
    }

    fn src(&self, role: u8) -> IpAddr {
        source(self.stage.family, role)
    }

    fn dst(&self) -> IpAddr {
        self.stage.server_ip()
    }

    /// Sends complete IP packets from host `b` through a raw socket.
    fn send(&self, packets: &[Vec<u8>]) -> Result<()> {
        let dst = self.dst();
        self.stage.hosts.b.run(|| -> Result<()> {
            for p in packets {
                send_raw_ip(dst, p)?;
            }
            Ok(())
        })?
    }

    /// Sends one IP packet from host `b` as an Ethernet frame, past the
    /// raw IP socket — which would correct a lying IPv4 total length or
    /// refuse a header length longer than the packet.
    fn send_frame(&self, packet: &[u8]) -> Result<()> {
        let hosts = &self.stage.hosts;
        let dst_mac = mac_of(&hosts.a, &hosts.a_end.ifname)?;
        let src_mac = mac_of(&hosts.b, &hosts.b_end.ifname)?;
        let ethertype: u16 = match self.stage.family {
            Family::V4 => 0x0800,
            Family::V6 => 0x86dd,
        };
        let mut frame = Vec::with_capacity(14 + packet.len());
        frame.extend_from_slice(&dst_mac);
        frame.extend_from_slice(&src_mac);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(packet);
        let ifname = hosts.b_end.ifname.clone();
        hosts
            .b
            .run(move || send_ethernet(&ifname, dst_mac, ethertype, &frame))?
    }

    fn arrives(&self, payload: &[u8]) -> bool {
        self.receiver.wait_for(payload, ARRIVES).is_some()
    }

    fn stays_away(&self, payload: &[u8]) -> bool {
        self.receiver.wait_for(payload, STAYS_AWAY).is_none()
    }
}

/// A link's MAC address, read with `ip -j link` inside its namespace.
fn mac_of(ns: &Netns, ifname: &str) -> Result<[u8; 6]> {
    let out = output_ok(std::process::Command::new("ip").args([
        "-n",
        ns.name(),
        "-j",
        "link",
        "show",
        "dev",
        ifname,
    ]))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let text = json[0]["address"]
        .as_str()
        .with_context(|| format!("no address for {ifname}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("odd MAC {text}");
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// Sends a whole Ethernet frame out of `ifname` (an `AF_PACKET` socket);
/// call it inside the namespace that owns the link.
fn send_ethernet(ifname: &str, dst_mac: [u8; 6], ethertype: u16, frame: &[u8]) -> Result<()> {
    let ifindex = nix::net::if_::if_nametoindex(ifname).context("if_nametoindex")?;
    let sock = Socket::new(Domain::PACKET, Type::RAW, None).context("opening a packet socket")?;
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ethertype.to_be();
    addr.sll_ifindex = i32::try_from(ifindex)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac);
    // SAFETY: the buffer and the address outlive the call; the lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        bail!(
            "sending a frame on {ifname}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

// ---- packet building -------------------------------------------------

const PROTO_UDP: u8 = 17;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const IPV4_MF: u16 = 0x2000;

/// A fresh fragment identification per datagram.
fn next_id() -> u32 {
    static ID: AtomicU32 = AtomicU32::new(0x4d00);
    ID.fetch_add(1, Ordering::Relaxed)
}

/// The Internet checksum of `data`, starting from the partial sum `sum`.
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// A UDP datagram (header + payload) from `src` to `dst`, with the
/// checksum over the family's pseudo-header.
fn udp(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("small datagram");
    let mut d = Vec::with_capacity(usize::from(len));
    d.extend_from_slice(&SRC_PORT.to_be_bytes());
    d.extend_from_slice(&PU_PORT.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(t)) => {
            sum_words(&s.octets()) + sum_words(&t.octets()) + u32::from(PROTO_UDP) + u32::from(len)
        }
        (IpAddr::V6(s), IpAddr::V6(t)) => {
            sum_words(&s.octets()) + sum_words(&t.octets()) + u32::from(len) + u32::from(PROTO_UDP)
        }
        _ => panic!("mixed families"),
    };
    let mut sum = checksum(pseudo, &d);
    if sum == 0 {
        sum = 0xffff;
    }
    d[6..8].copy_from_slice(&sum.to_be_bytes());
    d
}

/// An IPv4 packet: header (with `options`, a multiple of 4 bytes) and
/// `body`; `frag` is the flags + fragment offset word.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, id: u16, frag: u16, options: &[u8], body: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "options pad to 32-bit words");
    let hlen = 20 + options.len();
    let total = u16::try_from(hlen + body.len()).expect("small packet");
    let mut p = Vec::with_capacity(usize::from(total));
    p.push(0x40 | u8::try_from(hlen / 4).expect("IHL"));
    p.push(0);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&frag.to_be_bytes());
    p.push(64);
    p.push(PROTO_UDP);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(options);
    fix_ipv4_checksum(&mut p);
    p.extend_from_slice(body);
    p
}

fn fix_ipv4_checksum(p: &mut [u8]) {
    let hlen = usize::from(p[0] & 0x0f) * 4;
    p[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(0, &p[..hlen.min(p.len())]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// An IPv6 packet: fixed header with `next` and `body` (extension
/// headers and what follows them).
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).expect("small packet");
    let mut p = Vec::with_capacity(40 + body.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&len.to_be_bytes());
    p.push(next);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(body);
    p
}

/// An 8-byte IPv6 options header (hop-by-hop or destination) holding one
/// PadN option.
fn padn_options_header(next: u8) -> [u8; 8] {
    [next, 0, 1, 4, 0, 0, 0, 0]
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("not IPv4: {ip}"),
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => panic!("not IPv6: {ip}"),
    }
}

/// A plain, well-formed UDP datagram to the PU port.
fn plain(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let d = udp(src, dst, payload);
    match src {
        IpAddr::V4(_) => ipv4(v4(src), v4(dst), next_id() as u16, 0, &[], &d),
        IpAddr::V6(_) => ipv6(v6(src), v6(dst), PROTO_UDP, &d),
    }
}

/// The same datagram with IPv4 options (router alert, then NOPs and an
/// end of list: IHL 7), or IPv6 hop-by-hop and destination-options
/// extension headers before UDP.
fn with_options(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let d = udp(src, dst, payload);
    match src {
        IpAddr::V4(_) => {
            let options = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
            ipv4(v4(src), v4(dst), next_id() as u16, 0, &options, &d)
        }
        IpAddr::V6(_) => {
            let mut body = Vec::new();
            body.extend_from_slice(&padn_options_header(NEXTHDR_DEST));
            body.extend_from_slice(&padn_options_header(PROTO_UDP));
            body.extend_from_slice(&d);
            ipv6(v6(src), v6(dst), NEXTHDR_HOP, &body)
        }
    }
}

/// The same datagram in two fragments: the UDP header and the first 32
/// bytes of payload, then the rest.
fn fragments(src: IpAddr, dst: IpAddr, payload: &[u8]) -> [Vec<u8>; 2] {
    assert!(payload.len() > 32);
    let d = udp(src, dst, payload);
    let (first, rest) = d.split_at(8 + 32);
    let offset_units = u16::try_from(first.len() / 8).expect("offset");
    let id = next_id();
    match src {
        IpAddr::V4(_) => {
            let (s, t, id) = (v4(src), v4(dst), id as u16);
            [
                ipv4(s, t, id, IPV4_MF, &[], first),
                ipv4(s, t, id, offset_units, &[], rest),
            ]
        }
        IpAddr::V6(_) => {
            let frag = |offset: u16, more: bool, data: &[u8]| {
                let mut body = vec![PROTO_UDP, 0];
                body.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                body.extend_from_slice(&id.to_be_bytes());
                body.extend_from_slice(data);
                ipv6(v6(src), v6(dst), NEXTHDR_FRAGMENT, &body)
            };
            [frag(0, true, first), frag(offset_units, false, rest)]
        }
    }
}

/// A payload of exactly 64 bytes, unique to `tag`.
fn long_payload(tag: &str) -> Vec<u8> {
    let mut p = format!("{tag}|").into_bytes();
    assert!(p.len() <= 64);
    p.resize(64, b'.');
    p
}

// ---- the tests -------------------------------------------------------

fn plain_datagrams_are_judged_by_their_source(datapath: Datapath, family: Family) -> Result<()> {
    let Some(w) = World::new(datapath, family)? else {
        return Ok(());
    };
    w.send(&[plain(w.src(ACL_PEER), w.dst(), b"plain-peer")])?;
    assert!(w.arrives(b"plain-peer"), "network ACL accepts the peer");
    w.send(&[plain(w.src(OTHER), w.dst(), b"plain-other")])?;
    assert!(w.stays_away(b"plain-other"), "no ACL for OTHER: dropped");
    Ok(())
}

fn ip_options_and_extension_headers_do_not_change_the_verdict(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = World::new(datapath, family)? else {
        return Ok(());
    };
    w.send(&[with_options(w.src(ACL_PEER), w.dst(), b"options-peer")])?;
    assert!(
        w.arrives(b"options-peer"),
        "IP options / extension headers: the peer is still accepted"
    );
    w.send(&[with_options(w.src(OTHER), w.dst(), b"options-other")])?;
    assert!(
        w.stays_away(b"options-other"),
        "IP options / extension headers: OTHER is still dropped"
    );
    // The control: the same world still judges plain datagrams.
    w.send(&[plain(w.src(ACL_PEER), w.dst(), b"options-control")])?;
    assert!(w.arrives(b"options-control"));
    Ok(())
}

fn fragmented_datagrams_get_the_unfragmented_verdict(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = World::new(datapath, family)? else {
        return Ok(());
    };
    let (peer, other, dst) = (w.src(ACL_PEER), w.src(OTHER), w.dst());

    // The control: the same 64-byte datagrams, unfragmented.
    let whole_peer = long_payload("whole-peer");
    w.send(&[plain(peer, dst, &whole_peer)])?;
    assert!(
        w.arrives(&whole_peer),
        "unfragmented from the peer: accepted"
    );
    let whole_other = long_payload("whole-other");
    w.send(&[plain(other, dst, &whole_other)])?;
    assert!(
        w.stays_away(&whole_other),
        "unfragmented from OTHER: dropped"
    );

    let frag_peer = long_payload("frag-peer");
    w.send(&fragments(peer, dst, &frag_peer))?;
    assert!(
        w.arrives(&frag_peer),
        "fragmented from the peer: reassembled and accepted, as unfragmented"
    );
    let frag_other = long_payload("frag-other");
    w.send(&fragments(other, dst, &frag_other))?;
    assert!(
        w.stays_away(&frag_other),
        "fragmented from OTHER: dropped, as unfragmented"
    );

    let reversed = |payload: &[u8], src: IpAddr| {
        let [first, second] = fragments(src, dst, payload);
        [second, first]
    };
    let rev_peer = long_payload("reversed-peer");
    w.send(&reversed(&rev_peer, peer))?;
    assert!(
        w.arrives(&rev_peer),
        "fragments in reverse order from the peer: reassembled and accepted"
    );
    let rev_other = long_payload("reversed-other");
    w.send(&reversed(&rev_other, other))?;
    assert!(
        w.stays_away(&rev_other),
        "fragments in reverse order from OTHER: dropped"
    );
    Ok(())
}

fn truncated_packets_never_pass_and_break_nothing(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = World::new(datapath, family)? else {
        return Ok(());
    };
    let (other, dst) = (w.src(OTHER), w.dst());

    // The control for the frames below: a well-formed datagram from the
    // peer, sent the same way (an Ethernet frame), arrives.
    w.send_frame(&plain(w.src(ACL_PEER), dst, b"frame-peer"))?;
    assert!(w.arrives(b"frame-peer"), "a frame from the peer arrives");

    // A total / payload length that claims 100 bytes more than are sent.
    let mut long_claim = plain(other, dst, b"length-lie");
    match family {
        Family::V4 => {
            let claimed = u16::from_be_bytes([long_claim[2], long_claim[3]]) + 100;
            long_claim[2..4].copy_from_slice(&claimed.to_be_bytes());
            fix_ipv4_checksum(&mut long_claim);
        }
        Family::V6 => {
            let claimed = u16::from_be_bytes([long_claim[4], long_claim[5]]) + 100;
            long_claim[4..6].copy_from_slice(&claimed.to_be_bytes());
        }
    }
    w.send_frame(&long_claim)?;

    // A UDP header cut short: the packet ends 4 bytes into it (source
    // and destination ports present, length and checksum missing).
    let cut = udp(other, dst, b"")[..4].to_vec();
    let short_udp = match family {
        Family::V4 => ipv4(v4(other), v4(dst), next_id() as u16, 0, &[], &cut),
        Family::V6 => ipv6(v6(other), v6(dst), PROTO_UDP, &cut),
    };
    w.send(&[short_udp])?;

    // Headers that run past the end of the packet: an IPv4 header length
    // of 60 bytes in a 28-byte packet; an IPv6 hop-by-hop header that
    // claims 88 bytes, and a chain that names a destination-options
    // header after the last byte.
    let udp_other = udp(other, dst, b"chain");
    match family {
        Family::V4 => {
            let mut p = ipv4(
                v4(other),
                v4(dst),
                next_id() as u16,
                0,
                &[],
                &udp_other[..8],
            );
            p[0] = 0x4f;
            fix_ipv4_checksum(&mut p);
            w.send_frame(&p)?;
        }
        Family::V6 => {
            let mut body = vec![PROTO_UDP, 10, 1, 4, 0, 0, 0, 0];
            body.extend_from_slice(&udp_other);
            w.send(&[ipv6(v6(other), v6(dst), NEXTHDR_HOP, &body)])?;
            w.send(&[ipv6(
                v6(other),
                v6(dst),
                NEXTHDR_HOP,
                &padn_options_header(NEXTHDR_DEST),
            )])?;
        }
    }
    assert!(
        w.stays_away(b"length-lie"),
        "a length lie from OTHER passed"
    );
    assert!(
        w.stays_away(b"chain"),
        "a broken header chain from OTHER passed"
    );

    // The datapath still works, and the agent still answers.
    w.send(&[plain(w.src(ACL_PEER), dst, b"after-malformed")])?;
    assert!(
        w.arrives(b"after-malformed"),
        "a well-formed datagram from the peer after the malformed ones"
    );
    w.send(&[plain(other, dst, b"after-malformed-other")])?;
    assert!(w.stays_away(b"after-malformed-other"));
    assert_eq!(w.agent.status()?["datapath"]["kind"], datapath.expected());
    Ok(())
}
