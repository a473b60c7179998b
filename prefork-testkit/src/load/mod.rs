//! The load generator behind `prefork-load` and `prefork-bench`.
//!
//! Each thread runs its own epoll loop (mio) over non-blocking connections:
//! connect, write the request, read the response, close (or keep alive),
//! and start the next. Closed loop: each of `-c` connections sends its next
//! request as soon as the previous one is answered. Open loop (`--rate`):
//! requests are due on a fixed schedule and latency is counted from the
//! time a request was *due*, not from when a free connection sent it, so a
//! stalled server shows as latency instead of hiding as a lower request
//! rate (coordinated omission corrected, as wrk2 does).

//!
//! Split by concern: [`config`] (what a run does), [`report`] (what it
//! found), and the engine that runs it ([`run`]).

pub mod config;
mod engine;
pub mod report;

pub use config::{LoadConfig, Protocol, Target};
pub use engine::{run, Progress};
pub use report::{fairness, ErrorCounts, LoadReport, Outcome, OutcomeRecord, Percentiles, Summary};
