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
pub use crate::state::{Heartbeat, WorkerState};
use crate::sys::{CacheLine, SharedMap};

const STATE_SHIFT: u32 = 62;
const TIME_MASK: u64 = (1 << STATE_SHIFT) - 1;
const IDLE: u64 = 1;
const BUSY: u64 = 2;
const KEEPALIVE: u64 = 3;

/// Upper bounds of the request-duration histogram's buckets, µs (the last
/// bucket, beyond 10 s, has none): Prometheus's default buckets with 1 ms
/// and 2.5 ms added below.
pub const DURATION_BOUNDS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Request durations, as counted in cells: per bucket (not cumulative) and
/// the sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durations {
    /// Requests per bucket of [`DURATION_BOUNDS_US`], then beyond.
    pub buckets: [u64; 14],
    /// Sum of the durations, µs.
    pub sum_us: u64,
}

impl Durations {
    /// Adds another's counts.
    pub fn add(&mut self, other: &Durations) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    /// Requests counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// One worker process's cell: a cache line of the shared map for its state
/// (so two workers never write the same line), and two more for its
/// request-duration histogram, all in a page of its own.
#[derive(Debug, Clone, Copy)]
pub struct Cell<'a> {
    line: &'a CacheLine,
    hist: &'a [CacheLine],
}

impl Cell<'_> {
    /// state << 62 | monotonic nanoseconds.
    #[inline]
    fn word(&self) -> &AtomicU64 {
        self.line.word(0)
    }

    /// Connections served.
    #[inline]
    fn served(&self) -> &AtomicU64 {
        self.line.word(1)
    }

    /// The heartbeat: holds-nothing << 63 | monotonic nanoseconds.
    #[inline]
    fn beat_word(&self) -> &AtomicU64 {
        self.line.word(2)
    }

    /// A sign of life between connections (see [`Heartbeat`]).
    #[inline]
    pub fn beat(&self, now: MonoTime) {
        self.beat_word()
            .store(now.as_nanos() & TIME_MASK, Ordering::Release);
    }

    /// Entering a wait that holds nothing (a lock wait): silence from now
    /// on is not held against the worker, until its next [`Cell::beat`].
    #[inline]
    pub fn holds_nothing(&self, now: MonoTime) {
        self.beat_word()
            .store(1 << 63 | (now.as_nanos() & TIME_MASK), Ordering::Release);
    }

    /// The worker's own memory reading (words 3 to 6: RSS, PSS, private,
    /// shared, KiB, each stored plus one so that zero means "not yet").
    pub fn set_memory(&self, m: &crate::memory::Memory) {
        for (i, v) in [m.rss_kib, m.pss_kib, m.private_kib, m.shared_kib]
            .into_iter()
            .enumerate()
        {
            self.line.word(3 + i).store(v + 1, Ordering::Relaxed);
        }
    }

    /// The worker's last memory reading, if it made one.
    pub fn memory(&self) -> Option<crate::memory::Memory> {
        let w = |i: usize| self.line.word(i).load(Ordering::Relaxed).checked_sub(1);
        Some(crate::memory::Memory {
            rss_kib: w(3)?,
            pss_kib: w(4)?,
            private_kib: w(5)?,
            shared_kib: w(6)?,
        })
    }

    /// A request took `d` (busy to idle): two atomic adds in this
    /// worker's own lines, no syscall.
    #[inline]
    pub fn record_duration(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = DURATION_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(DURATION_BOUNDS_US.len());
        self.hist_word(i).fetch_add(1, Ordering::Relaxed);
        self.hist_word(14).fetch_add(us, Ordering::Relaxed);
    }

    fn hist_word(&self, i: usize) -> &AtomicU64 {
        self.hist[i / 8].word(i % 8)
    }

    /// The durations counted so far.
    pub fn durations(&self) -> Durations {
        let mut d = Durations::default();
        for (i, b) in d.buckets.iter_mut().enumerate() {
            *b = self.hist_word(i).load(Ordering::Relaxed);
        }
        d.sum_us = self.hist_word(14).load(Ordering::Relaxed);
        d
    }

    /// The master stops for good (not a reload): when told to stop, this
    /// worker empties the shared accept queue before it exits (word 7).
    pub fn set_final_stop(&self) {
        self.line.word(7).store(1, Ordering::Release);
    }

    /// See [`Cell::set_final_stop`].
    pub fn final_stop(&self) -> bool {
        self.line.word(7).load(Ordering::Acquire) == 1
    }

    /// The last heartbeat.
    pub fn heartbeat(&self) -> Heartbeat {
        let w = self.beat_word().load(Ordering::Acquire);
        Heartbeat {
            at: MonoTime::from_nanos(w & TIME_MASK),
            holds_nothing: w >> 63 == 1,
        }
    }

    /// The worker took a connection.
    #[inline]
    pub fn busy(&self, now: MonoTime) {
        self.word().store(
            BUSY << STATE_SHIFT | (now.as_nanos() & TIME_MASK),
            Ordering::Release,
        );
    }

    /// The worker is done with it.
    #[inline]
    pub fn idle(&self, now: MonoTime) {
        self.served().fetch_add(1, Ordering::Relaxed);
        self.word().store(
            IDLE << STATE_SHIFT | (now.as_nanos() & TIME_MASK),
            Ordering::Release,
        );
    }

    /// The worker served a request and waits in place for the next one on
    /// the same connection.
    #[inline]
    pub fn kept_alive(&self, now: MonoTime) {
        self.served().fetch_add(1, Ordering::Relaxed);
        self.word().store(
            KEEPALIVE << STATE_SHIFT | (now.as_nanos() & TIME_MASK),
            Ordering::Release,
        );
    }

    /// Booted and waiting.
    pub fn ready(&self, now: MonoTime) {
        self.word().store(
            IDLE << STATE_SHIFT | (now.as_nanos() & TIME_MASK),
            Ordering::Release,
        );
    }

    /// The state as last stored.
    pub fn state(&self) -> WorkerState {
        let w = self.word().load(Ordering::Acquire);
        let since = MonoTime::from_nanos(w & TIME_MASK);
        match w >> STATE_SHIFT {
            IDLE => WorkerState::Idle { since },
            BUSY => WorkerState::Busy { since },
            KEEPALIVE => WorkerState::KeepAlive { since },
            _ => WorkerState::Booting,
        }
    }

    /// Connections served.
    pub fn requests(&self) -> u64 {
        self.served().load(Ordering::Relaxed)
    }

    fn reset(&self) {
        self.line.clear();
        for l in self.hist {
            l.clear();
        }
    }
}

/// The master's scoreboard: cells and which are free.
///
/// Each cell has a page of its own, so that a worker can keep only its own
/// cell writable ([`Scoreboard::keep_only_writable`]): a compromised worker
/// cannot get a sibling killed as frozen by writing a false busy time into
/// its cell (RELIABILITY S8). Untouched pages cost no memory.
#[derive(Debug)]
pub struct Scoreboard {
    map: SharedMap,
    free: Vec<usize>,
    /// Cache lines from one cell to the next (a page's worth).
    stride: usize,
    cells: usize,
}

impl Scoreboard {
    /// Room for `cells` worker processes alive at once.
    pub fn new(cells: usize) -> std::io::Result<Scoreboard> {
        let page = crate::sys::page_size();
        let map = SharedMap::new(cells * page)?;
        Ok(Scoreboard {
            map,
            free: (0..cells).rev().collect(),
            stride: (page / std::mem::size_of::<CacheLine>()).max(1),
            cells,
        })
    }

    /// In a worker: every cell read-only but cell `i`, its own (in this
    /// process only; the master keeps writing cells it hands out).
    pub fn keep_only_writable(&self, i: usize) -> std::io::Result<()> {
        if i >= self.cells {
            return Err(std::io::Error::other("no such cell"));
        }
        let page = crate::sys::page_size();
        self.map.protect(0, self.cells * page, false)?;
        self.map.protect(i * page, page, true)
    }

    /// Takes a free cell for a new worker, reset.
    pub fn allocate(&mut self) -> Option<usize> {
        let i = self.free.pop()?;
        self.cell(i)?.reset();
        Some(i)
    }

    /// Returns a reaped worker's cell.
    pub fn release(&mut self, i: usize) {
        if !self.free.contains(&i) {
            self.free.push(i);
        }
    }

    /// One cell.
    pub fn cell(&self, i: usize) -> Option<Cell<'_>> {
        if i >= self.cells {
            return None;
        }
        let lines = self.map.as_slice_of::<CacheLine>();
        let at = i * self.stride;
        Some(Cell {
            line: lines.get(at)?,
            hist: lines.get(at + 1..at + 3)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_round_trip_and_cells_are_reused_clean() {
        let mut sb = Scoreboard::new(8).expect("map");
        let i = sb.allocate().expect("cell");
        let cell = |i| sb.cell(i).expect("a cell");
        assert_eq!(cell(i).state(), WorkerState::Booting);
        let t = MonoTime::from_nanos(123_456_789);
        // (Sharing across fork is exercised by the binary's status tests.)
        cell(i).busy(t);
        assert_eq!(cell(i).state(), WorkerState::Busy { since: t });
        cell(i).idle(t);
        assert_eq!(cell(i).requests(), 1);
        assert_eq!(cell(i).state(), WorkerState::Idle { since: t });
        cell(i).kept_alive(t);
        assert_eq!(cell(i).requests(), 2);
        assert_eq!(cell(i).state(), WorkerState::KeepAlive { since: t });
        assert_eq!(
            cell(i).heartbeat().at,
            MonoTime::from_nanos(0),
            "never beat"
        );
        let later = MonoTime::from_nanos(987_654_321);
        cell(i).holds_nothing(later);
        assert_eq!(
            cell(i).heartbeat(),
            Heartbeat {
                at: later,
                holds_nothing: true
            }
        );
        cell(i).beat(later);
        assert!(!cell(i).heartbeat().holds_nothing);
        assert_eq!(cell(i).memory(), None, "no reading yet");
        let m = crate::memory::Memory {
            rss_kib: 0,
            pss_kib: 7,
            private_kib: 3,
            shared_kib: 4,
        };
        cell(i).set_memory(&m);
        assert_eq!(cell(i).memory(), Some(m), "zero is a value, not 'unknown'");
        cell(i).record_duration(std::time::Duration::from_micros(800));
        cell(i).record_duration(std::time::Duration::from_millis(2));
        cell(i).record_duration(std::time::Duration::from_secs(60));
        let d = cell(i).durations();
        assert_eq!((d.buckets[0], d.buckets[1], d.buckets[13]), (1, 1, 1));
        assert_eq!((d.count(), d.sum_us), (3, 800 + 2_000 + 60_000_000));
        assert_eq!(
            cell(i).state(),
            WorkerState::KeepAlive { since: t },
            "a beat leaves the state alone"
        );
        sb.release(i);
        let j = sb.allocate().expect("again");
        assert_eq!(j, i);
        assert_eq!(
            sb.cell(j).expect("a cell").requests(),
            0,
            "a reused cell starts clean"
        );
        assert_eq!(sb.cell(j).expect("a cell").durations().count(), 0);
        assert_eq!(std::mem::size_of::<CacheLine>(), 64);
    }
}
