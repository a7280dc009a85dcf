//! The handshake packet functions (token take/strip, attach, UDP
//! handshake) on arbitrary bytes as an IP packet: no panic, well-formed
//! output, and every carried token held to the token property (see
//! `enforcer::identity::fuzz_check::check_packet`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enforcer::identity::fuzz_check::check_packet(data);
});
