//! Address families: the one [`IpFamily`] type of the crate, splitting
//! mixed lists by family, and the "everything" default.
//!
//! The config mixes IPv4 and IPv6 freely; each datapath instance (the
//! seed's `IPImpl`) serves one family and takes its half of every list.
//! Both halves come from one generic function, never from a v4 and a v6
//! copy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// IPv4 or IPv6. Kernel names per family live in `crate::naming`
/// (`IpFamily::set_prefix`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

impl IpFamily {
    /// Both families, IPv4 first.
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// Every address of the family, as the two /1 halves: ipset refuses a
    /// /0 prefix, and the halves serve an LPM trie just as well.
    pub fn everything(self) -> [IpNet; 2] {
        match self {
            IpFamily::V4 => [
                IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 1)),
                IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(128, 0, 0, 0), 1)),
            ],
            IpFamily::V6 => [
                IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 1)),
                IpNet::V6(Ipv6Net::new_assert(
                    Ipv6Addr::new(0x8000, 0, 0, 0, 0, 0, 0, 0),
                    1,
                )),
            ],
        }
    }

    /// The items of `items` that belong to this family, in order.
    pub fn select<T: HasFamily>(self, items: &[T]) -> impl Iterator<Item = &T> {
        items.iter().filter(move |item| item.family() == self)
    }
}

/// Anything that belongs to one address family.
pub trait HasFamily {
    fn family(&self) -> IpFamily;
}

impl HasFamily for IpAddr {
    fn family(&self) -> IpFamily {
        match self {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl HasFamily for IpNet {
    fn family(&self) -> IpFamily {
        self.addr().family()
    }
}

/// One value per address family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerFamily<T> {
    pub v4: T,
    pub v6: T,
}

impl<T> PerFamily<T> {
    /// The value for `family`.
    pub fn get(&self, family: IpFamily) -> &T {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }
}

/// Splits a mixed list into its IPv4 and IPv6 parts, keeping order.
pub fn split_by_family<T: HasFamily + Clone>(items: &[T]) -> PerFamily<Vec<T>> {
    let part = |family: IpFamily| family.select(items).cloned().collect();
    PerFamily {
        v4: part(IpFamily::V4),
        v6: part(IpFamily::V6),
    }
}

/// `net` itself, or its family's two /1 halves when it is a /0 prefix,
/// which ipset refuses. Use it wherever a user-written network becomes a
/// set entry.
pub fn split_zero_prefix(net: IpNet) -> impl Iterator<Item = IpNet> {
    let halves = (net.prefix_len() == 0).then(|| net.family().everything());
    let whole = halves.is_none().then_some(net);
    halves.into_iter().flatten().chain(whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn split_keeps_order_within_each_family() {
        let mixed = nets(&["10.0.0.0/8", "fd00::/8", "192.168.1.1/32", "::1/128"]);
        let split = split_by_family(&mixed);
        assert_eq!(split.v4, nets(&["10.0.0.0/8", "192.168.1.1/32"]));
        assert_eq!(split.v6, nets(&["fd00::/8", "::1/128"]));
        assert_eq!(split.get(IpFamily::V6), &split.v6);
    }

    #[test]
    fn split_works_for_addresses_too() {
        let addrs: Vec<IpAddr> = vec!["::1".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let split = split_by_family(&addrs);
        assert_eq!(split.v4, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(split.v6, vec!["::1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn everything_is_the_two_halves_and_covers_the_family() {
        assert_eq!(
            IpFamily::V4.everything().to_vec(),
            nets(&["0.0.0.0/1", "128.0.0.0/1"])
        );
        assert_eq!(
            IpFamily::V6.everything().to_vec(),
            nets(&["::/1", "8000::/1"])
        );
        for family in IpFamily::ALL {
            let halves = family.everything();
            assert!(
                halves
                    .iter()
                    .all(|n| n.prefix_len() == 1 && n.family() == family)
            );
            let whole = IpNet::aggregate(&halves.to_vec());
            assert_eq!(whole.len(), 1);
            assert_eq!(whole[0].prefix_len(), 0);
        }
    }

    #[test]
    fn zero_prefix_is_split_and_others_pass_through() {
        let zero4: IpNet = "0.0.0.0/0".parse().unwrap();
        let zero6: IpNet = "::/0".parse().unwrap();
        let other: IpNet = "10.0.0.0/8".parse().unwrap();
        assert_eq!(
            split_zero_prefix(zero4).collect::<Vec<_>>(),
            IpFamily::V4.everything().to_vec()
        );
        assert_eq!(
            split_zero_prefix(zero6).collect::<Vec<_>>(),
            IpFamily::V6.everything().to_vec()
        );
        assert_eq!(split_zero_prefix(other).collect::<Vec<_>>(), vec![other]);
    }
}
