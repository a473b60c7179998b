//! # prefork-mutex
//!
//! Accept serialized by a cross-process lock, as Apache's prefork MPM and
//! uWSGI's thunder lock do. When workers wait on several listeners they
//! must poll them, and without a lock every connection wakes every idle
//! worker while only one can win the accept (the thundering herd). With
//! this strategy one worker at a time holds the lock and polls: it accepts
//! one connection, releases the lock, then serves. The others sleep on the
//! lock, and only one of them is woken when it is released.
//!
//! With a single listener the kernel already wakes one accept(2) waiter per
//! connection, so the lock is skipped unless `lock_always` is set.
//!
//! Lock kinds ([`LockKind`]):
//! * `flock`: flock(2) on a lock file that each worker opens **after** fork.
//!   A lock belongs to an open file description, and a description shared
//!   through fork is the same description in every worker, so a lock taken
//!   through an inherited descriptor excludes nothing.
//! * `fcntl`: a POSIX record lock (F_SETLKW) on the lock file; owned by
//!   the process, released by the kernel when it dies.
//! * `sysvsem`: a SysV semaphore with SEM_UNDO; the kernel undoes a killed
//!   holder's decrement.
//! * `pthread`: a robust, process-shared pthread mutex in shared memory; a
//!   holder that dies is detected (EOWNERDEAD) and the lock recovered.
//!
//! Lock files live in a private directory (mode 0700, random name, under
//! `$XDG_RUNTIME_DIR` or the temp dir), created O_EXCL|O_NOFOLLOW with mode
//! 0600. The master removes the directory and the semaphore when it exits.
//! A detached guardian process does the same if the master is killed.
//!
//! # Example
//!
//! Two workers that take a flock(2) lock before each accept. With one
//! listener the kernel already wakes one waiter per connection, so the lock
//! is used only when asked (`lock_always`), as here.
//!
//! ```
//! use std::io::{Read, Write};
//!
//! use prefork_core::{App, BindSpec, Connection, ListenAddr, Master, MasterConfig, Next};
//! use prefork_mutex::{LockKind, Mutex};
//!
//! struct Hello;
//!
//! impl App for Hello {
//!     fn handle(&mut self, conn: &mut Connection) -> std::io::Result<Next> {
//!         conn.write_all(b"hello\n")?;
//!         Ok(Next::Close)
//!     }
//! }
//!
//! let cfg = MasterConfig {
//!     binds: vec![BindSpec::parse("127.0.0.1:0")?],
//!     workers: 2,
//!     ..MasterConfig::default()
//! };
//! let master = Master::start(cfg, Mutex::new(LockKind::Flock, true), Hello)?;
//! let code = master.run(|ready| {
//!     // Every worker is up: be a client once, then stop gracefully (QUIT).
//!     let ListenAddr::Tcp(addr) = ready.addrs[0] else { unreachable!("a TCP bind") };
//!     let mut reply = String::new();
//!     std::net::TcpStream::connect(addr)
//!         .and_then(|mut c| c.read_to_string(&mut reply))
//!         .expect("a worker answers");
//!     assert_eq!(reply, "hello\n");
//!     let me = nix::unistd::Pid::from_raw(ready.pid as i32);
//!     nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGQUIT).expect("QUIT");
//! })?;
//! assert_eq!(code, 0, "a graceful stop");
//! # Ok::<(), prefork_core::Error>(())
//! ```

#![deny(missing_docs)]
// `unsafe` is confined to `sys`: the compiler enforces it.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod sys;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use nix::fcntl::{FcntlArg, OFlag};
use prefork_core::accept::ListenerSet;
use prefork_core::sys::{Forked, SharedMap};
use prefork_core::{
    AcceptContext, AcceptStrategy, Accepted, Error, Listener, Prepare, Result, WorkerAcceptor,
};

pub use sys::Audit;

/// Which lock serializes accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockKind {
    /// flock(2) on a lock file opened by each worker after fork.
    Flock,
    /// fcntl(2) POSIX record lock on the lock file.
    Fcntl,
    /// SysV semaphore with SEM_UNDO.
    SysvSem,
    /// Robust process-shared pthread mutex.
    Pthread,
}

impl LockKind {
    /// Every kind.
    pub const ALL: [LockKind; 4] = [
        LockKind::Flock,
        LockKind::Fcntl,
        LockKind::SysvSem,
        LockKind::Pthread,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LockKind::Flock => "flock",
            LockKind::Fcntl => "fcntl",
            LockKind::SysvSem => "sysvsem",
            LockKind::Pthread => "pthread",
        }
    }
}

fn strategy_err(reason: String) -> Error {
    Error::Strategy {
        strategy: "mutex",
        reason,
    }
}

/// The mutex strategy (master side).
#[derive(Debug)]
pub struct Mutex {
    kind: LockKind,
    lock_always: bool,
    /// Whether workers take the lock (several listeners, or `lock_always`).
    locking: bool,
    dir: Option<PathBuf>,
    lock_file: Option<PathBuf>,
    sem: Option<i32>,
    robust: Option<sys::RobustMutex>,
    audit: Option<SharedMap>,
    /// Write end of the guardian's pipe; its EOF tells the guardian the
    /// master is gone.
    guardian: Option<OwnedFd>,
    /// The workers' uid and gid when they run as another user (`--user`):
    /// the lock file, its directory and the semaphore are given to them.
    owner: Option<(u32, u32)>,
}

impl Mutex {
    /// A mutex strategy with this lock kind. `lock_always` takes the lock
    /// even with a single listener.
    pub fn new(kind: LockKind, lock_always: bool) -> Mutex {
        Mutex {
            kind,
            lock_always,
            locking: false,
            dir: None,
            lock_file: None,
            sem: None,
            robust: None,
            audit: None,
            guardian: None,
            owner: None,
        }
    }

    /// The lock file (flock and fcntl kinds), once prepared.
    pub fn lock_file(&self) -> Option<&Path> {
        self.lock_file.as_deref()
    }

    /// The SysV semaphore id (sysvsem kind), once prepared.
    pub fn semaphore(&self) -> Option<i32> {
        self.sem
    }

    fn audit(&self) -> Option<&Audit> {
        self.audit.as_ref()?.as_slice_of::<Audit>().first()
    }

    fn make_lock_file(&mut self) -> io::Result<()> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        // A private directory with a random name, mode 0700.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("prefork-mutex-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&base)?
            .keep();
        let path = dir.join("accept.lock");
        self.dir = Some(dir.clone());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        self.lock_file = Some(path);
        // Workers open the file after fork, as their own user.
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Forks a detached guardian (double fork, new session, every signal
    /// blocked, every descriptor closed but a pipe only the master writes).
    /// When the master dies in any way, the pipe reads EOF and the guardian
    /// removes the semaphore and the lock directory.
    fn spawn_guardian(&mut self) -> Result<()> {
        let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| Error::sys("pipe2() for the mutex guardian", e))?;
        match prefork_core::sys::fork()
            .map_err(|e| Error::sys("fork() of the mutex guardian", e))?
        {
            Forked::Parent(pid) => {
                drop(rd);
                // The intermediate child exits at once; reap it here so the
                // master never sees it.
                let _ = nix::sys::wait::waitpid(pid, None);
                self.guardian = Some(wr);
                Ok(())
            }
            Forked::Child => {
                drop(wr);
                if let Ok(Forked::Child) = prefork_core::sys::fork() {
                    guardian(rd, self.sem, self.dir.clone());
                }
                prefork_core::sys::exit_now(0)
            }
        }
    }
}

/// The guardian's life: wait for the master to be gone, clean up, exit.
fn guardian(pipe: OwnedFd, sem: Option<i32>, dir: Option<PathBuf>) -> ! {
    let _ = nix::unistd::setsid();
    sys::close_all_except(pipe.as_raw_fd());
    let mut buf = [0u8; 1];
    loop {
        match nix::unistd::read(&pipe, &mut buf) {
            Ok(0) => break,
            Err(nix::Error::EINTR) | Ok(_) => continue,
            Err(_) => break,
        }
    }
    cleanup(sem, dir.as_deref());
    prefork_core::sys::exit_now(0)
}

fn cleanup(sem: Option<i32>, dir: Option<&Path>) {
    if let Some(id) = sem {
        sys::sem_remove(id);
    }
    if let Some(d) = dir {
        let _ = std::fs::remove_file(d.join("accept.lock"));
        let _ = std::fs::remove_dir(d);
    }
}

impl AcceptStrategy for Mutex {
    type Acceptor = MutexAcceptor;

    fn name(&self) -> &'static str {
        "mutex"
    }

    fn prepare(&mut self, ctx: Prepare<'_>) -> Result<()> {
        let listeners = ctx.listeners;
        self.owner = ctx.worker_owner;
        self.locking = listeners.len() > 1 || self.lock_always;
        // With several listeners the holder polls them, so they are
        // non-blocking. A single one stays blocking even under the lock: the
        // holder blocks in accept(2) itself (SO_RCVTIMEO bounds it to a
        // tick), which saves a poll(2) per connection.
        ListenerSet::set_nonblocking(listeners, listeners.len() > 1)
            .map_err(|e| strategy_err(format!("O_NONBLOCK on the listeners: {e}")))?;
        if !self.locking {
            tracing::info!(
                "mutex: one listener, so accept(2) wakes one worker by itself; the {} lock is not used (--lock-always uses it)",
                self.kind.name()
            );
            return Ok(());
        }
        let audit = SharedMap::new(std::mem::size_of::<Audit>())
            .map_err(|e| Error::sys("mmap() for the lock audit", e))?;
        self.audit = Some(audit);
        match self.kind {
            LockKind::Flock | LockKind::Fcntl => self
                .make_lock_file()
                .map_err(|e| strategy_err(format!("creating the lock file: {e}")))?,
            LockKind::SysvSem => {
                let id = sys::sem_create().map_err(|e| strategy_err(format!("semget(): {e}")))?;
                if let Some((uid, gid)) = self.owner {
                    if let Err(e) = sys::sem_chown(id, uid, gid) {
                        sys::sem_remove(id);
                        return Err(strategy_err(format!(
                            "semctl(IPC_SET) of the semaphore: {e}"
                        )));
                    }
                }
                tracing::info!("mutex: SysV semaphore id {id}");
                self.sem = Some(id);
            }
            LockKind::Pthread => {
                self.robust = Some(
                    sys::RobustMutex::new()
                        .map_err(|e| strategy_err(format!("robust pthread mutex: {e}")))?,
                )
            }
        }
        if let Err(e) = self.spawn_guardian() {
            self.shutdown();
            return Err(e);
        }
        tracing::info!("mutex: accept serialized by a {} lock", self.kind.name());
        Ok(())
    }

    fn into_acceptor(self, _slot: usize, listeners: Vec<Listener>) -> io::Result<MutexAcceptor> {
        let lock = if !self.locking {
            WorkerLock::None
        } else {
            match self.kind {
                LockKind::Flock => {
                    WorkerLock::Flock(self.lock_file.clone().unwrap_or_default(), None)
                }
                LockKind::Fcntl => {
                    WorkerLock::Fcntl(self.lock_file.clone().unwrap_or_default(), None)
                }
                LockKind::SysvSem => WorkerLock::Sem(self.sem.unwrap_or(-1)),
                LockKind::Pthread => match self.robust {
                    Some(m) => WorkerLock::Pthread(m),
                    None => return Err(io::Error::other("robust mutex missing")),
                },
            }
        };
        // `self.guardian` (the pipe's write end) is dropped here: only the
        // master keeps it.
        Ok(MutexAcceptor {
            set: ListenerSet::new(listeners),
            lock,
            audit: self.audit,
            warned: false,
            pid: std::process::id(),
        })
    }

    fn shutdown(&mut self) {
        if let Some(a) = self.audit() {
            let (n, bad, dead) = (
                a.acquisitions.load(Ordering::Relaxed),
                a.violations.load(Ordering::Relaxed),
                a.dead_holders.load(Ordering::Relaxed),
            );
            if bad > 0 {
                tracing::error!("mutex audit: {n} acquisitions, {bad} times a second live worker entered the locked section: MUTUAL EXCLUSION BROKEN");
            } else {
                tracing::info!("mutex audit: {n} acquisitions, at most 1 worker inside the locked section at once, {dead} taken over from holders that died");
            }
        }
        cleanup(self.sem.take(), self.dir.take().as_deref());
        self.lock_file = None;
    }
}

/// True while `pid` runs and is not exiting. A holder killed inside the
/// section releases its lock early in exit (files closed, SEM_UNDO
/// applied), then lingers as an exiting task and a zombie until the master
/// reaps it; kill(pid, 0) would still find it. /proc/PID/stat shows both:
/// the state (Z, X) and the PF_EXITING flag.
fn running(pid: u64) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied();
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    !matches!(state, None | Some("Z") | Some("X")) && flags & PF_EXITING == 0
}

/// A worker's handle on the lock.
#[derive(Debug)]
enum WorkerLock {
    None,
    /// The lock file path, and the worker's own open file (after fork).
    Flock(PathBuf, Option<File>),
    Fcntl(PathBuf, Option<File>),
    Sem(i32),
    Pthread(sys::RobustMutex),
}

/// The worker side.
#[derive(Debug)]
pub struct MutexAcceptor {
    set: ListenerSet,
    lock: WorkerLock,
    audit: Option<SharedMap>,
    warned: bool,
    pid: u32,
}

fn whole_file_lock(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

impl MutexAcceptor {
    /// Takes the lock, waiting at most about `tick` (flock and fcntl wait
    /// until a signal or the lock; the holder releases at least every tick).
    /// Ok(false): not taken this time.
    fn acquire(&mut self, ctx: &AcceptContext<'_>) -> io::Result<bool> {
        let tick = ctx.tick;
        // flock(2) and fcntl(2) waits have no deadline: a worker queued
        // there holds nothing, and must not look stopped for its silence
        // (a stopped waiter never takes the lock: the waiter itself retries
        // when woken). The holder beats again once it has the lock.
        let taken = match &self.lock {
            WorkerLock::None => return Ok(true),
            WorkerLock::Flock(_, Some(f)) => {
                ctx.liveness.holds_nothing();
                match sys::flock(f.as_fd(), libc::LOCK_EX) {
                    Ok(()) => true,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => false,
                    Err(e) => return Err(e),
                }
            }
            WorkerLock::Fcntl(_, Some(f)) => {
                ctx.liveness.holds_nothing();
                let l = whole_file_lock(libc::F_WRLCK);
                match nix::fcntl::fcntl(f, FcntlArg::F_SETLKW(&l)) {
                    Ok(_) => true,
                    Err(nix::Error::EINTR) => false,
                    Err(e) => return Err(e.into()),
                }
            }
            WorkerLock::Sem(id) => sys::sem_acquire(*id, tick)?,
            WorkerLock::Pthread(m) => match m.lock(tick)? {
                sys::Locked::Yes => true,
                sys::Locked::Recovered => true, // EOWNERDEAD, made consistent
                sys::Locked::No => false,
            },
            WorkerLock::Flock(_, None) | WorkerLock::Fcntl(_, None) => {
                return Err(io::Error::other("lock file not opened (init not called)"))
            }
        };
        if taken {
            ctx.liveness.beat();
            if let Some(a) = self.audit_cell() {
                a.acquisitions.fetch_add(1, Ordering::Relaxed);
                let prev = a.holder.swap(u64::from(self.pid), Ordering::AcqRel);
                // A holder that did not leave is either dead (killed inside;
                // the kernel released its lock) or, if alive, proof that
                // the lock failed to exclude.
                if prev != 0 {
                    if running(prev) {
                        a.violations.fetch_add(1, Ordering::Relaxed);
                    } else {
                        a.dead_holders.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(taken)
    }

    fn release(&mut self) -> io::Result<()> {
        if let Some(a) = self.audit_cell() {
            let me = u64::from(self.pid);
            let _ = a
                .holder
                .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
        match &self.lock {
            WorkerLock::None => Ok(()),
            WorkerLock::Flock(_, Some(f)) => sys::flock(f.as_fd(), libc::LOCK_UN),
            WorkerLock::Fcntl(_, Some(f)) => {
                let l = whole_file_lock(libc::F_UNLCK);
                nix::fcntl::fcntl(f, FcntlArg::F_SETLK(&l))
                    .map(|_| ())
                    .map_err(Into::into)
            }
            WorkerLock::Sem(id) => sys::sem_release(*id),
            WorkerLock::Pthread(m) => m.unlock(),
            WorkerLock::Flock(_, None) | WorkerLock::Fcntl(_, None) => Ok(()),
        }
    }

    fn audit_cell(&self) -> Option<&Audit> {
        self.audit.as_ref()?.as_slice_of::<Audit>().first()
    }
}

impl WorkerAcceptor for MutexAcceptor {
    /// In a final stop (new connections dropped at the SYN), the shared
    /// accept queue is emptied before the worker exits, without the lock
    /// (no herd to fear while everyone leaves).
    fn drain(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        if ctx.final_stop {
            return self.set.accept(ctx);
        }
        Ok(Accepted::Idle)
    }

    fn init(&mut self) -> io::Result<()> {
        // Each worker opens the lock file itself, after fork: its own file
        // description, so its flock excludes the other workers.
        match &mut self.lock {
            WorkerLock::Flock(path, file) | WorkerLock::Fcntl(path, file) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&*path)?;
                *file = Some(f);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn accept(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        if matches!(self.lock, WorkerLock::None) {
            return self.set.accept(ctx);
        }
        match self.acquire(ctx) {
            Ok(true) => {}
            Ok(false) => return Ok(Accepted::Idle),
            Err(e) => {
                if !self.warned {
                    self.warned = true;
                    tracing::error!("mutex: taking the accept lock failed: {e}");
                }
                return Err(e);
            }
        }
        if prefork_core::sys::worker_quit_requested() {
            self.release()?;
            return Ok(Accepted::Idle);
        }
        let got = self.set.accept(ctx);
        self.release()?;
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Why each worker must open the lock file after fork: a flock on a
    /// description shared through fork (or dup) excludes nothing, while a
    /// separate open(2) is excluded.
    #[test]
    fn flock_on_a_shared_description_excludes_nothing_but_a_separate_open_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let a = File::create(&path).expect("create");
        let shared = a.try_clone().expect("dup: same description, as after fork");
        let own = File::open(&path).expect("a separate open");
        let ex = libc::LOCK_EX | libc::LOCK_NB;
        sys::flock(a.as_fd(), ex).expect("first lock");
        sys::flock(shared.as_fd(), ex).expect("the shared description is not excluded");
        let err = sys::flock(own.as_fd(), ex).expect_err("a separate description is excluded");
        assert_eq!(err.raw_os_error(), Some(libc::EWOULDBLOCK));
    }

    #[test]
    fn sysv_semaphore_excludes_and_times_out() {
        let id = sys::sem_create().expect("semget");
        assert!(sys::sem_acquire(id, Duration::from_millis(10)).expect("first"));
        assert!(!sys::sem_acquire(id, Duration::from_millis(10)).expect("second times out"));
        sys::sem_release(id).expect("release");
        assert!(sys::sem_acquire(id, Duration::from_millis(10)).expect("again"));
        sys::sem_remove(id);
        assert!(
            sys::sem_acquire(id, Duration::from_millis(10)).is_err(),
            "removed"
        );
    }

    #[test]
    fn robust_mutex_excludes_and_times_out() {
        let m = sys::RobustMutex::new().expect("mutex");
        assert_eq!(
            m.lock(Duration::from_millis(10)).expect("lock"),
            sys::Locked::Yes
        );
        // A second lock from another thread times out while we hold it.
        let other = std::thread::scope(|s| {
            s.spawn(|| m.lock(Duration::from_millis(20)).expect("timed"))
                .join()
                .expect("thread")
        });
        assert_eq!(other, sys::Locked::No);
        m.unlock().expect("unlock");
    }

    #[test]
    fn lock_file_is_private_0600_and_removed_on_shutdown() {
        let mut m = Mutex::new(LockKind::Flock, true);
        m.make_lock_file().expect("lock file");
        let path = m.lock_file().expect("path").to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        let name = path
            .parent()
            .and_then(Path::file_name)
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("prefork-mutex-") && name.len() > "prefork-mutex-".len() + 4);
        m.shutdown();
        assert!(!path.exists() && !path.parent().expect("dir").exists());
    }
}
