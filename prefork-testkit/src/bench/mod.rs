//! The comparison harness behind `prefork-bench`: start each server, put
//! the same load on it, read what it cost from /proc, stop it by pid.
//!
//! Split by concern: [`run`] (start, load, measure, stop), [`stats`]
//! (medians and same-round ratios) and [`render`] (markdown and SVG).

pub mod render;
pub mod run;
pub mod stats;
#[cfg(test)]
mod tests;

pub use render::{markdown, side_by_side, svg};
pub(crate) use render::{svg_legend, COLORS};
pub use run::{
    build_c_anchor, free_port, pss_kib, run_one, BenchLoad, RunResult, Scenario, ServerSpec,
};
pub use stats::{aggregate, lowest_p99, paired, Aggregate};
