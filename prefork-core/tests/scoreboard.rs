//! S8: a worker keeps only its own scoreboard cell writable, so a
//! compromised worker cannot write a false busy time into a sibling's cell
//! (which would get the sibling killed as frozen). The workers are forked
//! children here that do nothing but that.

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::ForkResult;
use prefork_core::scoreboard::{Scoreboard, WorkerState};
use prefork_core::MonoTime;

/// Forks a child that keeps only cell `own` writable, then marks cell
/// `target` busy; returns how the child ended.
fn worker_writes(sb: &Scoreboard, own: usize, target: usize) -> WaitStatus {
    // SAFETY: the child makes two mprotect calls and an atomic store, then
    // leaves with _exit; it never returns into the test harness.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => {
            let code = match sb.keep_only_writable(own) {
                Ok(()) => {
                    if let Some(c) = sb.cell(target) {
                        c.busy(MonoTime::from_nanos(42));
                    }
                    0
                }
                Err(_) => 3,
            };
            // SAFETY: _exit ends the child at once, running nothing else.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
    }
}

#[test]
fn a_worker_can_write_only_its_own_cell() {
    let mut sb = Scoreboard::new(8).expect("scoreboard");
    let mine = sb.allocate().expect("a cell");
    let sibling = sb.allocate().expect("another");
    // Its own cell: written, and the master (this process) sees it.
    let st = worker_writes(&sb, mine, mine);
    assert!(matches!(st, WaitStatus::Exited(_, 0)), "{st:?}");
    assert_eq!(
        sb.cell(mine).expect("cell").state(),
        WorkerState::Busy {
            since: MonoTime::from_nanos(42)
        }
    );
    // A sibling's cell: the write faults, and the sibling's cell is as it was.
    let st = worker_writes(&sb, mine, sibling);
    assert!(
        matches!(st, WaitStatus::Signaled(_, Signal::SIGSEGV, _)),
        "{st:?}"
    );
    assert_eq!(
        sb.cell(sibling).expect("cell").state(),
        WorkerState::Booting
    );
    // The master itself can still write every cell (it resets them).
    sb.cell(sibling)
        .expect("cell")
        .busy(MonoTime::from_nanos(7));
}
