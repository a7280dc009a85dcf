//! A PU's listening ports that change while it runs (SPEC, "port set
//! add/remove"): the words both datapaths use for them and the rules they
//! share, so that the two keep one behaviour.
//!
//! A PU's port set is what its config lists *plus* its run-time ports
//! (those [`Datapath::add_port`] added, e.g. found listening by the
//! agent's discovery). The datapath holds the run-time ones beside the
//! policy, so that:
//! - adding a port the config already lists changes nothing in the kernel
//!   but is remembered: an update that drops it from the config keeps it
//!   in the set while the PU still listens there ([`with_runtime`]);
//! - removing a run-time port the config lists leaves it in the set;
//! - a port another PU holds (by config or at run time) is refused with
//!   [`DatapathError::PortTaken`], never taken over ([`check_free`]);
//! - both operations are idempotent.
//!
//! [`Datapath::add_port`]: super::Datapath::add_port

use std::collections::BTreeSet;
use std::fmt;
use std::num::NonZeroU16;

use serde::{Deserialize, Serialize};

use super::DatapathError;
use crate::policy::{PortRange, Pu, PuId};

/// The transport protocols that have listening ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

/// One listening port of a PU: `8080/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ListenPort {
    pub transport: Transport,
    pub port: NonZeroU16,
}

impl ListenPort {
    pub fn tcp(port: NonZeroU16) -> Self {
        Self {
            transport: Transport::Tcp,
            port,
        }
    }

    pub fn udp(port: NonZeroU16) -> Self {
        Self {
            transport: Transport::Udp,
            port,
        }
    }

    /// The port as a one-port range, as the config writes ports.
    pub fn range(self) -> PortRange {
        PortRange::single(self.port)
    }
}

impl fmt::Display for ListenPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let transport = match self.transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        };
        write!(f, "{}/{transport}", self.port)
    }
}

/// A PU's run-time ports.
pub type RuntimePorts = BTreeSet<ListenPort>;

/// The configured ranges of `pu` for `transport`.
pub fn configured_ranges(pu: &Pu, transport: Transport) -> &[PortRange] {
    match transport {
        Transport::Tcp => &pu.tcp_ports,
        Transport::Udp => &pu.udp_ports,
    }
}

/// Whether `pu`'s config lists `port`.
pub fn configured(pu: &Pu, port: ListenPort) -> bool {
    let p = port.port.get();
    configured_ranges(pu, port.transport)
        .iter()
        .any(|r| (r.start()..=r.end()).contains(&p))
}

/// Whether a PU with this config and these run-time ports holds `port`.
pub fn holds(pu: &Pu, runtime: &RuntimePorts, port: ListenPort) -> bool {
    runtime.contains(&port) || configured(pu, port)
}

/// `pu` with its run-time ports added to its configured ones: what its
/// port sets hold. Only the ports differ from `pu`.
pub fn with_runtime(pu: &Pu, runtime: &RuntimePorts) -> Pu {
    let mut all = pu.clone();
    for port in runtime.iter().filter(|&&p| !configured(pu, p)) {
        match port.transport {
            Transport::Tcp => all.tcp_ports.push(port.range()),
            Transport::Udp => all.udp_ports.push(port.range()),
        }
    }
    all
}

/// Refuses `port` for PU `id` if one of `others` (each PU's config and
/// run-time ports; `id` itself is skipped) holds it already.
pub fn check_free<'a>(
    id: &PuId,
    port: ListenPort,
    others: impl IntoIterator<Item = (&'a Pu, &'a RuntimePorts)>,
) -> Result<(), DatapathError> {
    for (other, runtime) in others {
        if &other.id != id && holds(other, runtime, port) {
            return Err(DatapathError::PortTaken {
                port,
                pu: id.clone(),
                owner: other.id.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Configuration;

    fn port(p: u16) -> NonZeroU16 {
        NonZeroU16::new(p).unwrap()
    }

    fn pus() -> Vec<Pu> {
        Configuration::from_toml_str(
            r#"
            mode = "local-server"
            [[pus]]
            id = "web"
            kind = "linux-process"
            cgroup = "web"
            tcp_ports = [80, "8000:8010"]
            [[pus]]
            id = "db"
            kind = "linux-process"
            cgroup = "db"
            udp_ports = [53]
            "#,
        )
        .unwrap()
        .pus
    }

    #[test]
    fn configured_ports_are_found_in_ranges_of_their_own_transport() {
        let pus = pus();
        assert!(configured(&pus[0], ListenPort::tcp(port(8005))));
        assert!(!configured(&pus[0], ListenPort::udp(port(8005))));
        assert!(!configured(&pus[0], ListenPort::tcp(port(8011))));
        assert!(configured(&pus[1], ListenPort::udp(port(53))));
        assert_eq!(ListenPort::udp(port(53)).to_string(), "53/udp");
    }

    #[test]
    fn runtime_ports_join_the_configured_ones_once() {
        let pus = pus();
        let runtime: RuntimePorts = [
            ListenPort::tcp(port(80)),
            ListenPort::tcp(port(9090)),
            ListenPort::udp(port(5353)),
        ]
        .into();
        let all = with_runtime(&pus[0], &runtime);
        let ranges = |list: &[PortRange]| list.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(ranges(&all.tcp_ports), ["80", "8000:8010", "9090"]);
        assert_eq!(ranges(&all.udp_ports), ["5353"]);
        assert_eq!(all.network_acls, pus[0].network_acls);
        assert!(holds(&pus[0], &runtime, ListenPort::udp(port(5353))));
    }

    #[test]
    fn a_port_another_pu_holds_is_refused_by_config_or_at_run_time() {
        let pus = pus();
        let db_runtime: RuntimePorts = [ListenPort::tcp(port(5432))].into();
        let none = RuntimePorts::new();
        let all = [(&pus[0], &none), (&pus[1], &db_runtime)];
        let web = &pus[0].id;
        let err = check_free(web, ListenPort::udp(port(53)), all).unwrap_err();
        assert_eq!(err.to_string(), "port 53/udp of PU web is PU db's already");
        assert!(check_free(web, ListenPort::tcp(port(5432)), all).is_err());
        // Its own ports are no conflict; a free port is free.
        assert!(check_free(web, ListenPort::tcp(port(80)), all).is_ok());
        assert!(check_free(web, ListenPort::tcp(port(81)), all).is_ok());
    }
}
