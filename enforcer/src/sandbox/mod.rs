//! Disposable namespaces, veths and cgroups for the demo and the tests;
//! never touches the root namespace.
//!
//! Every object here is made under a name of its own and removed when its
//! value is dropped, also on an error or a panic:
//! - [`netns`]: network namespaces, veth pairs between them, and running
//!   code or commands inside one;
//! - [`cgroup`]: cgroup v2 directories and processes started in them;
//! - [`traffic`]: TCP echo servers and clients, and how an attempt ended.
//!
//! Names are chosen by the caller ([`netns::Netns::named`],
//! [`cgroup::Cgroup::named`]) or made unique under a prefix
//! ([`unique_name`]); the `new` constructors use [`TEST_PREFIX`], which the
//! kernel tests' leftovers check looks for.

pub mod cgroup;
pub mod netns;
pub mod traffic;

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of the objects the kernel tests make.
pub const TEST_PREFIX: &str = "enft";

/// A name unique to this process and call: `<prefix><pid>x<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_carry_the_prefix_and_differ() {
        let (a, b) = (unique_name("enfx"), unique_name("enfx"));
        assert!(a.starts_with("enfx") && b.starts_with("enfx"), "{a} {b}");
        assert_ne!(a, b);
    }
}
