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
pub mod procs;
pub mod server;
pub mod slow;
pub mod step;

pub use client::{http_get, read_line_from, HttpReply};
pub use procs::{
    children_at_once, children_of, is_sleeping_in_nanosleep, process_alive, zombie_children,
};
pub use server::{wait_until, Server, ServerBuilder};
