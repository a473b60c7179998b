//! Listening sockets: parsed from `--bind` values, bound by the master before
//! any fork, or adopted from systemd socket activation.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::error::{Error, Result};
use crate::sys;
use crate::upgrade::Inherited;

/// Default listen(2) backlog, as Unicorn's.
pub const DEFAULT_BACKLOG: i32 = 1024;

/// How often a worker blocked in accept(2) wakes to look at its stop flag and
/// at the master. Set as SO_RCVTIMEO on every listener; accepted connections
/// inherit it as their per-read timeout.
pub const DEFAULT_ACCEPT_TICK: Duration = Duration::from_millis(500);

/// One `--bind` value, parsed but not yet bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindSpec {
    /// `HOST:PORT`, `[V6]:PORT` or a bare `PORT` (all IPv4 interfaces).
    Tcp {
        /// Host name or address literal, without brackets.
        host: String,
        /// Port; 0 asks the kernel for a free one.
        port: u16,
    },
    /// `unix:/path`.
    Unix(PathBuf),
    /// `fd:N`: an already-listening socket inherited on descriptor N.
    Fd(RawFd),
}

impl BindSpec {
    /// Parses one `--bind` value.
    pub fn parse(spec: &str) -> Result<BindSpec> {
        let bad = |reason: &str| Error::BadAddress {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("expected unix:/path/to/socket"));
            }
            if path.len() >= 108 {
                return Err(bad("a Unix socket path must be shorter than 108 bytes"));
            }
            return Ok(BindSpec::Unix(PathBuf::from(path)));
        }
        if let Some(n) = spec.strip_prefix("fd:") {
            return n
                .parse::<RawFd>()
                .ok()
                .filter(|&fd| fd >= 0)
                .map(BindSpec::Fd)
                .ok_or_else(|| bad("expected fd:N with N a descriptor number"));
        }
        if let Ok(port) = spec.parse::<u16>() {
            return Ok(BindSpec::Tcp {
                host: "0.0.0.0".into(),
                port,
            });
        }
        if let Ok(sa) = spec.parse::<SocketAddr>() {
            return Ok(BindSpec::Tcp {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        let (host, port) = spec
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT, [IPV6]:PORT, unix:/path or fd:N"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        if host.contains(':') || host.contains('[') || host.contains(']') {
            return Err(bad(
                "an IPv6 address must be written in brackets: [::1]:8080",
            ));
        }
        Ok(BindSpec::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for BindSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindSpec::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            BindSpec::Tcp { host, port } => write!(f, "{host}:{port}"),
            BindSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            BindSpec::Fd(n) => write!(f, "fd:{n}"),
        }
    }
}

/// Where a bound listener listens, with the real port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(sa) => write!(f, "{sa}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Options applied to every listener the master binds.
#[derive(Debug, Clone)]
pub struct BindOptions {
    /// listen(2) backlog.
    pub backlog: i32,
    /// Set SO_REUSEPORT before bind (the reuseport strategy needs it).
    pub reuse_port: bool,
    /// chmod for Unix socket files (e.g. 0o660); `None` leaves the umask's.
    pub unix_mode: Option<u32>,
    /// SO_RCVTIMEO: the worker's accept tick and a connection's read timeout.
    pub accept_tick: Duration,
    /// TCP_DEFER_ACCEPT in seconds on the TCP sockets bound here (0: off).
    /// A connection is accepted only once its first bytes arrive, so no
    /// worker wakes for, or waits on, a client that has sent nothing yet.
    /// Only for protocols where the client speaks first (HTTP); a client
    /// that sends nothing is accepted about this many seconds late.
    pub defer_accept: u32,
}

impl Default for BindOptions {
    fn default() -> Self {
        BindOptions {
            backlog: DEFAULT_BACKLOG,
            reuse_port: false,
            unix_mode: None,
            accept_tick: DEFAULT_ACCEPT_TICK,
            defer_accept: 0,
        }
    }
}

/// A bound, listening socket owned by the master.
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    addr: ListenAddr,
    /// For Unix sockets we created: the path and its inode, to remove on exit
    /// only if it is still ours.
    unix_owned: Option<(PathBuf, u64, u64)>,
    /// Name from LISTEN_FDNAMES, if inherited from systemd.
    name: Option<String>,
    /// What it was made from (the `--bind` text, `systemd:N`), by which a
    /// new master finds it after a binary upgrade.
    key: String,
}

impl Listener {
    /// The address, with the real port.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The socket.
    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    /// The systemd name of an inherited socket.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// What it was made from (the `--bind` text, or `systemd:N`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// True for a Unix-domain listener.
    pub fn is_unix(&self) -> bool {
        matches!(self.addr, ListenAddr::Unix(_))
    }

    /// Removes the socket file of a Unix listener this process created, if the
    /// path still names that same socket (a newer server may have replaced it).
    pub fn remove_socket_file(&mut self) {
        if let Some((path, dev, ino)) = self.unix_owned.take() {
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.dev() == dev && meta.ino() == ino {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// Wraps an already-bound, listening socket (used by strategies that make
    /// sockets of their own, such as one per worker slot).
    pub fn from_socket(socket: Socket, addr: ListenAddr) -> Listener {
        Listener {
            key: addr.to_string(),
            socket,
            addr,
            unix_owned: None,
            name: None,
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Binds every spec, in order. A hostname binds every address it resolves
/// to. If one fails, the Unix socket files already created are removed.
pub fn bind_all(specs: &[BindSpec], opts: &BindOptions) -> Result<Vec<Listener>> {
    bind_all_inheriting(specs, opts, &mut Inherited::default())
}

/// [`bind_all`], taking for each spec the sockets an old master handed over
/// for it (binary upgrade) instead of binding again.
pub fn bind_all_inheriting(
    specs: &[BindSpec],
    opts: &BindOptions,
    inherited: &mut Inherited,
) -> Result<Vec<Listener>> {
    warn_if_backlog_capped(opts.backlog);
    let mut out = Vec::new();
    let bound = bind_each(specs, opts, inherited, &mut out);
    if bound.is_err() {
        for l in &mut out {
            l.remove_socket_file();
        }
    }
    bound.map(|()| out)
}

fn bind_each(
    specs: &[BindSpec],
    opts: &BindOptions,
    inherited: &mut Inherited,
    out: &mut Vec<Listener>,
) -> Result<()> {
    for spec in specs {
        let key = spec.to_string();
        let handed = inherited.take(&key);
        if !handed.is_empty() {
            for fd in handed {
                let mut l = adopt_handed_over(fd, &key, opts)?;
                if let BindSpec::Unix(path) = spec {
                    // Ours now: removed when this master exits (unless its
                    // old master still serves it, see Master).
                    if let Ok(meta) = std::fs::symlink_metadata(path) {
                        l.unix_owned = Some((path.clone(), meta.dev(), meta.ino()));
                    }
                }
                out.push(l);
            }
            continue;
        }
        match spec {
            BindSpec::Tcp { host, port } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| Error::Listen {
                        addr: spec.to_string(),
                        source: e,
                    })?
                    .collect();
                let mut seen = Vec::new();
                for sa in addrs {
                    if !seen.contains(&sa) {
                        seen.push(sa);
                        out.push(bind_tcp(sa, spec, opts)?);
                    }
                }
            }
            BindSpec::Unix(path) => out.push(bind_unix(path, opts)?),
            BindSpec::Fd(fd) => out.push(adopt(*fd, None, opts).map_err(|e| Error::Listen {
                addr: spec.to_string(),
                source: e,
            })?),
        }
    }
    Ok(())
}

/// Creates one TCP listener on `sa` (close-on-exec, SO_REUSEADDR, IPv6-only
/// for IPv6 addresses as nginx does).
pub fn bind_tcp(sa: SocketAddr, spec: &BindSpec, opts: &BindOptions) -> Result<Listener> {
    let err = |e: std::io::Error| Error::Listen {
        addr: spec.to_string(),
        source: e,
    };
    let socket = Socket::new(Domain::for_address(sa), Type::STREAM, None).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if sa.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    if opts.reuse_port {
        socket.set_reuse_port(true).map_err(err)?;
    }
    socket.bind(&SockAddr::from(sa)).map_err(err)?;
    socket.listen(opts.backlog).map_err(err)?;
    if opts.defer_accept > 0 {
        crate::sys::set_tcp_defer_accept(socket.as_fd(), opts.defer_accept).map_err(err)?;
    }
    socket
        .set_read_timeout(Some(opts.accept_tick))
        .map_err(err)?;
    let real = socket
        .local_addr()
        .map_err(err)?
        .as_socket()
        .ok_or_else(|| err(std::io::Error::other("not an inet socket")))?;
    Ok(Listener {
        socket,
        addr: ListenAddr::Tcp(real),
        unix_owned: None,
        name: None,
        key: spec.to_string(),
    })
}

fn bind_unix(path: &Path, opts: &BindOptions) -> Result<Listener> {
    let shown = format!("unix:{}", path.display());
    let err = |e: std::io::Error| Error::Listen {
        addr: shown.clone(),
        source: e,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A live server answers connect(); a stale file refuses.
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::UnixSocketInUse {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    tracing::info!(path = %path.display(), "replacing stale Unix socket file");
                    std::fs::remove_file(path).map_err(err)?;
                }
                Err(e) => return Err(err(e)),
            }
        }
        Ok(_) => {
            return Err(Error::UnixPathNotSocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(err)?;
    let addr = SockAddr::unix(path).map_err(err)?;
    // The mode is set by the umask at bind(2), not by a chmod of the path
    // afterwards, which would follow a symlink swapped in between. The
    // umask is process-wide: the master is single-threaded here, and a
    // library user binding from a threaded program should know it.
    let bound = match opts.unix_mode {
        Some(mode) => {
            let mask = nix::sys::stat::Mode::from_bits_truncate(!mode & 0o777);
            let old = nix::sys::stat::umask(mask);
            let bound = socket.bind(&addr);
            nix::sys::stat::umask(old);
            bound
        }
        None => socket.bind(&addr),
    };
    bound.map_err(err)?;
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    let listener = Listener {
        socket,
        addr: ListenAddr::Unix(path.to_path_buf()),
        unix_owned: Some((path.to_path_buf(), meta.dev(), meta.ino())),
        name: None,
        key: shown.clone(),
    };
    listener.socket.listen(opts.backlog).map_err(err)?;
    listener
        .socket
        .set_read_timeout(Some(opts.accept_tick))
        .map_err(err)?;
    Ok(listener)
}

/// Adopts an inherited listening socket on descriptor `fd`.
fn adopt(fd: RawFd, name: Option<String>, opts: &BindOptions) -> std::io::Result<Listener> {
    let owned: OwnedFd = sys::adopt_fd(fd)?;
    let socket = Socket::from(owned);
    socket.set_cloexec(true)?;
    if !socket.is_listener()? {
        return Err(std::io::Error::other(format!(
            "descriptor {fd} is not a listening socket"
        )));
    }
    socket.set_read_timeout(Some(opts.accept_tick))?;
    let local = socket.local_addr()?;
    let addr = if let Some(sa) = local.as_socket() {
        ListenAddr::Tcp(sa)
    } else {
        ListenAddr::Unix(
            local
                .as_pathname()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(format!("<fd {}>", socket.as_raw_fd()))),
        )
    };
    Ok(Listener {
        socket,
        addr,
        unix_owned: None,
        name,
        key: format!("fd:{fd}"),
    })
}

/// Adopts a socket an old master handed over (binary upgrade) under `key`:
/// the `--bind` it was made from, or for one no `--bind` names (systemd
/// passed it to the old master) its old key, so that every socket the old
/// master listened on stays listened on.
pub fn adopt_handed_over(fd: RawFd, key: &str, opts: &BindOptions) -> Result<Listener> {
    let mut l = adopt(fd, None, opts).map_err(|e| Error::Listen {
        addr: format!("{key} (handed over by the old master)"),
        source: e,
    })?;
    l.key = key.to_string();
    Ok(l)
}

/// Socket-activation variables as systemd sets them.
#[derive(Debug, Clone, Default)]
pub struct ActivationEnv {
    /// `LISTEN_PID`.
    pub listen_pid: Option<String>,
    /// `LISTEN_FDS`.
    pub listen_fds: Option<String>,
    /// `LISTEN_FDNAMES`.
    pub listen_fdnames: Option<String>,
}

impl ActivationEnv {
    /// Reads the variables and removes them from the environment, so that
    /// workers and programs they start do not adopt the sockets again.
    pub fn take_from_process() -> ActivationEnv {
        let get = |k: &str| std::env::var(k).ok();
        let env = ActivationEnv {
            listen_pid: get("LISTEN_PID"),
            listen_fds: get("LISTEN_FDS"),
            listen_fdnames: get("LISTEN_FDNAMES"),
        };
        if env.listen_fds.is_some() {
            // The master is single-threaded here (nothing has started a thread).
            for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
                std::env::remove_var(k);
            }
        }
        env
    }
}

/// Adopts the sockets systemd passed (descriptors `first_fd ..`, normally 3),
/// if `LISTEN_PID` names `my_pid`. Returns none when activation is not in use.
pub fn adopt_activated(
    env: &ActivationEnv,
    my_pid: u32,
    first_fd: RawFd,
    opts: &BindOptions,
) -> Result<Vec<Listener>> {
    let Some(fds) = env.listen_fds.as_deref() else {
        return Ok(Vec::new());
    };
    let pid_ok = env
        .listen_pid
        .as_deref()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(my_pid);
    if !pid_ok {
        tracing::debug!("LISTEN_FDS set for another process; ignoring it");
        return Ok(Vec::new());
    }
    let n: i32 = fds
        .trim()
        .parse()
        .ok()
        .filter(|&n| (0..=4096).contains(&n))
        .ok_or_else(|| Error::SocketActivation(format!("LISTEN_FDS={fds:?} is not a count")))?;
    let names: Vec<String> = env
        .listen_fdnames
        .as_deref()
        .map(|s| s.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let fd = first_fd + i;
        let name = names.get(i as usize).cloned();
        let l = adopt(fd, name, opts).map_err(|e| {
            Error::SocketActivation(format!("descriptor {fd} from LISTEN_FDS: {e}"))
        })?;
        out.push(l);
    }
    Ok(out)
}

/// The kernel silently caps the backlog at net.core.somaxconn; say so (L15).
fn warn_if_backlog_capped(backlog: i32) {
    if let Some(max) = somaxconn() {
        if backlog > max {
            tracing::warn!(
                backlog,
                somaxconn = max,
                "listen backlog {backlog} is capped by the kernel to net.core.somaxconn={max}; \
                 raise it with `sysctl -w net.core.somaxconn={backlog}`"
            );
        }
    }
}

/// net.core.somaxconn, if readable.
pub fn somaxconn() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            BindSpec::parse("127.0.0.1:8080").expect("v4"),
            BindSpec::Tcp {
                host: "127.0.0.1".into(),
                port: 8080
            }
        );
        assert_eq!(
            BindSpec::parse("[::1]:0").expect("v6"),
            BindSpec::Tcp {
                host: "::1".into(),
                port: 0
            }
        );
        assert_eq!(
            BindSpec::parse("localhost:80").expect("name"),
            BindSpec::Tcp {
                host: "localhost".into(),
                port: 80
            }
        );
        assert_eq!(
            BindSpec::parse("9000").expect("bare port"),
            BindSpec::Tcp {
                host: "0.0.0.0".into(),
                port: 9000
            }
        );
        assert_eq!(
            BindSpec::parse("unix:/run/app.sock").expect("unix"),
            BindSpec::Unix("/run/app.sock".into())
        );
        assert_eq!(BindSpec::parse("fd:3").expect("fd"), BindSpec::Fd(3));
        assert_eq!(
            BindSpec::parse("[::1]:8080").expect("v6").to_string(),
            "[::1]:8080"
        );
    }

    #[test]
    fn rejects_malformed_addresses_with_a_reason() {
        for bad in [
            "",
            "host",
            "host:",
            ":80",
            "1.2.3.4:99999",
            "::1:80",
            "unix:",
            "fd:x",
            "fd:-1",
            "a:b:c",
        ] {
            let err = BindSpec::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("invalid listen address"), "{bad}: {err}");
        }
    }

    #[test]
    fn binds_port_zero_and_reports_the_real_port_with_cloexec_and_tick() {
        let specs = [BindSpec::parse("127.0.0.1:0").expect("spec")];
        let ls = bind_all(&specs, &BindOptions::default()).expect("bind");
        let ListenAddr::Tcp(sa) = ls[0].addr() else {
            panic!("tcp")
        };
        assert_ne!(sa.port(), 0);
        assert!(ls[0].socket().is_listener().expect("so_acceptconn"));
        let flags =
            nix::fcntl::fcntl(ls[0].socket(), nix::fcntl::FcntlArg::F_GETFD).expect("getfd");
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "listener must be close-on-exec"
        );
        assert_eq!(
            ls[0].socket().read_timeout().expect("rcvtimeo"),
            Some(DEFAULT_ACCEPT_TICK)
        );
    }

    /// With TCP_DEFER_ACCEPT a connection that has sent nothing is not
    /// acceptable; its first byte makes it so. Without it, the handshake
    /// alone does.
    #[test]
    fn defer_accept_holds_a_connection_until_its_first_byte() {
        use std::io::Write;
        let readable = |l: &Listener, ms: u16| {
            let mut fds = [nix::poll::PollFd::new(
                l.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).expect("poll") == 1
        };
        let specs = [BindSpec::parse("127.0.0.1:0").expect("spec")];
        let plain = bind_all(&specs, &BindOptions::default()).expect("bind");
        assert_eq!(sys::tcp_defer_accept(plain[0].as_fd()).expect("get"), 0);
        let _quiet = std::net::TcpStream::connect(plain[0].addr().to_string()).expect("connect");
        assert!(
            readable(&plain[0], 5000),
            "no defer: the handshake is enough"
        );

        let opts = BindOptions {
            defer_accept: 5,
            ..BindOptions::default()
        };
        let deferred = bind_all(&specs, &opts).expect("bind");
        assert!(sys::tcp_defer_accept(deferred[0].as_fd()).expect("get") > 0);
        let mut quiet =
            std::net::TcpStream::connect(deferred[0].addr().to_string()).expect("connect");
        assert!(
            !readable(&deferred[0], 300),
            "a connection that sent nothing must not be acceptable yet"
        );
        quiet.write_all(b"G").expect("write");
        assert!(
            readable(&deferred[0], 5000),
            "its first byte makes it acceptable"
        );
    }

    #[test]
    fn binds_ipv6_loopback_only_v6() {
        let specs = [BindSpec::parse("[::1]:0").expect("spec")];
        match bind_all(&specs, &BindOptions::default()) {
            Ok(ls) => {
                assert!(ls[0].socket().only_v6().expect("v6only"));
                assert!(ls[0].addr().to_string().starts_with("[::1]:"));
            }
            // A machine without IPv6 says so; nothing else is acceptable.
            Err(e) => assert!(e.to_string().contains("[::1]:0"), "{e}"),
        }
    }

    #[test]
    fn port_in_use_names_the_address() {
        let first = bind_all(
            &[BindSpec::parse("127.0.0.1:0").expect("spec")],
            &BindOptions::default(),
        )
        .expect("bind");
        let taken = BindSpec::parse(&first[0].addr().to_string()).expect("spec");
        let err =
            bind_all(std::slice::from_ref(&taken), &BindOptions::default()).expect_err("in use");
        let msg = err.to_string();
        assert!(
            msg.contains(&taken.to_string()) && msg.contains("in use"),
            "{msg}"
        );
    }

    #[test]
    /// The mode is the umask's at bind(2), not a chmod of the path after
    /// it (which would follow a symlink swapped in between), and the
    /// process's umask is as it was afterwards.
    fn the_mode_is_set_at_bind_and_the_umask_restored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.sock");
        let opts = BindOptions {
            unix_mode: Some(0o600),
            ..BindOptions::default()
        };
        let before = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
        let bound = bind_all(&[BindSpec::Unix(path.clone())], &opts);
        let after = nix::sys::stat::umask(before);
        let mut bound = bound.expect("bound");
        assert_eq!(after.bits(), 0o002, "the umask is restored");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        bound[0].remove_socket_file();
    }

    #[test]
    fn unix_stale_file_is_replaced_live_one_refused_and_mode_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        // A stale socket: bound, then its socket closed.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let opts = BindOptions {
            unix_mode: Some(0o660),
            ..BindOptions::default()
        };
        let mut live = bind_all(&[BindSpec::Unix(path.clone())], &opts).expect("replaces stale");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let err = bind_all(&[BindSpec::Unix(path.clone())], &opts).expect_err("live");
        assert!(matches!(err, Error::UnixSocketInUse { .. }), "{err}");
        live[0].remove_socket_file();
        assert!(!path.exists());

        let regular = dir.path().join("file");
        std::fs::write(&regular, b"keep me").expect("write");
        let err = bind_all(&[BindSpec::Unix(regular.clone())], &opts).expect_err("not a socket");
        assert!(matches!(err, Error::UnixPathNotSocket { .. }), "{err}");
        assert_eq!(std::fs::read(&regular).expect("kept"), b"keep me");
    }

    #[test]
    fn activation_variables_are_taken_out_of_the_environment() {
        // The only test that touches these variables.
        std::env::set_var("LISTEN_PID", "1");
        std::env::set_var("LISTEN_FDS", "2");
        std::env::set_var("LISTEN_FDNAMES", "a:b");
        let env = ActivationEnv::take_from_process();
        assert_eq!(env.listen_fds.as_deref(), Some("2"));
        assert_eq!(env.listen_fdnames.as_deref(), Some("a:b"));
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            assert!(
                std::env::var(k).is_err(),
                "{k} left for children to adopt again"
            );
        }
    }

    #[test]
    fn a_failed_bind_removes_the_socket_files_already_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("first.sock");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let specs = [
            BindSpec::Unix(path.clone()),
            BindSpec::parse(&taken.local_addr().expect("addr").to_string()).expect("spec"),
        ];
        let err = bind_all(&specs, &BindOptions::default()).expect_err("second is in use");
        assert!(err.to_string().contains("in use"), "{err}");
        assert!(
            !path.exists(),
            "the first listener's socket file is removed"
        );
    }

    #[test]
    fn socket_activation_adopts_contiguous_fds_with_names() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("a");
        let b = std::net::TcpListener::bind("127.0.0.1:0").expect("b");
        let (pa, pb) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
        // Place them on two contiguous descriptor numbers, as systemd does at 3.
        let base: RawFd = 900;
        let target0 =
            nix::fcntl::fcntl(&a, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(base)).expect("dupfd");
        assert_eq!(target0, base, "fd {base} must be free in the test process");
        let target1 =
            nix::fcntl::fcntl(&b, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(base + 1)).expect("dupfd");
        assert_eq!(target1, base + 1);
        let env = ActivationEnv {
            listen_pid: Some(std::process::id().to_string()),
            listen_fds: Some("2".into()),
            listen_fdnames: Some("web:admin".into()),
        };
        let ls = adopt_activated(&env, std::process::id(), base, &BindOptions::default())
            .expect("adopt");
        assert_eq!(ls.len(), 2);
        assert_eq!(ls[0].addr(), &ListenAddr::Tcp(pa));
        assert_eq!(ls[1].addr(), &ListenAddr::Tcp(pb));
        assert_eq!(ls[0].name(), Some("web"));
        assert_eq!(ls[1].name(), Some("admin"));

        // Another process's variables are ignored.
        let other = ActivationEnv {
            listen_pid: Some("1".into()),
            ..env.clone()
        };
        assert!(
            adopt_activated(&other, std::process::id(), base, &BindOptions::default())
                .expect("ignored")
                .is_empty()
        );
        // A non-listening descriptor is refused with its number.
        let (s, _peer) = std::os::unix::net::UnixStream::pair().expect("pair");
        let raw = s.into_raw_fd();
        let bad = ActivationEnv {
            listen_pid: Some(std::process::id().to_string()),
            listen_fds: Some("1".into()),
            listen_fdnames: None,
        };
        let err = adopt_activated(&bad, std::process::id(), raw, &BindOptions::default())
            .expect_err("not listening");
        assert!(
            err.to_string().contains(&format!("descriptor {raw}")),
            "{err}"
        );
    }
}
