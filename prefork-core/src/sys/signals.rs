//! Signal dispositions: the master's self-pipe handler, the worker's flags
//! (graceful stop, log reopen) and its last words, and the resets a forked
//! child makes before it runs anything else.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

/// Write end of the master's self-pipe, read by the signal handler.
static SELF_PIPE_WR: AtomicI32 = AtomicI32::new(-1);

/// Set by the worker's SIGQUIT handler: finish the connection in hand, then exit.
static WORKER_QUIT: AtomicBool = AtomicBool::new(false);

/// Set by the worker's SIGUSR1 handler: reopen the log file.
static WORKER_REOPEN: AtomicBool = AtomicBool::new(false);

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

/// What a worker writes to stderr when the master kills it as frozen.
static LAST_WORDS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// The master's pid, as the worker knows it: only its SIGABRT means "frozen".
static MASTER_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn worker_abort_handler(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler;
    // si_pid is the sender for signals sent with kill(2).
    let sender = unsafe { info.as_ref().map_or(0, |i| i.si_pid()) };
    if sender != 0 && sender == MASTER_PID.load(Ordering::Relaxed) {
        if let Some(msg) = LAST_WORDS.get() {
            // SAFETY: write(2) is async-signal-safe; the message was set
            // once before the handler could run and never changes.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
            }
        }
        // SAFETY: _exit(2) is async-signal-safe and does not return.
        unsafe { libc::_exit(128 + libc::SIGABRT) }
    }
    // Anyone else's SIGABRT, the app's own abort() included, keeps its
    // meaning: default action (core dump, "killed by SIGABRT").
    // SAFETY: signal(2) and raise(3) are async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Sets the line a frozen worker writes when the master's SIGABRT arrives,
/// and which pid is the master.
pub fn set_last_words(master: i32, msg: String) {
    MASTER_PID.store(master, Ordering::Relaxed);
    let _ = LAST_WORDS.set(msg.into_bytes());
}

extern "C" fn worker_reopen_handler(_sig: libc::c_int) {
    WORKER_REOPEN.store(true, Ordering::Relaxed);
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
/// stop), ABRT writes the worker's last words and exits (the master's
/// frozen-worker kill), USR1 sets a flag (reopen the log file), TERM and INT
/// keep their default (immediate exit), PIPE and the master-only
/// administrative signals are ignored. The mask is cleared last.
pub fn reset_signals_for_worker() -> io::Result<()> {
    SELF_PIPE_WR.store(-1, Ordering::Relaxed);
    WORKER_QUIT.store(false, Ordering::Relaxed);
    WORKER_REOPEN.store(false, Ordering::Relaxed);
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
    let abort = SigAction::new(
        SigHandler::SigAction(worker_abort_handler),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    let reopen = SigAction::new(
        SigHandler::Handler(worker_reopen_handler),
        SaFlags::empty(),
        SigSet::empty(),
    );
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: worker_quit_handler and worker_reopen_handler only store to an
    // atomic; the abort handler only calls write(2) and _exit(2); SIG_IGN
    // runs no code.
    unsafe {
        signal::sigaction(Signal::SIGQUIT, &quit).map_err(io::Error::from)?;
        signal::sigaction(Signal::SIGUSR1, &reopen).map_err(io::Error::from)?;
        signal::sigaction(Signal::SIGABRT, &abort).map_err(io::Error::from)?;
        for sig in [
            Signal::SIGPIPE,
            Signal::SIGHUP,
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

/// In a child about to exec a new master: every signal back to its default,
/// then the mask cleared (exec keeps both the mask and ignored signals), so
/// the program starts as from a shell. A signal that arrived since fork takes
/// its default action here, never the old master's handler.
pub fn reset_signals_for_exec() -> io::Result<()> {
    SELF_PIPE_WR.store(-1, Ordering::Relaxed);
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL has no handler code to be unsafe about.
        unsafe { signal::sigaction(sig, &default) }.map_err(io::Error::from)?;
    }
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(io::Error::from)?;
    Ok(())
}

/// Unblocks every signal (sigprocmask(2)), as in a process that forked to
/// go on as itself ([`crate::daemon`]) rather than as a worker.
pub fn unblock_all_signals() -> io::Result<()> {
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(io::Error::from)
}

/// True once after the worker was asked to reopen its log file (SIGUSR1).
pub fn take_worker_reopen() -> bool {
    // A plain load on the per-connection path; the swap only when set.
    WORKER_REOPEN.load(Ordering::Relaxed) && WORKER_REOPEN.swap(false, Ordering::Relaxed)
}

/// True once the worker was asked to stop gracefully (SIGQUIT).
pub fn worker_quit_requested() -> bool {
    WORKER_QUIT.load(Ordering::Relaxed)
}

/// Ask this worker to stop gracefully, as SIGQUIT would.
pub fn request_worker_quit() {
    WORKER_QUIT.store(true, Ordering::Relaxed);
}
