//! The scoreboard: how workers tell the master busy and idle.
//!
//! One cache-line cell per worker *process* (not per slot: during a reload
//! or a recycle two processes share a slot) in a shared anonymous mapping
//! made before the first fork. A transition is one atomic store of a word
//! packing the state and its monotonic timestamp, then a counter bump: no
//! syscall, never blocking, nothing queued for a stopped master to read
//! late. The master reads every live worker's cell on each turn.
//!
//! The per-worker status pipe can carry the same reports (`ReportMode::Pipe`);
//! docs/status.md says why the scoreboard is the default.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::MonoTime;
use crate::sys::SharedMap;

/// Types that are valid when all-zero and only touched through atomics,
/// so they may live in a mapping shared between processes.
///
/// # Safety
/// Implementors must be valid for the all-zero bit pattern and be `Sync`.
pub unsafe trait ZeroValidAtomic: Sync {}

/// What a worker does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Booting (nothing reported yet).
    Booting,
    /// Waiting for a connection since `since`.
    Idle {
        /// When it became idle.
        since: MonoTime,
    },
    /// Serving a connection since `since`.
    Busy {
        /// When it took the connection.
        since: MonoTime,
    },
}

const STATE_SHIFT: u32 = 62;
const TIME_MASK: u64 = (1 << STATE_SHIFT) - 1;
const IDLE: u64 = 1;
const BUSY: u64 = 2;

/// One worker process's cell.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Cell {
    /// state << 62 | monotonic nanoseconds.
    word: AtomicU64,
    /// Connections served.
    requests: AtomicU64,
}

// SAFETY: Cell holds only atomics, for which all-zero is a valid value.
unsafe impl ZeroValidAtomic for Cell {}
// SAFETY: an atomic integer is valid when all-zero and is Sync.
unsafe impl ZeroValidAtomic for AtomicU64 {}

impl Cell {
    /// The worker took a connection.
    #[inline]
    pub fn busy(&self, now: MonoTime) {
        self.word.store(
            BUSY << STATE_SHIFT | (now.as_nanos() & TIME_MASK),
            Ordering::Release,
        );
    }

    /// The worker is done with it.
    #[inline]
    pub fn idle(&self, now: MonoTime) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.word.store(
            IDLE << STATE_SHIFT | (now.as_nanos() & TIME_MASK),
            Ordering::Release,
        );
    }

    /// Booted and waiting.
    pub fn ready(&self, now: MonoTime) {
        self.word.store(
            IDLE << STATE_SHIFT | (now.as_nanos() & TIME_MASK),
            Ordering::Release,
        );
    }

    /// The state as last stored.
    pub fn state(&self) -> WorkerState {
        let w = self.word.load(Ordering::Acquire);
        let since = MonoTime::from_nanos(w & TIME_MASK);
        match w >> STATE_SHIFT {
            IDLE => WorkerState::Idle { since },
            BUSY => WorkerState::Busy { since },
            _ => WorkerState::Booting,
        }
    }

    /// Connections served.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn reset(&self) {
        self.word.store(0, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
    }
}

/// The master's scoreboard: cells and which are free.
#[derive(Debug)]
pub struct Scoreboard {
    map: SharedMap,
    free: Vec<usize>,
}

impl Scoreboard {
    /// Room for `cells` worker processes alive at once.
    pub fn new(cells: usize) -> std::io::Result<Scoreboard> {
        let map = SharedMap::new(cells * std::mem::size_of::<Cell>())?;
        Ok(Scoreboard {
            map,
            free: (0..cells).rev().collect(),
        })
    }

    /// Takes a free cell for a new worker, reset.
    pub fn allocate(&mut self) -> Option<usize> {
        let i = self.free.pop()?;
        self.cells()[i].reset();
        Some(i)
    }

    /// Returns a reaped worker's cell.
    pub fn release(&mut self, i: usize) {
        if !self.free.contains(&i) {
            self.free.push(i);
        }
    }

    /// Every cell.
    pub fn cells(&self) -> &[Cell] {
        self.map.as_slice_of::<Cell>()
    }

    /// One cell.
    pub fn cell(&self, i: usize) -> Option<&Cell> {
        self.cells().get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_round_trip_and_cells_are_reused_clean() {
        let mut sb = Scoreboard::new(8).expect("map");
        let i = sb.allocate().expect("cell");
        assert_eq!(sb.cells()[i].state(), WorkerState::Booting);
        let t = MonoTime::from_nanos(123_456_789);
        // (Sharing across fork is exercised by the binary's status tests.)
        sb.cells()[i].busy(t);
        assert_eq!(sb.cells()[i].state(), WorkerState::Busy { since: t });
        sb.cells()[i].idle(t);
        assert_eq!(sb.cells()[i].requests(), 1);
        assert_eq!(sb.cells()[i].state(), WorkerState::Idle { since: t });
        sb.release(i);
        let j = sb.allocate().expect("again");
        assert_eq!(j, i);
        assert_eq!(sb.cells()[j].requests(), 0, "a reused cell starts clean");
        assert_eq!(std::mem::size_of::<Cell>(), 64);
    }
}
