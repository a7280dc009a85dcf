//! The netfilter matches of the identity handshake's traps, shared by both
//! datapaths' rules (SPEC, "Global steering", "Order of evaluation inside
//! a PU", "The trap"). Pure text.
//!
//! What reaches user space for a TCP connection with a target network is
//! its set-up and nothing after: the SYN, the SYN-ACK, and the first ACK
//! (the one that completes the handshake). The consumer
//! ([`crate::trap`]) accepts the SYN and SYN-ACK as they are and marks the
//! connection authorised at that ACK — the handshake's last packet — so
//! the main chains accept every later packet before any trap rule sees it.
//! Besides, a SYN carrying TCP option 34 and a UDP packet carrying the
//! handshake signature (anywhere in it), both from a target network, are
//! trapped whatever their port — the UDP one before the accepts of
//! decided connections, as SPEC orders it, so a decided flow's datagram
//! whose data happens to contain the signature is trapped too: the
//! consumer knows it by its connection mark (looked up in conntrack) and
//! lets it on unchanged ([`crate::trap`]).
//!
//! Which packet is "the first ACK" needs care: conntrack counts the packet
//! before mangle sees it, so the handshake's ACK is the initiator's packet
//! 2 (or 3, after one SYN retransmission) — but an application that
//! writes as soon as `connect` returns sends its first data as packet 3,
//! possibly before the consumer's verdict on the ACK has marked the
//! connection. The ACK carries no payload and data does, so
//! [`first_ack`] also asks a small classic-BPF program (`-m bpf
//! --bytecode`, in the kernel since 3.9 and on both iptables flavours)
//! whether the TCP payload is empty. Without that, the first data packet
//! would race the verdict into the queue.
//!
//! The other side of that choice, for the identity handshake (issue 7) to
//! settle: a data packet sent while the first ACK waits for its verdict is
//! not trapped — it passes as the PU chain's established traffic, before
//! the connection is decided. The seed instead traps every ACK of an
//! undecided connection, data included; a handshake that refuses at the
//! ACK needs that (or a drop of such packets), at the price of an extra
//! queued packet whenever data races the verdict.

use enforcer_common::marks::MarkLayout;

use crate::policy::IpFamily;

/// The UDP handshake signature (SPEC, "Global steering").
pub const UDP_SIGNATURE: &str = "n30njxq7bmiwr6dtxq";

/// A SYN-ACK.
pub const SYN_ACK: &str = "-p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK";

/// A SYN (without ACK) carrying TCP option 34.
pub const SYN_WITH_OPTION_34: &str = "-p tcp -m tcp --tcp-option 34 --tcp-flags SYN,ACK SYN";

/// A packet carrying [`UDP_SIGNATURE`] anywhere (Boyer-Moore over the
/// whole packet, as the seed searches it); the rules put it after their
/// cheaper `-p udp` and target matches.
pub fn udp_signature() -> String {
    format!("-m string --string {UDP_SIGNATURE} --algo bm --to 65535")
}

/// The first ACK of a connection: the initiator's (original direction)
/// packet with ACK as its only flag among SYN, ACK, FIN and RST, among
/// its first three packets, with no TCP payload. Without the packet bound,
/// a connection that is never marked (one that predates the agent, say)
/// would send each of its pure ACKs to user space, as the seed's "every
/// ACK" rule does; without the direction, the responder's would be taken
/// for it; without the payload check, data (see the module docs).
pub fn first_ack(family: IpFamily) -> String {
    format!(
        "-p tcp -m tcp --tcp-flags SYN,ACK,FIN,RST ACK -m conntrack --ctdir ORIGINAL \
         -m connbytes --connbytes 0:3 --connbytes-dir original --connbytes-mode packets \
         -m bpf --bytecode \"{}\"",
        bytecode(no_tcp_payload(family))
    )
}

/// One classic BPF instruction: code, jump if true, jump if false, k.
type Insn = (u16, u8, u8, u32);

// Classic BPF opcodes (linux/filter.h), as `-m bpf --bytecode` takes them.
const LD_H_ABS: u16 = 0x28;
const LD_B_ABS: u16 = 0x30;
const LD_B_IND: u16 = 0x50;
const LDX_B_MSH: u16 = 0xb1;
const LD_MEM: u16 = 0x60;
const ST: u16 = 0x02;
const RSH_K: u16 = 0x74;
const AND_K: u16 = 0x54;
const ADD_X: u16 = 0x0c;
const TAX: u16 = 0x07;
const JEQ_K: u16 = 0x15;
const JEQ_X: u16 = 0x1d;
const RET_K: u16 = 0x06;

const IPPROTO_TCP: u32 = 6;

/// Whether a TCP packet (netfilter hands xt_bpf the packet from its IP
/// header) has an empty payload: the IP length equals the IP and TCP
/// headers' lengths. The TCP header length is `(byte 12 >> 4) * 4`,
/// computed as `(byte 12 >> 2) & 0x3c`. An IPv6 packet with extension
/// headers before TCP does not match (the ACK is then not trapped, and
/// the connection is judged by the PU's chain as any unmarked one).
fn no_tcp_payload(family: IpFamily) -> &'static [Insn] {
    match family {
        IpFamily::V4 => &[
            (LD_H_ABS, 0, 0, 2),  // A = total length
            (ST, 0, 0, 0),        // M[0] = A
            (LDX_B_MSH, 0, 0, 0), // X = IP header length
            (LD_B_IND, 0, 0, 12), // A = TCP data offset byte
            (RSH_K, 0, 0, 2),     //
            (AND_K, 0, 0, 0x3c),  // A = TCP header length
            (ADD_X, 0, 0, 0),     // A = both headers
            (TAX, 0, 0, 0),       // X = A
            (LD_MEM, 0, 0, 0),    // A = total length
            (JEQ_X, 0, 1, 0),     // no payload?
            (RET_K, 0, 0, 1),     // match
            (RET_K, 0, 0, 0),     // no match
        ],
        IpFamily::V6 => &[
            (LD_B_ABS, 0, 0, 6),        // A = next header
            (JEQ_K, 0, 7, IPPROTO_TCP), // TCP right after the fixed header?
            (LD_B_ABS, 0, 0, 40 + 12),  // A = TCP data offset byte
            (RSH_K, 0, 0, 2),           //
            (AND_K, 0, 0, 0x3c),        // A = TCP header length
            (TAX, 0, 0, 0),             // X = A
            (LD_H_ABS, 0, 0, 4),        // A = payload length
            (JEQ_X, 0, 1, 0),           // no TCP payload?
            (RET_K, 0, 0, 1),           // match
            (RET_K, 0, 0, 0),           // no match
        ],
    }
}

/// `--bytecode` text: the count, then `code jt jf k` per instruction.
fn bytecode(program: &[Insn]) -> String {
    let mut text = program.len().to_string();
    for (code, jt, jf, k) in program {
        text.push_str(&format!(",{code} {jt} {jf} {k}"));
    }
    text
}

/// The first rule of both datapaths' main chains: a SYN (without ACK)
/// starts a new connection, so whatever the agent wrote into its
/// connection's mark (kind and class; other bits kept) is forgotten
/// before any rule reads it. Conntrack does not always make a new entry
/// for a new connection: when a connection was closed by the responder's
/// reset, a SYN on the same ports within the closed entry's 10 s reuses
/// it — mark and all — and without this rule the old connection's
/// `Authorised` kind would accept the new one past the trap (and past the
/// identity handshake). Incoming, not on `lo`: a local connection's SYN
/// was already cleared on its way out, and what the application side wrote
/// into it then must stay.
pub fn new_connection_forgets_marks(marks: MarkLayout, chain: &str, incoming: bool) -> String {
    let mask = marks.kind_mask() | marks.class_mask();
    let not_lo = if incoming { "! -i lo " } else { "" };
    format!(
        "-A {chain} {not_lo}-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN \
         -j CONNMARK --set-xmark 0x0/{mask:#x}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program of the opcodes above on `packet` (from
    /// its IP header), as the kernel would: an out-of-bounds load ends it
    /// with 0.
    fn run(program: &[Insn], packet: &[u8]) -> u32 {
        let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        let byte = |at: usize| packet.get(at).map(|&b| u32::from(b));
        let half = |at: usize| Some(byte(at)? << 8 | byte(at + 1)?);
        loop {
            let (code, jt, jf, k) = program[pc];
            pc += 1;
            match code {
                LD_H_ABS => match half(k as usize) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_B_ABS => match byte(k as usize) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_B_IND => match byte((x + k) as usize) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LDX_B_MSH => match byte(k as usize) {
                    Some(v) => x = (v & 0xf) * 4,
                    None => return 0,
                },
                LD_MEM => a = mem[k as usize],
                ST => mem[k as usize] = a,
                RSH_K => a >>= k,
                AND_K => a &= k,
                ADD_X => a = a.wrapping_add(x),
                TAX => x = a,
                JEQ_K | JEQ_X => {
                    let operand = if code == JEQ_K { k } else { x };
                    pc += usize::from(if a == operand { jt } else { jf });
                }
                RET_K => return k,
                other => panic!("opcode {other:#x} not modelled"),
            }
        }
    }

    /// A TCP segment with a header of `tcp_len` bytes and `payload` bytes.
    fn tcp(tcp_len: usize, payload: usize) -> Vec<u8> {
        let mut t = vec![0u8; tcp_len + payload];
        t[12] = u8::try_from(tcp_len / 4).unwrap() << 4;
        t[13] = 0x10;
        t
    }

    fn v4(options: usize, segment: &[u8]) -> Vec<u8> {
        let hlen = 20 + options;
        let total = u16::try_from(hlen + segment.len()).unwrap();
        let mut p = vec![0u8; hlen];
        p[0] = 0x40 | u8::try_from(hlen / 4).unwrap();
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[9] = 6;
        p.extend_from_slice(segment);
        p
    }

    fn v6(next: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        p[6] = next;
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn an_ack_without_payload_matches_and_data_does_not() {
        let v4_prog = no_tcp_payload(IpFamily::V4);
        let v6_prog = no_tcp_payload(IpFamily::V6);
        for tcp_len in [20, 32, 60] {
            for options in [0, 8, 40] {
                assert_eq!(run(v4_prog, &v4(options, &tcp(tcp_len, 0))), 1);
                assert_eq!(run(v4_prog, &v4(options, &tcp(tcp_len, 1))), 0);
                assert_eq!(run(v4_prog, &v4(options, &tcp(tcp_len, 1400))), 0);
            }
            assert_eq!(run(v6_prog, &v6(6, &tcp(tcp_len, 0))), 1);
            assert_eq!(run(v6_prog, &v6(6, &tcp(tcp_len, 1))), 0);
            assert_eq!(run(v6_prog, &v6(6, &tcp(tcp_len, 700))), 0);
        }
        // TCP behind a destination-options header: not judged, no match.
        let mut behind = vec![6, 0, 1, 4, 0, 0, 0, 0];
        behind.extend(tcp(20, 0));
        assert_eq!(run(v6_prog, &v6(60, &behind)), 0);
        // Truncated: no match, never a read out of bounds.
        assert_eq!(run(v4_prog, &v4(0, &tcp(20, 0))[..30]), 0);
        assert_eq!(run(v6_prog, &[0x60, 0, 0, 0, 0, 20, 6]), 0);
    }

    #[test]
    fn rendered_as_iptables_takes_it() {
        // Seen accepted by iptables-restore and saved back verbatim.
        assert_eq!(
            bytecode(no_tcp_payload(IpFamily::V4)),
            "12,40 0 0 2,2 0 0 0,177 0 0 0,80 0 0 12,116 0 0 2,84 0 0 60,12 0 0 0,7 0 0 0,\
             96 0 0 0,29 0 1 0,6 0 0 1,6 0 0 0"
        );
        assert_eq!(
            bytecode(no_tcp_payload(IpFamily::V6)),
            "10,48 0 0 6,21 0 7 6,48 0 0 52,116 0 0 2,84 0 0 60,7 0 0 0,40 0 0 4,29 0 1 0,\
             6 0 0 1,6 0 0 0"
        );
        assert!(first_ack(IpFamily::V6).ends_with("-m bpf --bytecode \"10,48 0 0 6,21 0 7 6,48 0 0 52,116 0 0 2,84 0 0 60,7 0 0 0,40 0 0 4,29 0 1 0,6 0 0 1,6 0 0 0\""));
    }
}
