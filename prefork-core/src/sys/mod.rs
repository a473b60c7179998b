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

/// Clears close-on-exec on `fd`: the one deliberate exception, for the
/// listening sockets handed to a new master across exec.
pub fn set_inheritable(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    Ok(())
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

/// A shared, zero-filled memory mapping (mmap MAP_SHARED|MAP_ANONYMOUS):
/// written by workers, read by the master, inherited across fork.
#[derive(Debug)]
pub struct SharedMap {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

impl SharedMap {
    /// Maps `len` bytes (rounded up to pages by the kernel).
    pub fn new(len: usize) -> io::Result<SharedMap> {
        let size = std::num::NonZeroUsize::new(len).ok_or_else(|| io::Error::other("empty map"))?;
        // SAFETY: an anonymous mapping at an address of the kernel's choosing
        // aliases no existing memory; we own it until munmap in Drop.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                size,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
            )
        }?;
        Ok(SharedMap { ptr, len })
    }

    /// The mapping as a slice of `T`.
    ///
    /// `T` must be valid when all-zero and safe to share between processes
    /// (atomics): the mapping starts zero-filled and is written concurrently.
    pub fn as_slice_of<T: crate::scoreboard::ZeroValidAtomic>(&self) -> &[T] {
        let n = self.len / std::mem::size_of::<T>();
        // SAFETY: the mapping is page-aligned (so aligned for T, whose
        // alignment is at most a cache line), `n * size_of::<T>() <= len`,
        // zero bytes are a valid T (the ZeroValidAtomic contract), T is only
        // accessed through atomics so concurrent writers in other processes
        // are fine, and the slice borrows `self`, which owns the mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<T>(), n) }
    }
}

impl SharedMap {
    /// The start of the mapping, for memory that is used only through raw
    /// pointers handed to the OS (a process-shared pthread mutex).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty (never: a mapping has at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; slices borrowed
        // from `self` cannot outlive this drop.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

/// Sets TCP_DEFER_ACCEPT on a listening TCP socket: a connection becomes
/// acceptable only when its first data arrives (or, for a client that sends
/// nothing, about `secs` later). 0 turns it off.
pub fn set_tcp_defer_accept(fd: BorrowedFd<'_>, secs: u32) -> io::Result<()> {
    let v = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: the pointer and length describe `v`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// getsockopt(IPPROTO_TCP, `opt`) into `out`. Only for plain C data (an
/// int, `tcp_info`), for which any bytes the kernel writes are valid.
fn tcp_getsockopt<T>(fd: BorrowedFd<'_>, opt: libc::c_int, out: &mut T) -> io::Result<()> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `*out`, which outlives the
    // call; the kernel writes at most `len` bytes; callers pass plain data.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            opt,
            (out as *mut T).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads TCP_DEFER_ACCEPT (seconds, as the kernel rounds them; 0 when off).
pub fn tcp_defer_accept(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    tcp_getsockopt(fd, libc::TCP_DEFER_ACCEPT, &mut v)?;
    Ok(u32::try_from(v).unwrap_or(0))
}

/// Accept queue of a listening TCP socket from TCP_INFO: (connections
/// waiting to be accepted, the backlog limit).
pub fn tcp_accept_queue(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    tcp_getsockopt(fd, libc::TCP_INFO, &mut info)?;
    // For a listener, Linux reports the accept queue in tcpi_unacked and
    // the backlog in tcpi_sacked.
    Ok((info.tcpi_unacked, info.tcpi_sacked))
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
    fn tcp_accept_queue_counts_unaccepted_connections() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let _a = std::net::TcpStream::connect(addr).expect("a");
        let _b = std::net::TcpStream::connect(addr).expect("b");
        use std::os::fd::AsFd;
        let (queued, backlog) = tcp_accept_queue(l.as_fd()).expect("tcp_info");
        assert_eq!(queued, 2);
        assert!(backlog >= 2);
    }

    #[test]
    fn thread_count_sees_the_test_harness_threads() {
        assert!(thread_count().expect("proc readable") >= 1);
    }
}
