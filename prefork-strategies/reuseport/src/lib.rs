//! # prefork-reuseport
//!
//! One SO_REUSEPORT listening socket per worker slot (per bind address):
//! the kernel puts each new connection in one socket's queue, and each
//! worker blocks in accept(2) on its own socket. No herd, no lock.
//!
//! The known failure of this design is closing: closing a SO_REUSEPORT
//! socket resets every connection waiting in its queue (unless
//! `net.ipv4.tcp_migrate_req=1`), so naive implementations lose connections
//! at every restart, reload and shrink. Here nothing is closed while the
//! master runs:
//!
//! * The **master** creates every slot's socket before forking and keeps
//!   it. A respawned, reloaded or recycled worker takes its slot's socket,
//!   so a dying worker closes nothing: its queue waits for the replacement.
//!   Slot 0 uses the socket the master bound; slots 1.. get new sockets on
//!   the real port, created in slot order.
//! * A classic **BPF program** on the group (SO_ATTACH_REUSEPORT_CBPF) picks
//!   a uniformly random socket among the first `live` ones. The kernel keeps
//!   a group's sockets in the order they started listening, which is slot
//!   order. When the pool shrinks (TTOU, WINCH), `live` shrinks **before**
//!   the retiring worker is told to stop, so its socket gets nothing new.
//!   A slot left with no worker (its worker reaped and the replacement not
//!   forked: a crash loop's back-off, fork(2) failing) is steered around
//!   until it is refilled, so its queue does not fill with connections no
//!   one takes; the program then picks among the serving slots by index.
//! * The retiring worker then **drains** its queue: it keeps accepting until
//!   nothing has arrived for [`DRAIN_LINGER`] (which covers handshakes still
//!   in flight), serves what it got, and exits. The socket stays open and
//!   empty, and is reused if the pool grows again.
//!
//! This needs no `tcp_migrate_req`. Unix sockets cannot use SO_REUSEPORT
//! (Linux does not balance them), and sockets inherited from systemd or
//! `fd:N` were bound without it: both are refused at start with a clear
//! error.
//!
//! # Example
//!
//! Two workers, each accepting from its own SO_REUSEPORT socket on the same
//! port; the kernel spreads connections across them.
//!
//! ```
//! use std::io::{Read, Write};
//!
//! use prefork_core::{App, BindSpec, Connection, ListenAddr, Master, MasterConfig, Next};
//!
//! struct Hello;
//!
//! impl App for Hello {
//!     fn handle(&mut self, conn: &mut Connection) -> std::io::Result<Next> {
//!         conn.write_all(b"hello\n")?;
//!         Ok(Next::Close)
//!     }
//! }
//!
//! let cfg = MasterConfig {
//!     binds: vec![BindSpec::parse("127.0.0.1:0")?],
//!     workers: 2,
//!     ..MasterConfig::default()
//! };
//! let master = Master::start(cfg, prefork_reuseport::Reuseport::new(), Hello)?;
//! let code = master.run(|ready| {
//!     // Every worker is up: be a client once, then stop gracefully (QUIT).
//!     let ListenAddr::Tcp(addr) = ready.addrs[0] else { unreachable!("a TCP bind") };
//!     let mut reply = String::new();
//!     std::net::TcpStream::connect(addr)
//!         .and_then(|mut c| c.read_to_string(&mut reply))
//!         .expect("a worker answers");
//!     assert_eq!(reply, "hello\n");
//!     let me = nix::unistd::Pid::from_raw(ready.pid as i32);
//!     nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGQUIT).expect("QUIT");
//! })?;
//! assert_eq!(code, 0, "a graceful stop");
//! # Ok::<(), prefork_core::Error>(())
//! ```

#![deny(missing_docs)]
// `unsafe` is confined to `sys`: the compiler enforces it.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod sys;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags};
use prefork_core::accept::ListenerSet;
use prefork_core::clock::poll_timeout;
use prefork_core::strategy::{OwnSockets, Prepare, SlotKey, SlotSocket};
use prefork_core::{
    AcceptContext, AcceptStrategy, Accepted, BindOptions, Error, ListenAddr, Listener, Result,
    WorkerAcceptor,
};
use socket2::{Domain, SockAddr, Socket, Type};

/// How long a retiring worker keeps accepting after its queue looked empty.
pub const DRAIN_LINGER: Duration = Duration::from_millis(200);

/// Beyond what its queue held when it was told to stop, how many more
/// connections a stopping worker takes (handshakes that were in flight).
/// The bound matters on reload, when the new worker of the slot shares the
/// socket and connections keep coming: the old one must not drain forever.
pub const DRAIN_MARGIN: u32 = 64;

fn strategy_err(reason: String) -> Error {
    Error::Strategy {
        strategy: "reuseport",
        reason,
    }
}

/// The reuseport strategy (master side).
#[derive(Debug, Default)]
pub struct Reuseport {
    addrs: Vec<SocketAddr>,
    /// Per slot: one socket per address, kept open while the master runs.
    slots: Vec<Vec<Listener>>,
    /// Slots 0..live receive new connections, but vacant ones.
    live: usize,
    /// Slots below `live` with no worker now (reaped, and its replacement
    /// not forked: a crash loop's back-off, fork failing): steered around,
    /// so that their queues do not fill with connections no one takes.
    vacant: std::collections::BTreeSet<usize>,
    opts: BindOptions,
    /// Slot sockets an old master handed over (binary upgrade), taken by
    /// the slots they belong to.
    handed: Vec<SlotSocket>,
    /// A new master started by USR2 shares this master's slot sockets and
    /// steers their groups: this one must not, until it is gone.
    steering_handed_over: bool,
}

impl Reuseport {
    /// Creates the strategy.
    pub fn new() -> Reuseport {
        Reuseport::default()
    }

    /// Sockets created so far (slots × addresses), for inspection.
    pub fn sockets(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }

    fn new_socket(&self, sa: SocketAddr) -> io::Result<Listener> {
        let socket = Socket::new(Domain::for_address(sa), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if sa.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&SockAddr::from(sa))?;
        socket.listen(self.opts.backlog)?;
        if self.opts.defer_accept > 0 {
            prefork_core::sys::set_tcp_defer_accept(socket.as_fd(), self.opts.defer_accept)?;
        }
        socket.set_read_timeout(Some(self.opts.accept_tick))?;
        socket.set_nonblocking(self.addrs.len() > 1)?;
        Ok(Listener::from_socket(socket, ListenAddr::Tcp(sa)))
    }

    /// Slot `slot`'s socket on `sa`: the one an old master handed over, or
    /// a new one.
    fn slot_socket(&mut self, slot: usize, sa: SocketAddr) -> io::Result<Listener> {
        let key = SlotKey { slot, addr: sa };
        match self.handed.iter().position(|h| h.key == key) {
            Some(i) => {
                let l = self.handed.swap_remove(i).listener;
                l.socket().set_nonblocking(self.addrs.len() > 1)?;
                Ok(l)
            }
            None => self.new_socket(sa),
        }
    }

    /// The slots that get new connections: 0..live, but vacant ones.
    fn serving(&self) -> Vec<u32> {
        (0..self.live)
            .filter(|s| !self.vacant.contains(s))
            .map(|s| s as u32)
            .collect()
    }

    /// Points every group's BPF program at the serving slots.
    fn steer(&self) -> Result<()> {
        let serving = self.serving();
        if serving.is_empty() || self.steering_handed_over {
            // No worker: connections wait in the queues (for the next
            // worker) where they are. Or a new master steers the groups now.
            return Ok(());
        }
        for (i, sa) in self.addrs.iter().enumerate() {
            if let Some(sock) = self.slots.first().and_then(|s| s.get(i)) {
                sys::attach_steering(sock.as_fd(), &serving)
                    .map_err(|e| strategy_err(format!("SO_ATTACH_REUSEPORT_CBPF on {sa}: {e}")))?;
            }
        }
        Ok(())
    }
}

fn migrate_req() -> Option<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .ok()
        .map(|s| s.trim().to_string())
}

impl OwnSockets for Reuseport {
    fn bind_options(&self, opts: &mut BindOptions) {
        opts.reuse_port = true;
    }

    fn backlog_fds(&self) -> Vec<BorrowedFd<'_>> {
        // The live slots' sockets: a retired slot's socket gets nothing new.
        self.slots
            .iter()
            .take(self.live)
            .flatten()
            .map(|l| l.as_fd())
            .collect()
    }

    fn handover(&self) -> Vec<(SlotKey, BorrowedFd<'_>)> {
        // Every slot's sockets but slot 0's (the listeners, handed over
        // anyway), retired slots' too: the new master takes the same
        // sockets, so each group keeps its members in slot order, and no
        // socket (nor its queue) closes when this master exits.
        self.slots
            .iter()
            .enumerate()
            .skip(1)
            .flat_map(|(slot, socks)| {
                socks.iter().filter_map(move |l| match l.addr() {
                    ListenAddr::Tcp(sa) => Some((SlotKey { slot, addr: *sa }, l.as_fd())),
                    ListenAddr::Unix(_) => None,
                })
            })
            .collect()
    }

    fn handed_over(&mut self, active: bool) {
        self.steering_handed_over = active;
        if !active {
            // The new master's program may still be on the groups.
            if let Err(e) = self.steer() {
                tracing::error!("{e}");
            }
        }
    }

    fn slot_vacant(&mut self, slot: usize) {
        if slot < self.live && self.vacant.insert(slot) {
            if let Err(e) = self.steer() {
                tracing::error!("{e}");
            }
        }
    }
}

impl AcceptStrategy for Reuseport {
    type Acceptor = ReuseportAcceptor;

    fn name(&self) -> &'static str {
        "reuseport"
    }

    fn own_sockets(&mut self) -> Option<&mut dyn OwnSockets> {
        Some(self)
    }

    fn prepare(&mut self, ctx: Prepare<'_>) -> Result<()> {
        let listeners = ctx.listeners;
        for h in ctx.handed_over {
            match h.listener.addr() {
                ListenAddr::Tcp(sa) if h.key.slot > 0 && *sa == h.key.addr => self.handed.push(h),
                _ => tracing::warn!(
                    "reuseport: {} handed over is not a slot socket; closed",
                    h.listener.key()
                ),
            }
        }
        let mut slot0 = Vec::new();
        for l in listeners {
            let sa = match l.addr() {
                ListenAddr::Tcp(sa) => *sa,
                ListenAddr::Unix(p) => {
                    return Err(strategy_err(format!(
                        "unix:{} cannot use SO_REUSEPORT (Linux does not balance Unix sockets); \
                         serve it with --strategy blocking or mutex",
                        p.display()
                    )))
                }
            };
            if !l.socket().reuse_port().unwrap_or(false) {
                return Err(strategy_err(format!(
                    "{sa} was bound without SO_REUSEPORT (inherited from systemd or fd:N); \
                     let prefork bind it with --bind, or use --strategy blocking or mutex"
                )));
            }
            let dup = l
                .socket()
                .try_clone()
                .map_err(|e| strategy_err(format!("dup() of {sa}: {e}")))?;
            slot0.push(Listener::from_socket(dup, ListenAddr::Tcp(sa)));
            self.addrs.push(sa);
        }
        self.opts.accept_tick = listeners
            .first()
            .and_then(|l| l.socket().read_timeout().ok().flatten())
            .unwrap_or(prefork_core::listener::DEFAULT_ACCEPT_TICK);
        // Every slot's socket has the bound one's backlog and defers accept
        // as it does.
        if let Some((_, backlog)) = listeners
            .first()
            .and_then(|l| prefork_core::sys::tcp_accept_queue(l.as_fd()).ok())
        {
            self.opts.backlog = i32::try_from(backlog).unwrap_or(i32::MAX).max(1);
        }
        self.opts.defer_accept = listeners
            .first()
            .and_then(|l| prefork_core::sys::tcp_defer_accept(l.as_fd()).ok())
            .unwrap_or(0);
        ListenerSet::set_nonblocking(listeners, listeners.len() > 1)
            .map_err(|e| strategy_err(format!("O_NONBLOCK on the listeners: {e}")))?;
        self.slots.push(slot0);
        // After a binary upgrade: the old master's slots, in slot order,
        // are this master's (a socket missing for an address is made, in
        // the same order); the pool may use fewer of them.
        let inherited_slots = self.handed.iter().map(|h| h.key.slot).max().unwrap_or(0);
        for slot in 1..=inherited_slots {
            let sockets = self
                .addrs
                .clone()
                .into_iter()
                .map(|sa| {
                    self.slot_socket(slot, sa).map_err(|e| {
                        strategy_err(format!("SO_REUSEPORT socket for slot {slot} on {sa}: {e}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            self.slots.push(sockets);
        }
        for h in self.handed.drain(..) {
            let SlotKey { slot, addr } = h.key;
            tracing::warn!("reuseport: slot {slot}'s socket on {addr} handed over for an address this master does not serve; closed");
        }
        if inherited_slots > 0 {
            tracing::info!("reuseport: took over the sockets of slots 1..={inherited_slots} from the old master");
        }
        match migrate_req().as_deref() {
            Some("1") => tracing::info!("reuseport: net.ipv4.tcp_migrate_req=1"),
            Some(v) => tracing::warn!(
                "reuseport: net.ipv4.tcp_migrate_req={v}: the kernel resets the queue of a closed \
                 SO_REUSEPORT socket. prefork closes none while running (retired slots are steered \
                 away from and drained), so resizing and reloads lose nothing; \
                 `sysctl -w net.ipv4.tcp_migrate_req=1` also protects the queues at exit"
            ),
            None => {}
        }
        Ok(())
    }

    fn prepare_slot(&mut self, slot: usize) -> Result<()> {
        // Sockets are created in slot order so that the group's order is
        // the slot order the BPF program relies on.
        while self.slots.len() <= slot {
            let sockets = self
                .addrs
                .iter()
                .map(|&sa| {
                    self.new_socket(sa).map_err(|e| {
                        strategy_err(format!("SO_REUSEPORT socket for slot {slot} on {sa}: {e}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            self.slots.push(sockets);
        }
        let refilled = self.vacant.remove(&slot);
        if slot >= self.live {
            self.live = slot + 1;
            self.steer()?;
        } else if refilled {
            self.steer()?;
        }
        Ok(())
    }

    fn slot_retired(&mut self, slot: usize) {
        if slot < self.live {
            self.live = slot;
            self.vacant.retain(|&s| s < slot);
            if let Err(e) = self.steer() {
                tracing::error!("{e}");
            }
        }
    }

    fn into_acceptor(
        mut self,
        slot: usize,
        _listeners: Vec<Listener>,
    ) -> io::Result<ReuseportAcceptor> {
        // Keep this slot's sockets; every other one (and the master's own
        // listeners, dropped with `_listeners`) is closed in this worker only.
        if slot >= self.slots.len() {
            return Err(io::Error::other(format!("no sockets for slot {slot}")));
        }
        let own = std::mem::take(&mut self.slots[slot]);
        Ok(ReuseportAcceptor {
            set: ListenerSet::new(own),
            drain_left: None,
        })
    }
}

/// The worker side: accepts from its slot's own sockets.
#[derive(Debug)]
pub struct ReuseportAcceptor {
    set: ListenerSet,
    /// Connections still to take while draining (set at the first call).
    drain_left: Option<u32>,
}

impl WorkerAcceptor for ReuseportAcceptor {
    fn accept(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        self.set.accept(ctx)
    }

    fn drain(&mut self, _ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        // When the slot is retired nobody else accepts from this socket:
        // take what is queued, and what arrives within the linger
        // (handshakes in flight when the steering changed). Bounded by what
        // was queued at the stop plus a margin.
        let left = *self.drain_left.get_or_insert_with(|| {
            let queued: u32 = self
                .set
                .listeners()
                .iter()
                .filter_map(|l| prefork_core::sys::tcp_accept_queue(l.as_fd()).ok())
                .map(|(n, _)| n)
                .sum();
            queued + DRAIN_MARGIN
        });
        if left == 0 {
            return Ok(Accepted::Idle);
        }
        self.drain_left = Some(left - 1);
        let mut fds: Vec<PollFd<'_>> = self
            .set
            .listeners()
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        match nix::poll::poll(&mut fds, poll_timeout(Some(DRAIN_LINGER))) {
            Ok(n) if n > 0 => {}
            _ => return Ok(Accepted::Idle),
        }
        let ready = fds
            .iter()
            .position(|p| p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)));
        drop(fds);
        match ready {
            Some(i) => self.set.accept_from(i),
            None => Ok(Accepted::Idle),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    /// What the master passes to `prepare`: the listeners, and the sockets
    /// an old master handed over.
    fn prepare_with(listeners: &[Listener], handed_over: Vec<SlotSocket>) -> Prepare<'_> {
        Prepare {
            listeners,
            worker_owner: None,
            handed_over,
        }
    }

    /// `--backlog` and `--defer-accept` reach every slot's socket, not only
    /// the one the master bound.
    #[test]
    fn slot_sockets_copy_the_bound_sockets_backlog_and_defer_accept() {
        let opts = BindOptions {
            backlog: 77,
            reuse_port: true,
            defer_accept: 3,
            ..BindOptions::default()
        };
        let spec = prefork_core::BindSpec::parse("127.0.0.1:0").expect("spec");
        let bound = prefork_core::listener::bind_all(&[spec], &opts).expect("bind");
        let mut r = Reuseport::new();
        r.prepare(prepare_with(&bound, Vec::new()))
            .expect("prepare");
        r.prepare_slot(2).expect("slots");
        assert_eq!(r.sockets(), 3);
        let want_defer = prefork_core::sys::tcp_defer_accept(bound[0].as_fd()).expect("get");
        assert!(want_defer > 0);
        for l in r.slots.iter().flatten() {
            let (_, backlog) = prefork_core::sys::tcp_accept_queue(l.as_fd()).expect("tcp_info");
            assert_eq!(backlog, 77);
            assert_eq!(
                prefork_core::sys::tcp_defer_accept(l.as_fd()).expect("get"),
                want_defer
            );
        }
    }

    /// Binary upgrade: the new master's slots are the old master's sockets,
    /// slot for slot (so the group order the steering relies on holds), and
    /// it makes any slot beyond them.
    #[test]
    fn a_new_master_takes_the_old_slot_sockets_slot_for_slot() {
        use std::os::fd::IntoRawFd;
        let opts = BindOptions {
            reuse_port: true,
            ..BindOptions::default()
        };
        let spec = prefork_core::BindSpec::parse("127.0.0.1:0").expect("spec");
        let bound = prefork_core::listener::bind_all(&[spec], &opts).expect("bind");
        let mut old = Reuseport::new();
        old.prepare(prepare_with(&bound, Vec::new()))
            .expect("prepare");
        old.prepare_slot(2).expect("slots");
        let handed = old.handover();
        let keys: Vec<SlotKey> = handed.iter().map(|(k, _)| *k).collect();
        let ListenAddr::Tcp(addr) = *bound[0].addr() else {
            panic!("a TCP listener");
        };
        assert_eq!(
            keys,
            [SlotKey { slot: 1, addr }, SlotKey { slot: 2, addr }],
            "slots 1 and 2 (slot 0's socket is the listener)"
        );
        // What exec hands over: other descriptors of the same sockets.
        let adopted: Vec<SlotSocket> = handed
            .iter()
            .map(|(key, fd)| {
                let raw = fd.try_clone_to_owned().expect("dup").into_raw_fd();
                let listener =
                    prefork_core::listener::adopt_handed_over(raw, &addr.to_string(), &opts)
                        .expect("adopt");
                SlotSocket {
                    key: *key,
                    listener,
                }
            })
            .collect();
        let inode = |l: &Listener| nix::sys::stat::fstat(l.as_fd()).expect("fstat").st_ino;
        let mut new = Reuseport::new();
        new.prepare(prepare_with(&bound, adopted)).expect("prepare");
        new.prepare_slot(3).expect("one slot more");
        assert_eq!(new.sockets(), 4);
        for slot in 0..3 {
            assert_eq!(
                inode(&new.slots[slot][0]),
                inode(&old.slots[slot][0]),
                "slot {slot}"
            );
        }
        assert!(old
            .slots
            .iter()
            .flatten()
            .all(|l| inode(l) != inode(&new.slots[3][0])));
    }

    /// Four listening SO_REUSEPORT sockets in one group on a free port.
    fn group_of_four() -> (Vec<Socket>, SocketAddr) {
        let first = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        first.set_reuse_port(true).expect("reuseport");
        first
            .bind(&SockAddr::from(
                "127.0.0.1:0".parse::<SocketAddr>().expect("addr"),
            ))
            .expect("bind");
        first.listen(256).expect("listen");
        let sa = first.local_addr().expect("addr").as_socket().expect("inet");
        let mut group = vec![first];
        for _ in 0..3 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            s.set_reuse_port(true).expect("reuseport");
            s.bind(&SockAddr::from(sa)).expect("bind");
            s.listen(256).expect("listen");
            group.push(s);
        }
        (group, sa)
    }

    /// `n` clients connect; returns them and how many each socket queued.
    fn connect_and_count(
        group: &[Socket],
        sa: SocketAddr,
        n: usize,
    ) -> (Vec<TcpStream>, [usize; 4]) {
        let clients: Vec<TcpStream> = (0..n)
            .map(|_| TcpStream::connect(sa).expect("connect"))
            .collect();
        let mut per_socket = [0usize; 4];
        for (i, s) in group.iter().enumerate() {
            s.set_nonblocking(true).expect("nonblocking");
            while s.accept().is_ok() {
                per_socket[i] += 1;
            }
        }
        (clients, per_socket)
    }

    #[test]
    fn steering_program_sends_every_connection_to_the_live_sockets() {
        // Four sockets in one group; steer to the first two only.
        let (group, sa) = group_of_four();
        sys::attach_steering(group[0].as_fd(), &[0, 1]).expect("attach");
        let (clients, per_socket) = connect_and_count(&group, sa, 40);
        assert_eq!(per_socket[2] + per_socket[3], 0, "{per_socket:?}");
        assert_eq!(per_socket[0] + per_socket[1], 40, "{per_socket:?}");
        assert!(
            per_socket[0] > 0 && per_socket[1] > 0,
            "random spread: {per_socket:?}"
        );
        drop(clients);
    }

    #[test]
    fn steering_around_a_vacant_slot_skips_its_socket_only() {
        // Four sockets; slot 1 is vacant: 0, 2 and 3 get everything.
        let (group, sa) = group_of_four();
        assert_eq!(sys::steering_program(&[0, 2, 3]).len(), 2 * 3 + 3);
        assert_eq!(sys::steering_program(&[0, 1, 2]).len(), 3, "contiguous");
        sys::attach_steering(group[0].as_fd(), &[0, 2, 3]).expect("attach");
        let (clients, per_socket) = connect_and_count(&group, sa, 90);
        assert_eq!(per_socket[1], 0, "{per_socket:?}");
        assert_eq!(per_socket.iter().sum::<usize>(), 90, "{per_socket:?}");
        assert!(
            per_socket[0] > 0 && per_socket[2] > 0 && per_socket[3] > 0,
            "random spread: {per_socket:?}"
        );
        drop(clients);
    }
}
