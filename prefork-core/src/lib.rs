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
//! strategy; see the `examples/` folder of the workspace.

#![deny(missing_docs)]
// `unsafe` is confined to `sys`: the compiler enforces it.
#![deny(unsafe_code)]

pub mod accept;
pub mod app;
pub mod clock;
pub mod daemon;
pub mod error;
pub mod listener;
pub mod logfile;
pub mod master;
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

pub use app::{App, BoxError, Connection, Stream, WorkerInfo};
pub use clock::MonoTime;
pub use error::{Error, Result};
pub use listener::{BindOptions, BindSpec, ListenAddr, Listener};
pub use master::{Master, MasterConfig, ReadyInfo, ReloadSettings};
pub use report::ReportMode;
pub use scaling::ScaleConfig;
pub use strategy::{
    accept_error, AcceptContext, AcceptStrategy, Accepted, MasterIo, OwnSockets, Prepare, SlotKey,
    SlotSocket, WorkerAcceptor,
};
pub use supervisor::{PoolSettings, Supervisor, SupervisorConfig, EXIT_BOOT_FAILED};
pub use user::WorkerUser;
pub use worker::EXIT_PANIC;
