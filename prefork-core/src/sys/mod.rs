//! The only module with `unsafe`. Each function wraps one OS facility; every
//! `unsafe` block says why it is sound.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::{ForkResult, Pid};

/// Write end of the master's self-pipe, read by the signal handler.
static SELF_PIPE_WR: AtomicI32 = AtomicI32::new(-1);

/// Set by the worker's SIGQUIT handler: finish the connection in hand, then exit.
static WORKER_QUIT: AtomicBool = AtomicBool::new(false);

extern "C" fn master_signal_handler(sig: libc::c_int) {
    // Only async-signal-safe work here: one write(2) of one byte, errno kept.
    let fd = SELF_PIPE_WR.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let byte = sig as u8;
    // SAFETY: errno_location returns this thread's errno; we read and restore
    // it so the interrupted code does not see a changed errno. write(2) is
    // async-signal-safe; the pipe is non-blocking, so a full pipe (which
    // already means "wake up") drops the byte instead of blocking.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(fd, (&byte as *const u8).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

extern "C" fn worker_quit_handler(_sig: libc::c_int) {
    WORKER_QUIT.store(true, Ordering::Relaxed);
}

/// Routes `signals` to the self-pipe whose write end is `wr` (sigaction(2)).
///
/// Handlers run without SA_RESTART so a blocking poll returns EINTR at once.
pub fn install_master_handlers(wr: BorrowedFd<'_>, signals: &[Signal]) -> io::Result<()> {
    SELF_PIPE_WR.store(wr.as_raw_fd(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(master_signal_handler),
        SaFlags::SA_NOCLDSTOP,
        SigSet::empty(),
    );
    for &sig in signals {
        // SAFETY: the handler only performs an async-signal-safe write(2) and
        // touches no Rust state besides an atomic load.
        unsafe { signal::sigaction(sig, &action) }.map_err(io::Error::from)?;
    }
    Ok(())
}

/// In a freshly forked worker: every signal back to its default, the worker's own dispositions: QUIT sets a flag (graceful
/// stop), TERM and INT keep their default (immediate exit), PIPE and the
/// master-only administrative signals are ignored. The mask is cleared last.
pub fn reset_signals_for_worker() -> io::Result<()> {
    SELF_PIPE_WR.store(-1, Ordering::Relaxed);
    WORKER_QUIT.store(false, Ordering::Relaxed);
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL has no handler code to be unsafe about.
        unsafe { signal::sigaction(sig, &default) }.map_err(io::Error::from)?;
    }
    let quit = SigAction::new(
        SigHandler::Handler(worker_quit_handler),
        SaFlags::empty(),
        SigSet::empty(),
    );
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: worker_quit_handler only stores to an atomic; SIG_IGN runs no code.
    unsafe {
        signal::sigaction(Signal::SIGQUIT, &quit).map_err(io::Error::from)?;
        for sig in [
            Signal::SIGPIPE,
            Signal::SIGHUP,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGWINCH,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
        ] {
            signal::sigaction(sig, &ignore).map_err(io::Error::from)?;
        }
    }
    // Unblock last: signals that arrived since fork are delivered now, to
    // the worker's dispositions.
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(io::Error::from)?;
    Ok(())
}

/// True once the worker was asked to stop gracefully (SIGQUIT).
pub fn worker_quit_requested() -> bool {
    WORKER_QUIT.load(Ordering::Relaxed)
}

/// Ask this worker to stop gracefully, as SIGQUIT would.
pub fn request_worker_quit() {
    WORKER_QUIT.store(true, Ordering::Relaxed);
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

/// Wraps fork(2). Refuses when the process has more than one thread.
///
/// Every signal is blocked across the fork. In the parent the old mask is
/// restored; the child keeps them blocked until [`reset_signals_for_worker`]
/// has replaced the master's handlers, so that no signal meant for the
/// worker can run the master's handler and write into the master's
/// self-pipe.
pub fn fork() -> Result<Forked, crate::Error> {
    let threads = thread_count().map_err(|e| crate::Error::sys("reading /proc/self/task", e))?;
    if threads != 1 {
        return Err(crate::Error::NotSingleThreaded(threads));
    }
    let mut old = SigSet::empty();
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old))
        .map_err(|e| crate::Error::sys("sigprocmask() before fork", e))?;
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
        Err(e) => Err(crate::Error::sys("fork()", e)),
    }
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
