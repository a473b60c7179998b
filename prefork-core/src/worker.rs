//! The worker process: boot, then accept and serve one connection at a time
//! until asked to stop or the master is gone.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags};
use nix::unistd::Pid;

use crate::app::{App, Connection, Next, WorkerInfo};
use crate::clock::{poll_timeout, MonoTime};
use crate::report::{ReportMode, Reporter};
use crate::scoreboard::Scoreboard;
use crate::status::{StatusKind, StatusWriter};
use crate::strategy::{AcceptContext, Accepted, Liveness, WorkerAcceptor};
use crate::supervisor::EXIT_BOOT_FAILED;
use crate::sys;

/// Exit code of a worker whose code panicked.
pub const EXIT_PANIC: i32 = 70;

/// What the master hands a new worker.
#[derive(Debug)]
pub(crate) struct WorkerSetup {
    pub slot: usize,
    pub generation: u64,
    /// Read end of a pipe whose only writer is the master: EOF = master gone.
    pub master_alive: OwnedFd,
    pub status: StatusWriter,
    pub master_pid: Pid,
    pub tick: Duration,
    /// How long a kept-alive connection waits in place for its next request.
    pub keepalive_timeout: Duration,
    /// This worker's scoreboard cell.
    pub cell: usize,
    pub report: ReportMode,
    /// Become this user before anything else runs.
    pub user: Option<crate::user::WorkerUser>,
    /// Reopened on USR1 (between connections).
    pub log_file: Option<crate::logfile::LogFile>,
    /// Read this worker's own memory (smaps_rollup) this often into its
    /// scoreboard cell, for `--max-memory` and the status: the read walks
    /// this process's page tables, so the worker pays for it, while idle,
    /// and the master only loads words.
    pub memory_check: Option<Duration>,
    /// Count each request's duration in the cell (`--metrics`).
    pub timed: bool,
}

/// The worker's own memory readings: due at an idle tick; a worker never
/// idle for three periods reads after a connection.
struct MemoryClock {
    every: Duration,
    next: MonoTime,
}

impl MemoryClock {
    fn read_if_due(&mut self, cell: Option<crate::scoreboard::Cell<'_>>, idle: bool) {
        let now = MonoTime::now();
        let due = if idle {
            now >= self.next
        } else {
            now >= self.next + self.every * 2
        };
        if !due {
            return;
        }
        self.next = now + self.every;
        if let (Some(c), Ok(m)) = (cell, crate::memory::read(std::process::id() as i32)) {
            c.set_memory(&m);
        }
    }
}

/// First thing in the child: worker signal dispositions, and death with the
/// master. Returns false if the master already died.
pub(crate) fn enter_child(master_pid: Pid) -> bool {
    if let Err(e) = sys::reset_signals_for_worker() {
        tracing::error!("worker: resetting signals failed: {e}");
        return false;
    }
    die_with(master_pid)
}

/// SIGTERM when the master dies. PR_SET_PDEATHSIG is racy at fork (the
/// master may be gone already), so the parent is checked right after.
/// Returns false if it is gone.
fn die_with(master_pid: Pid) -> bool {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    nix::unistd::getppid() == master_pid
}

/// Boots the worker and serves until stopped. Returns the exit code.
pub(crate) fn run<A, W, F>(
    app: &mut A,
    make_acceptor: F,
    setup: WorkerSetup,
    scoreboard: &Scoreboard,
) -> i32
where
    A: App,
    W: WorkerAcceptor,
    F: FnOnce() -> std::io::Result<W>,
{
    match boot(app, make_acceptor, &setup) {
        Ok(acceptor) => serve(app, acceptor, &setup, scoreboard),
        Err(code) => code,
    }
}

/// Everything before the first accept: the process name, the user, the
/// app's `after_fork`, the strategy's acceptor, the last words for a
/// frozen-worker kill. `Err` is the exit code (a boot failure, or 0 when
/// the master is already gone).
fn boot<A, W, F>(app: &mut A, make_acceptor: F, setup: &WorkerSetup) -> Result<W, i32>
where
    A: App,
    W: WorkerAcceptor,
    F: FnOnce() -> std::io::Result<W>,
{
    let info = WorkerInfo {
        slot: setup.slot,
        pid: std::process::id(),
        generation: setup.generation,
    };
    let slot = setup.slot;
    // Name the process for ps/top: "prefork-w3" (comm holds 15 bytes).
    if let Ok(name) = std::ffi::CString::new(format!("prefork-w{slot}")) {
        let _ = nix::sys::prctl::set_name(&name);
    }
    if let Some(u) = &setup.user {
        if let Err(e) = u.become_it() {
            tracing::error!(
                "worker={slot} pid={} failed to boot: becoming user {}: {e}",
                info.pid,
                u.name
            );
            return Err(EXIT_BOOT_FAILED);
        }
        // A change of credentials clears the parent-death signal: set it
        // again, and check the parent once more.
        if !die_with(setup.master_pid) {
            return Err(0);
        }
    }
    if let Err(e) = app.after_fork(&info) {
        tracing::error!(
            "worker={slot} pid={} failed to boot: app after_fork: {e}",
            info.pid
        );
        return Err(EXIT_BOOT_FAILED);
    }
    let acceptor = match make_acceptor().and_then(|mut a| a.init().map(|()| a)) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(
                "worker={slot} pid={} failed to boot: accept strategy: {e}",
                info.pid
            );
            return Err(EXIT_BOOT_FAILED);
        }
    };
    sys::set_last_words(
        setup.master_pid.as_raw(),
        format!(
            "prefork worker={slot} pid={}: busy past the timeout, killed by the master (SIGABRT)\n",
            info.pid
        ),
    );
    Ok(acceptor)
}

/// Reports ready, then accepts and serves one connection at a time until
/// asked to stop (then serves what only this worker can take) or the master
/// is gone. Returns the exit code.
fn serve<A: App, W: WorkerAcceptor>(
    app: &mut A,
    mut acceptor: W,
    setup: &WorkerSetup,
    scoreboard: &Scoreboard,
) -> i32 {
    let slot = setup.slot;
    // Only this worker's own cell stays writable here (S8).
    if let Err(e) = scoreboard.keep_only_writable(setup.cell) {
        tracing::warn!("worker={slot} could not make the other scoreboard cells read-only: {e}");
    }
    let cell = scoreboard.cell(setup.cell);
    if let Some(c) = cell {
        c.ready(MonoTime::now());
    }
    let report = match (setup.report, cell) {
        (ReportMode::Scoreboard, Some(c)) => Reporter::Scoreboard(c, setup.timed),
        (ReportMode::Pipe, _) => Reporter::Pipe(&setup.status),
        _ => Reporter::Off,
    };
    setup.status.send(StatusKind::Ready);
    // Heartbeats go with the scoreboard: the pipe carries no periodic
    // message (it would wake the master for nothing).
    let liveness = Liveness::new(cell.filter(|_| setup.report == ReportMode::Scoreboard));
    let mut ctx = AcceptContext {
        master_alive: setup.master_alive.as_fd(),
        tick: setup.tick,
        liveness,
        final_stop: false,
    };
    let mut backoff = Duration::ZERO;
    let mut memory = setup.memory_check.map(|every| MemoryClock {
        every,
        next: MonoTime::now(),
    });
    // A first reading before the first connection: the status has one at
    // once, even for a worker that then stays busy.
    if let Some(m) = &mut memory {
        m.read_if_due(cell, true);
    }
    // One connection: a request, and while the app keeps the connection
    // alive, the next ones, each waited for in place or handed back to the
    // strategy (fdpass's master parks it).
    let mut serve_one = |mut conn: Connection, acceptor: &mut W| {
        report.busy();
        loop {
            let next = app.handle(&mut conn).unwrap_or_else(|e| {
                tracing::debug!("connection ended with an error: {e}");
                Next::Close
            });
            if next == Next::Close || sys::worker_quit_requested() {
                break;
            }
            conn.count_request();
            conn = match acceptor.keep_alive(conn, &*app) {
                Ok(Some(conn)) => conn,
                Ok(None) => {
                    // Taken by the strategy (handed back to the master).
                    report.idle();
                    return;
                }
                Err(e) => {
                    tracing::debug!("keeping a connection alive failed: {e}");
                    acceptor.done();
                    report.idle();
                    return;
                }
            };
            report.kept_alive();
            if !wait_for_request(&conn, setup, &liveness) {
                report.released();
                acceptor.closing(&conn);
                drop(conn);
                acceptor.done();
                return;
            }
            report.busy();
        }
        acceptor.closing(&conn);
        drop(conn);
        acceptor.done();
        report.idle();
    };
    while !sys::worker_quit_requested() {
        if sys::take_worker_reopen() {
            reopen_log(setup);
        }
        match acceptor.accept(&ctx) {
            Ok(Accepted::Connection(conn)) => {
                backoff = Duration::ZERO;
                serve_one(conn, &mut acceptor);
                if let Some(m) = &mut memory {
                    m.read_if_due(cell, false);
                }
            }
            Ok(Accepted::Idle) => {
                liveness.beat();
                if let Some(m) = &mut memory {
                    m.read_if_due(cell, true);
                }
                if master_gone(setup) {
                    tracing::info!("worker={slot} master is gone; exiting");
                    return 0;
                }
            }
            Err(e) => {
                if !back_off(&mut backoff, &e, setup) {
                    return 0;
                }
                liveness.beat();
            }
        }
    }
    // Asked to stop: serve what only this worker can take, and in a final
    // stop what waits in a shared accept queue.
    ctx.final_stop = cell.is_some_and(|c| c.final_stop());
    while let Ok(Accepted::Connection(conn)) = acceptor.drain(&ctx) {
        serve_one(conn, &mut acceptor);
    }
    0
}

/// Waits in place for the next request on a kept-alive connection, at most
/// the keep-alive timeout: true when it has bytes to read, false when it
/// stays silent, the client closed it, a graceful stop was asked or the
/// master is gone.
fn wait_for_request(conn: &Connection, setup: &WorkerSetup, liveness: &Liveness<'_>) -> bool {
    if !conn.buffered().is_empty() {
        return true; // a pipelined request is already here
    }
    let deadline = MonoTime::now() + setup.keepalive_timeout;
    loop {
        if sys::worker_quit_requested() {
            return false;
        }
        let left = deadline.saturating_since(MonoTime::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [
            PollFd::new(conn.as_fd(), PollFlags::POLLIN),
            PollFd::new(setup.master_alive.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, poll_timeout(Some(left.min(setup.tick)))) {
            Ok(0) | Err(nix::Error::EINTR) => liveness.beat(),
            Ok(_) => {
                if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                    return false; // the master is gone
                }
                // Readable: a request, or the client's close (EOF).
                return conn.peek_open();
            }
            Err(_) => return false,
        }
    }
}

/// USR1 was received: reopen the log file (between connections).
fn reopen_log(setup: &WorkerSetup) {
    if let Some(lf) = &setup.log_file {
        if let Err(e) = lf.reopen() {
            let slot = setup.slot;
            tracing::error!("worker={slot} USR1: reopening {}: {e}", lf.path().display());
        }
    }
}

/// accept failed with EMFILE and friends: the connection stays queued, so
/// wait for relief (10 ms, doubling up to 1 s) instead of spinning on a
/// readable listener (L14). Returns false when the master is gone.
fn back_off(backoff: &mut Duration, e: &std::io::Error, setup: &WorkerSetup) -> bool {
    *backoff = (*backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
    if *backoff == Duration::from_millis(10) {
        tracing::warn!("worker={} accept failed: {e}; backing off", setup.slot);
    }
    let mut fds = [PollFd::new(setup.master_alive.as_fd(), PollFlags::POLLIN)];
    let _ = nix::poll::poll(&mut fds, poll_timeout(Some(*backoff)));
    !master_gone(setup)
}

/// The master-alive pipe is readable (EOF) or our parent changed.
fn master_gone(setup: &WorkerSetup) -> bool {
    let mut fds = [PollFd::new(setup.master_alive.as_fd(), PollFlags::POLLIN)];
    let eof = matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0);
    eof || nix::unistd::getppid() != setup.master_pid
}
