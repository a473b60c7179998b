//! # prefork-blocking
//!
//! The simplest accept strategy: every worker waits in accept(2) on the
//! listening sockets it inherited from the master.
//!
//! * **One listener**: each worker blocks in accept(2) itself. The kernel
//!   queues the waiters exclusively and hands each connection to exactly one
//!   of them: no thundering herd, and no syscall besides accept4(2) on the
//!   accept path. The listener's SO_RCVTIMEO (the accept tick) makes accept
//!   return `EAGAIN` now and then, so an idle worker notices a graceful stop
//!   or a dead master.
//! * **Several listeners**: a worker cannot block in accept(2) on two
//!   sockets, so it polls them all (plus the master-alive pipe) and accepts
//!   non-blocking from the ready one. Every idle worker wakes for every
//!   connection and all but one find nothing: the thundering herd that the
//!   `mutex` strategy exists to fix. The testkit measures it as wakeups per
//!   accepted connection.
//!
//! ```no_run
//! use prefork_core::{App, Connection, Master, MasterConfig, BindSpec};
//! use std::io::Write;
//!
//! struct Hello;
//! impl App for Hello {
//!     fn handle(&mut self, c: &mut Connection) -> std::io::Result<()> {
//!         c.write_all(b"hello\n")
//!     }
//! }
//!
//! let cfg = MasterConfig {
//!     binds: vec![BindSpec::parse("127.0.0.1:8080")?],
//!     workers: 4,
//!     ..MasterConfig::default()
//! };
//! let master = Master::start(cfg, prefork_blocking::Blocking::new(), Hello)?;
//! std::process::exit(master.run(|ready| println!("ready on {:?}", ready.addrs))?);
//! # Ok::<(), prefork_core::Error>(())
//! ```

#![deny(missing_docs)]

use std::io;
use std::os::fd::AsFd;

use nix::poll::{PollFd, PollFlags};
use prefork_core::clock::poll_timeout;
use prefork_core::{
    accept_error, AcceptContext, AcceptStrategy, Accepted, Connection, Error, Listener, Result,
    WorkerAcceptor,
};

/// The blocking strategy (master side). Holds no state of its own: the
/// master owns the listeners and every worker inherits them.
#[derive(Debug, Default, Clone)]
pub struct Blocking {
    _private: (),
}

impl Blocking {
    /// Creates the strategy.
    pub fn new() -> Blocking {
        Blocking::default()
    }
}

impl AcceptStrategy for Blocking {
    type Acceptor = BlockingAcceptor;

    fn name(&self) -> &'static str {
        "blocking"
    }

    fn prepare(&mut self, listeners: &[Listener]) -> Result<()> {
        // Polling several listeners needs non-blocking accept, else a worker
        // that loses the race blocks on one socket and ignores the others.
        // O_NONBLOCK is on the shared file description: set it once, here.
        let nonblocking = listeners.len() > 1;
        for l in listeners {
            l.socket()
                .set_nonblocking(nonblocking)
                .map_err(|e| Error::Strategy {
                    strategy: "blocking",
                    reason: format!("O_NONBLOCK on {}: {e}", l.addr()),
                })?;
        }
        Ok(())
    }

    fn into_acceptor(self, _slot: usize, listeners: Vec<Listener>) -> io::Result<BlockingAcceptor> {
        Ok(BlockingAcceptor::new(listeners))
    }
}

/// The worker side: accepts from the inherited listeners.
#[derive(Debug)]
pub struct BlockingAcceptor {
    listeners: Vec<Listener>,
    unix: Vec<bool>,
    /// Where polling starts next time, so one busy listener cannot starve another.
    next: usize,
}

impl BlockingAcceptor {
    /// Accepts from these listeners (blocking ones if there is one,
    /// non-blocking ones if there are several).
    pub fn new(listeners: Vec<Listener>) -> BlockingAcceptor {
        let unix = listeners.iter().map(Listener::is_unix).collect();
        BlockingAcceptor {
            listeners,
            unix,
            next: 0,
        }
    }

    /// accept4(2) with SOCK_CLOEXEC on listener `i`.
    fn accept_from(&self, i: usize) -> io::Result<Accepted> {
        match self.listeners[i].socket().accept() {
            Ok((sock, _peer)) => Ok(Accepted::Connection(Connection::from_socket(
                sock,
                self.unix[i],
                i,
            ))),
            Err(e) => accept_error(e),
        }
    }
}

impl WorkerAcceptor for BlockingAcceptor {
    fn accept(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        if self.listeners.len() == 1 {
            // Blocks until a connection or the tick (SO_RCVTIMEO → EAGAIN).
            return self.accept_from(0);
        }
        let n = self.listeners.len();
        let mut fds = Vec::with_capacity(n + 1);
        fds.push(PollFd::new(ctx.master_alive, PollFlags::POLLIN));
        for l in &self.listeners {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, poll_timeout(Some(ctx.tick))) {
            Ok(0) => return Ok(Accepted::Idle),
            Ok(_) => {}
            Err(nix::Error::EINTR) => return Ok(Accepted::Idle),
            Err(e) => return Err(e.into()),
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(Accepted::Idle); // the master is gone: let the loop see it
        }
        let ready: Vec<bool> = fds[1..]
            .iter()
            .map(|p| p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
            .collect();
        drop(fds);
        for k in 0..n {
            let i = (self.next + k) % n;
            if ready[i] {
                self.next = (i + 1) % n;
                return self.accept_from(i);
            }
        }
        Ok(Accepted::Idle)
    }
}
