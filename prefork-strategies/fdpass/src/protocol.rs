//! The channel protocol between the fdpass master and a worker: the
//! message bytes, and a typed view of the counters they share.
//!
//! Each worker has a `SOCK_SEQPACKET` socketpair with the master. The master
//! sends a connection as one message with one descriptor; the worker sends
//! one-byte reports. Beside the channel, a shared map holds per worker how
//! many connections it took and finished, and one flag saying whether the
//! master waits for an idle worker (see [`Receipts`]).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use prefork_core::sys::SharedMap;

/// "Here is a connection" (master → worker), with one descriptor: `C` for
/// TCP or `U` for Unix, then the index of its listener (u16, little
/// endian), so the worker needs no syscall to learn either.
pub(crate) const CONN_TCP: u8 = b'C';
pub(crate) const CONN_UNIX: u8 = b'U';
/// "I am idle" (worker → master): after boot and after each connection.
pub(crate) const IDLE: &[u8] = b"D";
/// "I could not take it" (worker → master): the descriptor could not be
/// installed in the worker (its descriptor limit, EMFILE), so the message
/// came without it; the master hands its own copy to a worker again.
pub(crate) const RETURNED: &[u8] = b"R";

/// The payload that announces a connection from listener `listener`.
pub(crate) fn connection_message(listener: u16, unix: bool) -> [u8; 3] {
    let [lo, hi] = listener.to_le_bytes();
    [if unix { CONN_UNIX } else { CONN_TCP }, lo, hi]
}

/// Reads a connection announcement: (is it a Unix connection, its listener).
pub(crate) fn parse_connection(data: &[u8]) -> Option<(bool, u16)> {
    match *data {
        [k @ (CONN_TCP | CONN_UNIX), lo, hi] => {
            Some((k == CONN_UNIX, u16::from_le_bytes([lo, hi])))
        }
        _ => None,
    }
}

/// Counter cells: one per channel alive at once (a full pool, its
/// replacements during a reload, and those still stopping).
pub(crate) const CELLS: usize = 4 * prefork_core::supervisor::MAX_WORKERS;

/// The layout of the shared map, as u64 atomics: per cell, connections the
/// worker counted as received (`RECEIVED + cell`) and connections it
/// finished (`FINISHED + cell`); then one flag, set while the master waits
/// for an idle worker.
const RECEIVED: usize = 0;
const FINISHED: usize = CELLS;
const WAITING: usize = 2 * CELLS;
const MAP_WORDS: usize = 2 * CELLS + 1;

/// The counters the master and its workers share, by name. All accesses
/// are sequentially consistent: the waiting flag and the idle counters are
/// read and written in an order that must not be reordered (see
/// `Fdpass::set_waiting`).
#[derive(Debug)]
pub(crate) struct Receipts {
    map: SharedMap,
}

impl Receipts {
    /// A zeroed map, made in the master before the first fork.
    pub(crate) fn new() -> io::Result<Receipts> {
        Ok(Receipts {
            map: SharedMap::new(MAP_WORDS * std::mem::size_of::<AtomicU64>())?,
        })
    }

    fn word(&self, i: usize) -> Option<&AtomicU64> {
        self.map.as_slice_of::<AtomicU64>().get(i)
    }

    fn load(&self, i: usize) -> u64 {
        self.word(i).map_or(0, |w| w.load(Ordering::SeqCst))
    }

    fn add_one(&self, i: usize) {
        if let Some(w) = self.word(i) {
            w.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Connections the worker of `cell` counted as received.
    pub(crate) fn received(&self, cell: usize) -> u64 {
        self.load(RECEIVED + cell)
    }

    /// Connections the worker of `cell` finished.
    pub(crate) fn finished(&self, cell: usize) -> u64 {
        self.load(FINISHED + cell)
    }

    /// The worker of `cell` took a connection (before reading a byte of it).
    pub(crate) fn count_received(&self, cell: usize) {
        self.add_one(RECEIVED + cell);
    }

    /// The worker of `cell` finished a connection.
    pub(crate) fn count_finished(&self, cell: usize) {
        self.add_one(FINISHED + cell);
    }

    /// `cell` starts over for a new worker.
    pub(crate) fn reset(&self, cell: usize) {
        for i in [RECEIVED + cell, FINISHED + cell] {
            if let Some(w) = self.word(i) {
                w.store(0, Ordering::SeqCst);
            }
        }
    }

    /// Raises or lowers the flag "the master waits for an idle worker".
    pub(crate) fn set_waiting(&self, on: bool) {
        if let Some(w) = self.word(WAITING) {
            w.store(u64::from(on), Ordering::SeqCst);
        }
    }

    /// Whether the master waits for an idle worker.
    pub(crate) fn waiting(&self) -> bool {
        self.load(WAITING) != 0
    }

    /// Sets what the worker of `cell` counted as received, as a forked
    /// worker would (tests drive both sides in one process).
    #[cfg(test)]
    pub(crate) fn set_received(&self, cell: usize, n: u64) {
        if let Some(w) = self.word(RECEIVED + cell) {
            w.store(n, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_messages_round_trip_and_junk_is_no_connection() {
        assert_eq!(
            parse_connection(&connection_message(513, true)),
            Some((true, 513))
        );
        assert_eq!(
            parse_connection(&connection_message(0, false)),
            Some((false, 0))
        );
        assert_eq!(parse_connection(b"junk"), None);
        assert_eq!(parse_connection(IDLE), None);
    }
}
