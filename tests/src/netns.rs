//! Network namespaces and veth pairs made for one test: the library's
//! [`enforcer::sandbox::netns`], under the harness's name prefix
//! ([`Netns::new`], [`TwoHosts::new`]).

pub use enforcer::sandbox::netns::*;
