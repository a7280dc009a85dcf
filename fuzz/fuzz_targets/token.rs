//! The token parser and verifier on arbitrary bytes: no panic, and no
//! input accepted unless the trusted key signed exactly it (see
//! `enforcer::identity::fuzz_check::check_token`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enforcer::identity::fuzz_check::check_token(data);
});
