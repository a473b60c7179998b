//! The fdpass master and worker sides driven together in one process (no
//! fork), over real socketpairs and TCP connections.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use prefork_core::clock::MonoTime;
use prefork_core::{
    AcceptStrategy, Accepted, App, Connection, Listener, MasterIo, Next, Prepare, WorkerAcceptor,
};
use socket2::Socket;

use crate::master::Conn;
use crate::{sys, Fdpass, FdpassAcceptor};

const CONN: &[u8] = b"C\0\0\0\0\0\0\0";

fn tcp(sock: impl Into<Socket>) -> Conn {
    Conn::accepted(sock.into(), 0, false)
}

/// An app without framing: the master dispatches at accept, as plain
/// fdpass (these tests drive the dispatch itself).
struct Plain;

impl App for Plain {
    fn handle(&mut self, _conn: &mut Connection) -> std::io::Result<Next> {
        Ok(Next::Close)
    }
}

/// What the master passes to `prepare` when there is nothing to listen on.
fn no_listeners() -> Prepare<'static> {
    Prepare {
        listeners: &[],
        worker_owner: None,
        handed_over: Vec::new(),
    }
}

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

/// This process with no descriptor number left: the limit just above the
/// highest one in use, every free number below it taken. Dropping it
/// gives them back and restores the limit.
struct AtLimit {
    fillers: Vec<std::fs::File>,
    limits: (u64, u64),
}

impl AtLimit {
    fn new() -> AtLimit {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let limits = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let highest = std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .expect("some fd");
        setrlimit(Resource::RLIMIT_NOFILE, highest + 1, limits.1).expect("setrlimit");
        let mut fillers = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            fillers.push(f);
        }
        AtLimit { fillers, limits }
    }
}

impl Drop for AtLimit {
    fn drop(&mut self) {
        use nix::sys::resource::{setrlimit, Resource};
        self.fillers.clear();
        let _ = setrlimit(Resource::RLIMIT_NOFILE, self.limits.0, self.limits.1);
    }
}

/// The tests count this process's descriptors: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fds").count()
}

/// F1: extra descriptors, a wrong type, a truncated control buffer and
/// 10,000 messages: each bad one rejected, every descriptor closed, the
/// descriptor count steady; a good one is a connection, close-on-exec.
#[test]
fn f1_bad_messages_are_rejected_and_every_descriptor_closed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (master, worker) = pair();
    let mut w = FdpassAcceptor::from_channel(worker);
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    let file = std::fs::File::open("/proc/self/stat").expect("file");
    let before = open_fds();
    for round in 0..10_000 {
        let (data, fds): (&[u8], Vec<RawFd>) = match round % 5 {
            0 => (CONN, vec![b.as_raw_fd(), a.as_raw_fd()]), // two descriptors
            1 => (CONN, vec![file.as_raw_fd()]),             // not a socket
            2 => (CONN, vec![b.as_raw_fd(); 20]),            // more than fits: MSG_CTRUNC
            3 => (b"junk", vec![b.as_raw_fd()]),             // wrong payload
            _ => (CONN, vec![]),                             // no descriptor
        };
        sys::send_with_fds(master.as_fd(), data, &fds).expect("send");
        assert!(
            matches!(w.receive(true).expect("receive"), Accepted::Idle),
            "round {round}"
        );
        // Drain the worker's idle replies.
        while let Ok(Some(_)) = sys::recv_with_fds(master.as_fd(), true) {}
    }
    assert_eq!(open_fds(), before, "no descriptor leaked");
    assert_eq!(w.rejected(), 10_000);
    // A good message is a connection, close-on-exec.
    sys::send_with_fds(master.as_fd(), CONN, &[b.as_raw_fd()]).expect("send");
    match w.receive(true).expect("receive") {
        Accepted::Connection(c) => {
            let flags = nix::fcntl::fcntl(&c, nix::fcntl::FcntlArg::F_GETFD).expect("getfd");
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
        Accepted::Idle => panic!("a good message was rejected"),
    }
}

/// The message names the connection's listener and its kind: a Unix
/// connection from listener 2 arrives as one (other strategies report
/// the listener index too).
#[test]
fn the_listener_index_and_kind_travel_with_the_connection() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (master, worker) = pair();
    let mut w = FdpassAcceptor::from_channel(worker);
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let conn = Conn::accepted(Socket::from(OwnedFd::from(a)), 2, true);
    let (message, memfd) = conn.message().expect("message");
    assert!(memfd.is_none(), "no bytes: nothing in a memfd");
    sys::send_with_fds(master.as_fd(), &message, &[conn.sock.as_raw_fd()]).expect("send");
    match w.receive(true).expect("receive") {
        Accepted::Connection(c) => {
            assert_eq!(c.listener(), 2);
            assert!(matches!(c.stream(), prefork_core::Stream::Unix(_)));
        }
        Accepted::Idle => panic!("rejected"),
    }
}

/// A master side with slots 0 and 1, and the two workers' sides on
/// their channels (no fork).
fn master_with_two_workers() -> (Fdpass, FdpassAcceptor, FdpassAcceptor) {
    let mut m = Fdpass::new();
    m.prepare(no_listeners()).expect("prepare");
    let mut take = |s: usize| {
        m.prepare_slot(s).expect("slot");
        FdpassAcceptor::from_channel(
            m.slots[s]
                .as_mut()
                .and_then(|c| c.worker.take())
                .expect("end"),
        )
    };
    let (w0, w1) = (take(0), take(1));
    (m, w0, w1)
}

/// A client connects and sends `ping`; worker 0 (the only idle one)
/// is sent the connection. Returns the listener, the client and the
/// master's end of worker 0's channel.
fn ping_sent_to_worker_0(
    m: &mut Fdpass,
    w0: &mut FdpassAcceptor,
) -> (TcpListener, TcpStream, RawFd) {
    use std::io::Write;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    client.write_all(b"ping").expect("send");
    w0.init().expect("idle");
    let fd0 = m.slots[0].as_ref().expect("ch").master.as_raw_fd();
    m.ready(fd0, &Plain);
    m.dispatch(tcp(l.accept().expect("accept").0));
    (l, client, fd0)
}

#[test]
fn the_master_hands_connections_only_to_idle_workers_round_robin() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut m, mut w0, mut w1) = master_with_two_workers();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let conn = || {
        let _c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        Socket::from(l.accept().expect("accept").0)
    };
    // Nobody idle yet: kept, not sent.
    m.dispatch(tcp(conn()));
    assert_eq!(m.pending.len(), 1);
    w0.init().expect("idle");
    w1.init().expect("idle");
    for s in 0..2 {
        let fd = m.slots[s].as_ref().expect("ch").master.as_raw_fd();
        m.ready(fd, &Plain);
    }
    assert!(
        m.pending.is_empty(),
        "the kept connection went to the first idle worker"
    );
    m.dispatch(tcp(conn()));
    assert!(matches!(
        w0.receive(true).expect("w0"),
        Accepted::Connection(_)
    ));
    assert!(matches!(
        w1.receive(true).expect("w1"),
        Accepted::Connection(_)
    ));
    // Both busy: the next one waits.
    m.dispatch(tcp(conn()));
    assert_eq!(m.pending.len(), 1);
    assert!(
        m.fds().len() == 2,
        "listeners are not polled while nobody is idle"
    );
}

/// accept(2) failing with EMFILE pauses accepting instead of spinning:
/// the listener leaves the poll set, the connection stays in the
/// kernel's backlog, and it is handed over once the pause is over.
#[test]
fn emfile_pauses_accept_and_loses_nothing() {
    use std::io::{Read, Write};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let std_l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = std_l.local_addr().expect("addr");
    let listener = Listener::from_socket(Socket::from(std_l), prefork_core::ListenAddr::Tcp(addr));
    let mut m = Fdpass::new();
    m.prepare(Prepare {
        listeners: std::slice::from_ref(&listener),
        worker_owner: None,
        handed_over: Vec::new(),
    })
    .expect("prepare");
    m.prepare_slot(0).expect("slot");
    let mut w0 = FdpassAcceptor::from_channel(
        m.slots[0]
            .as_mut()
            .and_then(|c| c.worker.take())
            .expect("end"),
    );
    w0.init().expect("idle");
    let ch = m.slots[0].as_ref().expect("ch").master.as_raw_fd();
    m.ready(ch, &Plain);
    let lfd = m.listeners[0].0.as_raw_fd();
    assert!(
        m.fds().iter().any(|f| f.as_raw_fd() == lfd),
        "an idle worker: the listener is polled"
    );
    let mut client = TcpStream::connect(addr).expect("connect");
    client.write_all(b"ping").expect("send");

    let at_limit = AtLimit::new();
    m.ready(lfd, &Plain);
    let paused = m.accept_paused();
    let polled = m.fds().iter().any(|f| f.as_raw_fd() == lfd);
    drop(at_limit);
    assert!(paused, "EMFILE paused accepting");
    assert!(!polled, "a paused listener is not polled (no spinning)");
    assert_eq!(m.passed(), 0);

    // The pause ends (at most 100 ms): the connection, still in the
    // backlog, goes to the idle worker intact.
    m.accept_paused_until = Some(MonoTime::now());
    m.ready(lfd, &Plain);
    assert_eq!(m.passed(), 1);
    let Accepted::Connection(mut c) = w0.receive(true).expect("w0") else {
        panic!("worker 0 got nothing");
    };
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).expect("the request is intact");
    assert_eq!(&buf, b"ping");
}

/// A worker killed with a connection still in its channel (it never took
/// it) loses nothing: the master hands its copy to another worker, and
/// the client is served. One that took it (counted) loses only that one.
#[test]
fn a_connection_the_dead_worker_never_took_goes_to_another_worker() {
    use std::io::{Read, Write};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut m, mut w0, mut w1) = master_with_two_workers();
    // Only worker 0 is idle: the connection is sent to it.
    let (l, mut client, fd0) = ping_sent_to_worker_0(&mut m, &mut w0);
    assert!(m.slots[0].as_ref().expect("ch").held.is_some());
    // Worker 0 dies without receiving it: its end closes.
    drop(w0);
    m.ready(fd0, &Plain);
    assert_eq!((m.rescued, m.lost), (1, 0));
    assert_eq!(m.pending.len(), 1, "kept for the next idle worker");
    w1.init().expect("idle");
    let fd1 = m.slots[1].as_ref().expect("ch").master.as_raw_fd();
    m.ready(fd1, &Plain);
    assert!(m.pending.is_empty());
    let Accepted::Connection(mut c) = w1.receive(true).expect("w1") else {
        panic!("worker 1 got nothing");
    };
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).expect("the request is intact");
    assert_eq!(&buf, b"ping");
    c.write_all(b"pong").expect("reply");
    // The worker loop calls this before closing: the master still holds
    // its copy, so without it the client would not see the end.
    w1.closing(&c);
    drop(c);
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).expect("read");
    assert_eq!(reply, b"pong");
    // A connection worker 1 counted as received is its own: if it dies
    // now, that one is lost (and not sent twice).
    let mut client2 = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    w1.done();
    m.ready(fd1, &Plain);
    m.dispatch(tcp(l.accept().expect("accept").0));
    // (This test's acceptors have no counter: count for worker 1 what a
    // forked worker counts itself, both connections it received.)
    let (cell, sent) = m.slots[1].as_ref().map(|c| (c.cell, c.sent)).expect("ch");
    assert_eq!(sent, 2);
    m.receipts.as_ref().expect("map").set_received(cell, sent);
    drop(w1);
    m.ready(fd1, &Plain);
    assert_eq!((m.rescued, m.lost), (1, 1));
    assert!(m.pending.is_empty());
    client2
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let mut rest = Vec::new();
    let _ = client2.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed, not served");
}

/// On a quiet server the master's copy of the last connection is
/// released at a turn once 100 ms old, not kept until another connection
/// comes;
/// and a slot's channel is closed as soon as its worker is gone (a slot
/// retired by TTOU may never be used again).
#[test]
fn a_quiet_master_keeps_no_copy_and_no_dead_channel() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut m, mut w0, w1) = master_with_two_workers();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let _client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    w0.init().expect("idle");
    let fd0 = m.slots[0].as_ref().expect("ch").master.as_raw_fd();
    m.ready(fd0, &Plain);
    m.dispatch(tcp(l.accept().expect("accept").0));
    assert!(m.slots[0].as_ref().expect("ch").held.is_some());
    let Accepted::Connection(_c) = w0.receive(true).expect("w0") else {
        panic!("worker 0 got nothing");
    };
    // What a forked worker counts itself on receiving it.
    let cell = m.slots[0].as_ref().expect("ch").cell;
    m.receipts.as_ref().expect("map").set_received(cell, 1);
    // A fresh copy waits for the next hand-over (its teardown must not
    // delay the next connection); one 100 ms old goes at the next turn.
    m.turn(&Plain);
    assert!(m.slots[0].as_ref().expect("ch").held.is_some());
    if let Some((_, at)) = m.slots[0].as_mut().and_then(|c| c.held.as_mut()) {
        *at = MonoTime::now() - std::time::Duration::from_millis(150);
    }
    m.turn(&Plain);
    assert!(
        m.slots[0].as_ref().expect("ch").held.is_none(),
        "released at the next turn"
    );
    let fd1 = m.slots[1].as_ref().expect("ch").master.as_raw_fd();
    m.slot_retired(1);
    drop(w1);
    m.ready(fd1, &Plain);
    assert!(m.slots[1].is_none(), "the dead worker's channel is closed");
    assert!(!m.fds().iter().any(|f| f.as_raw_fd() == fd1));
}

/// L14 for fdpass: a worker at its descriptor limit cannot take the
/// descriptor (the message comes with MSG_CTRUNC and without it). It
/// hands the connection back and backs off (EMFILE); the master, which
/// still holds its copy, hands it on, and once the limit is relieved the
/// connection is served with its bytes intact. Nothing is lost.
#[test]
fn a_worker_at_its_descriptor_limit_hands_the_connection_back() {
    use std::io::Read;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut m, mut w0, _w1) = master_with_two_workers();
    let (_l, _client, fd0) = ping_sent_to_worker_0(&mut m, &mut w0);
    assert_eq!(m.slots[0].as_ref().expect("ch").sent, 1);

    // No descriptor number left for the worker side to receive into.
    let at_limit = AtLimit::new();
    let got = w0.receive(true);
    drop(at_limit);
    let err = got.expect_err("EMFILE, not a connection");
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
    assert_eq!(w0.rejected(), 0, "handed back, not rejected");

    // The master takes it back and hands it on (here: to the same
    // worker, the only idle one, now relieved).
    m.ready(fd0, &Plain);
    assert_eq!((m.returned, m.lost), (1, 0));
    assert!(m.pending.is_empty(), "handed on at once");
    let Accepted::Connection(mut c) = w0.receive(true).expect("w0") else {
        panic!("worker 0 got nothing after relief");
    };
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).expect("the request is intact");
    assert_eq!(&buf, b"ping");
}

/// A kept-alive connection handed back (`K`) while the master is at its
/// descriptor limit finds a place in the master's reserve: received and
/// held, not closed as a truncated message (the client's connection would
/// be lost).
#[test]
fn a_connection_handed_back_at_the_descriptor_limit_is_not_lost() {
    use crate::protocol::Kept;
    use std::io::Read;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = Fdpass::new();
    m.prepare(no_listeners()).expect("prepare");
    m.prepare_slot(0).expect("slot");
    let worker_end = m.slots[0]
        .as_mut()
        .and_then(|c| c.worker.take())
        .expect("end");
    m.turn(&Plain); // fills the reserve
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (conn, _) = l.accept().expect("accept");
    let msg = Kept {
        requests: 1,
        listener: 0,
        unix: false,
        ahead: b"",
    }
    .encode();
    sys::send_with_fds(worker_end.as_fd(), &msg, &[conn.as_raw_fd()]).expect("K");
    drop(conn); // the worker's copy
    let ch = m.slots[0].as_ref().expect("ch").master.as_raw_fd();
    let at_limit = AtLimit::new();
    m.reserve.mark_tight(); // as accept's EMFILE does
    m.ready(ch, &Plain);
    drop(at_limit);
    assert_eq!(m.kept, 1, "the connection was received");
    client
        .set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .expect("timeout");
    let mut b = [0u8; 1];
    let r = client.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the client's connection is still open: {r:?}"
    );
}
