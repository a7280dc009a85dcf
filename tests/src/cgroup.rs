//! cgroup v2 directories made for one test, and processes placed in them:
//! the library's [`enforcer::sandbox::cgroup`], under the harness's name
//! prefix ([`Cgroup::new`]).

pub use enforcer::sandbox::cgroup::*;
