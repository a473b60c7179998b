//! The mutex strategy's only `unsafe`: SysV semaphores, a robust
//! process-shared pthread mutex, and closing inherited descriptors.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prefork_core::sys::{SharedMap, ZeroValidAtomic};

/// Shared by every worker: who holds the lock, and what was seen.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Audit {
    /// Pid of the worker inside the locked section, 0 when none.
    pub holder: AtomicU64,
    /// Times the lock was taken.
    pub acquisitions: AtomicU64,
    /// Times a worker entered while another *live* worker was inside
    /// (must stay 0).
    pub violations: AtomicU64,
    /// Times a worker entered after the previous holder died inside
    /// (killed while holding the lock; the kernel released it).
    pub dead_holders: AtomicU64,
}

// SAFETY: Audit holds only atomics, for which all-zero is a valid value.
unsafe impl ZeroValidAtomic for Audit {}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Wraps flock(2) (`op`: LOCK_EX, LOCK_UN, optionally | LOCK_NB).
pub fn flock(fd: BorrowedFd<'_>, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock only acts on the descriptor, which the borrow keeps open.
    check(unsafe { libc::flock(fd.as_raw_fd(), op) }).map(|_| ())
}

/// Wraps semget(IPC_PRIVATE, 1, 0600) and semctl(SETVAL, 1): a new set of one
/// semaphore, free.
pub fn sem_create() -> io::Result<i32> {
    // SAFETY: semget with IPC_PRIVATE creates a new set; no memory is passed.
    let id = check(unsafe { libc::semget(libc::IPC_PRIVATE, 1, libc::IPC_CREAT | 0o600) })?;
    // SAFETY: SETVAL takes an int as its fourth (variadic) argument.
    if let Err(e) = check(unsafe { libc::semctl(id, 0, libc::SETVAL, 1 as libc::c_int) }) {
        sem_remove(id);
        return Err(e);
    }
    Ok(id)
}

/// Gives the semaphore set `id` to `uid`:`gid` (its mode stays 0600), for
/// workers that run as another user.
pub fn sem_chown(id: i32, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: semid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one semid_ds through the pointer, which points
    // to `ds`, alive and writable for the call.
    check(unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) })?;
    ds.sem_perm.uid = uid;
    ds.sem_perm.gid = gid;
    // SAFETY: IPC_SET reads one semid_ds through the pointer, `ds` above.
    check(unsafe { libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) })?;
    Ok(())
}

/// Wraps semctl(IPC_RMID). Errors (already removed) are ignored.
pub fn sem_remove(id: i32) {
    // SAFETY: IPC_RMID takes no further argument and touches no memory of ours.
    unsafe {
        libc::semctl(id, 0, libc::IPC_RMID);
    }
}

/// Wraps semtimedop(2): -1 with SEM_UNDO (a killed holder's decrement is
/// undone by the kernel), waiting at most `timeout`. Ok(false) on timeout
/// or a signal.
pub fn sem_acquire(id: i32, timeout: Duration) -> io::Result<bool> {
    let mut op = libc::sembuf {
        sem_num: 0,
        sem_op: -1,
        sem_flg: libc::SEM_UNDO as libc::c_short,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `op` and `ts` outlive the call; nsops is 1, matching `op`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_semtimedop,
            id,
            &mut op as *mut libc::sembuf,
            1usize,
            &ts,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EINTR) => Ok(false),
        _ => Err(e),
    }
}

/// Wraps semop(2): +1 with SEM_UNDO.
pub fn sem_release(id: i32) -> io::Result<()> {
    let mut op = libc::sembuf {
        sem_num: 0,
        sem_op: 1,
        sem_flg: libc::SEM_UNDO as libc::c_short,
    };
    loop {
        // SAFETY: `op` outlives the call; nsops is 1.
        match check(unsafe { libc::semop(id, &mut op, 1) }) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r.map(|_| ()),
        }
    }
}

/// A robust, process-shared pthread mutex in a shared mapping.
#[derive(Debug)]
pub struct RobustMutex {
    map: SharedMap,
}

// SAFETY: a process-shared pthread mutex exists to be used concurrently by
// many threads and processes; every access goes through pthread calls.
unsafe impl Send for RobustMutex {}
// SAFETY: as above.
unsafe impl Sync for RobustMutex {}

/// What acquiring the robust mutex found.
#[derive(Debug, PartialEq, Eq)]
pub enum Locked {
    /// Taken.
    Yes,
    /// Taken from a holder that died with it (made consistent again).
    Recovered,
    /// Timed out or interrupted.
    No,
}

impl RobustMutex {
    /// Creates and initialises it (PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST).
    pub fn new() -> io::Result<RobustMutex> {
        let map = SharedMap::new(std::mem::size_of::<libc::pthread_mutex_t>())?;
        let m = map.as_ptr().cast::<libc::pthread_mutex_t>();
        // SAFETY: `attr` is initialised by pthread_mutexattr_init before use
        // and destroyed after; `m` points to fresh, page-aligned, zeroed
        // shared memory large enough for a pthread_mutex_t that nothing else
        // uses yet.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let e = libc::pthread_mutexattr_init(&mut attr);
            if e != 0 {
                return Err(io::Error::from_raw_os_error(e));
            }
            let mut e = libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            if e == 0 {
                e = libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            }
            if e == 0 {
                e = libc::pthread_mutex_init(m, &attr);
            }
            libc::pthread_mutexattr_destroy(&mut attr);
            if e != 0 {
                return Err(io::Error::from_raw_os_error(e));
            }
        }
        Ok(RobustMutex { map })
    }

    fn ptr(&self) -> *mut libc::pthread_mutex_t {
        self.map.as_ptr().cast()
    }

    /// Wraps pthread_mutex_timedlock(3), waiting at most `timeout`; a lock
    /// whose holder died (EOWNERDEAD) is made consistent and taken.
    pub fn lock(&self, timeout: Duration) -> io::Result<Locked> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)?;
        let deadline = Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32) + timeout;
        let ts = libc::timespec {
            tv_sec: deadline.as_secs() as libc::time_t,
            tv_nsec: deadline.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the mutex was initialised in `new` and lives in a mapping
        // that outlives `self`; `ts` outlives the call.
        let e = unsafe { libc::pthread_mutex_timedlock(self.ptr(), &ts) };
        match e {
            0 => Ok(Locked::Yes),
            libc::EOWNERDEAD => {
                // SAFETY: we own the mutex now (EOWNERDEAD); marking it
                // consistent is what the robust protocol asks of the new owner.
                let e = unsafe { libc::pthread_mutex_consistent(self.ptr()) };
                if e != 0 {
                    return Err(io::Error::from_raw_os_error(e));
                }
                Ok(Locked::Recovered)
            }
            libc::ETIMEDOUT | libc::EINTR => Ok(Locked::No),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Wraps pthread_mutex_unlock(3).
    pub fn unlock(&self) -> io::Result<()> {
        // SAFETY: called only by the holder, after a successful `lock`.
        let e = unsafe { libc::pthread_mutex_unlock(self.ptr()) };
        if e == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(e))
        }
    }
}

/// Closes every descriptor of this process except `keep` (the guardian
/// holds nothing but its pipe).
pub fn close_all_except(keep: RawFd) {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd != keep)
        .collect();
    for fd in fds {
        // SAFETY: in the freshly forked, single-threaded guardian nothing
        // else refers to these descriptors; closing the one read_dir used
        // (already dropped) fails harmlessly with EBADF.
        unsafe {
            libc::close(fd);
        }
    }
}
