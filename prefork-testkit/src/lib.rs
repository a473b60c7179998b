//! # prefork-testkit
//!
//! Helpers for tests that run the real `prefork` binary: start it, read its
//! ready line, wait on conditions with a deadline, find its workers in
//! /proc, talk to it, and stop it (and every worker) by pid.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bench;
pub mod client;
pub mod faults;
pub mod idle;
pub mod load;
pub mod memory;
pub mod procs;
pub mod server;
pub mod slow;
pub mod soak;
pub mod step;

pub use client::{http_get, read_line_from, HttpReply};
pub use procs::{
    children_at_once, children_of, is_sleeping_in_nanosleep, process_alive, zombie_children,
};
pub use server::{wait_until, Server, ServerBuilder};

/// A test that cannot run on this machine (not root, a missing tool) says
/// so where CI's log shows it: cargo hides a passing test's output, so the
/// line also goes to the file `PREFORK_SKIP_LOG` names, which
/// scripts/test.sh prints at the end of the run.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let line = format!("SKIPPED: {test}: {why}");
    println!("{line}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("PREFORK_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
