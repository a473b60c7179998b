//! The worker → master status channel: one pipe per worker process.
//!
//! Messages are 16 bytes (kind, slot, monotonic timestamp), written with one
//! non-blocking write(2): below PIPE_BUF, so a message arrives whole or not
//! at all, and a full pipe or a gone master never stalls the worker.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::OFlag;

use crate::clock::MonoTime;

/// Size of one message.
pub const MESSAGE_LEN: usize = 16;

/// What a worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// Booted: app and acceptor initialised, accepting from now on.
    Ready,
    /// Took a connection.
    Busy,
    /// Done with it.
    Idle,
    /// Done with a request; waits in place for the next one on the same
    /// connection.
    KeepAlive,
    /// The kept-alive connection ended without another request: idle.
    Released,
}

/// One report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusMessage {
    /// What happened.
    pub kind: StatusKind,
    /// The worker's slot.
    pub slot: u32,
    /// When, on the monotonic clock.
    pub at: MonoTime,
}

impl StatusMessage {
    /// Encodes to the wire form.
    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut b = [0u8; MESSAGE_LEN];
        b[0] = b'P';
        b[1] = match self.kind {
            StatusKind::Ready => 1,
            StatusKind::Busy => 2,
            StatusKind::Idle => 3,
            StatusKind::KeepAlive => 4,
            StatusKind::Released => 5,
        };
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..16].copy_from_slice(&self.at.as_nanos().to_le_bytes());
        b
    }

    /// Decodes; `None` for anything malformed (S5: garbage is rejected).
    pub fn decode(b: &[u8]) -> Option<StatusMessage> {
        if b.len() != MESSAGE_LEN || b[0] != b'P' || b[2] != 0 || b[3] != 0 {
            return None;
        }
        let kind = match b[1] {
            1 => StatusKind::Ready,
            2 => StatusKind::Busy,
            3 => StatusKind::Idle,
            4 => StatusKind::KeepAlive,
            5 => StatusKind::Released,
            _ => return None,
        };
        let slot = u32::from_le_bytes(b[4..8].try_into().ok()?);
        let at = MonoTime::from_nanos(u64::from_le_bytes(b[8..16].try_into().ok()?));
        Some(StatusMessage { kind, slot, at })
    }
}

/// Creates a channel: (master's read end, worker's write end), both
/// close-on-exec and non-blocking.
pub fn channel() -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
}

/// The worker's end.
#[derive(Debug)]
pub struct StatusWriter {
    fd: OwnedFd,
    slot: u32,
}

impl StatusWriter {
    /// Wraps the write end of [`channel`].
    pub fn new(fd: OwnedFd, slot: usize) -> StatusWriter {
        StatusWriter {
            fd,
            slot: slot as u32,
        }
    }

    /// Sends one report; never blocks, drops it if the pipe is full or the
    /// master is gone.
    pub fn send(&self, kind: StatusKind) {
        let msg = StatusMessage {
            kind,
            slot: self.slot,
            at: MonoTime::now(),
        };
        let _ = nix::unistd::write(&self.fd, &msg.encode());
    }
}

impl AsFd for StatusWriter {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether a channel can still carry messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// The worker holds its end.
    Open,
    /// EOF: the worker closed its end (it is exiting).
    Closed,
}

/// Reads every whole message available on a master's read end.
pub fn read_messages(fd: BorrowedFd<'_>, out: &mut Vec<Option<StatusMessage>>) -> ChannelState {
    let mut buf = [0u8; MESSAGE_LEN * 64];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => return ChannelState::Closed,
            Ok(n) => {
                out.extend(buf[..n].chunks(MESSAGE_LEN).map(StatusMessage::decode));
                if n < buf.len() {
                    return ChannelState::Open;
                }
            }
            Err(nix::Error::EINTR) => continue,
            Err(_) => return ChannelState::Open,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let m = StatusMessage {
            kind: StatusKind::Busy,
            slot: 7,
            at: MonoTime::from_nanos(123_456_789),
        };
        assert_eq!(StatusMessage::decode(&m.encode()), Some(m));
        assert_eq!(StatusMessage::decode(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(StatusMessage::decode(&[0u8; 3]), None);
        let mut bad = m.encode();
        bad[1] = 9;
        assert_eq!(StatusMessage::decode(&bad), None);
    }

    #[test]
    fn writer_never_blocks_on_a_full_pipe_and_reader_sees_eof() {
        let (rd, wr) = channel().expect("pipe");
        let w = StatusWriter::new(wr, 2);
        for _ in 0..100_000 {
            w.send(StatusKind::Idle); // a 64 KiB pipe fills after 4096
        }
        let mut out = Vec::new();
        assert_eq!(read_messages(rd.as_fd(), &mut out), ChannelState::Open);
        assert!(out.len() >= 4096 && out.iter().all(|m| m.is_some_and(|m| m.slot == 2)));
        drop(w);
        let mut more = Vec::new();
        assert_eq!(read_messages(rd.as_fd(), &mut more), ChannelState::Closed);
    }
}
