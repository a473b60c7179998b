//! The engine: one mio (epoll) loop per thread over non-blocking
//! connections, paced by a timerfd in open loop.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::config::{LoadConfig, Protocol, Target};
use super::report::{LoadReport, Outcome, OutcomeRecord};

/// Live counters, readable while a run goes on (the progress line).
#[derive(Debug, Default)]
pub struct Progress {
    /// Successful requests so far.
    pub ok: AtomicU64,
    /// Failed requests so far.
    pub failed: AtomicU64,
    /// Set to stop issuing requests early.
    pub stop: AtomicBool,
}

/// Runs the load; blocks until every thread is done.
pub fn run(cfg: &LoadConfig, progress: &Arc<Progress>) -> io::Result<LoadReport> {
    if cfg.targets.is_empty() {
        return Err(io::Error::other("no target"));
    }
    if cfg.duration.is_none() && cfg.requests.is_none() {
        return Err(io::Error::other(
            "give --duration or --requests (a run must be bounded)",
        ));
    }
    let threads = cfg.threads.clamp(1, cfg.concurrency.max(1));
    let issued = Arc::new(AtomicU64::new(0));
    // The clock starts once every thread is set up (its connection buffers
    // faulted in, its poll and timer made): the first requests are due at
    // the start, and the setup is not theirs to pay. Counted from before
    // it, the first milliseconds of every open-loop run were as slow as the
    // setup, and so was the largest fast latency of a run (the `mixed` p99).
    let setup_began = Instant::now();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let mut go = Vec::with_capacity(threads);
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let cfg = cfg.clone();
            let issued = Arc::clone(&issued);
            let progress = Arc::clone(progress);
            let ready = ready_tx.clone();
            let (start_tx, start_rx) = mpsc::channel::<Instant>();
            go.push(start_tx);
            // Spread connections and rate over threads.
            let conns = cfg.concurrency / threads + usize::from(i < cfg.concurrency % threads);
            std::thread::spawn(move || {
                let built = Worker::new(&cfg, i, conns, threads, issued, progress);
                let _ = ready.send(());
                let mut w = built?;
                let start = start_rx
                    .recv()
                    .map_err(|_| io::Error::other("the run was abandoned before it began"))?;
                w.start_at(start);
                w.run()
            })
        })
        .collect();
    drop(ready_tx);
    // A thread that failed to set up still says so (then returns its error).
    for _ in 0..threads {
        if ready_rx.recv().is_err() {
            break;
        }
    }
    let start = Instant::now();
    let setup = start.saturating_duration_since(setup_began);
    for g in &go {
        let _ = g.send(start);
    }
    let mut report = LoadReport::empty();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(part)) => report.merge(part),
            Ok(Err(e)) => first_err = Some(e),
            Err(_) => first_err = Some(io::Error::other("a generator thread panicked")),
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    report.outcomes.sort_by_key(|o| o.at_us);
    report.setup = setup;
    Ok(report)
}

/// A zeroed buffer with every page already touched, so that the page faults
/// happen during setup and not on a connection's first answer. (A fresh
/// zeroed allocation is usually untouched memory; the stores go through
/// `black_box` so that they are not elided as storing what is already
/// there.)
fn faulted_in(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for b in buf.iter_mut().step_by(4096) {
        *b = std::hint::black_box(0);
    }
    buf
}

enum Stream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Stream::Tcp(s) => s.take_error(),
            Stream::Unix(s) => s.take_error(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Connecting,
    Writing,
    Reading,
}

struct Conn {
    stream: Option<Stream>,
    state: State,
    buf: Vec<u8>,
    len: usize,
    written: usize,
    /// When the request was due (open loop) or sent (closed loop).
    started: Instant,
    deadline: Instant,
    slow: bool,
}

/// The open-loop timer's token (connections use their index).
const TIMER: Token = Token(usize::MAX);

struct Worker<'a> {
    cfg: &'a LoadConfig,
    poll: Poll,
    conns: Vec<Conn>,
    req_fast: Vec<u8>,
    req_slow: Vec<u8>,
    start: Instant,
    end: Option<Instant>,
    /// Open loop: when the next request is due, and the spacing.
    next_due: Option<Instant>,
    interval: Duration,
    /// Open loop: wakes the thread when the next request is due, to the
    /// microsecond (epoll's own timeout is whole milliseconds, rounded up,
    /// which would send each request up to 1 ms late and count that
    /// lateness as the server's latency); and the due time it is set for.
    timer: Option<TimerFd>,
    armed: Option<Instant>,
    issued: Arc<AtomicU64>,
    progress: Arc<Progress>,
    /// This thread's index, and how many there are (its schedule's offset).
    index: usize,
    threads: usize,
    next_target: usize,
    slow_every: u64,
    count: u64,
    report: LoadReport,
    last_done: Instant,
}

impl<'a> Worker<'a> {
    fn new(
        cfg: &'a LoadConfig,
        index: usize,
        conns: usize,
        threads: usize,
        issued: Arc<AtomicU64>,
        progress: Arc<Progress>,
    ) -> io::Result<Worker<'a>> {
        // Placeholder until `start_at`.
        let start = Instant::now();
        // The line protocol's server speaks first: nothing to send (bytes it
        // never reads would turn its close into a reset).
        let request = |path: &str| match cfg.protocol {
            Protocol::Line => Vec::new(),
            Protocol::Http => {
                let conn = if cfg.keepalive { "keep-alive" } else { "close" };
                format!("GET {path} HTTP/1.1\r\nHost: prefork\r\nConnection: {conn}\r\n\r\n")
                    .into_bytes()
            }
        };
        let interval = cfg
            .rate
            .map(|r| Duration::from_secs_f64(threads as f64 / r.max(1e-3)))
            .unwrap_or_default();
        let slow_every = match &cfg.slow {
            Some((_, f)) if *f > 0.0 => (1.0 / f).round().max(1.0) as u64,
            _ => 0,
        };
        let poll = Poll::new()?;
        let timer = match cfg.rate {
            Some(_) => {
                let t = TimerFd::new(
                    ClockId::CLOCK_MONOTONIC,
                    TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
                )?;
                poll.registry().register(
                    &mut SourceFd(&t.as_fd().as_raw_fd()),
                    TIMER,
                    Interest::READABLE,
                )?;
                Some(t)
            }
            None => None,
        };
        Ok(Worker {
            cfg,
            poll,
            timer,
            armed: None,
            conns: (0..conns.max(1))
                .map(|_| Conn {
                    stream: None,
                    state: State::Free,
                    buf: faulted_in(16 * 1024),
                    len: 0,
                    written: 0,
                    started: start,
                    deadline: start,
                    slow: false,
                })
                .collect(),
            req_fast: request(&cfg.path),
            req_slow: cfg
                .slow
                .as_ref()
                .map(|(p, _)| request(p))
                .unwrap_or_default(),
            start,
            end: cfg.duration.map(|d| start + d),
            next_due: None,
            interval,
            issued,
            progress,
            index,
            threads,
            next_target: index,
            slow_every,
            count: index as u64,
            report: LoadReport::empty(),
            last_done: start,
        })
    }

    /// The clock starts: the first request is due now (open loop: plus this
    /// thread's offset, so threads do not send in lockstep), and the run
    /// ends `duration` from now.
    fn start_at(&mut self, start: Instant) {
        self.start = start;
        self.last_done = start;
        self.end = self.cfg.duration.map(|d| start + d);
        self.next_due = self.cfg.rate.map(|_| {
            start
                + self
                    .interval
                    .mul_f64(self.index as f64 / self.threads as f64)
        });
    }

    /// Sets the timer to fire `wait` from now, for the request due at `due`
    /// (once per due time; a zero wait needs no timer).
    fn arm(&mut self, due: Instant, wait: Duration) -> io::Result<()> {
        let Some(t) = &self.timer else {
            return Ok(());
        };
        if wait.is_zero() || self.armed == Some(due) {
            return Ok(());
        }
        t.set(
            Expiration::OneShot(TimeSpec::from_duration(wait)),
            TimerSetTimeFlags::empty(),
        )?;
        self.armed = Some(due);
        Ok(())
    }

    /// The timer fired: read it (it stays readable until read).
    fn disarm(&mut self) {
        if let Some(t) = &self.timer {
            let mut buf = [0u8; 8];
            let _ = nix::unistd::read(t.as_fd(), &mut buf);
        }
        self.armed = None;
    }

    fn may_issue(&self, now: Instant) -> bool {
        if self.progress.stop.load(Ordering::Relaxed) {
            return false;
        }
        if self.end.is_some_and(|e| now >= e) {
            return false;
        }
        match self.cfg.requests {
            Some(n) => self.issued.load(Ordering::Relaxed) < n,
            None => true,
        }
    }

    fn run(mut self) -> io::Result<LoadReport> {
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        loop {
            let now = Instant::now();
            let issuing = self.may_issue(now);
            if issuing {
                self.start_free(now)?;
            }
            let in_flight = self.conns.iter().any(|c| c.state != State::Free);
            if !issuing && !in_flight {
                break;
            }
            // Sleep until an event, the next due request, or a deadline. In
            // closed loop a request can finish inside `start_free` (loopback
            // answers before we poll): a free slot then means "go again",
            // not "sleep".
            let mut timeout = Duration::from_millis(50);
            if issuing
                && self.next_due.is_none()
                && self.conns.iter().any(|c| c.state == State::Free)
            {
                timeout = Duration::ZERO;
            }
            if let (true, Some(due)) = (issuing, self.next_due) {
                if self.conns.iter().any(|c| c.state == State::Free) {
                    let wait = due.saturating_duration_since(now);
                    self.arm(due, wait)?;
                    // The timer wakes the thread on time; this is a fallback.
                    timeout = timeout.min(wait + Duration::from_millis(1));
                }
            }
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                if ev.token() == TIMER {
                    self.disarm();
                    continue;
                }
                let i = ev.token().0;
                self.drive(i)?;
            }
            let now = Instant::now();
            if now.duration_since(last_sweep) >= Duration::from_millis(10) {
                last_sweep = now;
                for i in 0..self.conns.len() {
                    let c = &self.conns[i];
                    if c.state != State::Free && now >= c.deadline {
                        self.finish(i, Outcome::Timeout)?;
                    }
                }
            }
        }
        self.report.elapsed = self.last_done.saturating_duration_since(self.start);
        Ok(self.report)
    }

    /// Starts requests on free connections (closed loop: all of them; open
    /// loop: those whose request is due).
    fn start_free(&mut self, now: Instant) -> io::Result<()> {
        for i in 0..self.conns.len() {
            if self.conns[i].state != State::Free {
                continue;
            }
            let started = match self.next_due {
                Some(due) if due > now => return Ok(()),
                Some(due) => {
                    self.next_due = Some(due + self.interval);
                    due
                }
                None => now,
            };
            if !self.may_issue(now) {
                return Ok(());
            }
            self.issued.fetch_add(1, Ordering::Relaxed);
            self.begin(i, started)?;
        }
        Ok(())
    }

    fn begin(&mut self, i: usize, started: Instant) -> io::Result<()> {
        self.count += 1;
        let slow = self.slow_every > 0 && self.count % self.slow_every == 0;
        let c = &mut self.conns[i];
        c.started = started;
        c.deadline = Instant::now() + self.cfg.timeout;
        c.slow = slow;
        c.len = 0;
        c.written = 0;
        if c.stream.is_some() {
            c.state = State::Writing; // kept alive
            return self.drive(i);
        }
        let target = &self.cfg.targets[self.next_target % self.cfg.targets.len()];
        self.next_target += 1;
        let stream = match target {
            Target::Tcp(a) => mio::net::TcpStream::connect(*a).map(Stream::Tcp),
            Target::Unix(p) => mio::net::UnixStream::connect(p).map(Stream::Unix),
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => return self.finish(i, classify(&e)),
        };
        self.report.connections += 1;
        self.poll.registry().register(
            stream.source(),
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let c = &mut self.conns[i];
        c.stream = Some(stream);
        c.state = State::Connecting;
        // On loopback the handshake has usually completed inside connect():
        // try to write at once instead of waiting a poll round for WRITABLE.
        self.drive(i)
    }

    /// Advances connection `i` as far as it can go without blocking.
    fn drive(&mut self, i: usize) -> io::Result<()> {
        loop {
            let state = self.conns[i].state;
            match state {
                State::Free => return Ok(()),
                State::Connecting => {
                    let c = &mut self.conns[i];
                    let Some(s) = c.stream.as_mut() else {
                        return Ok(());
                    };
                    if let Ok(Some(e)) | Err(e) = s.take_error() {
                        return self.finish(i, classify(&e));
                    }
                    c.state = State::Writing;
                }
                State::Writing => {
                    let c = &mut self.conns[i];
                    let req = if c.slow {
                        &self.req_slow
                    } else {
                        &self.req_fast
                    };
                    if c.written == req.len() {
                        c.state = State::Reading; // nothing (more) to send
                        continue;
                    }
                    let Some(s) = c.stream.as_mut() else {
                        return Ok(());
                    };
                    match s.write(&req[c.written..]) {
                        Ok(n) => {
                            c.written += n;
                            if c.written == req.len() {
                                c.state = State::Reading;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == ErrorKind::NotConnected => {
                            c.state = State::Connecting; // handshake not done yet
                            return Ok(());
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return self.finish(i, classify(&e)),
                    }
                }
                State::Reading => {
                    let c = &mut self.conns[i];
                    let Some(s) = c.stream.as_mut() else {
                        return Ok(());
                    };
                    if c.len == c.buf.len() {
                        c.buf.resize(c.buf.len() * 2, 0);
                    }
                    match s.read(&mut c.buf[c.len..]) {
                        Ok(0) => {
                            let verdict = self.parse(i, true);
                            return self.finish_parsed(i, verdict);
                        }
                        Ok(n) => {
                            self.conns[i].len += n;
                            if self.cfg.protocol == Protocol::Http {
                                let verdict = self.parse(i, false);
                                if !matches!(verdict, Parsed::Incomplete) {
                                    return self.finish_parsed(i, verdict);
                                }
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return self.finish(i, classify(&e)),
                    }
                }
            }
        }
    }

    fn parse(&self, i: usize, eof: bool) -> Parsed {
        let c = &self.conns[i];
        let data = &c.buf[..c.len];
        match self.cfg.protocol {
            Protocol::Line => {
                if !eof {
                    return Parsed::Incomplete;
                }
                if data.is_empty() {
                    return Parsed::Bad(Outcome::Reset);
                }
                Parsed::Done {
                    worker: find_after(data, b"worker=").or_else(|| find_after(data, b"worker ")),
                    keep: false,
                }
            }
            Protocol::Http => {
                let mut headers = [httparse::EMPTY_HEADER; 24];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(data) {
                    Ok(httparse::Status::Complete(head)) => {
                        let mut length = None;
                        let mut worker = None;
                        let mut keep = self.cfg.keepalive;
                        for h in resp.headers.iter() {
                            if h.name.eq_ignore_ascii_case("content-length") {
                                length = std::str::from_utf8(h.value)
                                    .ok()
                                    .and_then(|v| v.trim().parse::<usize>().ok());
                            } else if h.name.eq_ignore_ascii_case("x-worker") {
                                worker = parse_u32_prefix(h.value);
                            } else if h.name.eq_ignore_ascii_case("connection") {
                                keep &= !h.value.eq_ignore_ascii_case(b"close");
                            }
                        }
                        let ok = resp.code.is_some_and(|c| (200..300).contains(&c));
                        let complete = match length {
                            Some(n) => data.len() >= head + n,
                            None => eof,
                        };
                        if !complete {
                            return if eof {
                                Parsed::Bad(Outcome::Reset)
                            } else {
                                Parsed::Incomplete
                            };
                        }
                        if !ok {
                            return Parsed::Bad(Outcome::BadResponse);
                        }
                        Parsed::Done {
                            worker,
                            keep: keep && length.is_some(),
                        }
                    }
                    Ok(httparse::Status::Partial) if eof => Parsed::Bad(if data.is_empty() {
                        Outcome::Reset
                    } else {
                        Outcome::BadResponse
                    }),
                    Ok(httparse::Status::Partial) => Parsed::Incomplete,
                    Err(_) => Parsed::Bad(Outcome::BadResponse),
                }
            }
        }
    }

    fn finish_parsed(&mut self, i: usize, verdict: Parsed) -> io::Result<()> {
        match verdict {
            Parsed::Incomplete => Ok(()),
            Parsed::Bad(o) => self.finish(i, o),
            Parsed::Done { worker, keep } => {
                if let Some(w) = worker {
                    *self.report.per_worker.entry(w).or_insert(0) += 1;
                }
                if keep {
                    let now = Instant::now();
                    self.record(i, Outcome::Ok, now);
                    // Free, with the stream kept for the next request.
                    self.conns[i].state = State::Free;
                    if !self.may_issue(now) {
                        self.close(i);
                    }
                    Ok(())
                } else {
                    self.finish(i, Outcome::Ok)
                }
            }
        }
    }

    fn record(&mut self, i: usize, o: Outcome, now: Instant) {
        let c = &self.conns[i];
        let latency = now.saturating_duration_since(c.started).as_micros() as u64;
        self.last_done = now;
        if o == Outcome::Ok {
            self.report.ok += 1;
            self.progress.ok.fetch_add(1, Ordering::Relaxed);
            let _ = self.report.latency.record(latency.max(1));
            if !c.slow {
                let _ = self.report.fast_latency.record(latency.max(1));
            }
        } else {
            self.report.errors.add(o);
            self.progress.failed.fetch_add(1, Ordering::Relaxed);
        }
        if self.cfg.record_outcomes {
            self.report.outcomes.push(OutcomeRecord {
                at_us: c.started.saturating_duration_since(self.start).as_micros() as u64,
                latency_us: latency,
                outcome: o,
            });
        }
    }

    /// Records the outcome and closes the connection; the run loop starts
    /// the next request on the freed slot (no recursion: a burst of instant
    /// failures cannot grow the stack).
    fn finish(&mut self, i: usize, o: Outcome) -> io::Result<()> {
        self.record(i, o, Instant::now());
        self.close(i);
        Ok(())
    }

    fn close(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if let Some(mut s) = c.stream.take() {
            let _ = self.poll.registry().deregister(s.source());
        }
        c.state = State::Free;
    }
}

enum Parsed {
    Incomplete,
    Bad(Outcome),
    Done { worker: Option<u32>, keep: bool },
}

fn classify(e: &io::Error) -> Outcome {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED | libc::EAGAIN | libc::ENOENT) => Outcome::Refused,
        Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED) => Outcome::Reset,
        Some(libc::ETIMEDOUT) => Outcome::Timeout,
        _ => Outcome::Other,
    }
}

fn parse_u32_prefix(v: &[u8]) -> Option<u32> {
    let digits = v.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&v[..digits]).ok()?.parse().ok()
}

fn find_after(hay: &[u8], needle: &[u8]) -> Option<u32> {
    let pos = hay.windows(needle.len()).position(|w| w == needle)?;
    parse_u32_prefix(&hay[pos + needle.len()..])
}

#[cfg(test)]
mod tests;
