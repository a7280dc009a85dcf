//! Peers by role on a [`TwoHosts`] world: host `b` speaks from one source
//! address per role, each in a network of its own, so a config can name a
//! role by its network and a test can connect "as" a role.
//!
//! Role `r`'s source is `10.<r>.0.2` / `fd00:<r>::2`, in the network
//! `10.<r>.0.0/16` / `fd00:<r>::/64`. Role [`TARGET`] is `b`'s own veth
//! address (in [`TARGET_NETS`]); the others are added to `b`'s veth end by
//! [`add_sources`], with a host route back on `a`.
//!
//! The stage such a test plays on is the shared [`PuWorld`]
//! ([`PuWorld::with_roles`]): those hosts, a cgroup for the PU, and the
//! agent on `a`.

use std::net::IpAddr;

use anyhow::Result;

use crate::netfilter::Family;
use crate::netns::TwoHosts;
use crate::privilege;
use crate::world::PuWorld;

/// A peer in a target network: `b`'s veth address.
pub const TARGET: u8 = 1;
/// A peer a network ACL names.
pub const ACL_PEER: u8 = 2;
/// A peer no ACL names, in no target network.
pub const OTHER: u8 = 3;
/// A peer in an excluded network.
pub const EXCLUDED: u8 = 9;

/// The target networks, both families: the veth pair's own networks.
pub const TARGET_NETS: [&str; 2] = ["10.1.0.0/24", "fd00:1::/64"];

/// The source address of `role` on host `b`.
pub fn source(family: Family, role: u8) -> IpAddr {
    let text = match family {
        Family::V4 => format!("10.{role}.0.2"),
        Family::V6 => format!("fd00:{role}::2"),
    };
    text.parse().expect("literal address")
}

/// The network of `role` in both families, as a config lists it.
pub fn networks(role: u8) -> [String; 2] {
    [format!("10.{role}.0.0/16"), format!("fd00:{role}::/64")]
}

/// Adds each role's source address (a host address, no DAD) to `b`'s
/// veth end, and a host route to it on `a`.
pub fn add_sources(hosts: &TwoHosts, family: Family, roles: &[u8]) -> Result<()> {
    add_addresses(hosts, roles.iter().map(|&role| source(family, role)))
}

/// Adds each address to `b`'s veth end as a host address (usable at once:
/// no duplicate address detection), with a host route to it on `a`.
pub fn add_addresses(hosts: &TwoHosts, addrs: impl IntoIterator<Item = IpAddr>) -> Result<()> {
    for addr in addrs {
        let plen = if addr.is_ipv4() { 32 } else { 128 };
        let host = format!("{addr}/{plen}");
        hosts
            .b
            .ip(&["addr", "add", &host, "dev", &hosts.b_end.ifname, "nodad"])?;
        hosts
            .a
            .ip(&["route", "add", &host, "dev", &hosts.a_end.ifname])?;
    }
    Ok(())
}

impl PuWorld {
    /// The stage of a test by roles: two hosts with the sources of `roles`
    /// on `b`, in one family, and a cgroup for the PU whose traffic `a`
    /// judges; `None` where [`privilege::require`] lets the test skip.
    pub fn with_roles(family: Family, roles: &[u8]) -> Result<Option<Self>> {
        let Some(env) = privilege::require() else {
            return Ok(None);
        };
        let world = Self::new(&env, family, &[])?;
        add_sources(&world.hosts, family, roles)?;
        Ok(Some(world))
    }

    /// Where `a`'s servers listen: its veth address.
    pub fn server_ip(&self) -> IpAddr {
        self.hosts.a_end.ip(self.family)
    }
}
