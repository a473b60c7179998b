//! The master's signals: a self-pipe the handlers write to, drained by the loop.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;

use crate::sys;

/// The signals the master handles. Everything an operator sends goes to the
/// master alone; it relays what is needed to workers.
pub const MASTER_SIGNALS: &[Signal] = &[
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGCHLD,
];

/// A self-pipe carrying one byte per delivered signal.
#[derive(Debug)]
pub struct SelfPipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl SelfPipe {
    /// Creates the pipe (pipe2 O_CLOEXEC|O_NONBLOCK) and routes
    /// [`MASTER_SIGNALS`] to it.
    pub fn install() -> io::Result<SelfPipe> {
        let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        sys::install_master_handlers(wr.as_fd(), MASTER_SIGNALS)?;
        Ok(SelfPipe { rd, wr })
    }

    /// The end to poll for readability.
    pub fn read_fd(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }

    /// Reads every pending byte and appends the signals, in arrival order.
    /// Drained before acting, so a signal arriving meanwhile wakes the next turn.
    pub fn drain(&self, out: &mut Vec<Signal>) {
        let mut buf = [0u8; 64];
        loop {
            match nix::unistd::read(&self.rd, &mut buf) {
                Ok(0) => return,
                Ok(n) => out.extend(
                    buf[..n]
                        .iter()
                        .filter_map(|&b| Signal::try_from(i32::from(b)).ok()),
                ),
                Err(nix::Error::EINTR) => continue,
                Err(_) => return, // EAGAIN: empty
            }
        }
    }

    /// Wakes the loop without a signal (used by tests).
    pub fn wake(&self) {
        let _ = nix::unistd::write(&self.wr, &[0u8]);
    }
}
