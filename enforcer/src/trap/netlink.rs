//! The NFQUEUE side of `NETLINK_NETFILTER` (linux/netfilter/nfnetlink_queue.h):
//! one socket that binds queues, receives queued packets and sends
//! verdicts, single or in batches.
//!
//! Hand-written rather than the `nfq` crate, which the consumer used
//! before: it hides the socket (so it cannot be polled, only spun on or
//! slept on) and has no batch verdict. The protocol is small — a config
//! message per queue setting, one packet message per queued packet, a
//! verdict message per packet or per run of packets — over the framing of
//! [`crate::netlink`], whose reads of received bytes are all
//! bounds-checked ([`parse_messages`] is pure and tested on crafted bytes).
//!
//! Verdicts are written into a fixed buffer ([`VerdictBuffer`]) and sent
//! with one `send(2)` for many: the kernel runs every netlink message of a
//! datagram in order.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::netlink::{
    self as nl, Builder, NETLINK_NETFILTER, NFGEN_HDR, NLA_HDR, NLM_F_ACK, NLM_F_REQUEST, NLMSG_HDR,
};

/// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_QUEUE: u16 = 3;
/// nfnetlink_queue.h message types.
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
/// Packet attributes.
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_MARK: u16 = 3;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_UID: u16 = 16;
/// Config attributes.
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
/// Config flags.
pub const NFQA_CFG_F_FAIL_OPEN: u32 = 1 << 0;
pub const NFQA_CFG_F_UID_GID: u32 = 1 << 3;

/// A netfilter verdict (linux/netfilter.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A refusal: the packet is gone.
    Drop,
    /// Let this packet on without deciding the connection (NF_ACCEPT:
    /// the rest of the hook's table is skipped, no connection mark is
    /// saved): a handshake packet whose connection is not decided yet.
    Accept,
    /// Run the hook again from its first rule (NF_REPEAT): how the
    /// consumer accepts a connection, with the decision in the packet
    /// mark.
    Repeat,
}

impl Verdict {
    fn code(self) -> u32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
            Verdict::Repeat => 4,
        }
    }
}

/// One verdict that replaces the packet with `payload` (NFQA_PAYLOAD):
/// the kernel takes a longer or shorter packet and fixes the skb's
/// length, but not the IP and transport headers, so `payload` must be a
/// whole packet with its lengths and checksums right. Sent alone, never
/// in a batch: a batch verdict cannot carry a payload.
pub fn payload_verdict(
    queue: u16,
    id: u32,
    verdict: Verdict,
    mark: Option<u32>,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(VERDICT_LEN + NLA_HDR + payload.len() + 4);
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&verdict.code().to_be_bytes());
    hdr[4..].copy_from_slice(&id.to_be_bytes());
    let mut b = Builder::netfilter(
        &mut out,
        NFNL_SUBSYS_QUEUE,
        NFQNL_MSG_VERDICT,
        NLM_F_REQUEST,
        queue,
    );
    b.attr(NFQA_VERDICT_HDR, &hdr);
    if let Some(mark) = mark {
        b.attr(NFQA_MARK, &mark.to_be_bytes());
    }
    b.attr(NFQA_PAYLOAD, payload);
    b.finish();
    out
}

/// One queued packet, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub queue: u16,
    /// The kernel's id of the packet in its queue (increasing).
    pub id: u32,
    pub mark: u32,
    /// The owning socket's uid, for locally sent packets.
    pub uid: Option<u32>,
    /// The first bytes of the packet (the copy range).
    pub payload: &'a [u8],
}

/// A message received on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received<'a> {
    Packet(Packet<'a>),
    /// The kernel refused a request (errno), e.g. a verdict for a packet
    /// it no longer holds. Verdicts are sent without an acknowledgement
    /// request, so only failures come back.
    Error(i32),
    /// Anything else (an acknowledgement, a message of no interest).
    Other,
}

/// The socket.
#[derive(Debug)]
pub struct Socket {
    nl: nl::Socket,
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.nl.as_raw_fd()
    }
}

impl Socket {
    /// A non-blocking `NETLINK_NETFILTER` socket whose receive buffer
    /// holds about `rcvbuf` bytes.
    pub fn open(rcvbuf: usize) -> io::Result<Self> {
        let nl = nl::Socket::open(NETLINK_NETFILTER, true)?;
        // What overflows the buffer the kernel lets through when failing
        // open, and otherwise drops and counts (`user_dropped`); an ENOBUFS
        // error would only say so once more.
        nl.set_int(libc::SOL_NETLINK, libc::NETLINK_NO_ENOBUFS, 1)?;
        let size = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        // FORCE passes net.core.rmem_max (the agent is privileged); the
        // plain option is the fallback, capped by it.
        if nl
            .set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size)
            .is_err()
        {
            nl.set_int(libc::SOL_SOCKET, libc::SO_RCVBUF, size)?;
        }
        Ok(Self { nl })
    }

    /// Binds `queue` to this socket and configures it: packets copied up to
    /// `copy_range` bytes, at most `max_len` waiting, and `flags` (within
    /// `mask`). Each step is acknowledged by the kernel before the next
    /// (only while binding, before any packet can arrive on the socket).
    pub fn bind_queue(
        &self,
        queue: u16,
        copy_range: u32,
        max_len: u32,
        flags: u32,
        mask: u32,
    ) -> io::Result<()> {
        let mut msg = Vec::new();
        let mut b = config(&mut msg, queue);
        b.attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]);
        b.finish();
        self.nl.request(&mut msg)?;
        let mut msg = Vec::new();
        let mut b = config(&mut msg, queue);
        let mut params = copy_range.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_PACKET);
        b.attr(NFQA_CFG_PARAMS, &params)
            .attr(NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes())
            .attr(NFQA_CFG_MASK, &mask.to_be_bytes())
            .attr(NFQA_CFG_FLAGS, &flags.to_be_bytes());
        b.finish();
        self.nl.request(&mut msg)
    }

    /// One datagram into `buf` without blocking: its length, or
    /// `WouldBlock` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.nl.recv(buf)
    }

    /// Sends one datagram (possibly several netlink messages).
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        self.nl.send(bytes)
    }
}

fn msg_type(msg: u16) -> u16 {
    nl::nfnl_type(NFNL_SUBSYS_QUEUE, msg)
}

/// An acknowledged `NFQNL_MSG_CONFIG` message for `queue`.
fn config(out: &mut Vec<u8>, queue: u16) -> Builder<'_> {
    Builder::netfilter(
        out,
        NFNL_SUBSYS_QUEUE,
        NFQNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        queue,
    )
}

/// The size of one verdict message with a mark.
pub const VERDICT_LEN: usize = NLMSG_HDR + NFGEN_HDR + (NLA_HDR + 8) + (NLA_HDR + 4);

/// Verdict messages gathered for one `send(2)`, in a buffer of fixed
/// capacity (memory stays bounded whatever the load).
#[derive(Debug)]
pub struct VerdictBuffer {
    bytes: Vec<u8>,
    capacity: usize,
}

impl VerdictBuffer {
    /// Room for `messages` verdicts.
    pub fn new(messages: usize) -> Self {
        let capacity = messages.max(1) * VERDICT_LEN;
        Self {
            bytes: Vec::with_capacity(capacity),
            capacity,
        }
    }

    /// Whether one more verdict fits.
    pub fn has_room(&self) -> bool {
        self.has_room_for(1)
    }

    /// Whether `n` more verdicts fit.
    pub fn has_room_for(&self, n: usize) -> bool {
        self.bytes.len() + n * VERDICT_LEN <= self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A verdict for packet `id` of `queue` — or, `batch`, for every
    /// packet of the queue up to and including `id` that is still waiting
    /// (NFQNL_MSG_VERDICT_BATCH) — setting the packet mark to `mark`.
    /// The caller checks [`Self::has_room`] first.
    pub fn push(&mut self, queue: u16, id: u32, verdict: Verdict, mark: Option<u32>, batch: bool) {
        let kind = if batch {
            NFQNL_MSG_VERDICT_BATCH
        } else {
            NFQNL_MSG_VERDICT
        };
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&verdict.code().to_be_bytes());
        hdr[4..].copy_from_slice(&id.to_be_bytes());
        let mut b = Builder::netfilter(
            &mut self.bytes,
            NFNL_SUBSYS_QUEUE,
            kind,
            NLM_F_REQUEST,
            queue,
        );
        b.attr(NFQA_VERDICT_HDR, &hdr);
        if let Some(mark) = mark {
            b.attr(NFQA_MARK, &mark.to_be_bytes());
        }
        b.finish();
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
    }
}

/// Every netlink message of one received datagram. A message cut short
/// ends the walk; a packet message without a packet header is `Other`.
pub fn parse_messages(buf: &[u8]) -> impl Iterator<Item = Received<'_>> {
    nl::messages(buf).map_while(Result::ok).map(|msg| {
        if let Some(errno) = msg.error() {
            Received::Error(errno)
        } else if msg.kind == msg_type(NFQNL_MSG_PACKET) {
            parse_packet(&msg).map_or(Received::Other, Received::Packet)
        } else {
            Received::Other
        }
    })
}

/// An `NFQNL_MSG_PACKET`: `nfgenmsg` then attributes. Any malformed
/// attribute makes it no packet.
fn parse_packet<'a>(msg: &nl::Message<'a>) -> Option<Packet<'a>> {
    let (queue, attrs) = msg.netfilter()?;
    let (mut id, mut mark, mut uid, mut payload) = (None, 0, None, &[][..]);
    for attr in attrs {
        let attr = attr.ok()?;
        match attr.kind {
            NFQA_PACKET_HDR => id = attr.be32(),
            NFQA_MARK => mark = attr.be32()?,
            NFQA_UID => uid = attr.be32(),
            NFQA_PAYLOAD => payload = attr.data,
            _ => {}
        }
    }
    Some(Packet {
        queue,
        id: id?,
        mark,
        uid,
        payload,
    })
}

/// Reading back what [`VerdictBuffer`] wrote, for the consumer's tests.
#[cfg(test)]
pub(super) mod tests_support {
    use super::*;

    /// A single verdict message: (queue, id, verdict code, mark, payload).
    pub fn verdict_with_payload(b: &[u8]) -> (u16, u32, u32, Option<u32>, Vec<u8>) {
        let msg = nl::messages(b).next().expect("a message").expect("whole");
        assert_eq!(msg.kind, msg_type(NFQNL_MSG_VERDICT));
        let (queue, attrs) = msg.netfilter().expect("an nfgenmsg");
        let (mut id, mut code, mut mark, mut payload) = (0, 0, None, Vec::new());
        for attr in attrs {
            let attr = attr.expect("an attribute");
            match attr.kind {
                NFQA_VERDICT_HDR => {
                    code = u32::from_be_bytes(attr.data[..4].try_into().unwrap());
                    id = u32::from_be_bytes(attr.data[4..8].try_into().unwrap());
                }
                NFQA_MARK => mark = attr.be32(),
                NFQA_PAYLOAD => payload = attr.data.to_vec(),
                _ => {}
            }
        }
        (queue, id, code, mark, payload)
    }

    /// Each verdict message: (queue, id, batch?, mark).
    pub fn verdicts(b: &[u8]) -> Vec<(u16, u32, bool, Option<u32>)> {
        nl::messages(b)
            .map(|msg| {
                let msg = msg.expect("a whole message");
                let (queue, attrs) = msg.netfilter().expect("an nfgenmsg");
                let attrs: Vec<_> = attrs.map(|a| a.expect("an attribute")).collect();
                let id = u32::from_be_bytes(attrs[0].data[4..8].try_into().unwrap());
                let batch = msg.kind == msg_type(NFQNL_MSG_VERDICT_BATCH);
                (queue, id, batch, attrs.get(1).and_then(|a| a.be32()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet message as the kernel writes it.
    fn packet_msg(queue: u16, id: u32, mark: Option<u32>, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut msg = Builder::netfilter(&mut out, NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET, 0, queue);
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend([0x08, 0x00, 3]); // hw protocol IPv4, hook LOCAL_OUT
        msg.attr(NFQA_PACKET_HDR, &hdr);
        if let Some(mark) = mark {
            msg.attr(NFQA_MARK, &mark.to_be_bytes());
        }
        msg.attr(NFQA_UID, &1000u32.to_be_bytes());
        msg.attr(NFQA_PAYLOAD, payload);
        msg.finish();
        out
    }

    #[test]
    fn reads_packets_errors_and_skips_the_rest() {
        let mut datagram = packet_msg(17, 42, Some(0x800), &[0x45, 1, 2]);
        datagram.extend(packet_msg(3, 7, None, &[]));
        // An nlmsgerr: the errno (negative), here without the offending
        // header.
        let mut error = Builder::new(&mut datagram, nl::NLMSG_ERROR, 0);
        error.bytes(&(-2i32).to_ne_bytes());
        error.finish();
        let got: Vec<Received> = parse_messages(&datagram).collect();
        assert_eq!(
            got,
            vec![
                Received::Packet(Packet {
                    queue: 17,
                    id: 42,
                    mark: 0x800,
                    uid: Some(1000),
                    payload: &[0x45, 1, 2],
                }),
                Received::Packet(Packet {
                    queue: 3,
                    id: 7,
                    mark: 0,
                    uid: Some(1000),
                    payload: &[],
                }),
                Received::Error(2),
            ]
        );
    }

    #[test]
    fn cut_messages_never_read_out_of_bounds() {
        let full = packet_msg(1, 9, Some(1), &[0x60; 40]);
        for len in 0..full.len() {
            // Any prefix: no panic, and never a packet with a wrong id.
            for got in parse_messages(&full[..len]) {
                if let Received::Packet(p) = got {
                    assert_eq!(p.id, 9);
                }
            }
        }
        // A length field past the datagram ends the walk.
        let mut lying = full.clone();
        lying[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(parse_messages(&lying).count(), 0);
        // An attribute claiming more than the message holds: no packet.
        let mut bad_attr = full;
        bad_attr[NLMSG_HDR + NFGEN_HDR..][..2].copy_from_slice(&500u16.to_ne_bytes());
        assert_eq!(
            parse_messages(&bad_attr).collect::<Vec<_>>(),
            vec![Received::Other]
        );
    }

    #[test]
    fn a_payload_verdict_carries_the_whole_packet() {
        let packet = [0x45, 0, 0, 5, 1];
        let msg = payload_verdict(4, 9, Verdict::Accept, None, &packet);
        let got = tests_support::verdict_with_payload(&msg);
        assert_eq!(got, (4, 9, 1, None, packet.to_vec()));
        let msg = payload_verdict(5, 10, Verdict::Repeat, Some(0x100), &packet);
        let got = tests_support::verdict_with_payload(&msg);
        assert_eq!(got, (5, 10, 4, Some(0x100), packet.to_vec()));
    }

    #[test]
    fn verdicts_are_laid_out_as_the_kernel_reads_them() {
        let mut buf = VerdictBuffer::new(2);
        assert!(buf.is_empty() && buf.has_room());
        buf.push(5, 0x0102_0304, Verdict::Repeat, Some(0x100), false);
        buf.push(6, 9, Verdict::Drop, None, true);
        assert!(!buf.has_room());
        let b = buf.bytes();
        // First message: a single verdict with a mark, VERDICT_LEN long.
        assert_eq!(
            u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize,
            VERDICT_LEN
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), (3 << 8) | 1);
        assert_eq!(u16::from_be_bytes([b[18], b[19]]), 5, "queue in nfgenmsg");
        assert_eq!(&b[24..28], &4u32.to_be_bytes(), "NF_REPEAT");
        assert_eq!(&b[28..32], &[1, 2, 3, 4], "packet id");
        assert_eq!(
            &b[32..36],
            &[8, 0, 3, 0],
            "mark attribute header (native endian)"
        );
        assert_eq!(&b[36..40], &0x100u32.to_be_bytes());
        // Second: a batch verdict without a mark.
        let second = &b[VERDICT_LEN..];
        assert_eq!(
            u32::from_ne_bytes(second[..4].try_into().unwrap()) as usize,
            VERDICT_LEN - 8
        );
        assert_eq!(u16::from_ne_bytes([second[4], second[5]]), (3 << 8) | 3);
        assert_eq!(&second[24..28], &0u32.to_be_bytes(), "NF_DROP");
        buf.clear();
        assert!(buf.is_empty());
    }
}
