//! Seccomp filters, one per kind of thread, built with seccompiler as Firecracker builds its own.
//!
//! Each thread installs its kind's filter as the first thing it does (the main thread once the
//! machine is built, just before its event loop), so setup (opening files, creating the VM,
//! mapping memory) runs unfiltered and everything after runs with only what that kind of
//! thread needs. Filters stack: a thread spawned after its parent installed a filter inherits
//! it, which is why the API's connection threads share the API thread's kind and why the main
//! thread installs its own last.
//!
//! `ioctl` is allowed only for the request numbers a kind uses. A syscall outside the lists
//! kills the whole process (`--seccomp kill`, the default), or is allowed and logged by the
//! kernel's audit (`--seccomp log`), which is how to find what a new code path needs.

use std::collections::BTreeMap;

use kvm_bindings::KVMIO;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// The seccomp filter each pmvm thread runs under once the VM is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    // Variants without doc comments: clap would print them in `--help`, which documents the
    // option itself.
    Kill,
    Log,
    Off,
}

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_bindings::kvm_dirty_log);
ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_bindings::kvm_userspace_memory_region
);

/// The kinds of thread pmvm runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: console input, stop signals, teardown and the final writeback.
    Main,
    /// `KVM_RUN` and every exit, the flush path included.
    Vcpu,
    /// The control socket's accept thread and its connection threads.
    Api,
    /// `writeback-interval=` threads.
    Writeback,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Writeback => "writeback",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {kind} thread's seccomp filter: {reason}")]
    Build { kind: &'static str, reason: String },
    #[error("cannot install the {kind} thread's seccomp filter: {reason}")]
    Install { kind: &'static str, reason: String },
}

/// One thread kind's compiled filter, or none with `--seccomp off`.
#[derive(Clone, Debug)]
pub struct ThreadFilter {
    kind: ThreadKind,
    program: Option<BpfProgram>,
}

impl ThreadFilter {
    /// Installs the filter on the calling thread (and the threads it spawns from now on).
    pub fn apply(&self) -> Result<(), SeccompError> {
        let Some(program) = &self.program else {
            return Ok(());
        };
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
            kind: self.kind.name(),
            reason: e.to_string(),
        })
    }
}

/// The filters of every thread kind, built once before any thread starts.
#[derive(Clone, Debug)]
pub struct Filters {
    pub main: ThreadFilter,
    pub vcpu: ThreadFilter,
    pub api: ThreadFilter,
    pub writeback: ThreadFilter,
}

/// Malloc arenas pmvm's threads may use between them.
const MALLOC_ARENAS: libc::c_int = 8;

impl Filters {
    /// Builds the filters, and readies the process to run under them: glibc sizes its malloc
    /// arenas by reading /sys/devices/system/cpu/online the first time a thread needs a new
    /// one, which can be a filtered thread (an API connection under load); with the limit set
    /// now it never opens that file.
    pub fn build(mode: SeccompMode) -> Result<Filters, SeccompError> {
        if mode != SeccompMode::Off {
            // SAFETY: mallopt only changes malloc's own tuning; it is called before the VM's
            // threads exist.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
        }
        let filter = |kind| -> Result<ThreadFilter, SeccompError> {
            let mismatch = match mode {
                SeccompMode::Off => {
                    return Ok(ThreadFilter {
                        kind,
                        program: None,
                    })
                }
                SeccompMode::Log => SeccompAction::Log,
                SeccompMode::Kill => SeccompAction::KillProcess,
            };
            let build_err = |reason: String| SeccompError::Build {
                kind: kind.name(),
                reason,
            };
            let filter = SeccompFilter::new(
                rules(kind).map_err(|e| build_err(e.to_string()))?,
                mismatch,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .map_err(|e| build_err(e.to_string()))?;
            let program = BpfProgram::try_from(filter).map_err(|e| build_err(e.to_string()))?;
            Ok(ThreadFilter {
                kind,
                program: Some(program),
            })
        };
        Ok(Filters {
            main: filter(ThreadKind::Main)?,
            vcpu: filter(ThreadKind::Vcpu)?,
            api: filter(ThreadKind::Api)?,
            writeback: filter(ThreadKind::Writeback)?,
        })
    }
}

/// What every thread needs: memory, locks, time, signals, its own exit, plain I/O on
/// descriptors it already has, and the SIGBUS recovery of pmem mappings (mmap MAP_FIXED).
const COMMON: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_lseek,
    libc::SYS_getrandom,
    libc::SYS_rseq,
];

/// The flush path, wherever it runs: stat the backing file, write back pages (and the flush
/// log) and wait for them.
const FLUSH: &[libc::c_long] = &[
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_sync_file_range,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_pwrite64,
    libc::SYS_pread64,
    // Undoing a torn flush-log append on its error path.
    libc::SYS_ftruncate,
];

/// Dirty-tracking ioctls on the VM fd and the backing paths' watch, part of every flush.
fn flush_ioctls() -> Vec<u64> {
    vec![
        KVM_GET_DIRTY_LOG(),
        KVM_CLEAR_DIRTY_LOG(),
        KVM_RESET_DIRTY_RINGS(),
        // Whether anything changed on a backing file's path (`path_watch`).
        libc::FIONREAD,
        // The first flush after a dirty-ring overflow re-arms logging on the pmem memslots.
        KVM_SET_USER_MEMORY_REGION(),
    ]
}

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut syscalls: Vec<libc::c_long> = COMMON.to_vec();
    let mut ioctls = flush_ioctls();
    syscalls.extend(FLUSH);
    match kind {
        ThreadKind::Main => {
            syscalls.extend([
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                // Teardown: the socket file and its staging directory, the pmem path locks
                // (a read-only holder takes its lock exclusively to learn it is the last).
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_rmdir,
                libc::SYS_flock,
            ]);
            ioctls.extend([
                // Restoring the terminal; deleting the pmem memslots at teardown.
                libc::TCGETS,
                libc::TCSETS,
                libc::TCSETSW,
            ]);
        }
        ThreadKind::Vcpu => {
            ioctls.extend([
                KVM_RUN(),
                // Naming a fatal exit's instruction.
                KVM_GET_REGS(),
                KVM_GET_SREGS(),
            ]);
        }
        ThreadKind::Api => {
            syscalls.extend([
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_setsockopt,
                libc::SYS_shutdown,
                // Connection threads, spawned by the accept thread.
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_set_robust_list,
                libc::SYS_prctl,
            ]);
            ioctls.push(libc::FIONBIO);
        }
        ThreadKind::Writeback => {}
    }
    let ioctl_rules = ioctls
        .into_iter()
        .map(|request| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                request,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut map: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls.into_iter().map(|s| (s, Vec::new())).collect();
    map.insert(libc::SYS_ioctl, ioctl_rules);
    Ok(map)
}

/// `--seccomp-selftest`: makes the calling thread (vCPU 0, right after its filter) call a
/// syscall no thread kind allows, and reports what happened. Under `kill` the process dies of
/// SIGSYS before this returns; under `log` the kernel logs it and it runs.
pub fn selftest() {
    // SAFETY: getppid takes no arguments and cannot fail or touch memory.
    let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
    eprintln!("pmvm: seccomp selftest: getppid from a vCPU thread returned {ppid}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS(), 0xaec7);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
    }

    #[test]
    fn every_mode_builds_and_off_builds_nothing() {
        for mode in [SeccompMode::Log, SeccompMode::Kill] {
            let f = Filters::build(mode).unwrap();
            for t in [&f.main, &f.vcpu, &f.api, &f.writeback] {
                assert!(t.program.as_ref().is_some_and(|p| !p.is_empty()));
            }
        }
        let off = Filters::build(SeccompMode::Off).unwrap();
        assert!(off.vcpu.program.is_none());
        off.vcpu.apply().unwrap();
    }

    #[test]
    fn only_the_vcpu_runs_the_guest_and_only_the_api_accepts() {
        let has = |kind, nr: libc::c_long| rules(kind).unwrap().contains_key(&nr);
        assert!(has(ThreadKind::Api, libc::SYS_accept4));
        assert!(!has(ThreadKind::Vcpu, libc::SYS_accept4));
        assert!(!has(ThreadKind::Vcpu, libc::SYS_execve));
        assert!(!has(ThreadKind::Main, libc::SYS_socket));
        assert!(!has(ThreadKind::Vcpu, libc::SYS_getppid));
        let ioctls = |kind| rules(kind).unwrap()[&libc::SYS_ioctl].len();
        // The flush ioctls (three dirty-log ones, the path watch's FIONREAD and the memslot
        // re-arm after a ring overflow); the vCPU adds KVM_RUN and the two register reads.
        assert_eq!(ioctls(ThreadKind::Writeback), 5);
        assert_eq!(ioctls(ThreadKind::Vcpu), 8);
    }

    /// A forked child installs the vCPU filter in kill mode and calls getppid: it must die of
    /// SIGSYS, and a child calling only allowed syscalls must exit normally.
    #[test]
    fn a_forbidden_syscall_kills_under_the_filter() {
        let filters = Filters::build(SeccompMode::Kill).unwrap();
        for (forbidden, want_signal) in [(true, Some(libc::SIGSYS)), (false, None)] {
            // SAFETY: the child only installs a filter, makes raw syscalls and _exits; it
            // touches no lock another thread of the test process could hold.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let ok = filters.vcpu.apply().is_ok();
                if forbidden {
                    // SAFETY: as in `selftest`.
                    unsafe { libc::syscall(libc::SYS_getppid) };
                }
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(if ok { 0 } else { 3 }) };
            }
            let mut status = 0;
            // SAFETY: waits for the child just forked; `status` is a valid out pointer.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            if let Some(sig) = want_signal {
                assert!(libc::WIFSIGNALED(status), "status {status:#x}");
                assert_eq!(libc::WTERMSIG(status), sig);
            } else {
                assert!(libc::WIFEXITED(status), "status {status:#x}");
                assert_eq!(libc::WEXITSTATUS(status), 0);
            }
        }
    }
}
