//! `prefork`: a preforking server with selectable accept strategies.
//!
//! Usage errors print one line `error: ...` and exit 2; runtime failures
//! (a port in use, an unwritable pid file) print `error: ...` and exit 1.

#![forbid(unsafe_code)]
// Doc comments here are clap's --help text, not rustdoc: `[IPV6]:PORT` is
// an address form, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

mod apps;
mod config;
mod site;
mod status;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use prefork_core::{
    AcceptStrategy, App, BindOptions, BindSpec, BoxError, Connection, Frame, Master, MasterConfig,
    Next, PoolSettings, ReadyInfo, ReloadSettings, ReportMode, ScaleConfig, WorkerInfo,
};

/// The accept strategies compiled into this binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StrategyName {
    /// Every worker blocks in accept(2) on the shared socket.
    Blocking,
    /// Accept serialized by a cross-process lock (--lock).
    Mutex,
    /// One SO_REUSEPORT socket per worker, kept by the master.
    Reuseport,
    /// The master accepts and hands each connection to an idle worker.
    Fdpass,
}

/// When the fdpass master hands a connection to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DispatchName {
    /// Once its request is whole; kept-alive connections parked in the master.
    Ready,
    /// At once, unread (plain fdpass).
    Accept,
}

/// The lock of the mutex strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LockName {
    /// flock(2) on a lock file each worker opens after fork.
    Flock,
    /// fcntl(2) record lock on the lock file.
    Fcntl,
    /// SysV semaphore with SEM_UNDO.
    Sysvsem,
    /// Robust process-shared pthread mutex.
    Pthread,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AppName {
    /// One line naming the worker, then close.
    Hello,
    /// Echo what the client sends.
    Echo,
    /// HTTP/1.1: fixed body, X-Worker header, /sleep/MS.
    Http,
    /// HTTP/1.1: the files under --root, loaded into memory by the master
    /// once and shared by every worker.
    Static,
}

/// Faults the test suite injects into workers (hidden flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fault {
    /// Abort in after_fork: a crash while booting (crash-loop back-off).
    BootCrash,
    /// after_fork returns an error: "boot failed", the slot is not respawned.
    BootFail,
    /// after_fork leaves the worker no descriptor number to accept into
    /// (EMFILE) for its first second, then gives them back (RELIABILITY L14).
    #[value(name = "fd-limit-1s")]
    FdLimit1s,
    /// after_fork never returns in workers of a reload (generation 2 on):
    /// a worker stuck at boot (RELIABILITY C5).
    BootHangOnReload,
    /// after_fork takes 200 ms in workers of a reload: a slow boot, to see
    /// a reload go in batches.
    BootSlowOnReload,
    /// after_fork starts `sh -c 'sleep 0.3 &'` and waits for the shell: the
    /// sleep is left an orphan, for the master to reap as PID 1 or with
    /// --subreaper.
    OrphanAtBoot,
}

/// What TERM does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TermStop {
    /// A fast stop (as INT), as nginx and Unicorn do.
    Fast,
    /// A graceful stop (as QUIT): what container managers mean by TERM.
    Graceful,
}

/// How workers report busy/idle (hidden: for measuring the cost only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Report {
    /// Shared-memory scoreboard (the default).
    Scoreboard,
    /// A message per transition on the worker's status pipe.
    Pipe,
    /// No reporting (timeouts and recycling then see nothing).
    Off,
}

#[derive(Debug, Clone, Subcommand)]
enum Cmd {
    /// Print a running server's workers: `prefork status unix:/path/to/status.sock`.
    Status {
        /// The --status socket of the server.
        #[arg(value_name = "unix:/PATH")]
        socket: String,
        /// Print the JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the manual page (roff): `prefork man > /usr/local/share/man/man1/prefork.1`.
    Man,
    /// Print shell completions: `prefork completions bash > /etc/bash_completion.d/prefork`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A preforking server: a master binds the sockets, forks workers, and is
/// administered with signals (QUIT graceful stop, TERM/INT fast stop, HUP
/// reload workers, TTIN/TTOU one worker more/less, WINCH stop all workers).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "prefork",
    version,
    about,
    max_term_width = 100,
    allow_negative_numbers = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,

    /// Read settings from this TOML file: each key is a long flag's name
    /// (`workers = 4`, `bind = ["127.0.0.1:8080"]`, `lock-always = true`);
    /// a flag given on the command line wins. HUP reads it again and applies
    /// the pool and timeout settings; a file with a mistake changes nothing.
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Address to listen on: HOST:PORT, [IPV6]:PORT, PORT, unix:/path or fd:N.
    /// Repeat for several. Default 127.0.0.1:8080 (none when systemd passes sockets).
    #[arg(short, long = "bind", value_name = "ADDR", value_parser = parse_bind)]
    bind: Vec<BindSpec>,

    /// Number of worker processes (default: number of CPUs), or MIN:MAX for
    /// a pool that sizes itself: it starts at MIN, grows when connections
    /// wait and no worker is free, and shrinks while workers sit idle.
    #[arg(short, long, value_name = "N|MIN:MAX", value_parser = parse_workers)]
    workers: Option<(usize, usize)>,

    /// With --workers MIN:MAX: idle workers to keep. The pool retires one
    /// worker per --scale-window while more than this stayed idle. [default: 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1024))]
    spare: Option<u32>,

    /// With --workers MIN:MAX: seconds the idle surplus must last before a
    /// worker is retired (at most one per window). [default: 10]
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    scale_window: Option<Duration>,

    /// With --workers MIN:MAX: seconds connections may wait with no worker
    /// changing state before the pool grows (a pool with every worker
    /// stuck). A pool whose workers are all busy grows after 0.1 s. [default: 1]
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    scale_stall: Option<Duration>,

    /// How workers get connections.
    #[arg(short, long, value_enum, default_value_t = StrategyName::Blocking)]
    strategy: StrategyName,

    /// The built-in application to serve.
    #[arg(short, long, value_enum, default_value_t = AppName::Http)]
    app: AppName,

    /// Write the master's pid here (refused if it names a running process).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,

    /// Write the logs (stderr, the app's too) to this file once the server
    /// is up; USR1 reopens it (after logrotate moved it away), in the master
    /// and then in every worker.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,

    /// Run the workers as this user (a name or a uid), with its groups; the
    /// master keeps running as root to bind, reload and manage them (nginx's
    /// `user`). Needs the master to start as root.
    #[arg(long, value_name = "USER")]
    user: Option<String>,

    /// With --user: the workers' group (a name or a gid; default: the
    /// user's primary group).
    #[arg(long, value_name = "GROUP", requires = "user")]
    group: Option<String>,

    /// Seconds a worker may take to finish its connection after QUIT or a
    /// reload before it is terminated.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    graceful_timeout: Duration,

    /// Kill a worker busy on one connection longer than SECS (a soft
    /// SIGABRT for its last words, SIGKILL a second later) and replace it;
    /// an idle worker silent (no heartbeat) as long, at least 2 s, gets
    /// SIGKILL: it is stopped or stuck.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,

    /// Recycle a worker after it served N connections (its replacement is
    /// up before it leaves; one slot at a time).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_requests: Option<u64>,

    /// Recycle a worker whose private memory (USS: its own pages, not the
    /// ones it shares with the master and its siblings) grows past SIZE
    /// (e.g. 256m); its replacement starts first, one slot at a time. Each
    /// worker reads its own every --memory-check seconds.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    max_memory: Option<u64>,

    /// How often each worker reads its own memory (for --max-memory and the
    /// status), while idle.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    memory_check: Duration,

    /// Recycle a worker SECS after it started, less up to a tenth of that at
    /// random (so that workers do not all recycle together); its
    /// replacement starts first, one slot at a time.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    max_age: Option<Duration>,

    /// Add a random 0..=J to each worker's --max-requests, so that workers
    /// do not all recycle together.
    #[arg(long, value_name = "J", default_value_t = 0, requires = "max_requests")]
    max_requests_jitter: u64,

    /// Serve the workers' status as JSON on this Unix socket (mode 0600,
    /// same uid or root only); read it with `prefork status unix:PATH`.
    #[arg(long, value_name = "unix:/PATH", value_parser = parse_status_socket)]
    status: Option<PathBuf>,

    /// How workers report busy/idle (for measuring its cost).
    #[arg(long, value_enum, default_value_t = Report::Scoreboard, hide = true)]
    status_report: Report,

    /// listen(2) backlog (capped by the kernel at net.core.somaxconn).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(i32).range(1..=65535))]
    backlog: i32,

    /// TCP_DEFER_ACCEPT: accept a TCP connection only when its first bytes
    /// arrive, so no worker wakes for, or is held by, a client that has sent
    /// nothing (one that never sends is accepted about SECS later). 0 turns
    /// it off. [default: 1 for the http app, as Unicorn; 0 for the others]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(0..=3600))]
    defer_accept: Option<u32>,

    /// File mode of Unix socket files, in octal (e.g. 660).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    unix_mode: Option<u32>,

    /// Seconds a new worker has to boot (the app's after_fork, the strategy's
    /// set-up) and report ready; one that takes longer is killed and counts
    /// as a boot failure (its slot waits for the next reload), so a reload
    /// never waits on a stuck worker.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    boot_timeout: Duration,

    /// What TERM does: `fast` (as INT: workers stop at once, as nginx and
    /// Unicorn) or `graceful` (as QUIT: requests in flight finish; what a
    /// container manager means when it sends TERM).
    #[arg(long, value_enum, value_name = "fast|graceful", default_value_t = TermStop::Fast)]
    term: TermStop,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
    /// 127.0.0.1:9100): the pool by state, requests, worker exits by
    /// reason, accept queues, held connections, scale events, generation,
    /// upgrades, and a histogram of request durations.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_metrics_addr)]
    metrics: Option<std::net::SocketAddr>,

    /// Answer HAProxy's agent checks at HOST:PORT: `up N%` from the idle
    /// workers (N = idle × 100 / --agent-scale, at least 1), `drain` during
    /// --drain, `maint` when WINCH stopped every worker.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_metrics_addr)]
    agent: Option<std::net::SocketAddr>,

    /// Idle workers worth 100 % of the configured weight in the agent's
    /// answer.
    #[arg(long, value_name = "N", default_value_t = 16, requires = "agent",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    agent_scale: u64,

    /// Before a graceful stop (QUIT, or TERM with --term graceful), answer
    /// `drain` to the agent checks for SECS while serving on, so the
    /// balancer moves new connections away first.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, requires = "agent")]
    drain: Option<Duration>,

    /// Reap every orphan the workers' processes leave behind
    /// (PR_SET_CHILD_SUBREAPER), as a master running as PID 1 in a
    /// container does anyway.
    #[arg(long)]
    subreaper: bool,

    /// Slots a reload (HUP) replaces at a time: each slot's new worker is
    /// forked only while fewer than workers + N run, so memory peaks at
    /// that and boots do not pile up; `all` forks every new worker at once.
    /// Default: a quarter of the pool, at least 1.
    #[arg(long, value_name = "N|all", value_parser = parse_batch)]
    reload_batch: Option<usize>,

    /// Seconds a client has to send a whole request head (the http app; the
    /// fdpass master enforces it for every app with framing, and answers
    /// the app's timeout response, the http app's 408). On a kept-alive
    /// connection, the http app gives all its heads together this long.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    header_timeout: Duration,

    /// Seconds an idle kept-alive connection is kept: waiting in the worker
    /// (blocking, mutex, reuseport), or parked in the master (fdpass).
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    keepalive_timeout: Duration,

    /// http app: requests served on one kept-alive connection at most.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    keepalive_requests: u32,

    /// static app: serve the files under this directory (loaded at start;
    /// a binary upgrade, USR2, loads them again).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,

    /// static app: the most the files under --root may take in all; more
    /// is an error at start (e.g. 512m, 2g).
    #[arg(long, value_name = "SIZE", default_value = "1g", value_parser = parse_size_arg)]
    static_max: u64,

    /// http app: the largest request body read (and discarded); a larger
    /// one gets 413 (e.g. 1m, 64k, 1048576).
    #[arg(long, value_name = "SIZE", default_value = "1m", value_parser = parse_size_arg)]
    max_body: u64,

    /// fdpass: the largest request body the master buffers before handing
    /// the request to a worker, so that a slow upload holds no worker; a
    /// larger body, or a chunked one, is handed over after the head.
    #[arg(long, value_name = "SIZE", default_value = "1m", value_parser = parse_size_arg)]
    max_body_buffer: u64,

    /// fdpass: connections the master holds at most (requests arriving,
    /// kept-alive connections, requests waiting for a worker). At the
    /// limit it stops accepting; new connections wait in the backlog.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,

    /// fdpass: when a connection goes to a worker. `ready`: once its
    /// request is whole, and kept-alive connections are parked in the
    /// master (the front: no slow or idle client holds a worker). `accept`:
    /// at once, unread, as plain fdpass (to compare).
    #[arg(long, value_enum, value_name = "WHEN")]
    dispatch: Option<DispatchName>,

    /// Inject a fault into every worker (for the test suite).
    #[arg(long, value_enum, hide = true)]
    fault: Option<Fault>,

    /// mutex strategy: the lock that serializes accept.
    #[arg(long, value_enum, value_name = "KIND")]
    lock: Option<LockName>,

    /// mutex strategy: take the lock even with a single listener.
    #[arg(long)]
    lock_always: bool,

    /// Print the accept strategies this binary offers, one per line, and exit.
    #[arg(long)]
    list_strategies: bool,

    /// Detach from the terminal (Unicorn's -D, nginx's `daemon on`): the
    /// command returns once the server is ready, printing its ready line,
    /// or with the server's error and exit code. Logs go to --log-file, or
    /// nowhere; stdin and stdout are /dev/null. Stop it by the pid in the
    /// ready line or --pid-file.
    #[arg(short = 'D', long)]
    daemon: bool,

    /// Check the flags and the --config file, print `configuration ok` and
    /// exit 0, or print the error and exit 2 (as `nginx -t`, gunicorn's
    /// --check-config): run it before sending HUP. Nothing is bound.
    #[arg(long)]
    check_config: bool,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log level (error, warn, info, debug, trace) or a tracing filter;
    /// RUST_LOG is used when this is not given.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

fn parse_bind(s: &str) -> Result<BindSpec, String> {
    BindSpec::parse(s).map_err(|e| e.to_string())
}

/// `N` (a fixed pool) or `MIN:MAX`, each 1..=1024.
fn parse_workers(s: &str) -> Result<(usize, usize), String> {
    let one = |v: &str| -> Result<usize, String> {
        match v.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            Ok(_) => Err(format!("{v:?} is not in 1..=1024")),
            Err(_) => Err(format!("{v:?} is not a number (expected N or MIN:MAX)")),
        }
    };
    match s.split_once(':') {
        None => one(s).map(|n| (n, n)),
        Some((min, max)) => {
            let (min, max) = (one(min)?, one(max)?);
            if min > max {
                return Err(format!("MIN {min} is more than MAX {max}"));
            }
            Ok((min, max))
        }
    }
}

fn parse_status_socket(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("unix:") {
        Some(p) if !p.is_empty() && p.len() < 108 => Ok(PathBuf::from(p)),
        _ => Err(format!("{s:?}: expected unix:/path/to/status.sock")),
    }
}

/// `--metrics`: an IP address and a port (`127.0.0.1:9100`, `[::1]:9100`).
fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address such as 127.0.0.1:9100"))
}

/// `--reload-batch`: a count of at least 1, or `all`.
fn parse_batch(s: &str) -> Result<usize, String> {
    if s == "all" {
        return Ok(usize::MAX);
    }
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a count of at least 1, or \"all\"")),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(format!(
            "{s:?} must be more than 0 and at most 86400 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

/// A size in bytes: a number, with a k, m or g suffix for KiB, MiB, GiB
/// (`1m`, `64k`, `1048576`), as nginx writes them.
fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{s:?} is not a size such as 64k or 1m: {e}"))
}

/// The fdpass master's front, from the flags.
fn front_config(cli: &Cli) -> prefork_fdpass::FrontConfig {
    prefork_fdpass::FrontConfig {
        dispatch: match cli.dispatch {
            Some(DispatchName::Accept) => prefork_fdpass::Dispatch::AtAccept,
            Some(DispatchName::Ready) | None => prefork_fdpass::Dispatch::WhenReady,
        },
        header_timeout: cli.header_timeout,
        keepalive_timeout: cli.keepalive_timeout,
        max_connections: cli.max_connections as usize,
        // The head (the http app refuses one over 8 KiB) and the body.
        max_buffer: usize::try_from(cli.max_body_buffer)
            .unwrap_or(usize::MAX)
            .saturating_add(64 << 10),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode such as 660"))
}

/// Leaves this process no descriptor number to open anything into (the
/// soft RLIMIT_NOFILE lowered to 3: a new descriptor must be numbered below
/// it, so accept(2) and a received descriptor fail with EMFILE; those open
/// already stay valid), and restores the limit after `d` from a thread
/// (workers may start threads).
fn exhaust_descriptors_for(d: Duration) -> Result<(), BoxError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let _ = setrlimit(Resource::RLIMIT_NOFILE, soft, hard);
    });
    setrlimit(Resource::RLIMIT_NOFILE, 3, hard)?;
    Ok(())
}

/// The built-in apps behind one type, so the master is generic over one App.
enum Builtin {
    Hello(apps::Hello),
    Echo(apps::Echo),
    Http(Box<apps::Http>),
}

/// A built-in app, with an optional injected fault.
struct Served {
    app: Builtin,
    fault: Option<Fault>,
}

impl App for Served {
    fn preload(&mut self) -> Result<(), BoxError> {
        match &mut self.app {
            Builtin::Http(a) => a.preload(),
            Builtin::Hello(_) | Builtin::Echo(_) => Ok(()),
        }
    }

    fn after_fork(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        match self.fault {
            Some(Fault::BootCrash) => std::process::abort(),
            Some(Fault::BootFail) => return Err("injected boot failure (--fault boot-fail)".into()),
            Some(Fault::FdLimit1s) => exhaust_descriptors_for(Duration::from_secs(1))?,
            Some(Fault::BootHangOnReload) if w.generation > 1 => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            Some(Fault::BootHangOnReload) => {}
            Some(Fault::BootSlowOnReload) if w.generation > 1 => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(Fault::BootSlowOnReload) => {}
            Some(Fault::OrphanAtBoot) => {
                std::process::Command::new("sh")
                    .args(["-c", "sleep 0.3 &"])
                    .status()?;
            }
            None => {}
        }
        match &mut self.app {
            Builtin::Hello(a) => a.after_fork(w),
            Builtin::Echo(a) => a.after_fork(w),
            Builtin::Http(a) => a.after_fork(w),
        }
    }

    fn frame(&self, buf: &[u8]) -> Frame {
        match &self.app {
            Builtin::Http(a) => a.frame(buf),
            Builtin::Hello(_) | Builtin::Echo(_) => Frame::Complete(0),
        }
    }

    fn timeout_response(&self) -> Option<Vec<u8>> {
        match &self.app {
            Builtin::Http(a) => a.timeout_response(),
            Builtin::Hello(_) | Builtin::Echo(_) => None,
        }
    }

    fn handle(&mut self, c: &mut Connection) -> std::io::Result<Next> {
        match &mut self.app {
            Builtin::Hello(a) => a.handle(c),
            Builtin::Echo(a) => a.handle(c),
            Builtin::Http(a) => a.handle(c),
        }
    }
}

/// Prints one line `error: ...` (the whole chain) and returns exit code `code`.
fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

fn log_filter(cli: &Cli) -> Result<tracing_subscriber::EnvFilter, String> {
    use tracing_subscriber::EnvFilter;
    Ok(match &cli.log_level {
        Some(l) => EnvFilter::try_new(l)
            .map_err(|e| format!("invalid value {l:?} for --log-level: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    })
}

/// Changes the log filter of the running process (a reload's `log-level`).
type LogLevelHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn init_logging(cli: &Cli) -> Result<LogLevelHandle, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(log_filter(cli)?);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(cli.log_file.is_none() && std::io::stderr().is_terminal())
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match cli.log_format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(handle)
}

/// The ready line: stable for scripts, every listen= a bound address with
/// its real port, in --bind order.
fn ready_line(r: &ReadyInfo) -> String {
    let mut line = format!(
        "prefork ready pid={} strategy={} workers={}",
        r.pid, r.strategy, r.workers
    );
    if let Some(max) = r.workers_max {
        line.push_str(&format!(" workers_max={max}"));
    }
    for a in &r.addrs {
        line.push_str(&format!(" listen={a}"));
    }
    line
}

fn print_ready(r: &ReadyInfo) {
    // The one line on stdout.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", ready_line(r));
    let _ = out.flush();
}

/// Why the arguments do not give a server to run.
enum ArgsError {
    /// --help or --version: print it and exit 0.
    Info(clap::Error),
    /// A usage error, one line.
    Usage(String),
}

/// clap's message folded to one line: what is wrong and what is valid.
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .collect::<Vec<_>>()
        .join(" ");
    line.trim_start_matches("error: ").to_string()
}

/// The settings: the command line, over the `--config` file's when one is
/// given.
fn read_settings(argv: &[OsString]) -> Result<Cli, ArgsError> {
    let usage = |e: clap::Error| {
        if e.use_stderr() {
            ArgsError::Usage(one_line(&e))
        } else {
            ArgsError::Info(e)
        }
    };
    let matches = Cli::command().try_get_matches_from(argv).map_err(usage)?;
    let cli = Cli::from_arg_matches(&matches).map_err(usage)?;
    let Some(path) = cli.config.clone().filter(|_| cli.cmd.is_none()) else {
        return Ok(cli);
    };
    let in_file = |e: String| ArgsError::Usage(format!("config file {}: {e}", path.display()));
    let from_file = config::flags(&path, &Cli::command(), |id| {
        matches.value_source(id) == Some(ValueSource::CommandLine)
    })
    .map_err(in_file)?;
    let mut merged = argv[..1].to_vec();
    merged.extend(from_file);
    merged.extend(argv.iter().skip(1).cloned());
    Cli::try_parse_from(&merged).map_err(|e| in_file(one_line(&e)))
}

/// Checks across flags that clap cannot express.
fn check(cli: &Cli) -> Result<(), String> {
    if (cli.lock.is_some() || cli.lock_always) && cli.strategy != StrategyName::Mutex {
        return Err("--lock and --lock-always apply only to --strategy mutex".into());
    }
    if cli.dispatch.is_some() && cli.strategy != StrategyName::Fdpass {
        return Err("--dispatch applies only to --strategy fdpass".into());
    }
    if cli.max_body_buffer > cli.max_body {
        return Err(format!(
            "--max-body-buffer ({}) is larger than --max-body ({}): a body that large is refused anyway",
            cli.max_body_buffer, cli.max_body
        ));
    }
    match (cli.app, &cli.root) {
        (AppName::Static, None) => return Err("--app static needs --root DIR".into()),
        (AppName::Static, Some(root)) if !root.is_dir() => {
            return Err(format!("--root {}: not a directory", root.display()))
        }
        (app, Some(_)) if app != AppName::Static => {
            return Err("--root applies only to --app static".into())
        }
        _ => {}
    }
    if cli.app == AppName::Hello && cli.defer_accept.unwrap_or(0) > 0 {
        return Err("--defer-accept: the hello app speaks first and its clients send nothing, so every connection would wait that long to be accepted".into());
    }
    let fixed = cli.workers.map_or(true, |(min, max)| min == max);
    if fixed && (cli.spare.is_some() || cli.scale_window.is_some() || cli.scale_stall.is_some()) {
        return Err("--spare, --scale-window and --scale-stall apply only to a pool that sizes itself (--workers MIN:MAX)".into());
    }
    if !fixed && cli.status_report == Report::Off {
        return Err("--workers MIN:MAX needs busy/idle reports (not --status-report off)".into());
    }
    Ok(())
}

/// The pool and its deadlines (what a reload may change).
fn reload_settings(cli: &Cli) -> ReloadSettings {
    let (workers, max) = cli.workers.unwrap_or_else(|| {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (n, n)
    });
    let scale = (max > workers).then(|| ScaleConfig {
        min: workers,
        max,
        spare: cli.spare.map_or(1, |n| n as usize),
        window: cli.scale_window.unwrap_or(Duration::from_secs(10)),
        stall: cli.scale_stall.unwrap_or(Duration::from_secs(1)),
    });
    ReloadSettings {
        pool: PoolSettings {
            workers,
            scale,
            graceful_timeout: cli.graceful_timeout,
            timeout: cli.timeout,
        },
        max_requests: cli.max_requests,
        max_requests_jitter: cli.max_requests_jitter,
        keepalive_timeout: cli.keepalive_timeout,
    }
}

fn http_limits(cli: &Cli) -> apps::HttpLimits {
    apps::HttpLimits {
        header_timeout: cli.header_timeout,
        keepalive_requests: cli.keepalive_requests,
        max_body: cli.max_body,
        max_body_buffer: cli.max_body_buffer,
        max_sleep: Duration::from_secs(3600),
    }
}

/// Settings a reload cannot change (sockets, identity, files, strategy),
/// by flag name.
fn fixed_settings(cli: &Cli) -> [(&'static str, String); 29] {
    [
        ("bind", format!("{:?}", cli.bind)),
        ("strategy", format!("{:?}", cli.strategy)),
        ("app", format!("{:?}", cli.app)),
        ("pid-file", format!("{:?}", cli.pid_file)),
        ("log-file", format!("{:?}", cli.log_file)),
        ("user", format!("{:?}", cli.user)),
        ("group", format!("{:?}", cli.group)),
        ("status", format!("{:?}", cli.status)),
        ("backlog", format!("{:?}", cli.backlog)),
        ("defer-accept", format!("{:?}", cli.defer_accept)),
        ("unix-mode", format!("{:?}", cli.unix_mode)),
        ("lock", format!("{:?}", cli.lock)),
        ("lock-always", format!("{:?}", cli.lock_always)),
        ("log-format", format!("{:?}", cli.log_format)),
        ("boot-timeout", format!("{:?}", cli.boot_timeout)),
        ("reload-batch", format!("{:?}", cli.reload_batch)),
        ("root", format!("{:?}", cli.root)),
        ("static-max", format!("{:?}", cli.static_max)),
        ("max-memory", format!("{:?}", cli.max_memory)),
        ("memory-check", format!("{:?}", cli.memory_check)),
        ("max-age", format!("{:?}", cli.max_age)),
        ("term", format!("{:?}", cli.term)),
        ("subreaper", format!("{:?}", cli.subreaper)),
        ("metrics", format!("{:?}", cli.metrics)),
        ("agent", format!("{:?}", cli.agent)),
        ("agent-scale", format!("{:?}", cli.agent_scale)),
        ("drain", format!("{:?}", cli.drain)),
        ("max-connections", format!("{:?}", cli.max_connections)),
        ("dispatch", format!("{:?}", cli.dispatch)),
    ]
}

/// HUP with `--config`: reads the file again, under the same command line.
struct Reloader {
    argv: Vec<OsString>,
    /// The settings the master started with.
    running: Cli,
    log_level: LogLevelHandle,
}

impl Reloader {
    fn reload(&self, app: &mut Served) -> Result<ReloadSettings, BoxError> {
        let new = match read_settings(&self.argv) {
            Ok(cli) => cli,
            Err(ArgsError::Usage(e)) => return Err(e.into()),
            Err(ArgsError::Info(e)) => return Err(one_line(&e).into()),
        };
        check(&new)?;
        let filter = log_filter(&new)?;
        for ((name, was), (_, now)) in fixed_settings(&self.running)
            .into_iter()
            .zip(fixed_settings(&new))
        {
            if was != now {
                tracing::warn!("reload: {name} changed in the config file; it takes effect on a restart or a binary upgrade (USR2), the running value stays");
            }
        }
        self.log_level.reload(filter)?;
        if let Builtin::Http(h) = &mut app.app {
            h.set_limits(http_limits(&new));
        }
        Ok(reload_settings(&new))
    }
}

/// Starts the master with `strategy` and runs it until it exits; `ready`
/// announces it (stdout, or a daemon's pipe).
fn serve<S: AcceptStrategy>(
    cfg: MasterConfig,
    strategy: S,
    app: Served,
    reloader: Option<Reloader>,
    ready: impl FnMut(&ReadyInfo),
) -> prefork_core::Result<i32> {
    let mut master = Master::start(cfg, strategy, app)?;
    if let Some(r) = reloader {
        master.on_reload(move |app| r.reload(app));
    }
    master.run(ready)
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = match read_settings(&argv) {
        Ok(cli) => cli,
        Err(ArgsError::Info(e)) => {
            let _ = e.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Usage(e)) => return fail(e, 2),
    };
    match &cli.cmd {
        Some(Cmd::Status { socket, json }) => return status::run(socket, *json),
        Some(Cmd::Man) => {
            // From the same clap definitions as --help: never out of date.
            let man = clap_mangen::Man::new(Cli::command());
            let mut out = std::io::stdout().lock();
            return match man.render(&mut out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("writing the manual page: {e}"), 1),
            };
        }
        Some(Cmd::Completions { shell }) => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "prefork",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    if cli.list_strategies {
        for s in StrategyName::value_variants() {
            if let Some(v) = s.to_possible_value() {
                println!("{}", v.get_name());
            }
        }
        return ExitCode::SUCCESS;
    }
    if let Err(e) = check(&cli) {
        return fail(e, 2);
    }
    let user = match &cli.user {
        None => None,
        Some(u) => match prefork_core::WorkerUser::resolve(u, cli.group.as_deref()) {
            Ok(u) => Some(u),
            Err(e) => return fail(e, 2),
        },
    };
    if cli.check_config {
        if let Err(e) = log_filter(&cli) {
            return fail(e, 2);
        }
        match &cli.config {
            Some(p) => println!("configuration ok: {}", p.display()),
            None => println!("configuration ok"),
        }
        return ExitCode::SUCCESS;
    }
    let log_level = match init_logging(&cli) {
        Ok(handle) => handle,
        Err(e) => return fail(e, 2),
    };
    let mut ready_pipe = None;
    // A new master started by USR2 is already detached: it is the old
    // (daemon) master's child, and must stay so (nginx does the same).
    let upgrading = std::env::var_os(prefork_core::upgrade::INHERIT_VAR).is_some();
    if cli.daemon && !upgrading && std::env::var_os("LISTEN_FDS").is_some() {
        // The sockets are meant for this pid (LISTEN_PID); a detached child
        // has another, and the service manager supervises the process anyway.
        return fail(
            "--daemon: the service manager passed sockets (LISTEN_FDS) to this process; run it in the foreground",
            2,
        );
    }
    if cli.daemon && !upgrading {
        match prefork_core::daemon::daemonize() {
            Ok(prefork_core::daemon::Daemon::Starter(starter)) => {
                return match starter.wait() {
                    Ok(line) => {
                        println!("{line}");
                        ExitCode::SUCCESS
                    }
                    Err(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                };
            }
            Ok(prefork_core::daemon::Daemon::Server(pipe)) => ready_pipe = Some(pipe),
            Err(e) => return fail(e, 1),
        }
    }
    let ready = move |r: &ReadyInfo| match &mut ready_pipe {
        Some(pipe) => pipe.send(&ready_line(r)),
        None => print_ready(r),
    };
    let mut binds = cli.bind.clone();
    if binds.is_empty() && std::env::var_os("LISTEN_FDS").is_none() {
        binds.push(BindSpec::Tcp {
            host: "127.0.0.1".into(),
            port: 8080,
        });
    }
    let pool = reload_settings(&cli);
    let cfg = MasterConfig {
        binds,
        bind_options: BindOptions {
            backlog: cli.backlog,
            unix_mode: cli.unix_mode,
            // The client speaks first in HTTP; with the others it may not.
            defer_accept: cli.defer_accept.unwrap_or(
                if matches!(cli.app, AppName::Http | AppName::Static) {
                    1
                } else {
                    0
                },
            ),
            ..BindOptions::default()
        },
        socket_activation: true,
        workers: pool.pool.workers,
        scale: pool.pool.scale,
        graceful_timeout: pool.pool.graceful_timeout,
        pid_file: cli.pid_file.clone(),
        timeout: pool.pool.timeout,
        boot_timeout: Some(cli.boot_timeout),
        reload_batch: cli.reload_batch,
        subreaper: cli.subreaper,
        term_is_graceful: cli.term == TermStop::Graceful,
        metrics: cli.metrics,
        agent: cli.agent.map(|a| (a, cli.agent_scale as usize)),
        drain: cli.drain,
        max_memory: cli.max_memory,
        memory_check: cli.memory_check,
        max_age: cli.max_age,
        max_requests: pool.max_requests,
        max_requests_jitter: pool.max_requests_jitter,
        keepalive_timeout: pool.keepalive_timeout,
        report: match cli.status_report {
            Report::Scoreboard => ReportMode::Scoreboard,
            Report::Pipe => ReportMode::Pipe,
            Report::Off => ReportMode::Off,
        },
        status_socket: cli.status.clone(),
        user,
        log_file: cli.log_file.clone(),
        detached: cli.daemon,
    };
    let app = match cli.app {
        AppName::Hello => Builtin::Hello(apps::Hello::default()),
        AppName::Echo => Builtin::Echo(apps::Echo {
            idle_timeout: Duration::from_secs(60),
        }),
        AppName::Http => Builtin::Http(Box::new(apps::Http::new(http_limits(&cli)))),
        AppName::Static => {
            let root = cli.root.clone().unwrap_or_default();
            Builtin::Http(Box::new(
                apps::Http::new(http_limits(&cli)).serving(root, cli.static_max),
            ))
        }
    };
    let app = Served {
        app,
        fault: cli.fault,
    };
    let reloader = cli.config.is_some().then(|| Reloader {
        argv,
        running: cli.clone(),
        log_level,
    });
    let result = match cli.strategy {
        StrategyName::Blocking => {
            serve(cfg, prefork_blocking::Blocking::new(), app, reloader, ready)
        }
        StrategyName::Mutex => {
            // pthread measured best (docs/strategies.md): its unlock wakes
            // exactly one waiter, where flock, fcntl and SysV wake them all.
            let kind = match cli.lock.unwrap_or(LockName::Pthread) {
                LockName::Flock => prefork_mutex::LockKind::Flock,
                LockName::Fcntl => prefork_mutex::LockKind::Fcntl,
                LockName::Sysvsem => prefork_mutex::LockKind::SysvSem,
                LockName::Pthread => prefork_mutex::LockKind::Pthread,
            };
            let strategy = prefork_mutex::Mutex::new(kind, cli.lock_always);
            serve(cfg, strategy, app, reloader, ready)
        }
        StrategyName::Reuseport => serve(
            cfg,
            prefork_reuseport::Reuseport::new(),
            app,
            reloader,
            ready,
        ),
        StrategyName::Fdpass => serve(
            cfg,
            prefork_fdpass::Fdpass::with(front_config(&cli)),
            app,
            reloader,
            ready,
        ),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e @ (prefork_core::Error::BadAddress { .. } | prefork_core::Error::Config(_))) => {
            fail(e, 2)
        }
        Err(e) => fail(e, 1),
    }
}
