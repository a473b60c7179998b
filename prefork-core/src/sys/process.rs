//! Processes: fork with the single-thread check, _exit, the thread count,
//! and taking ownership of inherited descriptors.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::{self, SigSet, SigmaskHow};
use nix::unistd::{ForkResult, Pid};

/// Clears close-on-exec on `fd`: the one deliberate exception, for the
/// listening sockets handed to a new master across exec.
pub fn set_inheritable(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    Ok(())
}

/// Number of threads in this process, from /proc/self/task.
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// What [`fork`] returned on this side.
#[derive(Debug)]
pub enum Forked {
    /// In the parent, with the child's pid.
    Parent(Pid),
    /// In the child.
    Child,
}

/// Wraps fork(2). Refuses when the process has more than one thread: the
/// child would inherit locks held by threads that do not exist in it.
///
/// Every signal is blocked across the fork. In the parent the old mask is
/// restored; the child keeps them blocked until
/// [`reset_signals_for_worker`](super::reset_signals_for_worker)
/// has replaced the master's handlers, so that no signal meant for the
/// worker can run the master's handler and write into the master's
/// self-pipe.
pub fn fork() -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "refusing to fork: the process has {threads} threads, and a master that forks without exec must have one"
        )));
    }
    let mut old = SigSet::empty();
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old))?;
    // SAFETY: we just checked that this process has one thread, so no lock can
    // be held by a thread that does not exist in the child; the child may run
    // ordinary Rust code (allocate, log) and ends with `exit_now`.
    let result = unsafe { nix::unistd::fork() };
    if !matches!(result, Ok(ForkResult::Child)) {
        let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    match result {
        Ok(ForkResult::Parent { child }) => Ok(Forked::Parent(child)),
        Ok(ForkResult::Child) => Ok(Forked::Child),
        Err(e) => Err(e.into()),
    }
}

/// Empties the capability bounding set (prctl PR_CAPBSET_DROP for every
/// capability the kernel knows), so that nothing this process or a program
/// it runs does can regain a capability, a setuid-root program included.
/// Needs CAP_SETPCAP: call it while still root, before dropping to a user.
pub fn drop_capability_bounding_set() -> io::Result<()> {
    let last: libc::c_ulong = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in 0..=last {
        // SAFETY: PR_CAPBSET_DROP takes plain integer arguments and reads or
        // writes no memory of this process.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break; // beyond the capabilities this kernel knows
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Ends the process at once with `code` (_exit(2)): no destructors, no atexit
/// handlers, no second flush of buffers copied from the master.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

/// Takes ownership of an inherited descriptor (socket activation, `fd:N`).
///
/// Checks first that `fd` is open (fcntl F_GETFD), so that a wrong number
/// becomes an error instead of a descriptor owned twice.
pub fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor flags; it has no effect and
    // fails with EBADF when the descriptor is not open.
    let rc = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open and was handed to this process to own
    // (systemd's LISTEN_FDS or an explicit fd:N); nothing else owns it here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopt_fd_rejects_a_closed_descriptor() {
        let err = adopt_fd(987_654).expect_err("fd 987654 is not open");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn thread_count_sees_the_test_harness_threads() {
        assert!(thread_count().expect("proc readable") >= 1);
    }
}
