//! The system calls a job may not make, installed by the jail helper just before it execs the
//! command (after `no_new_privs`, so no privilege is needed and the filter outlives every
//! `exec` of the job).
//!
//! A compiler reads files, writes files, forks and execs. Everything below is kernel surface a
//! compiler never needs and an attacker wants: a user namespace (root again, with every
//! capability, inside it: new mounts, new network namespaces), other namespaces, mounts, the
//! kernel keyrings (keyed per uid, and a slot's uid serves every client), BPF, perf, ptrace,
//! userfaultfd (the classic way to win kernel races), io_uring, modules and the clock. Each is
//! refused with `EPERM`, a plain error the job sees and the compiler reports, never a killed
//! process or a builder failure.
//!
//! `clone3` passes its flags in memory, where a filter cannot look, so it is refused with
//! `ENOSYS`: the C library then falls back to `clone`, whose flags are checked. On x86_64 the
//! x32 numbers of the same calls are refused too; 32-bit calls fail the filter's architecture
//! check and kill the caller.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `clone` flags that make a namespace.
const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// Refused outright, whatever their arguments.
const REFUSED: &[i64] = &[
    // Namespaces: a user namespace gives the job every capability inside it.
    libc::SYS_unshare,
    libc::SYS_setns,
    // Mounts, old and new API.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    // Kernel keyrings: per uid and outliving the job.
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    // Other processes' memory, and kernel attack surface.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_fanotify_init,
    // The machine's state: modules, reboot, swap, clocks, accounting, the kernel log.
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_vhangup,
];

/// Port I/O, where the architecture has it.
#[cfg(target_arch = "x86_64")]
const REFUSED_HERE: &[i64] = &[libc::SYS_iopl, libc::SYS_ioperm];
#[cfg(not(target_arch = "x86_64"))]
const REFUSED_HERE: &[i64] = &[];

/// Socket families a job may not open: vsock reaches the hypervisor whatever the network
/// namespace, and the kernel's crypto sockets are attack surface no compiler uses.
const REFUSED_FAMILIES: [i32; 2] = [libc::AF_VSOCK, libc::AF_ALG];

/// x32 system calls are the x86_64 numbers with this bit set.
#[cfg(target_arch = "x86_64")]
const X32: i64 = 0x4000_0000;

/// Every number under which `nr` can be called on this architecture.
fn numbers(nr: i64) -> Vec<i64> {
    #[cfg(target_arch = "x86_64")]
    return vec![nr, nr | X32];
    #[cfg(not(target_arch = "x86_64"))]
    return vec![nr];
}

fn arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("no system call filter for this architecture: {e}"))
}

/// Rules matching a call whose first argument compares (`op`, given the value) with one of
/// `values`, read as `len`.
fn first_argument_is(
    values: impl IntoIterator<Item = u64>,
    len: SeccompCmpArgLen,
    op: impl Fn(u64) -> SeccompCmpOp,
) -> Result<Vec<SeccompRule>, String> {
    values
        .into_iter()
        .map(|v| {
            let cond =
                SeccompCondition::new(0, len.clone(), op(v), v).map_err(|e| e.to_string())?;
            SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
        })
        .collect()
}

/// A filter answering every call in `rules` with `errno`, and allowing the rest.
fn answering(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<SeccompFilter, String> {
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch()?,
    )
    .map_err(|e| e.to_string())
}

/// The filter that refuses [`REFUSED`], namespace-making `clone`s and the sockets of
/// [`REFUSED_FAMILIES`] with `EPERM`.
fn refusals() -> Result<SeccompFilter, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in REFUSED
        .iter()
        .chain(REFUSED_HERE)
        .flat_map(|nr| numbers(*nr))
    {
        rules.insert(nr, Vec::new());
    }
    // Any one namespace flag set, whatever the others.
    let clone = first_argument_is(
        NAMESPACE_FLAGS,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq,
    )?;
    for nr in numbers(libc::SYS_clone) {
        rules.insert(nr, clone.clone());
    }
    let families = REFUSED_FAMILIES.iter().map(|f| *f as u64);
    let socket = first_argument_is(families, SeccompCmpArgLen::Dword, |_| SeccompCmpOp::Eq)?;
    for nr in [libc::SYS_socket, libc::SYS_socketpair]
        .into_iter()
        .flat_map(numbers)
    {
        rules.insert(nr, socket.clone());
    }
    answering(rules, libc::EPERM)
}

/// The filter that sends `clone3` back to `clone`.
fn clone3() -> Result<SeccompFilter, String> {
    let rules = numbers(libc::SYS_clone3)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    answering(rules, libc::ENOSYS)
}

/// The compiled filters, in the order they are installed.
pub fn programs() -> Result<Vec<BpfProgram>, String> {
    [refusals()?, clone3()?]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(|e| format!("compiling the filter: {e}")))
        .collect()
}

/// Installs `programs` (from [`programs`]) on the calling thread; they pass to every process
/// it starts.
pub fn install(programs: &[BpfProgram]) -> Result<(), String> {
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| format!("installing the filter: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_architecture() {
        let programs = programs().unwrap();
        assert_eq!(programs.len(), 2);
        // Every refused call and each namespace flag of clone leaves instructions behind.
        assert!(programs[0].len() > REFUSED.len() + NAMESPACE_FLAGS.len());
    }
}
