//! Slow clients (slowloris): connections that send a request line, then one
//! header line a second, and never finish. A server that gives each
//! connection a worker is stopped cold by as many of them as it has
//! workers; one that buffers requests in front of its workers is not.
//!
//! One thread runs them all. A client the server cuts (at its header
//! deadline) connects again, so the pressure holds for the whole run.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What the slow clients did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SlowReport {
    /// Connections made (the first ones, and again after each cut).
    pub connects: u64,
    /// Times the server closed a slow client (its header deadline).
    pub cut: u64,
    /// Header lines sent.
    pub lines: u64,
}

/// Slow clients running in a thread of their own until stopped.
#[derive(Debug)]
pub struct SlowClients {
    stop: Arc<AtomicBool>,
    connects: Arc<AtomicU64>,
    thread: Option<JoinHandle<SlowReport>>,
}

impl SlowClients {
    /// Starts `n` slow clients against `addr`, a header line every `every`.
    /// Returns once all have connected (or failed to, counted nowhere).
    pub fn start(addr: SocketAddr, n: usize, every: Duration) -> SlowClients {
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            let connects = Arc::clone(&connects);
            std::thread::spawn(move || run(addr, n, every, &stop, &connects, ready_tx))
        };
        let _ = ready_rx.recv_timeout(Duration::from_secs(30));
        SlowClients {
            stop,
            connects,
            thread: Some(thread),
        }
    }

    /// Connections made so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Stops them (their connections close) and says what they did.
    pub fn stop(mut self) -> SlowReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for SlowClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open(addr: SocketAddr, connects: &AtomicU64) -> Option<TcpStream> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    c.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    c.set_nonblocking(true).ok()?;
    connects.fetch_add(1, Ordering::Relaxed);
    c.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n").ok()?;
    Some(c)
}

fn run(
    addr: SocketAddr,
    n: usize,
    every: Duration,
    stop: &AtomicBool,
    connects: &AtomicU64,
    ready: std::sync::mpsc::Sender<()>,
) -> SlowReport {
    let mut report = SlowReport::default();
    let mut clients: Vec<Option<TcpStream>> = (0..n).map(|_| open(addr, connects)).collect();
    let _ = ready.send(());
    let mut last = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if last.elapsed() < every {
            continue;
        }
        last = std::time::Instant::now();
        for c in &mut clients {
            let alive = c
                .as_mut()
                .is_some_and(|s| !closed(s) && s.write_all(b"X-Slow: 1\r\n").is_ok());
            if alive {
                report.lines += 1;
            } else {
                if c.is_some() {
                    report.cut += 1;
                }
                *c = open(addr, connects);
            }
        }
    }
    report.connects = connects.load(Ordering::Relaxed);
    report
}

/// Whether the server closed the non-blocking `s` (it may have sent a
/// response first, which is read and dropped).
fn closed(s: &mut TcpStream) -> bool {
    let mut probe = [0u8; 512];
    loop {
        match std::io::Read::read(s, &mut probe) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}
