//! Netlink framing shared by the agent's three netlink users: the NFQUEUE
//! consumer ([`crate::trap::netlink`]), the fallback's NFLOG reader
//! ([`crate::datapath::iptables::nflog`]) and the socket table
//! ([`crate::datapath::sockdiag`]). It owns the socket (open, bind,
//! options, send, receive into the caller's buffer, acknowledged
//! requests), the message builder (header, family header, attributes,
//! nested attributes) and the bounds-checked walks over received messages
//! and attributes. Each user keeps its own protocol: message types,
//! attribute numbers and what they mean.
//!
//! Hand-written rather than the `netlink-sys` / `netlink-packet-*` crates:
//! `netlink-packet-netfilter` covers NFLOG only (no NFQUEUE, so no batch
//! verdicts), `netlink-packet-sock-diag` has no `SOCK_DESTROY`, and their
//! decoders copy every message into owned values (a `Vec` of attributes
//! per queued packet), where the trap's hot path reads packets in place
//! from one reused buffer and writes verdicts into a fixed one. With the
//! protocols hand-written anyway, `netlink-sys` alone would only replace
//! the few lines of `socket`/`bind`/`send`/`recv` below.
//!
//! Every read of received bytes is bounds-checked: [`messages`] and
//! [`attributes`] never panic, whatever the input; a length that does not
//! fit ends the walk with one error item.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// linux/netlink.h: `struct nlmsghdr` (length, type, flags, sequence,
/// port id).
pub const NLMSG_HDR: usize = 16;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
/// `struct nlattr` (length, type).
pub const NLA_HDR: usize = 4;
/// Attribute type bits that are flags, not the type.
pub const NLA_TYPE_MASK: u16 = 0x3fff;
pub const NLA_F_NESTED: u16 = 1 << 15;
/// The netfilter netlink family (linux/netlink.h); libc lacks it.
pub const NETLINK_NETFILTER: libc::c_int = 12;
/// linux/netfilter/nfnetlink.h: `struct nfgenmsg` (family, version,
/// resource id big-endian).
pub const NFGEN_HDR: usize = 4;

/// How long an acknowledged request waits for its answer.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The message type of netfilter subsystem `subsys`'s message `msg`.
pub fn nfnl_type(subsys: u16, msg: u16) -> u16 {
    (subsys << 8) | msg
}

/// A bound netlink socket talking to the kernel.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    /// The sequence number of the next acknowledged request.
    seq: AtomicU32,
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Socket {
    /// A socket of netlink `protocol`, bound to a port id of the kernel's
    /// choice; `nonblocking` makes every receive return `WouldBlock`
    /// rather than wait.
    pub fn open(protocol: libc::c_int, nonblocking: bool) -> io::Result<Self> {
        let mut kind = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        if nonblocking {
            kind |= libc::SOCK_NONBLOCK;
        }
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, kind, protocol) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid (port id 0: the kernel picks).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: a live address of the stated length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            seq: AtomicU32::new(1),
        })
    }

    /// An integer socket option.
    pub fn set_int(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        self.set_option(level, name, &value)
    }

    /// How long a blocking receive waits before it returns `WouldBlock`.
    pub fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        self.set_option(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
    }

    fn set_option<T>(&self, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
        // SAFETY: the option value is a live T of the size given.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (value as *const T).cast(),
                size_of::<T>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sends one datagram (one or more messages) to the kernel.
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: the kernel reads bytes.len() bytes from bytes.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// One datagram into `buf`: its length. `WouldBlock` when none is
    /// waiting (non-blocking) or the receive timeout passed.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel writes at most buf.len() bytes into buf.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Waits up to `timeout` for a datagram to read.
    fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one live pollfd.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms.max(1)) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sends `message` (one built message, [`NLM_F_ACK`] set) under a
    /// fresh sequence number and waits for the kernel's answer to it: `Ok`
    /// for an acknowledgement, the kernel's errno otherwise. Other
    /// messages arriving meanwhile (a packet logged to a group bound a
    /// moment ago) are skipped.
    pub fn request(&self, message: &mut [u8]) -> io::Result<()> {
        self.request_with(message, |_| {})
    }

    /// [`Self::request`] for a request the kernel answers with messages
    /// before its acknowledgement (a get): each message of the request's
    /// sequence number but the acknowledgement goes to `answer`.
    pub fn request_with(
        &self,
        message: &mut [u8],
        mut answer: impl FnMut(&Message),
    ) -> io::Result<()> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        message
            .get_mut(8..12)
            .ok_or_else(|| invalid("request shorter than a netlink header"))?
            .copy_from_slice(&seq.to_ne_bytes());
        self.send(message)?;
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut buf = vec![0u8; 8192];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no netlink acknowledgement",
                ));
            }
            let n = match self.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait_readable(left)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            for msg in messages(&buf[..n]).map_while(Result::ok) {
                if msg.seq != seq {
                    continue;
                }
                match msg.error() {
                    Some(errno) => return errno_result(errno),
                    None => answer(&msg),
                }
            }
        }
    }
}

/// `Ok` for errno 0 (an acknowledgement), else the OS error.
pub fn errno_result(errno: i32) -> io::Result<()> {
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(errno))
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"))
}

/// One message under construction, appended to the caller's buffer (so
/// several can share one datagram); [`Builder::finish`] writes its length.
pub struct Builder<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Builder<'a> {
    /// A header of type `kind` with `flags`, addressed to the kernel,
    /// after any padding the previous message of `out` needs.
    /// The sequence number is 0 until [`Socket::request`] sets one.
    pub fn new(out: &'a mut Vec<u8>, kind: u16, flags: u16) -> Self {
        // Messages of one datagram start on 4-byte boundaries.
        out.resize(align4(out.len()), 0);
        let start = out.len();
        out.extend_from_slice(&0u32.to_ne_bytes()); // length, by finish
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes()); // sequence
        out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        Self { out, start }
    }

    /// A netfilter message: the header and an `nfgenmsg` (AF_UNSPEC,
    /// NFNETLINK_V0) for resource `res_id` (a queue, a log group).
    pub fn netfilter(out: &'a mut Vec<u8>, subsys: u16, msg: u16, flags: u16, res_id: u16) -> Self {
        let b = Self::new(out, nfnl_type(subsys, msg), flags);
        b.out.push(libc::AF_UNSPEC as u8);
        b.out.push(0); // NFNETLINK_V0
        b.out.extend_from_slice(&res_id.to_be_bytes());
        b
    }

    /// Raw bytes after what is written (a family's fixed header), not
    /// padded: the message's length counts them exactly.
    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        self.out.extend_from_slice(data);
        self
    }

    /// One attribute, starting and ending on a 4-byte boundary.
    pub fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        self.pad();
        let len = NLA_HDR + data.len();
        self.out.extend_from_slice(&(len as u16).to_ne_bytes());
        self.out.extend_from_slice(&kind.to_ne_bytes());
        self.out.extend_from_slice(data);
        self.pad();
        self
    }

    /// A nested attribute holding what `inner` writes.
    pub fn nested(&mut self, kind: u16, inner: impl FnOnce(&mut Self)) -> &mut Self {
        let at = self.out.len();
        self.attr(kind | NLA_F_NESTED, &[]);
        inner(self);
        let len = (self.out.len() - at) as u16;
        self.out[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn pad(&mut self) {
        let end = self.start + align4(self.out.len() - self.start);
        self.out.resize(end, 0);
    }

    /// Writes the message's length; the message is done.
    pub fn finish(self) {
        let len = (self.out.len() - self.start) as u32;
        self.out[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One received message, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// What follows the header, up to the message's length.
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// For an `NLMSG_ERROR` message, its errno (positive; 0 is an
    /// acknowledgement). `None` for any other message or one cut short.
    pub fn error(&self) -> Option<i32> {
        if self.kind != NLMSG_ERROR {
            return None;
        }
        let code = i32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?);
        Some(code.checked_neg().unwrap_or(i32::MAX))
    }

    /// A netfilter message's resource id (queue, group) and attributes;
    /// `None` if the message has no room for the `nfgenmsg`.
    pub fn netfilter(&self) -> Option<(u16, Attributes<'a>)> {
        let nfgen = self.payload.get(..NFGEN_HDR)?;
        Some((
            u16::from_be_bytes([nfgen[2], nfgen[3]]),
            attributes(&self.payload[NFGEN_HDR..]),
        ))
    }
}

/// The messages of one received datagram, in order. A length shorter
/// than a header or past the end of the datagram yields one error and
/// ends the walk; trailing bytes too few for a header end it silently.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = io::Result<Message<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        // The length is the header's first 4 bytes.
        let record = next_record(&mut self.rest, NLMSG_HDR, "message", |h| {
            u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize
        })?;
        Some(record.map(|(header, payload)| Message {
            kind: u16::from_ne_bytes([header[4], header[5]]),
            flags: u16::from_ne_bytes([header[6], header[7]]),
            seq: u32::from_ne_bytes([header[8], header[9], header[10], header[11]]),
            payload,
        }))
    }
}

/// Takes the next length-prefixed record (a message, an attribute) of
/// `rest`: its header and body. `None` when fewer bytes than a header
/// remain; one error, and an empty `rest`, when the length `len_of` reads
/// from the header is shorter than the header or runs past `rest`.
fn next_record<'a>(
    rest: &mut &'a [u8],
    header_len: usize,
    what: &str,
    len_of: impl Fn(&[u8]) -> usize,
) -> Option<io::Result<(&'a [u8], &'a [u8])>> {
    let buf: &'a [u8] = rest;
    let len = len_of(buf.get(..header_len)?);
    if len < header_len || len > buf.len() {
        *rest = &[];
        return Some(Err(invalid(&format!("{what} length {len}"))));
    }
    *rest = buf.get(align4(len)..).unwrap_or(&[]);
    Some(Ok((&buf[..header_len], &buf[header_len..len])))
}

/// One attribute: its type (flag bits masked off) and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attribute<'a> {
    pub kind: u16,
    pub nested: bool,
    pub data: &'a [u8],
}

impl<'a> Attribute<'a> {
    /// The value as a big-endian u32 (netfilter's byte order), if it has
    /// room for one.
    pub fn be32(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.data.get(..4)?.try_into().ok()?))
    }

    /// The attributes inside a nested one.
    pub fn attributes(&self) -> Attributes<'a> {
        attributes(self.data)
    }
}

/// The attributes in `buf`, in order. A length shorter than an attribute
/// header or past the end yields one error and ends the walk; trailing
/// bytes too few for a header end it silently.
pub fn attributes(buf: &[u8]) -> Attributes<'_> {
    Attributes { rest: buf }
}

#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = io::Result<Attribute<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let record = next_record(&mut self.rest, NLA_HDR, "attribute", |h| {
            usize::from(u16::from_ne_bytes([h[0], h[1]]))
        })?;
        Some(record.map(|(header, data)| {
            let kind = u16::from_ne_bytes([header[2], header[3]]);
            Attribute {
                kind: kind & NLA_TYPE_MASK,
                nested: kind & NLA_F_NESTED != 0,
                data,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(kind: u16, body: impl FnOnce(&mut Builder)) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = Builder::new(&mut out, kind, NLM_F_REQUEST);
        body(&mut b);
        b.finish();
        out
    }

    #[test]
    fn builds_headers_attributes_and_nesting_as_the_kernel_reads_them() {
        let mut out = Vec::new();
        let mut b = Builder::netfilter(&mut out, 3, 2, NLM_F_REQUEST | NLM_F_ACK, 0x0102);
        b.attr(1, &[1]).nested(7, |n| {
            n.attr(2, &5u32.to_be_bytes());
        });
        b.finish();
        assert_eq!(out.len(), 16 + 4 + 8 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(out[..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes([out[4], out[5]]), (3 << 8) | 2);
        assert_eq!(u16::from_ne_bytes([out[6], out[7]]), 5);
        assert_eq!(&out[16..20], &[0, 0, 1, 2], "nfgenmsg, id big-endian");
        assert_eq!(&out[20..28], &[5, 0, 1, 0, 1, 0, 0, 0], "padded attribute");
        let msgs: Vec<_> = messages(&out).collect::<io::Result<_>>().unwrap();
        assert_eq!(msgs.len(), 1);
        let (id, attrs) = msgs[0].netfilter().unwrap();
        assert_eq!(id, 0x0102);
        let attrs: Vec<_> = attrs.collect::<io::Result<_>>().unwrap();
        assert_eq!((attrs[0].kind, attrs[0].data), (1, &[1][..]));
        assert!(attrs[1].nested && attrs[1].kind == 7);
        let inner: Vec<_> = attrs[1].attributes().map_while(Result::ok).collect();
        assert_eq!((inner[0].kind, inner[0].be32()), (2, Some(5)));
    }

    #[test]
    fn walks_several_messages_and_reads_errors() {
        let mut datagram = one(20, |b| {
            b.bytes(&[1, 2, 3]);
        });
        let mut b = Builder::new(&mut datagram, NLMSG_ERROR, 0);
        b.bytes(&(-libc::EPERM).to_ne_bytes());
        b.finish();
        datagram.extend(one(NLMSG_ERROR, |b| {
            b.bytes(&0i32.to_ne_bytes());
        }));
        let msgs: Vec<_> = messages(&datagram).collect::<io::Result<_>>().unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].payload, &[1, 2, 3], "payload up to the length");
        assert_eq!(msgs[0].error(), None);
        assert_eq!(msgs[1].error(), Some(libc::EPERM));
        assert_eq!(
            errno_result(msgs[1].error().unwrap())
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EPERM)
        );
        assert_eq!(msgs[2].error(), Some(0));
        assert!(errno_result(0).is_ok());
    }

    #[test]
    fn malformed_messages_end_the_walk_without_panicking() {
        let full = one(20, |b| {
            b.attr(1, &[9; 10]).attr(2, &[]);
        });
        // Every prefix: never a panic; a cut header ends silently, a cut
        // body is one error.
        for len in 0..full.len() {
            let got: Vec<_> = messages(&full[..len]).collect();
            if len < NLMSG_HDR {
                assert!(got.is_empty(), "{len}");
            } else {
                assert_eq!(got.len(), 1, "{len}");
                assert!(got[0].is_err(), "{len}");
            }
        }
        // A length past the buffer, a zero length, a length inside the
        // header: one error, then nothing (no endless loop on zero).
        for bad in [1000u32, 0, 15] {
            let mut lying = full.clone();
            lying.extend(&full);
            lying[..4].copy_from_slice(&bad.to_ne_bytes());
            let got: Vec<_> = messages(&lying).collect();
            assert_eq!(got.len(), 1, "length {bad}");
            assert!(got[0].is_err());
        }
        // A good message then a bad one: the good one first.
        let mut tail = full.clone();
        tail.extend(&[0xff; NLMSG_HDR]);
        let got: Vec<_> = messages(&tail).collect();
        assert!(got[0].is_ok() && got[1].is_err() && got.len() == 2);
        // A short error message is no acknowledgement.
        let short = one(NLMSG_ERROR, |b| {
            b.bytes(&[]);
        });
        assert_eq!(messages(&short).next().unwrap().unwrap().error(), None);
        assert!(messages(&[]).next().is_none());
    }

    #[test]
    fn malformed_attributes_end_the_walk_without_panicking() {
        let mut good = Vec::new();
        let mut b = Builder::new(&mut good, 0, 0);
        b.attr(1, &[1, 2, 3, 4, 5]).attr(2, &7u32.to_be_bytes());
        b.finish();
        let attrs = &good[NLMSG_HDR..];
        assert_eq!(attributes(attrs).count(), 2);
        for len in 0..attrs.len() {
            // Any prefix: at most the whole first attribute, no panic.
            let got: Vec<_> = attributes(&attrs[..len]).collect();
            assert!(got.len() <= 2, "{len}");
            if len < NLA_HDR {
                assert!(got.is_empty());
            }
        }
        // Zero length, a length inside the header, a length past the end.
        for bad in [0u16, 3, 200] {
            let mut lying = attrs.to_vec();
            lying[..2].copy_from_slice(&bad.to_ne_bytes());
            let got: Vec<_> = attributes(&lying).collect();
            assert_eq!(got.len(), 1, "length {bad}");
            assert!(got[0].is_err());
        }
        // The second attribute lies: the first still comes through.
        let mut second = attrs.to_vec();
        second[12..14].copy_from_slice(&100u16.to_ne_bytes());
        let got: Vec<_> = attributes(&second).collect();
        assert!(got[0].is_ok() && got[1].is_err() && got.len() == 2);
        // A value too short for a u32.
        let a = attributes(&attrs[..12]).next().unwrap().unwrap();
        assert_eq!(a.be32(), Some(0x0102_0304));
        let tiny = Attribute {
            kind: 1,
            nested: false,
            data: &[1, 2],
        };
        assert_eq!(tiny.be32(), None);
        // A netfilter message with no room for its nfgenmsg.
        let m = Message {
            kind: 0,
            flags: 0,
            seq: 0,
            payload: &[1, 2],
        };
        assert!(m.netfilter().is_none());
    }
}
