//! Keys, values, names and sizes of the eBPF datapath's proxy redirection
//! (dependent services and the DNS proxy; `enforcer-ebpf/src/proxy.rs`
//! and `enforcer/src/datapath/ebpf/proxy.rs`), shared by the programs and
//! the loader. Addresses are IPv4-mapped for IPv4, as in [`crate::maps`].

/// Map names, as the loader finds them in the object.
pub const MAP_PROXY_SERVICES: &str = "PROXY_SERVICES";
pub const MAP_PROXY_PORTS: &str = "PROXY_PORTS";

/// The sock_addr programs of a PU with a proxy configuration, beside its
/// [`crate::maps::PU_PROGRAMS`] (and on the host scope while any PU has
/// one): the answer to a redirected DNS query seems to come from the server
/// asked (`recvmsg`), and a redirected connected socket's peer is the
/// original destination (`getpeername`).
pub const PROG_PROXY_RECVMSG4: &str = "enforcer_proxy_recvmsg4";
pub const PROG_PROXY_RECVMSG6: &str = "enforcer_proxy_recvmsg6";
pub const PROG_PROXY_GETPEERNAME4: &str = "enforcer_proxy_getpeername4";
pub const PROG_PROXY_GETPEERNAME6: &str = "enforcer_proxy_getpeername6";
pub const PROXY_SOCK_PROGRAMS: [&str; 4] = [
    PROG_PROXY_RECVMSG4,
    PROG_PROXY_RECVMSG6,
    PROG_PROXY_GETPEERNAME4,
    PROG_PROXY_GETPEERNAME6,
];
/// The sock_ops program beside them: when a redirected connection is
/// established, its original destination is filed under the client's
/// address and port, where the proxy's accepted socket finds it.
pub const PROG_PROXY_SOCKOPS: &str = "enforcer_proxy_sockops";
/// The cgroup/getsockopt program of the host scope (where proxies run):
/// answers `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` for a redirected
/// connection's accepted socket.
pub const PROG_PROXY_ORIGINAL_DST: &str = "enforcer_proxy_original_dst";

/// Capacities. Redirected sockets age out of their LRU maps by
/// themselves: an entry is needed from the connect to the proxy's
/// `getsockopt` (microseconds) or, for a DNS query, to its answer; one
/// evicted while a socket still lives only makes `getpeername` and a late
/// answer show the proxy's address.
pub const MAX_REDIRECTS: u32 = 65_536;
/// Prefixes of all PUs' dependent services.
pub const MAX_SERVICE_PREFIXES: u32 = 65_536;
/// Port ranges of the dependent services that can cover one address of
/// one PU.
pub const MAX_SERVICE_PORTS: usize = 16;

/// A PU's proxy ports, by slot ([`MAP_PROXY_PORTS`]); 0 where it has none.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyPorts {
    /// Where its connections to its dependent services go.
    pub proxy: u16,
    /// Where its DNS queries (UDP to port 53) go.
    pub dns: u16,
}

/// An inclusive port range (host order).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct PortSpan {
    pub lo: u16,
    pub hi: u16,
}

/// Everything a PU's dependent services say about the addresses under one
/// prefix: the port ranges of every service whose network covers it (a
/// trie returns only the longest match, so the loader stores each
/// service's ranges at every prefix it covers, as for ACLs).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceEntry {
    pub count: u32,
    pub ports: [PortSpan; MAX_SERVICE_PORTS],
}

/// Where a redirected socket was going: filed by its cookie when the
/// connect or sendmsg hook rewrote it, and (TCP) by its address once
/// established. `to_port` is the proxy port it went to instead.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Redirect {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    /// Host order.
    pub to_port: u16,
    pub pad: u32,
}

/// A redirected connection's client end as the proxy's accepted socket
/// sees its peer: address and port (host order).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub pad: [u8; 6],
}

impl PeerKey {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            pad: [0; 6],
        }
    }
}

/// Loopback in the maps' form, for the family of `original`: where a
/// redirected socket goes instead (`127.0.0.1` IPv4-mapped, or `::1`), as
/// iptables `REDIRECT` sends locally generated traffic.
pub const fn loopback_for(original: &[u8; 16]) -> [u8; 16] {
    if crate::maps::is_v4_mapped(original) {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
    } else {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], 2+2 bytes, no padding.
    unsafe impl aya::Pod for super::ProxyPorts {}
    // SAFETY: #[repr(C)], 4 + 4*N bytes of u16 pairs, no padding.
    unsafe impl aya::Pod for super::ServiceEntry {}
}
