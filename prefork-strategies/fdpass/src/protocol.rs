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

/// "Here is a request" (master → worker): `C` for TCP or `U` for Unix, the
/// index of its listener (u16), the requests served on the connection
/// before (u32), how its bytes travel (one byte: [`INLINE`] after this
/// header, or [`IN_MEMFD`], a second descriptor holding them), then the
/// bytes the master already read (the request, when it buffers requests;
/// none when it dispatches at accept). Little endian. One descriptor (the
/// connection), or two with [`IN_MEMFD`].
pub(crate) const CONN_TCP: u8 = b'C';
pub(crate) const CONN_UNIX: u8 = b'U';
/// The bytes follow the header in the message.
pub(crate) const INLINE: u8 = 0;
/// The bytes are in a memfd passed as the second descriptor.
pub(crate) const IN_MEMFD: u8 = 1;
/// The header of a request message.
pub(crate) const HEADER: usize = 8;
/// Bytes sent inside a message at most; more go in a memfd.
pub(crate) const MAX_INLINE: usize = 32 * 1024;
/// The largest message either side receives whole.
pub(crate) const MAX_MESSAGE: usize = HEADER + MAX_INLINE;
/// "I am idle" (worker → master): after boot and after each connection.
pub(crate) const IDLE: &[u8] = b"D";
/// "I could not take it" (worker → master): the descriptor could not be
/// installed in the worker (its descriptor limit, EMFILE), so the message
/// came without it; the master hands its own copy to a worker again.
pub(crate) const RETURNED: &[u8] = b"R";
/// "Keep it for me" (worker → master): a served connection the app keeps
/// alive, with its descriptor: the requests served on it (u32), its
/// listener (u16), whether it is a Unix connection (u8), then the bytes
/// already read past the last request (a pipelined request). It also says
/// the worker is idle.
pub(crate) const KEPT: u8 = b'K';

/// The header of a request message: what a worker needs to know besides
/// the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestHeader {
    pub unix: bool,
    pub listener: u16,
    pub requests: u32,
    pub in_memfd: bool,
}

impl RequestHeader {
    pub(crate) fn encode(&self) -> [u8; HEADER] {
        let [l0, l1] = self.listener.to_le_bytes();
        let [r0, r1, r2, r3] = self.requests.to_le_bytes();
        [
            if self.unix { CONN_UNIX } else { CONN_TCP },
            l0,
            l1,
            r0,
            r1,
            r2,
            r3,
            if self.in_memfd { IN_MEMFD } else { INLINE },
        ]
    }

    /// Reads a header from the start of a message; `None` if it is not one.
    pub(crate) fn decode(data: &[u8]) -> Option<RequestHeader> {
        match *data.get(..HEADER)? {
            [k @ (CONN_TCP | CONN_UNIX), l0, l1, r0, r1, r2, r3, how @ (INLINE | IN_MEMFD)] => {
                Some(RequestHeader {
                    unix: k == CONN_UNIX,
                    listener: u16::from_le_bytes([l0, l1]),
                    requests: u32::from_le_bytes([r0, r1, r2, r3]),
                    in_memfd: how == IN_MEMFD,
                })
            }
            _ => None,
        }
    }
}

/// What a `K` message says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Kept<'a> {
    pub requests: u32,
    pub listener: u16,
    pub unix: bool,
    pub ahead: &'a [u8],
}

impl Kept<'_> {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(8 + self.ahead.len());
        m.push(KEPT);
        m.extend_from_slice(&self.requests.to_le_bytes());
        m.extend_from_slice(&self.listener.to_le_bytes());
        m.push(u8::from(self.unix));
        m.extend_from_slice(self.ahead);
        m
    }
}

/// Reads a `K` message.
pub(crate) fn parse_kept(data: &[u8]) -> Option<Kept<'_>> {
    match data {
        [KEPT, r0, r1, r2, r3, l0, l1, u @ (0 | 1), ahead @ ..] => Some(Kept {
            requests: u32::from_le_bytes([*r0, *r1, *r2, *r3]),
            listener: u16::from_le_bytes([*l0, *l1]),
            unix: *u == 1,
            ahead,
        }),
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
    fn request_headers_round_trip_and_junk_is_no_request() {
        let h = RequestHeader {
            unix: true,
            listener: 513,
            requests: 7,
            in_memfd: false,
        };
        assert_eq!(RequestHeader::decode(&h.encode()), Some(h));
        let m = RequestHeader {
            unix: false,
            listener: 0,
            requests: 0,
            in_memfd: true,
        };
        assert_eq!(RequestHeader::decode(&m.encode()), Some(m));
        assert_eq!(RequestHeader::decode(b"junk"), None);
        assert_eq!(
            RequestHeader::decode(b"C\0\0\0\0\0\0\x09"),
            None,
            "an unknown way"
        );
        assert_eq!(RequestHeader::decode(IDLE), None);
    }

    #[test]
    fn kept_messages_round_trip() {
        let k = Kept {
            requests: 3,
            listener: 2,
            unix: true,
            ahead: b"GET / HTTP/1.1\r\n\r\n",
        };
        assert_eq!(parse_kept(&k.encode()), Some(k));
        assert_eq!(parse_kept(b"K\x01"), None);
        assert_eq!(parse_kept(b"K\0\0\0\0\0\0\x07"), None, "not a kind");
    }
}
