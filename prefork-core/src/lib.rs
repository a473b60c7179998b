//! # prefork-core
//!
//! The master/worker core of prefork, a toolkit for preforking servers on
//! Linux in the tradition of Unicorn, gunicorn and nginx.
//!
//! ```text
//!                 signals (QUIT TERM INT HUP USR1 USR2 WINCH TTIN TTOU)
//!                                   │
//!                             ┌─────▼─────┐   owns every listening socket;
//!                             │  master   │   one thread, one poll(2)
//!                             └─┬───┬───┬─┘
//!                fork (no exec) │   │   │  ▲ status: ready (busy/idle)
//!                         ┌─────▼┐ ┌▼───┐ ┌▼─────┐
//!                         │ w 0  │ │ w 1│ │ w 2  │  slot + pid; one
//!                         └──────┘ └────┘ └──────┘  connection at a time
//! ```
//!
//! * [`Master`] binds listeners, runs the [`App`]'s preload once, forks
//!   workers, reaps and respawns them, and obeys signals sent to it alone.
//! * [`Supervisor`] makes every decision as a pure function of events and a
//!   clock passed in; [`master`] is the thin effectful shell around it.
//! * An [`AcceptStrategy`] decides how workers get connections; each lives
//!   in its own crate (`prefork-blocking`, ...).
//!
//! A library user writes an [`App`] and hands it to a [`Master`] with a
//! strategy (one of the strategy crates, or their own); see also the
//! `examples/` folder of the workspace.
//!
//! # Example
//!
//! An app that answers every connection with one line, a strategy in which
//! every worker accepts from the listeners it inherited (what the
//! `prefork-blocking` crate does), and a master with two workers. When they
//! are up, the ready callback is a client once, then asks the master to stop
//! gracefully (QUIT), as an operator would.
//!
//! ```
//! use std::io::{Read, Write};
//!
//! use prefork_core::accept::ListenerSet;
//! use prefork_core::{
//!     AcceptContext, AcceptStrategy, Accepted, App, BindSpec, Connection, ListenAddr, Listener,
//!     Master, MasterConfig, Next, WorkerAcceptor,
//! };
//!
//! /// The app: what a worker does with one connection.
//! struct Hello;
//!
//! impl App for Hello {
//!     fn handle(&mut self, conn: &mut Connection) -> std::io::Result<Next> {
//!         conn.write_all(b"hello\n")?;
//!         Ok(Next::Close)
//!     }
//! }
//!
//! /// The strategy's master side: nothing to prepare; each worker keeps the
//! /// listeners it inherited.
//! struct Shared;
//!
//! impl AcceptStrategy for Shared {
//!     type Acceptor = SharedAcceptor;
//!
//!     fn name(&self) -> &'static str {
//!         "shared"
//!     }
//!
//!     fn into_acceptor(self, _slot: usize, listeners: Vec<Listener>) -> std::io::Result<SharedAcceptor> {
//!         Ok(SharedAcceptor(ListenerSet::new(listeners)))
//!     }
//! }
//!
//! /// The strategy's worker side: accept(2) from the shared listeners.
//! struct SharedAcceptor(ListenerSet);
//!
//! impl WorkerAcceptor for SharedAcceptor {
//!     fn accept(&mut self, ctx: &AcceptContext<'_>) -> std::io::Result<Accepted> {
//!         self.0.accept(ctx)
//!     }
//! }
//!
//! let cfg = MasterConfig {
//!     binds: vec![BindSpec::parse("127.0.0.1:0")?],
//!     workers: 2,
//!     ..MasterConfig::default()
//! };
//! let master = Master::start(cfg, Shared, Hello)?;
//! let code = master.run(|ready| {
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

pub mod accept;
pub mod agent;
pub mod app;
pub mod clock;
pub mod daemon;
pub mod error;
pub mod listener;
pub mod logfile;
pub mod master;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod pidfile;
mod pool;
pub mod report;
pub mod scaling;
pub mod scoreboard;
pub mod signals;
pub mod state;
pub mod status;
pub mod status_server;
pub mod strategy;
pub mod supervisor;
#[allow(unsafe_code)]
pub mod sys;
pub mod upgrade;
pub mod user;
mod worker;

pub use app::{App, BoxError, Connection, Frame, Framing, Next, Stream, WorkerInfo};
pub use clock::MonoTime;
pub use error::{Error, Result};
pub use listener::{BindOptions, BindSpec, ListenAddr, Listener};
pub use master::{Master, MasterConfig, ReadyInfo, ReloadSettings};
pub use report::ReportMode;
pub use scaling::ScaleConfig;
pub use strategy::{
    accept_error, AcceptContext, AcceptStrategy, Accepted, Liveness, MasterIo, OwnSockets, Prepare,
    SlotKey, SlotSocket, WorkerAcceptor,
};
pub use supervisor::{PoolSettings, Supervisor, SupervisorConfig, EXIT_BOOT_FAILED};
pub use user::WorkerUser;
pub use worker::EXIT_PANIC;
