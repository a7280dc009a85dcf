//! `cgroup/setsockopt`: keeps a PU's tasks out of the agent's mark field.
//! Attached beside the sock_addr programs to each linux-process PU's
//! cgroup and (as `enforcer_host_mark_guard`) to the host scope, and
//! limited to the agent's network namespace like them.
//!
//! A process holding CAP_NET_ADMIN (or CAP_NET_RAW) can set its socket's
//! mark with `setsockopt(SOL_SOCKET, SO_MARK)`. The fixed netfilter rules
//! trust the agent's field of that mark (`enforcer_common::marks`): the
//! injected kind is accepted first in OUTPUT, the authorised kind as a
//! decided connection, and the class is what the connect hooks decided. So
//! a PU task that wrote them itself would skip its ACLs and the trap, and
//! one that cleared a class its connect hook wrote would make its socket's
//! packets look unclassified. Here a PU task's `SO_MARK` whose value
//! differs from the socket's current mark anywhere in the agent's field is
//! refused with EPERM; bits outside the field (kube-proxy's `0x4000` and
//! `0x8000`, Calico's) are the PU's to set, and every other option passes.
//!
//! The connect hooks write the class with `bpf_setsockopt` from inside
//! BPF, which does not go through this hook (it runs only for the
//! `setsockopt` system call), so the agent's own decisions are never
//! refused. Nor are the agent's own sockets when a namespace-wide PU
//! claims its task: the agent's thread group is left alone.
//!
//! Nothing is rewritten: the program never touches `optval` or `optlen`
//! (an `optlen` of -1 would skip the kernel's handling, a smaller one
//! would cut the option), so a passed option reaches the kernel as the
//! application gave it — even one longer than the page the kernel copies
//! for the program.

use aya_ebpf::{
    bindings::bpf_sockopt, helpers::generated::bpf_get_current_pid_tgid, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use enforcer_common::maps::PortKey;

use crate::policy::{
    Scope, agent_tgid, current_cgroup_pu, current_uid, in_agent_netns, judging_pu, mark_layout,
};

const PROCEED: i32 = 1;
const REFUSE: i32 = 0;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

#[cgroup_sockopt(setsockopt)]
pub fn enforcer_mark_guard(ctx: SockoptContext) -> i32 {
    guard(ctx.sockopt, Scope::PuCgroup)
}

#[cgroup_sockopt(setsockopt)]
pub fn enforcer_host_mark_guard(ctx: SockoptContext) -> i32 {
    guard(ctx.sockopt, Scope::Host)
}

#[inline(always)]
fn guard(opt: *mut bpf_sockopt, scope: Scope) -> i32 {
    // SAFETY: the kernel hands a valid context; level and optname are
    // plain reads.
    let (level, optname) = unsafe { ((*opt).level, (*opt).optname) };
    if level != SOL_SOCKET || optname != SO_MARK {
        return PROCEED;
    }
    let Some(value) = option_value(opt) else {
        // Shorter than an int: the kernel refuses it (EINVAL) itself.
        return PROCEED;
    };
    if !in_agent_netns(opt.cast()) {
        return PROCEED;
    }
    // SAFETY: `sk` of a sockopt context is always a valid socket (the
    // verifier types it so); mark, protocol and src_port (host order) are
    // readable fields.
    let (current, proto, port) = unsafe {
        let sk = (*opt).__bindgen_anon_1.sk;
        ((*sk).mark, (*sk).protocol as u8, (*sk).src_port as u16)
    };
    let field = mark_layout().field_mask();
    if (value ^ current) & field == 0 {
        return PROCEED;
    }
    // SAFETY: a helper without arguments; the high half is the tgid.
    if (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32 == agent_tgid() {
        return PROCEED;
    }
    let local = (port != 0).then(|| PortKey::new(proto, port));
    match judging_pu(scope, current_cgroup_pu, current_uid, local) {
        Some(_) => REFUSE,
        None => PROCEED,
    }
}

/// The int the application passes, if `optval` holds one.
#[inline(always)]
fn option_value(opt: *mut bpf_sockopt) -> Option<u32> {
    // SAFETY: valid context; the verifier allows reading optval only
    // after it is checked against optval_end, as here.
    unsafe {
        let start = (*opt).__bindgen_anon_2.optval as *const u8;
        let end = (*opt).__bindgen_anon_3.optval_end as *const u8;
        if start.add(size_of::<u32>()) > end {
            return None;
        }
        Some(core::ptr::read_unaligned(start.cast::<u32>()))
    }
}
