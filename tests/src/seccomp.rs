//! A seccomp filter that makes `bpf(2)` fail with EPERM, installed in a
//! child between fork and exec: how a test shows the agent on a kernel (or
//! in a container) without eBPF.

use std::{os::unix::process::CommandExt, process::Command};

/// Classic-BPF instruction helpers (linux/filter.h).
const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}
const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// Offsets in `struct seccomp_data`: nr at 0, arch at 4.
const NR: u32 = 0;
const ARCH: u32 = 4;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// On x86_64, `bpf` → EPERM, everything else allowed. Other
/// architectures are let through: the tests run on x86_64 machines.
static DENY_BPF: [libc::sock_filter; 7] = [
    stmt(LD_W_ABS, ARCH),
    jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
    stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    stmt(LD_W_ABS, NR),
    jump(JEQ_K, libc::SYS_bpf as u32, 0, 1),
    stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    stmt(RET_K, libc::SECCOMP_RET_ALLOW),
];

/// Makes `bpf(2)` fail with EPERM in the process `cmd` starts.
pub fn deny_bpf(cmd: &mut Command) {
    // SAFETY: runs in the forked child before exec; prctl(2) and
    // seccomp(2) are plain syscalls, the filter is a static, nothing
    // allocates.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let prog = libc::sock_fprog {
                len: DENY_BPF.len() as u16,
                filter: DENY_BPF.as_ptr().cast_mut(),
            };
            let rc = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &raw const prog,
            );
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
