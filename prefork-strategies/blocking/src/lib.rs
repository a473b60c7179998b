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
//! # Example
//!
//! An app that answers each connection with one line, served by two workers
//! that block in accept(2) on the listener they share. The ready callback is
//! a client once, then asks the master to stop, as an operator would.
//!
//! ```
//! use std::io::{Read, Write};
//!
//! use prefork_core::{App, BindSpec, Connection, ListenAddr, Master, MasterConfig, Next};
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
//! let master = Master::start(cfg, prefork_blocking::Blocking::new(), Hello)?;
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
#![forbid(unsafe_code)]

use std::io;

use prefork_core::accept::ListenerSet;
use prefork_core::{
    AcceptContext, AcceptStrategy, Accepted, Error, Listener, Prepare, Result, WorkerAcceptor,
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

    fn prepare(&mut self, ctx: Prepare<'_>) -> Result<()> {
        let listeners = ctx.listeners;
        // Polling several listeners needs non-blocking accept, else a worker
        // that loses the race blocks on one socket and ignores the others.
        // O_NONBLOCK is on the shared file description: set it once, here.
        ListenerSet::set_nonblocking(listeners, listeners.len() > 1).map_err(|e| Error::Strategy {
            strategy: "blocking",
            reason: format!("O_NONBLOCK on the listeners: {e}"),
        })
    }

    fn into_acceptor(self, _slot: usize, listeners: Vec<Listener>) -> io::Result<BlockingAcceptor> {
        Ok(BlockingAcceptor::new(listeners))
    }
}

/// The worker side: accepts from the inherited listeners.
#[derive(Debug)]
pub struct BlockingAcceptor {
    set: ListenerSet,
}

impl BlockingAcceptor {
    /// Accepts from these listeners (blocking ones if there is one,
    /// non-blocking ones if there are several).
    pub fn new(listeners: Vec<Listener>) -> BlockingAcceptor {
        BlockingAcceptor {
            set: ListenerSet::new(listeners),
        }
    }
}

impl WorkerAcceptor for BlockingAcceptor {
    fn accept(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        self.set.accept(ctx)
    }

    /// In a final stop (new connections dropped at the SYN), the shared
    /// accept queue is emptied before the worker exits: a connection left
    /// there would be reset when the master closes the listener. `Idle`
    /// once nothing comes within a tick.
    fn drain(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        if ctx.final_stop {
            return self.set.accept(ctx);
        }
        Ok(Accepted::Idle)
    }
}
