//! The master: binds, preloads, forks workers and supervises them.
//!
//! One thread, one poll(2). [`Master::run`] is its loop, each turn read
//! aloud:
//! 1. wait for events: a poll that returns what is ready, nothing else;
//! 2. act on signals (the self-pipe is drained first, so none is lost);
//! 3. reap every exited child (waitpid(-1, WNOHANG) until none is left);
//! 4. read worker reports, and let the strategy do its I/O;
//! 5. observe the workers and size the pool;
//! 6. perform the supervisor's actions (spawn, signal, exit).
//!
//! Its parts: the pool of worker processes (the table, the scoreboard,
//! their reports; `pool.rs`), the upgrade component (USR2; `upgrade.rs`),
//! and the pure [`Supervisor`] that decides.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::app::{App, BoxError};
use crate::clock::{poll_timeout, MonoTime};
use crate::error::{Error, Result};
use crate::listener::{self, ActivationEnv, BindOptions, BindSpec, ListenAddr, Listener};
use crate::pidfile::PidFile;
use crate::pool::Pool;
use crate::report::ReportMode;
use crate::scoreboard::Scoreboard;
use crate::signals::SelfPipe;
use crate::status::{self, StatusWriter};
use crate::status_server::StatusServer;
use crate::strategy::{AcceptStrategy, Prepare};
use crate::supervisor::{
    Action, Command, ExitStatus, PoolSettings, StopReason, Supervisor, SupervisorConfig,
};
use crate::sys::{self, Forked};
use crate::upgrade::{self, MasterFiles, Upgrade};
use crate::worker::{self, WorkerSetup, EXIT_PANIC};

/// Everything the master needs to start.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// Addresses to bind (in addition to sockets from socket activation).
    pub binds: Vec<BindSpec>,
    /// How to bind them.
    pub bind_options: BindOptions,
    /// Adopt systemd's LISTEN_FDS sockets when they are meant for us.
    pub socket_activation: bool,
    /// Workers to keep (the starting size when `scale` is set: `scale.min`).
    pub workers: usize,
    /// Size the pool between a minimum and a maximum (`--workers MIN:MAX`).
    pub scale: Option<crate::scaling::ScaleConfig>,
    /// After QUIT, how long a worker may finish before it is terminated.
    pub graceful_timeout: Duration,
    /// Where to write the master's pid.
    pub pid_file: Option<PathBuf>,
    /// Kill a worker busy on one connection longer than this.
    pub timeout: Option<Duration>,
    /// Kill a worker not ready this long after its fork (a boot failure).
    pub boot_timeout: Option<Duration>,
    /// Recycle a worker whose private memory (USS) grows past this many
    /// bytes (`--max-memory`), checked every `memory_check`.
    pub max_memory: Option<u64>,
    /// How often each worker's memory is read for `max_memory`.
    pub memory_check: Duration,
    /// Recycle a worker this long after its fork, less up to a tenth of it
    /// at random so that workers do not recycle together (`--max-age`).
    pub max_age: Option<Duration>,
    /// Slots a reload replaces at a time (`None`: a quarter of the pool).
    pub reload_batch: Option<usize>,
    /// Recycle a worker after this many connections.
    pub max_requests: Option<u64>,
    /// Add 0..=this to each worker's limit, so workers do not recycle together.
    pub max_requests_jitter: u64,
    /// How long a worker keeps a kept-alive connection waiting in place for
    /// its next request (blocking, mutex, reuseport; fdpass's master parks
    /// it instead, with its own timeout).
    pub keepalive_timeout: Duration,
    /// How workers report busy/idle.
    pub report: ReportMode,
    /// Serve the scoreboard as JSON on this Unix socket (mode 0600).
    pub status_socket: Option<PathBuf>,
    /// Run the workers as this user (the master keeps its own).
    pub user: Option<crate::user::WorkerUser>,
    /// Send stderr (the logs) here once the listeners are bound; USR1
    /// reopens it.
    pub log_file: Option<PathBuf>,
    /// Detached from the terminal (`--daemon`): without `log_file`, stderr
    /// goes to /dev/null at the same point, before any worker is forked.
    pub detached: bool,
    /// Become a child subreaper (PR_SET_CHILD_SUBREAPER): processes the
    /// app's workers leave behind are re-parented to the master, which
    /// reaps them, as PID 1 in a container does anyway (`--subreaper`).
    pub subreaper: bool,
    /// TERM (and INT) stop gracefully, as QUIT does (`--term graceful`:
    /// container managers send TERM to stop).
    pub term_is_graceful: bool,
    /// Serve the Prometheus exposition here (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// Answer HAProxy's agent checks here (`--agent`), with this many idle
    /// workers worth 100 % (`--agent-scale`).
    pub agent: Option<(std::net::SocketAddr, usize)>,
    /// A graceful stop first reports `drain` to the agent checks this long,
    /// while serving on (`--drain`).
    pub drain: Option<Duration>,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            binds: Vec::new(),
            bind_options: BindOptions::default(),
            socket_activation: true,
            workers: 1,
            scale: None,
            graceful_timeout: Duration::from_secs(30),
            pid_file: None,
            timeout: None,
            boot_timeout: Some(Duration::from_secs(60)),
            subreaper: false,
            term_is_graceful: false,
            metrics: None,
            agent: None,
            drain: None,
            max_memory: None,
            memory_check: Duration::from_secs(5),
            max_age: None,
            reload_batch: None,
            max_requests: None,
            max_requests_jitter: 0,
            keepalive_timeout: Duration::from_secs(5),
            report: ReportMode::Scoreboard,
            status_socket: None,
            user: None,
            log_file: None,
            detached: false,
        }
    }
}

/// What a reload (HUP) applies, from the configuration the program re-read
/// (see [`Master::on_reload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSettings {
    /// The pool and its deadlines.
    pub pool: PoolSettings,
    /// Recycle a worker after this many connections.
    pub max_requests: Option<u64>,
    /// Add 0..=this to each worker's limit.
    pub max_requests_jitter: u64,
    /// How long a kept-alive connection waits in place in a worker.
    pub keepalive_timeout: Duration,
}

type ReloadFn<A> = Box<dyn FnMut(&mut A) -> std::result::Result<ReloadSettings, BoxError>>;

/// The reload hook (a newtype, for `Debug`).
struct ReloadHook<A>(ReloadFn<A>);

impl<A> std::fmt::Debug for ReloadHook<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadHook")
    }
}

/// Passed to the ready callback once every initial worker is up.
#[derive(Debug, Clone)]
pub struct ReadyInfo {
    /// The master's pid.
    pub pid: u32,
    /// Strategy name.
    pub strategy: &'static str,
    /// Workers running.
    pub workers: usize,
    /// The most workers, when the pool sizes itself.
    pub workers_max: Option<usize>,
    /// Every listening address, with real ports.
    pub addrs: Vec<ListenAddr>,
}

/// How often the master looks at the scoreboard when timeouts or recycling
/// need it, and the gap beyond which it decides it was stopped or starved.
const OBSERVE_TICK: Duration = Duration::from_millis(100);
/// The longest the master sleeps: each turn reaps, so a SIGCHLD wakeup that
/// never arrives cannot leave a zombie longer than this (see docs/design.md).
const MAX_SLEEP: Duration = Duration::from_secs(1);
const STALL_GAP: Duration = Duration::from_secs(1);

/// The master process.
#[derive(Debug)]
pub struct Master<S: AcceptStrategy, A: App> {
    strategy: S,
    app: A,
    pid: Pid,
    listeners: Vec<Listener>,
    pid_file: Option<PidFile>,
    status: Option<StatusServer>,
    /// Where stderr goes (`--log-file`), reopened on USR1.
    log_file: Option<crate::logfile::LogFile>,
    self_pipe: SelfPipe,
    /// The master keeps the only write end; children inherit the read end.
    alive: (OwnedFd, OwnedFd),
    sup: Supervisor,
    pool: Pool,
    upgrade: Upgrade,
    /// What every worker is forked with: its accept tick and its user.
    tick: Duration,
    keepalive_timeout: Duration,
    user: Option<crate::user::WorkerUser>,
    max_requests: Option<(u64, u64)>,
    max_age: Option<Duration>,
    /// `--max-memory`: the limit (KiB of private memory) and when the
    /// workers' readings are looked at next.
    memory_watch: Option<MemoryWatch>,
    /// How often workers read their own memory (with `--max-memory` or a
    /// status socket; `None`: never).
    memory_check: Option<Duration>,
    /// The pool sizes itself: sample it at this time next.
    next_sample: Option<MonoTime>,
    /// When the master last reaped (see [`MAX_SLEEP`]).
    last_reap: MonoTime,
    /// Re-reads the configuration on HUP.
    reload: Option<ReloadHook<A>>,
    /// A graceful stop waits, since then, for the requests the master holds
    /// to be handed over.
    drain_before_stop: Option<MonoTime>,
    started: MonoTime,
    rng: u64,
    /// The service manager's notify socket (systemd `Type=notify`).
    notify: crate::notify::Notifier,
    /// TERM stops gracefully (`--term graceful`).
    term_is_graceful: bool,
    /// `--metrics`: the endpoint, and what only the master counts.
    metrics: Option<crate::metrics::MetricsServer>,
    counts: Counts,
    /// `--agent`: the endpoint and its scale.
    agent: Option<(crate::agent::AgentServer, usize)>,
    /// `--drain`: how long, and, once a graceful stop was asked, until when
    /// the agent says `drain` before the stop proceeds.
    drain: Option<Duration>,
    draining_until: Option<MonoTime>,
}

/// What the metrics report that only the master sees.
#[derive(Debug, Default)]
struct Counts {
    /// Worker exits by reason.
    exits: std::collections::BTreeMap<&'static str, u64>,
    /// Why each signalled worker was told to stop (its exit's reason).
    stop_reasons: std::collections::HashMap<Pid, &'static str>,
    /// Scale decisions: grow, shrink.
    scale: (u64, u64),
    /// USR2 upgrades started.
    upgrades: u64,
}

/// `--max-memory`: every `every`, the workers' own readings (in their
/// scoreboard cells) are compared with the limit. The master makes no
/// syscall for it: a smaps_rollup read walks the process's page tables
/// (8 ms for 200 MiB resident, docs/memory.md), so each worker reads its
/// own, while idle.
#[derive(Debug)]
struct MemoryWatch {
    limit_kib: u64,
    every: Duration,
    next_at: MonoTime,
    /// Workers already logged as over the limit (until they are gone).
    warned: Vec<Pid>,
}

/// Where a spawn left us.
enum Spawned {
    Parent(Pid),
    Child(WorkerSetup),
}

/// What one wait found ready.
#[derive(Debug, Default)]
struct Events {
    /// The self-pipe: a signal came.
    signals: bool,
    /// Workers whose status channel is readable.
    reports: Vec<Pid>,
    /// The strategy's descriptors that are ready.
    strategy: Vec<RawFd>,
    /// A status client is waiting.
    status_clients: bool,
    /// A metrics client is waiting or sent something.
    metrics: bool,
    /// An agent check is waiting.
    agent: bool,
    /// How much longer than planned the sleep took (a stopped or starved
    /// master).
    overslept: Duration,
}

/// What start has left on disk so far: removed when dropped, so that every
/// early return of a failed start leaves nothing behind; handed to the
/// master when start succeeds.
#[derive(Debug, Default)]
struct Created {
    listeners: Vec<Listener>,
    pid_file: Option<PidFile>,
    status: Option<StatusServer>,
}

impl Drop for Created {
    fn drop(&mut self) {
        for l in &mut self.listeners {
            l.remove_socket_file();
        }
        if let Some(pf) = self.pid_file.take() {
            pf.remove();
        }
        if let Some(st) = self.status.take() {
            st.remove();
        }
    }
}

impl<S: AcceptStrategy, A: App> Master<S, A> {
    /// Binds every listener, writes the pid file and runs the app's preload,
    /// in that order; nothing is forked yet. Errors here lose nothing and
    /// leave nothing behind (socket files and the pid file are removed).
    pub fn start(cfg: MasterConfig, mut strategy: S, mut app: A) -> Result<Self> {
        // Checked here for a clear error before anything is bound; sys::fork
        // checks again at each fork, where soundness depends on it.
        let threads = sys::thread_count().map_err(|e| Error::sys("reading /proc/self/task", e))?;
        if threads != 1 {
            return Err(Error::NotSingleThreaded(threads));
        }
        if let Some(u) = &cfg.user {
            u.check_master()?;
        }
        if cfg.scale.is_some() && cfg.report == ReportMode::Off {
            return Err(Error::Config(
                "a pool that sizes itself needs busy/idle reports (not --status-report off)".into(),
            ));
        }
        let pid = nix::unistd::getpid();
        let mut opts = cfg.bind_options.clone();
        if let Some(own) = strategy.own_sockets() {
            own.bind_options(&mut opts);
        }
        let mut created = Created::default();
        if cfg.socket_activation {
            let env = ActivationEnv::take_from_process();
            created.listeners = listener::adopt_activated(&env, pid.as_raw() as u32, 3, &opts)?;
        }
        // Sockets handed over by an old master (USR2) are taken for their
        // --bind instead of binding again.
        let owned: Vec<std::os::fd::RawFd> = created
            .listeners
            .iter()
            .map(|l| l.as_fd().as_raw_fd())
            .collect();
        let taken = upgrade::take_over(&cfg.binds, &opts, strategy.name(), &owned)?;
        created.listeners.extend(taken.listeners);
        if created.listeners.is_empty() {
            return Err(Error::BadAddress {
                spec: String::new(),
                reason: "nothing to listen on: give at least one --bind".into(),
            });
        }
        let log_file = log_file(&cfg)?;
        strategy.prepare(Prepare {
            listeners: &created.listeners,
            worker_owner: cfg.user.as_ref().map(|u| (u.uid.as_raw(), u.gid.as_raw())),
            handed_over: taken.own,
        })?;
        let self_pipe =
            SelfPipe::install().map_err(|e| Error::sys("installing signal handlers", e))?;
        let alive = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| Error::sys("pipe2() for the master-alive pipe", e))?;
        if let Some(path) = &cfg.status_socket {
            created.status = Some(StatusServer::bind(path)?);
        }
        // Room for every worker alive at once: a full pool, its replacements
        // during a reload, and those still stopping.
        let scoreboard = Scoreboard::new(4 * crate::supervisor::MAX_WORKERS)
            .map_err(|e| Error::sys("mmap() for the scoreboard", e))?;
        if let Some(p) = &cfg.pid_file {
            created.pid_file = Some(PidFile::create(p, pid.as_raw() as u32)?);
        }
        app.preload().map_err(|e| Error::Preload(e.to_string()))?;
        // Everything is in place: from here on the logs go to the file (or,
        // detached, nowhere: the pipe to the starting command must not
        // reach the workers).
        redirect_stderr(log_file.as_ref(), cfg.detached)?;
        let metrics = match cfg.metrics {
            Some(addr) => {
                let m = crate::metrics::MetricsServer::bind(addr)
                    .map_err(|e| Error::sys(format!("--metrics {addr}"), e))?;
                let at = m
                    .local_addr()
                    .map_err(|e| Error::sys(format!("--metrics {addr}"), e))?;
                tracing::info!("metrics on http://{at}/metrics");
                Some(m)
            }
            None => None,
        };
        let agent = match cfg.agent {
            Some((addr, scale)) => {
                let a = crate::agent::AgentServer::bind(addr)
                    .map_err(|e| Error::sys(format!("--agent {addr}"), e))?;
                let at = a
                    .local_addr()
                    .map_err(|e| Error::sys(format!("--agent {addr}"), e))?;
                tracing::info!("agent checks on {at}");
                Some((a, scale))
            }
            None => None,
        };
        if cfg.subreaper {
            nix::sys::prctl::set_child_subreaper(true).map_err(|e| {
                Error::sys("prctl(PR_SET_CHILD_SUBREAPER)", std::io::Error::from(e))
            })?;
            tracing::info!("child subreaper: orphans of the workers' processes are reaped here");
        }
        if pid.as_raw() == 1 {
            tracing::info!("running as PID 1: every orphan is re-parented here and reaped");
        }
        let sup = Supervisor::new(SupervisorConfig {
            workers: cfg.workers,
            graceful_timeout: cfg.graceful_timeout,
            timeout: cfg.timeout,
            boot_timeout: cfg.boot_timeout,
            scale: cfg.scale,
            reload_batch: cfg.reload_batch,
            ..SupervisorConfig::default()
        });
        Ok(Master {
            strategy,
            app,
            pid,
            listeners: std::mem::take(&mut created.listeners),
            pid_file: created.pid_file.take(),
            status: created.status.take(),
            log_file,
            self_pipe,
            alive,
            sup,
            pool: Pool::new(scoreboard, cfg.report),
            upgrade: Upgrade::new(taken.from, cfg.status_socket.clone()),
            tick: opts.accept_tick,
            keepalive_timeout: cfg.keepalive_timeout,
            user: cfg.user,
            max_requests: cfg.max_requests.map(|n| (n, cfg.max_requests_jitter)),
            max_age: cfg.max_age,
            memory_watch: cfg.max_memory.map(|bytes| MemoryWatch {
                limit_kib: bytes / 1024,
                every: cfg.memory_check,
                next_at: MonoTime::now(),
                warned: Vec::new(),
            }),
            memory_check: (cfg.max_memory.is_some() || cfg.status_socket.is_some())
                .then_some(cfg.memory_check),
            next_sample: cfg.scale.map(|_| MonoTime::now()),
            last_reap: MonoTime::now(),
            reload: None,
            drain_before_stop: None,
            started: MonoTime::now(),
            rng: u64::from(pid.as_raw().unsigned_abs()) ^ MonoTime::now().as_nanos() | 1,
            notify: crate::notify::Notifier::from_env(
                taken.from.map(|p| p.as_raw().unsigned_abs()),
            ),
            term_is_graceful: cfg.term_is_graceful,
            metrics,
            counts: Counts::default(),
            agent,
            drain: cfg.drain,
            draining_until: None,
        })
    }

    /// Makes HUP re-read the configuration before it replaces the workers
    /// (Unicorn's, gunicorn's and nginx's reload). `hook` runs in the master,
    /// with the app, which it may update (new workers are forked from it);
    /// what it returns resizes the pool and sets the deadlines and request
    /// limits of the new workers. When it fails, as for a configuration file
    /// with a mistake, the error is logged and nothing changes: the running
    /// workers stay, with the settings they have (RELIABILITY L6).
    pub fn on_reload(
        &mut self,
        hook: impl FnMut(&mut A) -> std::result::Result<ReloadSettings, BoxError> + 'static,
    ) {
        self.reload = Some(ReloadHook(Box::new(hook)));
    }

    /// The bound addresses, with real ports.
    pub fn addrs(&self) -> Vec<ListenAddr> {
        self.listeners.iter().map(|l| l.addr().clone()).collect()
    }

    /// Runs until the master is told to stop; returns its exit code.
    /// `on_ready` is called once, when every initial worker is up.
    ///
    /// In a forked worker this never returns: the worker exits from here.
    pub fn run(mut self, mut on_ready: impl FnMut(&ReadyInfo)) -> Result<i32> {
        let mut announced = false;
        let mut signals = Vec::new();
        loop {
            let events = self.wait();
            if events.signals {
                self.self_pipe.drain(&mut signals);
                for sig in signals.drain(..) {
                    self.handle_signal(sig);
                }
            }
            self.reap_children(events.signals);
            for pid in &events.reports {
                self.pool.read_reports(*pid, &mut self.sup);
            }
            if let Some(io) = self.strategy.master_io() {
                for &fd in &events.strategy {
                    io.ready(fd, &self.app);
                }
            }
            self.finish_draining();
            self.observe_workers(events.overslept);
            self.watch_memory();
            if events.status_clients {
                self.serve_status();
            }
            if events.agent {
                self.answer_agent();
            }
            if self
                .draining_until
                .is_some_and(|t| MonoTime::now() >= t && !self.sup.is_stopping())
            {
                self.stop_gracefully("drain over");
            }
            if events.metrics
                || self
                    .metrics
                    .as_ref()
                    .and_then(|m| m.next_deadline())
                    .is_some_and(|t| t <= MonoTime::now())
            {
                self.serve_metrics();
            }
            self.size_pool();
            for action in self.sup.actions(MonoTime::now()) {
                match self.perform(action)? {
                    None => {}
                    Some(Flow::Exit(code)) => return Ok(self.finish(code)),
                    Some(Flow::Child(setup)) => {
                        // What the callback holds (a daemon's ready pipe)
                        // is the master's, not the worker's.
                        drop(on_ready);
                        self.become_worker(setup)
                    }
                }
            }
            let now = MonoTime::now();
            if self.notify.enabled() {
                let ready = self.sup.all_ready() && self.sup.live() > 0;
                if ready && (!announced || self.notify.is_reloading()) {
                    let line = self.status_line();
                    self.notify.ready(&line);
                }
                self.notify.turn(now);
                if self.notify.status_due(now) {
                    let line = self.status_line();
                    self.notify.status(now, line);
                }
            }
            if !announced && self.sup.all_ready() && self.sup.live() > 0 {
                announced = true;
                on_ready(&ReadyInfo {
                    pid: self.pid.as_raw() as u32,
                    strategy: self.strategy.name(),
                    workers: self.sup.target(),
                    workers_max: self.sup.scale_config().map(|c| c.max),
                    addrs: self.addrs(),
                });
            }
        }
    }

    /// How long the next wait may sleep: until the supervisor's next
    /// deadline, at most OBSERVE_TICK when the scoreboard must be watched
    /// (timeouts, recycling, pool sizing) and MAX_SLEEP otherwise, and no
    /// later than the next pool sample.
    fn sleep_budget(&mut self, now: MonoTime) -> Duration {
        let watch = self.sup.timeout().is_some()
            || self.max_requests.is_some()
            || self.sup.scale_config().is_some();
        let mut cap = if watch { OBSERVE_TICK } else { MAX_SLEEP };
        if let Some(t) = self.next_sample {
            cap = cap.min(t.saturating_since(now));
        }
        if let Some(w) = &self.memory_watch {
            cap = cap.min(w.next_at.saturating_since(now));
        }
        if let Some(t) = self.notify.next_deadline() {
            cap = cap.min(t.saturating_since(now));
        }
        if let Some(t) = self.metrics.as_ref().and_then(|m| m.next_deadline()) {
            cap = cap.min(t.saturating_since(now));
        }
        if let Some(t) = self.draining_until.filter(|_| !self.sup.is_stopping()) {
            cap = cap.min(t.saturating_since(now));
        }
        if let Some(t) = self.strategy.master_io().and_then(|io| io.next_deadline()) {
            cap = cap.min(t.saturating_since(now));
        }
        match self.sup.next_deadline() {
            Some(t) => t.saturating_since(now).min(cap),
            None => cap,
        }
    }

    /// Sleeps in poll(2) until a signal, a worker report, a strategy
    /// descriptor, a status client or the next deadline, and says which were
    /// ready. Reads nothing.
    fn wait(&mut self) -> Events {
        if let Some(io) = self.strategy.master_io() {
            io.turn(&self.app);
        }
        let start = MonoTime::now();
        let timeout = self.sleep_budget(start);
        let mut events = Events::default();
        let reports: Vec<(Pid, BorrowedFd<'_>)> = self.pool.channels().collect();
        let strategy_fds = match self.strategy.master_io() {
            Some(io) => io.fds(),
            None => Vec::new(),
        };
        let mut fds = Vec::with_capacity(2 + reports.len() + strategy_fds.len());
        fds.push(PollFd::new(self.self_pipe.read_fd(), PollFlags::POLLIN));
        if let Some(st) = &self.status {
            fds.push(PollFd::new(st.as_fd(), PollFlags::POLLIN));
        }
        let first_report = fds.len();
        fds.extend(
            reports
                .iter()
                .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
        );
        let first_strategy = fds.len();
        fds.extend(
            strategy_fds
                .iter()
                .map(|fd| PollFd::new(*fd, PollFlags::POLLIN)),
        );
        let first_metrics = fds.len();
        if let Some(m) = &self.metrics {
            fds.extend(
                m.fds()
                    .into_iter()
                    .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
            );
        }
        let agent_at = fds.len();
        if let Some((a, _)) = &self.agent {
            fds.push(PollFd::new(a.fd(), PollFlags::POLLIN));
        }
        if let Ok(n) = nix::poll::poll(&mut fds, poll_timeout(Some(timeout))) {
            if n > 0 {
                let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
                events.signals = ready(&fds[0]);
                events.status_clients = first_report > 1 && ready(&fds[1]);
                events.reports = reports
                    .iter()
                    .zip(&fds[first_report..first_strategy])
                    .filter(|(_, p)| ready(p))
                    .map(|((pid, _), _)| *pid)
                    .collect();
                events.metrics = fds[first_metrics..agent_at].iter().any(ready);
                events.agent = fds.get(agent_at).is_some_and(ready);
                events.strategy = fds[first_strategy..first_metrics]
                    .iter()
                    .filter(|p| ready(p))
                    .map(|p| p.as_fd().as_raw_fd())
                    .collect();
            }
        }
        events.overslept = MonoTime::now()
            .saturating_since(start)
            .saturating_sub(timeout);
        events
    }

    /// Feeds every worker's busy/idle state to the supervisor; tells it when
    /// the master itself was stopped or starved.
    fn observe_workers(&mut self, overslept: Duration) {
        if overslept > STALL_GAP {
            tracing::warn!(
                "master was stopped or starved for {:.1}s; busy workers get a fresh timeout",
                overslept.as_secs_f64()
            );
            self.sup.stalled(MonoTime::now());
        }
        self.pool.observe(&mut self.sup);
    }

    /// `--max-memory`: when due, looks at every worker's last reading of
    /// its own memory, and marks one over the limit for recycling
    /// (replacement first, one slot at a time). Private memory, not RSS,
    /// which counts the pages a worker shares with the master and its
    /// siblings.
    fn watch_memory(&mut self) {
        let Some(w) = &mut self.memory_watch else {
            return;
        };
        let now = MonoTime::now();
        if now < w.next_at {
            return;
        }
        w.next_at = now + w.every;
        let limit = w.limit_kib;
        let view = self.sup.view();
        w.warned.retain(|p| view.iter().any(|v| v.pid == *p));
        let candidates: Vec<_> = view
            .into_iter()
            .filter(|v| v.ready && !v.stopping && !v.recycling && !w.warned.contains(&v.pid))
            .collect();
        for v in candidates {
            let Some(m) = self.pool.memory(v.pid) else {
                continue; // no reading yet
            };
            tracing::debug!(
                "worker={} pid={} memory check: private {} KiB, shared {} KiB, PSS {} KiB (--max-memory {} KiB)",
                v.slot,
                v.pid,
                m.private_kib,
                m.shared_kib,
                m.pss_kib,
                limit
            );
            if m.private_kib > limit {
                tracing::warn!(
                    "worker={} pid={} private memory {} MiB > --max-memory {} MiB (RSS {} MiB, of which {} MiB shared); recycling it",
                    v.slot,
                    v.pid,
                    m.private_kib / 1024,
                    limit / 1024,
                    m.rss_kib / 1024,
                    m.shared_kib / 1024
                );
                self.sup.recycle(v.pid);
                w.warned.push(v.pid);
            }
        }
    }

    /// The pool sizing policy's turn, every SAMPLE_INTERVAL: probe the
    /// accept queues (poll with a zero timeout; TCP_INFO for the count),
    /// let the supervisor decide, log the decision.
    fn size_pool(&mut self) {
        let Some(due) = self.next_sample else { return };
        let now = MonoTime::now();
        if now < due {
            return;
        }
        self.next_sample = Some(now + crate::scaling::SAMPLE_INTERVAL);
        let (mut backlog, mut queued) = match self.strategy.own_sockets() {
            Some(own) => probe_backlog(&own.backlog_fds()),
            None => probe_backlog(&self.listeners.iter().map(|l| l.as_fd()).collect::<Vec<_>>()),
        };
        // A master that takes connections in (the fdpass front) keeps whole
        // requests waiting for a worker in a queue of its own: they wait
        // just as those in the listen queue do.
        if let Some((_, front_queued, _)) = self.strategy.master_io().and_then(|io| io.held()) {
            if front_queued > 0 {
                backlog = true;
                let n = u32::try_from(front_queued).unwrap_or(u32::MAX);
                queued = Some(queued.unwrap_or(0).saturating_add(n));
            }
        }
        if let Some(event) = self.sup.scale(now, backlog, queued) {
            if event.to > event.from {
                self.counts.scale.0 += 1;
            } else {
                self.counts.scale.1 += 1;
            }
            tracing::info!("{event}");
        }
    }

    /// Answers every waiting status client with the scoreboard as JSON.
    /// The `STATUS=` line for the service manager: the pool by state and
    /// what the master holds.
    fn status_line(&mut self) -> String {
        let view = self.sup.view();
        let mut count = [0usize; 3]; // busy, idle, keepalive
        for v in &view {
            match self.pool.state(v.pid) {
                crate::scoreboard::WorkerState::Busy { .. } => count[0] += 1,
                crate::scoreboard::WorkerState::KeepAlive { .. } => count[2] += 1,
                crate::scoreboard::WorkerState::Idle { .. } => count[1] += 1,
                crate::scoreboard::WorkerState::Booting => {}
            }
        }
        let mut line = format!(
            "{} of {} workers: {} busy, {} idle, {} keepalive",
            view.len(),
            self.sup.target(),
            count[0],
            count[1],
            count[2]
        );
        if let Some((reading, queued, parked)) = self.strategy.master_io().and_then(|io| io.held())
        {
            line.push_str(&format!(
                "; held {} ({reading} reading, {queued} queued, {parked} parked)",
                reading + queued + parked
            ));
        }
        line
    }

    /// The master's state for a scrape.
    fn metrics_snapshot(&mut self) -> crate::metrics::Snapshot {
        let mut snap = crate::metrics::Snapshot {
            target: self.sup.target() as u64,
            generation: self.sup.generation(),
            upgrades: self.counts.upgrades,
            scale_events: self.counts.scale,
            exits: self.counts.exits.clone(),
            durations: self.pool.durations(),
            listen_overflows: crate::metrics::host_listen_overflows(),
            held: self
                .strategy
                .master_io()
                .and_then(|io| io.held())
                .map(|(r, q, p)| (r as u64, q as u64, p as u64)),
            ..crate::metrics::Snapshot::default()
        };
        let view = self.sup.view();
        let mut served = self.pool.retired_requests();
        for v in &view {
            served += v.requests;
            let state = if v.stopping {
                "stopping"
            } else {
                match self.pool.state(v.pid) {
                    crate::scoreboard::WorkerState::Busy { .. } => "busy",
                    crate::scoreboard::WorkerState::KeepAlive { .. } => "keepalive",
                    crate::scoreboard::WorkerState::Idle { .. } => "idle",
                    crate::scoreboard::WorkerState::Booting if v.ready => "idle",
                    crate::scoreboard::WorkerState::Booting => "booting",
                }
            };
            *snap.workers.entry(state).or_default() += 1;
        }
        snap.requests = served;
        for l in &self.listeners {
            if let (ListenAddr::Tcp(_), Ok((queued, backlog))) =
                (l.addr(), sys::tcp_accept_queue(l.as_fd()))
            {
                snap.listen_queues.push((
                    l.addr().to_string(),
                    u64::from(queued),
                    u64::from(backlog),
                ));
            }
        }
        snap
    }

    fn serve_metrics(&mut self) {
        let Some(mut server) = self.metrics.take() else {
            return;
        };
        server.turn(|| crate::metrics::render(self.metrics_snapshot()));
        self.metrics = Some(server);
    }

    fn serve_status(&mut self) {
        let held = self.strategy.master_io().and_then(|io| io.held());
        let Some(server) = &self.status else {
            return;
        };
        let now = MonoTime::now();
        let mut workers: Vec<_> = self
            .sup
            .view()
            .into_iter()
            .map(|v| {
                crate::status_server::WorkerStatus::new(
                    &v,
                    self.pool.state(v.pid),
                    self.pool.memory(v.pid),
                    now,
                )
            })
            .collect();
        workers.sort_by_key(|w| (w.slot, w.pid));
        let listeners = self
            .listeners
            .iter()
            .map(|l| {
                let queue = match l.addr() {
                    ListenAddr::Tcp(_) => sys::tcp_accept_queue(l.as_fd()).ok(),
                    ListenAddr::Unix(_) => None,
                };
                (l.addr().to_string(), queue)
            })
            .collect::<Vec<_>>();
        let doc = crate::status_server::document(
            self.pid.as_raw() as u32,
            self.strategy.name(),
            self.sup.generation(),
            now.saturating_since(self.started),
            self.sup.target(),
            self.sup.scale_config(),
            &workers,
            self.pool.retired_requests(),
            &listeners,
            held,
        );
        server.answer_all(&doc);
    }

    fn handle_signal(&mut self, sig: Signal) {
        let cmd = match sig {
            Signal::SIGQUIT => Command::GracefulStop,
            Signal::SIGTERM if self.term_is_graceful => Command::GracefulStop,
            Signal::SIGTERM | Signal::SIGINT => Command::FastStop,
            Signal::SIGHUP if self.reload.is_some() && !self.sup.is_stopping() => {
                self.notify.reloading();
                self.reload_with_new_settings();
                return;
            }
            Signal::SIGHUP => Command::Reload,
            Signal::SIGTTIN => Command::AddWorker,
            Signal::SIGTTOU => Command::RemoveWorker,
            Signal::SIGWINCH => Command::StopWorkers,
            Signal::SIGUSR1 => {
                self.reopen_logs();
                return;
            }
            Signal::SIGUSR2 => {
                self.start_new_master();
                return;
            }
            _ => return, // SIGCHLD: reaping follows
        };
        if cmd == Command::Reload && !self.sup.is_stopping() {
            self.notify.reloading();
        }
        if cmd == Command::GracefulStop
            && self.draining_until.is_none()
            && !self.sup.is_stopping()
            && self.agent.is_some()
        {
            if let Some(d) = self.drain {
                // The balancer is told first; the pool serves on meanwhile.
                tracing::info!(
                    "{sig}: draining for {} (the agent says drain), then stopping gracefully",
                    fmt_secs(d)
                );
                self.draining_until = Some(MonoTime::now() + d);
                self.notify.stopping();
                return;
            }
        }
        if matches!(cmd, Command::GracefulStop | Command::FastStop) {
            self.notify.stopping();
            let graceful = cmd == Command::GracefulStop;
            if graceful && !self.sup.is_stopping() {
                self.refuse_new_connections();
            }
            let in_hand = self.strategy.master_io().map_or(0, |io| {
                io.stopping(graceful);
                io.held().map_or(0, |(reading, queued, _)| reading + queued)
            });
            // A graceful stop serves what the master already took in: the
            // workers are told to stop once it is handed over (or at the
            // graceful timeout), not before.
            if graceful && in_hand > 0 && self.drain_before_stop.is_none() {
                tracing::info!(
                    "{sig}: graceful stop: first handing over the {in_hand} request(s) the master holds"
                );
                self.drain_before_stop = Some(MonoTime::now());
                return;
            }
        }
        let what = self.sup.command(cmd, MonoTime::now());
        tracing::info!("{sig}: {what}");
    }

    /// The agent's answer: drain while draining (or stopping), maint with
    /// no worker wanted (WINCH), else the idle capacity.
    fn answer_agent(&mut self) {
        let state = if self.draining_until.is_some() || self.sup.is_stopping() {
            crate::agent::AgentState::Drain
        } else if self.sup.target() == 0 {
            crate::agent::AgentState::Maint
        } else {
            let idle = self
                .sup
                .view()
                .iter()
                .filter(|v| {
                    v.ready
                        && !v.stopping
                        && matches!(
                            self.pool.state(v.pid),
                            crate::scoreboard::WorkerState::Idle { .. }
                        )
                })
                .count();
            crate::agent::AgentState::Up { idle }
        };
        if let Some((a, scale)) = &self.agent {
            a.answer(|| crate::agent::line(state, *scale));
        }
    }

    /// The graceful stop a drain ends with, as QUIT does.
    fn stop_gracefully(&mut self, why: &str) {
        self.refuse_new_connections();
        let in_hand = self.strategy.master_io().map_or(0, |io| {
            io.stopping(true);
            io.held().map_or(0, |(reading, queued, _)| reading + queued)
        });
        if in_hand > 0 && self.drain_before_stop.is_none() {
            self.drain_before_stop = Some(MonoTime::now());
            return;
        }
        let what = self.sup.command(Command::GracefulStop, MonoTime::now());
        tracing::info!("{why}: {what}");
    }

    /// A graceful stop for good: new connections are dropped at the SYN
    /// (clients retransmit, balancers retry elsewhere) rather than queued
    /// and then reset when the listeners close, and the workers are told
    /// to empty the accept queues before they exit. Not while another
    /// master shares the sockets (a binary upgrade): it serves them on.
    fn refuse_new_connections(&mut self) {
        if self.upgrade.another_master_serves() {
            return;
        }
        let mut fds: Vec<BorrowedFd<'_>> = self
            .listeners
            .iter()
            .filter(|l| matches!(l.addr(), ListenAddr::Tcp(_)))
            .map(|l| l.as_fd())
            .collect();
        if let Some(own) = self.strategy.own_sockets() {
            fds.extend(own.backlog_fds());
        }
        let mut failed = 0;
        for fd in fds {
            if sys::drop_new_connections(fd).is_err() {
                failed += 1;
            }
        }
        if failed > 0 {
            tracing::warn!("graceful stop: {failed} listener(s) could not refuse new connections");
        }
        self.pool.mark_final_stop();
        tracing::info!("graceful stop: new connections are dropped at the SYN; the accept queues are emptied first");
    }

    /// A graceful stop waiting for the master's own requests to be handed
    /// over: once they are (or at the graceful timeout), the workers are
    /// told to stop.
    fn finish_draining(&mut self) {
        let Some(since) = self.drain_before_stop else {
            return;
        };
        let in_hand = self
            .strategy
            .master_io()
            .and_then(|io| io.held())
            .map_or(0, |(reading, queued, _)| reading + queued);
        let waited = MonoTime::now().saturating_since(since);
        if in_hand > 0 && waited < self.sup.graceful_timeout() {
            return;
        }
        self.drain_before_stop = None;
        if in_hand > 0 {
            tracing::warn!(
                "SIGQUIT: {in_hand} request(s) the master holds were not handed over within the graceful timeout"
            );
        }
        let what = self.sup.command(Command::GracefulStop, MonoTime::now());
        tracing::info!("SIGQUIT: {what}");
    }

    /// HUP with a reload hook: re-read, then apply and replace the workers,
    /// or change nothing.
    fn reload_with_new_settings(&mut self) {
        let Some(hook) = self.reload.as_mut() else {
            return;
        };
        let mut new = match (hook.0)(&mut self.app) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(
                    "SIGHUP: reload failed, the running workers and settings stay: {e}"
                );
                return;
            }
        };
        if let (Some(sc), ReportMode::Off) = (new.pool.scale, self.pool.report()) {
            tracing::warn!("SIGHUP: a pool that sizes itself needs busy/idle reports, which are off: keeping a fixed pool of {}", sc.min);
            new.pool.workers = sc.min;
            new.pool.scale = None;
        }
        let now = MonoTime::now();
        self.max_requests = new.max_requests.map(|n| (n, new.max_requests_jitter));
        self.keepalive_timeout = new.keepalive_timeout;
        self.next_sample = match (new.pool.scale, self.next_sample) {
            (None, _) => None,
            (Some(_), Some(t)) => Some(t),
            (Some(_), None) => Some(now),
        };
        let what = self.sup.reload_with(new.pool, now);
        tracing::info!("SIGHUP: configuration re-read; {what}");
    }

    /// waitpid(-1, WNOHANG) until nothing is left: SIGCHLDs coalesce. A
    /// SIGCHLD always leaves the self-pipe readable (`signalled`); a busy
    /// turn without it (fdpass wakes for every connection) skips the
    /// waitpid, but never for longer than MAX_SLEEP.
    fn reap_children(&mut self, signalled: bool) {
        let now = MonoTime::now();
        if !signalled && now.saturating_since(self.last_reap) < MAX_SLEEP {
            return;
        }
        self.last_reap = now;
        loop {
            let (pid, status) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signaled(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Ok(_) => continue, // stopped/continued: not an exit
                Err(e) => {
                    tracing::error!("waitpid() failed: {e}");
                    return;
                }
            };
            let how = match status {
                ExitStatus::Code(c) => format!("exit code {c}"),
                ExitStatus::Signaled(s) => Signal::try_from(s)
                    .map(|s| format!("killed by {s}"))
                    .unwrap_or_else(|_| format!("killed by signal {s}")),
            };
            let files = MasterFiles {
                pid_file: self.pid_file.as_mut(),
                status: &mut self.status,
            };
            if self.upgrade.reaped(pid, &how, self.pid, files) {
                if let Some(own) = self.strategy.own_sockets() {
                    own.handed_over(false);
                }
                continue;
            }
            self.pool.remove(pid);
            let Some(r) = self.sup.exited(pid, status, MonoTime::now()) else {
                // Not a worker: an app's subprocess, or (as PID 1, or with
                // --subreaper) an orphan re-parented to the master. Reaped
                // all the same: no zombie is left.
                tracing::debug!("pid={pid} reaped ({how}): not a worker");
                continue;
            };
            let slot = r.slot;
            let told = self.counts.stop_reasons.remove(&pid);
            let reason = if r.boot_failed {
                "boot_failure"
            } else if r.expected {
                told.unwrap_or("other")
            } else {
                "crash"
            };
            *self.counts.exits.entry(reason).or_default() += 1;
            self.note_if_vacant(slot);
            let up = r.uptime.as_secs_f64();
            if r.boot_failed {
                tracing::error!("worker={slot} pid={pid} failed to boot ({how}); slot {slot} will not be respawned until reload (HUP)");
            } else if r.expected {
                tracing::info!("worker={slot} pid={pid} exited ({how}) after {up:.1}s");
            } else if let Some(d) = r.respawn_delay {
                let when = if d.is_zero() {
                    "respawning now".to_string()
                } else {
                    format!(
                        "respawning in {:.1}s (crash loop back-off)",
                        d.as_secs_f64()
                    )
                };
                tracing::warn!(
                    "worker={slot} pid={pid} died ({how}) after {up:.1}s{}; {when}",
                    if r.before_ready {
                        " before it was ready"
                    } else {
                        ""
                    }
                );
            } else {
                tracing::info!("worker={slot} pid={pid} exited ({how})");
            }
        }
    }

    fn perform(&mut self, action: Action) -> Result<Option<Flow>> {
        let now = MonoTime::now();
        match action {
            Action::Spawn { slot, generation } => match self.spawn_worker(slot, generation) {
                Ok(Spawned::Parent(pid)) => {
                    self.sup.spawned(slot, generation, pid, now);
                    if let Some((n, jitter)) = self.max_requests {
                        let limit = n + self.random_below(jitter + 1);
                        self.sup.limit_requests(pid, limit);
                    }
                    if let Some(age) = self.max_age {
                        let tenth = (age.as_millis() / 10) as u64;
                        let jitter = Duration::from_millis(self.random_below(tenth + 1));
                        self.sup.limit_age(pid, now + age.saturating_sub(jitter));
                    }
                    tracing::debug!("worker={slot} pid={pid} spawned");
                }
                Ok(Spawned::Child(setup)) => return Ok(Some(Flow::Child(setup))),
                Err(e) => {
                    let delay = self.sup.spawn_failed(slot, now);
                    self.note_if_vacant(slot);
                    tracing::error!(
                        "spawning worker {slot} failed: {e}; retrying in {:.1}s",
                        delay.as_secs_f64()
                    );
                }
            },
            Action::Signal {
                pid,
                slot,
                signal,
                reason,
            } => {
                match reason {
                    StopReason::Frozen { busy_for, timeout } => tracing::warn!(
                        "worker={slot} pid={pid} busy {:.1}s > {}, killing",
                        busy_for.as_secs_f64(),
                        fmt_secs(timeout)
                    ),
                    StopReason::Unresponsive { quiet_for, limit } => tracing::warn!(
                        "worker={slot} pid={pid} idle but silent {:.1}s > {} (stopped or stuck), killing",
                        quiet_for.as_secs_f64(),
                        fmt_secs(limit)
                    ),
                    StopReason::BootTimeout { timeout } => tracing::error!(
                        "worker={slot} pid={pid} not ready within the boot timeout ({}), killing; slot {slot} counts as failed to boot",
                        fmt_secs(timeout)
                    ),
                    StopReason::Recycled { why } => tracing::info!(
                        "worker={slot} pid={pid} {why}; its replacement is ready, stopping it gracefully"
                    ),
                    StopReason::Escalated => tracing::warn!("worker={slot} pid={pid} did not stop in time; sending {signal}"),
                    StopReason::Retired => tracing::info!("worker={slot} pid={pid} retiring"),
                    StopReason::Replaced => tracing::info!("worker={slot} pid={pid} replaced by a new generation; stopping it gracefully"),
                    StopReason::Shutdown => tracing::debug!("worker={slot} pid={pid} sent {signal}"),
                }
                let label = match reason {
                    StopReason::Frozen { .. } => Some("timeout_kill"),
                    StopReason::Unresponsive { .. } => Some("unresponsive_kill"),
                    StopReason::BootTimeout { .. } => Some("boot_failure"),
                    StopReason::Recycled { .. } => Some("recycle"),
                    StopReason::Retired => Some("scale_down"),
                    StopReason::Replaced => Some("reload"),
                    StopReason::Shutdown => Some("shutdown"),
                    StopReason::Escalated => None, // keeps the first reason
                };
                if let Some(label) = label {
                    self.counts.stop_reasons.entry(pid).or_insert(label);
                }
                // The slot's current worker leaves without a successor in
                // it: strategies stop giving it work (reuseport steers away,
                // fdpass stops dispatching).
                if matches!(reason, StopReason::Retired | StopReason::Shutdown) {
                    self.strategy.slot_retired(slot);
                }
                match kill(pid, signal) {
                    Ok(()) | Err(Errno::ESRCH) => {} // ESRCH: already gone, reaped next turn
                    Err(e) => tracing::error!("kill({pid}, {signal}) failed: {e}"),
                }
            }
            Action::Exit { code } => return Ok(Some(Flow::Exit(code))),
        }
        Ok(None)
    }

    /// A number in 0..n (jitter for request limits; no need for strength).
    fn random_below(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    /// Tells a strategy with sockets of its own that `slot` has no worker
    /// left, so that it steers new connections elsewhere until the slot is
    /// refilled.
    fn note_if_vacant(&mut self, slot: usize) {
        if self.sup.pids().any(|(_, s)| s == slot) {
            return;
        }
        if let Some(own) = self.strategy.own_sockets() {
            own.slot_vacant(slot);
        }
    }

    fn spawn_worker(&mut self, slot: usize, generation: u64) -> Result<Spawned> {
        self.strategy.prepare_slot(slot)?;
        let cell = self.pool.allocate_cell().ok_or_else(|| {
            Error::sys(
                format!("spawning worker {slot}"),
                std::io::Error::other("the scoreboard is full"),
            )
        })?;
        let (status_rd, status_wr) = match status::channel() {
            Ok(ends) => ends,
            Err(e) => {
                // At the descriptor limit: the cell must not leak with each
                // retry, or the scoreboard fills up.
                self.pool.release_cell(cell);
                return Err(Error::sys(format!("pipe2() for worker {slot}"), e));
            }
        };
        let forked = match sys::fork() {
            Ok(f) => f,
            Err(e) => {
                self.pool.release_cell(cell);
                return Err(Error::sys(
                    format!("fork() failed while spawning worker {slot}"),
                    e,
                ));
            }
        };
        match forked {
            Forked::Parent(pid) => {
                drop(status_wr);
                if let Some(io) = self.strategy.master_io() {
                    io.worker_spawned(slot);
                }
                self.pool.add(pid, slot, status_rd, cell);
                Ok(Spawned::Parent(pid))
            }
            Forked::Child => {
                drop(status_rd);
                // try_clone is F_DUPFD_CLOEXEC: a plain dup(2) would drop
                // close-on-exec, and a program the app runs would inherit it.
                let master_alive = self
                    .alive
                    .0
                    .try_clone()
                    .map_err(|e| Error::sys("dup() of the master-alive pipe", e))?;
                Ok(Spawned::Child(WorkerSetup {
                    slot,
                    generation,
                    master_alive,
                    status: StatusWriter::new(status_wr, slot),
                    master_pid: self.pid,
                    tick: self.tick,
                    keepalive_timeout: self.keepalive_timeout,
                    cell,
                    report: self.pool.report(),
                    user: self.user.clone(),
                    log_file: self.log_file.clone(),
                    memory_check: self.memory_check,
                    timed: self.metrics.is_some(),
                }))
            }
        }
    }

    /// In the child: drop every master resource, serve, and exit. Never returns.
    fn become_worker(self, setup: WorkerSetup) -> ! {
        if !worker::enter_child(setup.master_pid) {
            sys::exit_now(0);
        }
        let Master {
            strategy,
            mut app,
            listeners,
            pid_file,
            self_pipe,
            alive,
            pool,
            status,
            metrics,
            agent,
            ..
        } = self;
        drop((metrics, agent));
        // Close in the child what belongs to the master: other workers'
        // channels, the self-pipe, the master-alive pipe (the worker has its
        // own copy of the read end), the status socket. The pid file and
        // socket files are the master's to remove.
        let scoreboard = pool.into_scoreboard();
        drop((self_pipe, alive));
        if let Some(st) = status {
            st.forget_in_child();
        }
        std::mem::forget(pid_file);
        let slot = setup.slot;
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            worker::run(
                &mut app,
                || strategy.into_acceptor(slot, listeners),
                setup,
                &scoreboard,
            )
        }))
        .unwrap_or(EXIT_PANIC);
        sys::exit_now(code)
    }

    /// USR1: reopen the log file here, then have every worker reopen it
    /// between connections (it is created here, and given to `--user`).
    fn reopen_logs(&mut self) {
        let Some(lf) = &self.log_file else {
            tracing::info!("USR1: no --log-file to reopen (logs go to stderr)");
            return;
        };
        if let Err(e) = lf.reopen() {
            tracing::error!(
                "USR1: reopening the log file {}: {e}; logging on to the old one",
                lf.path().display()
            );
            return;
        }
        tracing::info!(
            "USR1: reopened {}; workers reopen it between connections",
            lf.path().display()
        );
        for pid in self.pool.pids() {
            // ESRCH: already gone, reaped on the next turn.
            let _ = kill(pid, Signal::SIGUSR1);
        }
    }

    /// USR2: hand the listeners (and the strategy's own sockets) to a new
    /// master started from the binary at this one's path.
    fn start_new_master(&mut self) {
        if self.sup.is_stopping() {
            tracing::warn!("USR2: this master is stopping; no binary upgrade");
            return;
        }
        let name = self.strategy.name();
        let mut handover: Vec<(BorrowedFd<'_>, String)> = self
            .listeners
            .iter()
            .map(|l| (l.as_fd(), l.key().to_string()))
            .collect();
        let mut own = self.strategy.own_sockets();
        if let Some(own) = own.as_deref_mut() {
            handover.extend(
                own.handover()
                    .into_iter()
                    .map(|(key, fd)| (fd, key.encode(name))),
            );
        }
        let files = MasterFiles {
            pid_file: self.pid_file.as_mut(),
            status: &mut self.status,
        };
        let started = self.upgrade.start(self.pid, &handover, files).is_some();
        drop(handover);
        if started {
            self.counts.upgrades += 1;
            if let Some(own) = own {
                own.handed_over(true);
            }
        }
    }

    /// Releases everything that outlives the process, then returns `code`.
    fn finish(mut self, code: i32) -> i32 {
        self.strategy.shutdown();
        // A Unix socket file stays while another master serves it: the new
        // one this master started, or the old one it came from (a rollback).
        if !self.upgrade.another_master_serves() {
            for l in &mut self.listeners {
                l.remove_socket_file();
            }
        }
        if let Some(st) = self.status.take() {
            st.remove();
        }
        if let Some(pf) = self.pid_file.take() {
            pf.remove();
        }
        if code == 0 {
            tracing::info!("master pid={} exiting", self.pid);
        } else {
            tracing::error!("{}", Error::AllWorkersFailedToBoot(crate::EXIT_BOOT_FAILED));
        }
        code
    }
}

enum Flow {
    Exit(i32),
    Child(WorkerSetup),
}

/// The `--log-file`, given to `--user` when it is created, checked to be
/// writable before anything is bound.
fn log_file(cfg: &MasterConfig) -> Result<Option<crate::logfile::LogFile>> {
    let Some(path) = cfg.log_file.as_deref() else {
        return Ok(None);
    };
    let mut lf = crate::logfile::LogFile::new(path);
    if let Some(u) = &cfg.user {
        lf.set_owner(u.uid.as_raw(), u.gid.as_raw());
    }
    lf.check()
        .map_err(|e| Error::sys(format!("log file {}", lf.path().display()), e))?;
    Ok(Some(lf))
}

/// stderr (the logs) to the log file, or to /dev/null when detached
/// without one.
fn redirect_stderr(log_file: Option<&crate::logfile::LogFile>, detached: bool) -> Result<()> {
    match log_file {
        Some(lf) => lf
            .reopen()
            .map_err(|e| Error::sys(format!("log file {}", lf.path().display()), e)),
        None if detached => std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .and_then(|f| Ok(nix::unistd::dup2_stderr(f)?))
            .map_err(|e| Error::sys("stderr to /dev/null", e)),
        None => Ok(()),
    }
}

/// Does any of `fds` have a connection waiting, and if so how many wait in
/// all (TCP only; `None` when none wait or no fd is TCP). The count is only
/// for the log line of a grow, so TCP_INFO is read only when some wait.
fn probe_backlog(fds: &[BorrowedFd<'_>]) -> (bool, Option<u32>) {
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let backlog = loop {
        match nix::poll::poll(&mut polled, nix::poll::PollTimeout::ZERO) {
            Ok(n) => break n > 0,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::debug!("poll() of the listeners failed: {e}");
                break false;
            }
        }
    };
    if !backlog {
        return (false, None);
    }
    let mut queued = None;
    for fd in fds {
        if let Ok((q, _)) = sys::tcp_accept_queue(*fd) {
            queued = Some(queued.unwrap_or(0) + q);
        }
    }
    (true, queued)
}

/// "30s", "2.5s".
fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}
