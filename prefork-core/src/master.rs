//! The master: binds, preloads, forks workers and supervises them.
//!
//! One thread, one poll(2). Each turn, read aloud:
//! 1. wait until a signal, a worker report or the supervisor's next deadline;
//! 2. drain the self-pipe, then turn signals into commands;
//! 3. reap every exited child (waitpid(-1, WNOHANG) until none is left);
//! 4. read worker reports;
//! 5. ask the supervisor what to do now, and do it.

use std::collections::HashMap;
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
use crate::report::ReportMode;
use crate::scoreboard::{Scoreboard, WorkerState};
use crate::signals::SelfPipe;
use crate::status::{self, StatusKind, StatusWriter};
use crate::strategy::{AcceptStrategy, Prepare, SlotKey, SlotSocket, HANDOVER_MARK};
use crate::supervisor::{
    Action, Command, ExitStatus, PoolSettings, StopReason, Supervisor, SupervisorConfig,
};
use crate::sys::{self, Forked};
use crate::upgrade::{self, ExecPlan, Inherited};
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
    /// Recycle a worker after this many connections.
    pub max_requests: Option<u64>,
    /// Add 0..=this to each worker's limit, so workers do not recycle together.
    pub max_requests_jitter: u64,
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
            max_requests: None,
            max_requests_jitter: 0,
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

#[derive(Debug)]
struct WorkerProc {
    slot: usize,
    /// The worker's status channel; `None` after EOF.
    status: Option<OwnedFd>,
    /// Its scoreboard cell.
    cell: usize,
    /// Last observed state and connections served.
    state: WorkerState,
    requests: u64,
    /// It sent garbage on its status channel and is being replaced.
    replacing: bool,
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
    listeners: Vec<Listener>,
    pid_file: Option<PidFile>,
    sup: Supervisor,
    self_pipe: SelfPipe,
    /// The master keeps the only write end; children inherit the read end.
    alive_rd: OwnedFd,
    alive_wr: OwnedFd,
    workers: HashMap<Pid, WorkerProc>,
    tick: Duration,
    pid: Pid,
    scoreboard: Scoreboard,
    report: ReportMode,
    max_requests: Option<(u64, u64)>,
    /// The pool sizes itself: sample it at this time next.
    next_sample: Option<MonoTime>,
    /// When the master last reaped (see [`MAX_SLEEP`]).
    last_reap: MonoTime,
    status: Option<crate::status_server::StatusServer>,
    /// Who the workers become right after fork.
    user: Option<crate::user::WorkerUser>,
    /// How to start this program again (USR2).
    exec: Option<ExecPlan>,
    /// The new master started by USR2, while it runs.
    new_master: Option<Pid>,
    /// The old master this one took its sockets from (binary upgrade).
    inherited_from: Option<Pid>,
    /// The status socket's path, to bind again after a failed upgrade.
    status_path: Option<PathBuf>,
    /// Where stderr goes (`--log-file`), reopened on USR1.
    log_file: Option<crate::logfile::LogFile>,
    /// Re-reads the configuration on HUP.
    reload: Option<ReloadHook<A>>,
    started: MonoTime,
    /// Connections served by workers already reaped.
    retired_requests: u64,
    rng: u64,
}

/// Where a spawn left us.
enum Spawned {
    Parent(Pid),
    Child(WorkerSetup),
}

impl<S: AcceptStrategy, A: App> Master<S, A> {
    /// Binds every listener, writes the pid file and runs the app's preload,
    /// in that order; nothing is forked yet. Errors here lose nothing and
    /// leave nothing behind (socket files and the pid file are removed).
    pub fn start(cfg: MasterConfig, mut strategy: S, app: A) -> Result<Self> {
        let threads = sys::thread_count().map_err(|e| Error::sys("reading /proc/self/task", e))?;
        if threads != 1 {
            return Err(Error::NotSingleThreaded(threads));
        }
        if let Some(u) = &cfg.user {
            u.check_master()?;
        }
        let pid = nix::unistd::getpid();
        let mut opts = cfg.bind_options.clone();
        if let Some(own) = strategy.own_sockets() {
            own.bind_options(&mut opts);
        }
        let mut listeners = Vec::new();
        if cfg.socket_activation {
            let env = ActivationEnv::take_from_process();
            listeners = listener::adopt_activated(&env, pid.as_raw() as u32, 3, &opts)?;
        }
        // Sockets handed over by an old master (USR2): taken for their
        // --bind instead of binding again; any other it listened on (from
        // systemd) is kept too.
        let mut inherited = Inherited::take_from_process();
        let from = inherited.from;
        listeners.extend(listener::bind_all_inheriting(
            &cfg.binds,
            &opts,
            &mut inherited,
        )?);
        // The strategy's own sockets (reuseport's per-slot ones) go back to
        // the strategy; another strategy's (the upgrade changed --strategy)
        // are not listeners of this one, and this copy is closed.
        let mut handed_over = Vec::new();
        for (fd, key) in inherited.take_prefixed(HANDOVER_MARK) {
            match SlotKey::decode(strategy.name(), &key) {
                Some(slot_key) => handed_over.push(SlotSocket {
                    key: slot_key,
                    listener: listener::adopt_handed_over(fd, &key, &opts)?,
                }),
                None => {
                    tracing::warn!(
                        "binary upgrade: {key} is not a socket of the {} strategy; closing this master's copy",
                        strategy.name()
                    );
                    drop(sys::adopt_fd(fd));
                }
            }
        }
        for (fd, key) in inherited.rest() {
            listeners.push(listener::adopt_handed_over(fd, &key, &opts)?);
        }
        if let Some(old) = from {
            tracing::info!(
                "binary upgrade: took over {} listening socket(s) from master pid={old}",
                listeners.len()
            );
        }
        let started = Self::assemble(cfg, strategy, app, &mut listeners, handed_over, pid, &opts)
            .map(|mut m| {
                m.inherited_from = from;
                m
            });
        if started.is_err() {
            for l in &mut listeners {
                l.remove_socket_file();
            }
        }
        started
    }

    /// Everything after binding; `listeners` is moved into the master on
    /// success and left with the caller (to clean up) on failure.
    fn assemble(
        cfg: MasterConfig,
        mut strategy: S,
        mut app: A,
        listeners: &mut Vec<Listener>,
        handed_over: Vec<SlotSocket>,
        pid: Pid,
        opts: &BindOptions,
    ) -> Result<Self> {
        if listeners.is_empty() {
            return Err(Error::BadAddress {
                spec: String::new(),
                reason: "nothing to listen on: give at least one --bind".into(),
            });
        }
        let log_file = cfg.log_file.as_deref().map(|p| {
            let mut lf = crate::logfile::LogFile::new(p);
            if let Some(u) = &cfg.user {
                lf.set_owner(u.uid.as_raw(), u.gid.as_raw());
            }
            lf
        });
        if let Some(lf) = &log_file {
            lf.check()
                .map_err(|e| Error::sys(format!("log file {}", lf.path().display()), e))?;
        }
        strategy.prepare(Prepare {
            listeners,
            worker_owner: cfg.user.as_ref().map(|u| (u.uid.as_raw(), u.gid.as_raw())),
            handed_over,
        })?;
        let self_pipe =
            SelfPipe::install().map_err(|e| Error::sys("installing signal handlers", e))?;
        let (alive_rd, alive_wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| Error::sys("pipe2() for the master-alive pipe", e))?;
        let status = match &cfg.status_socket {
            Some(path) => Some(crate::status_server::StatusServer::bind(path)?),
            None => None,
        };
        // Room for every worker alive at once: a full pool, its replacements
        // during a reload, and those still stopping.
        let scoreboard = Scoreboard::new(4 * crate::supervisor::MAX_WORKERS)
            .map_err(|e| Error::sys("mmap() for the scoreboard", e))?;
        let pid_file = match &cfg.pid_file {
            Some(p) => match PidFile::create(p, pid.as_raw() as u32) {
                Ok(pf) => Some(pf),
                Err(e) => {
                    if let Some(st) = status {
                        st.remove();
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        if let Err(e) = app.preload() {
            if let Some(pf) = pid_file {
                pf.remove();
            }
            if let Some(st) = status {
                st.remove();
            }
            return Err(Error::Preload(e.to_string()));
        }
        if cfg.scale.is_some() && cfg.report == ReportMode::Off {
            return Err(Error::Config(
                "a pool that sizes itself needs busy/idle reports (not --status-report off)".into(),
            ));
        }
        // Everything is in place: from here on the logs go to the file (or,
        // detached, nowhere: the pipe to the starting command must not
        // reach the workers).
        let redirected = match &log_file {
            Some(lf) => lf
                .reopen()
                .map_err(|e| Error::sys(format!("log file {}", lf.path().display()), e)),
            None if cfg.detached => std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .and_then(|f| Ok(nix::unistd::dup2_stderr(f)?))
                .map_err(|e| Error::sys("stderr to /dev/null", e)),
            None => Ok(()),
        };
        if let Err(e) = redirected {
            if let Some(pf) = pid_file {
                pf.remove();
            }
            if let Some(st) = status {
                st.remove();
            }
            return Err(e);
        }
        let sup = Supervisor::new(SupervisorConfig {
            workers: cfg.workers,
            graceful_timeout: cfg.graceful_timeout,
            timeout: cfg.timeout,
            scale: cfg.scale,
            ..SupervisorConfig::default()
        });
        Ok(Master {
            strategy,
            app,
            listeners: std::mem::take(listeners),
            pid_file,
            sup,
            self_pipe,
            alive_rd,
            alive_wr,
            workers: HashMap::new(),
            tick: opts.accept_tick,
            pid,
            scoreboard,
            report: cfg.report,
            max_requests: cfg.max_requests.map(|n| (n, cfg.max_requests_jitter)),
            next_sample: cfg.scale.map(|_| MonoTime::now()),
            last_reap: MonoTime::now(),
            status,
            status_path: cfg.status_socket.clone(),
            log_file,
            user: cfg.user,
            exec: ExecPlan::current(),
            new_master: None,
            inherited_from: None,
            reload: None,
            started: MonoTime::now(),
            retired_requests: 0,
            rng: u64::from(pid.as_raw().unsigned_abs()) ^ MonoTime::now().as_nanos() | 1,
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
            let (slept, pipe_ready) = self.wait(&mut signals);
            for sig in signals.drain(..) {
                self.handle_signal(sig);
            }
            // A SIGCHLD always leaves the self-pipe readable; a busy turn
            // without it (fdpass wakes for every connection) skips the
            // waitpid, but never for longer than MAX_SLEEP.
            if pipe_ready || MonoTime::now().saturating_since(self.last_reap) >= MAX_SLEEP {
                self.last_reap = MonoTime::now();
                self.reap_children();
            }
            self.observe_workers(slept);
            self.size_pool();
            for action in self.sup.actions(MonoTime::now()) {
                match self.perform(action) {
                    Ok(None) => {}
                    Ok(Some(Flow::Exit(code))) => return Ok(self.finish(code)),
                    Ok(Some(Flow::Child(setup))) => {
                        // What the callback holds (a daemon's ready pipe)
                        // is the master's, not the worker's.
                        drop(on_ready);
                        self.become_worker(setup)
                    }
                    Err(e) => return Err(e),
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

    /// Sleeps in poll(2) until a signal, a worker report, a strategy fd or
    /// the next deadline; reads what arrived. Returns how much longer than
    /// planned the sleep took (a stopped or starved master), and whether the
    /// self-pipe was readable (a signal came).
    fn wait(&mut self, signals: &mut Vec<Signal>) -> (Duration, bool) {
        let start = MonoTime::now();
        let mut timeout = self.sup.next_deadline().map(|t| t.saturating_since(start));
        // Timeouts, recycling and pool sizing need the scoreboard looked at
        // at least every OBSERVE_TICK.
        let watch = self.sup.timeout().is_some()
            || self.max_requests.is_some()
            || self.sup.scale_config().is_some();
        let mut cap = if watch { OBSERVE_TICK } else { MAX_SLEEP };
        if let Some(t) = self.next_sample {
            cap = cap.min(t.saturating_since(start));
        }
        timeout = Some(timeout.map_or(cap, |t| t.min(cap)));
        if let Some(io) = self.strategy.master_io() {
            io.turn();
        }
        let mut owners: Vec<Option<Pid>> = Vec::with_capacity(self.workers.len() + 1);
        let mut ready: Vec<(Option<Pid>, RawFd)> = Vec::new();
        {
            let mut fds = vec![PollFd::new(self.self_pipe.read_fd(), PollFlags::POLLIN)];
            owners.push(None);
            for (pid, w) in &self.workers {
                if let Some(fd) = &w.status {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    owners.push(Some(*pid));
                }
            }
            if let Some(io) = self.strategy.master_io() {
                for fd in io.fds() {
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                    owners.push(None);
                }
            }
            if let Some(st) = &self.status {
                fds.push(PollFd::new(st.as_fd(), PollFlags::POLLIN));
                owners.push(None);
            }
            match nix::poll::poll(&mut fds, poll_timeout(timeout)) {
                Ok(0) | Err(_) => {}
                Ok(_) => {
                    for (i, p) in fds.iter().enumerate() {
                        if p.revents().is_some_and(|r| !r.is_empty()) {
                            let raw = p.as_fd().as_raw_fd();
                            ready.push((owners.get(i).copied().flatten(), raw));
                        }
                    }
                }
            }
        }
        let overslept = timeout.map_or(Duration::ZERO, |t| {
            MonoTime::now().saturating_since(start).saturating_sub(t)
        });
        let pipe_fd = self.self_pipe.read_fd().as_raw_fd();
        let pipe_ready = ready
            .iter()
            .any(|&(owner, raw)| owner.is_none() && raw == pipe_fd);
        if pipe_ready {
            self.self_pipe.drain(signals);
        }
        let mut msgs = Vec::new();
        let status_fd = self.status.as_ref().map(|s| s.as_fd().as_raw_fd());
        for (owner, raw) in ready {
            match owner {
                Some(pid) => self.read_status(pid, &mut msgs),
                None if Some(raw) == status_fd => self.serve_status(),
                None if raw != pipe_fd => {
                    if let Some(io) = self.strategy.master_io() {
                        io.ready(raw);
                    }
                }
                None => {}
            }
        }
        (overslept, pipe_ready)
    }

    /// Feeds every worker's busy/idle state to the supervisor; tells it when
    /// the master itself was stopped or starved.
    fn observe_workers(&mut self, overslept: Duration) {
        let now = MonoTime::now();
        if overslept > STALL_GAP {
            tracing::warn!(
                "master was stopped or starved for {:.1}s; busy workers get a fresh timeout",
                overslept.as_secs_f64()
            );
            self.sup.stalled(now);
        }
        for (pid, w) in self.workers.iter_mut() {
            if self.report == ReportMode::Scoreboard {
                if let Some(cell) = self.scoreboard.cell(w.cell) {
                    w.state = cell.state();
                    w.requests = cell.requests();
                }
            }
            self.sup.observe(*pid, w.state, w.requests);
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
        let (backlog, queued) = match self.strategy.own_sockets() {
            Some(own) => probe_backlog(&own.backlog_fds()),
            None => probe_backlog(&self.listeners.iter().map(|l| l.as_fd()).collect::<Vec<_>>()),
        };
        if let Some(event) = self.sup.scale(now, backlog, queued) {
            tracing::info!("{event}");
        }
    }

    /// Answers every waiting status client with the scoreboard as JSON.
    fn serve_status(&mut self) {
        let Some(server) = &self.status else {
            return;
        };
        let now = MonoTime::now();
        let mut workers: Vec<_> = self
            .sup
            .view()
            .into_iter()
            .map(|v| {
                let state = self
                    .workers
                    .get(&v.pid)
                    .map_or(WorkerState::Booting, |p| p.state);
                crate::status_server::WorkerStatus::new(&v, state, now)
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
            self.retired_requests,
            &listeners,
        );
        server.answer_all(&doc);
    }

    fn read_status(&mut self, pid: Pid, msgs: &mut Vec<Option<status::StatusMessage>>) {
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        let Some(fd) = &w.status else { return };
        msgs.clear();
        let eof = status::read_messages(fd.as_fd(), msgs) == status::ChannelState::Closed;
        let slot = w.slot;
        if eof {
            w.status = None; // stop polling it; the exit is seen through SIGCHLD
        }
        for m in msgs.iter() {
            match m {
                Some(m) if m.kind == StatusKind::Ready => {
                    if self.sup.ready(pid, m.at) {
                        tracing::info!("worker={slot} pid={pid} ready");
                    }
                }
                Some(m) if self.report == ReportMode::Pipe => {
                    if let Some(w) = self.workers.get_mut(&pid) {
                        if m.kind == StatusKind::Busy {
                            w.state = WorkerState::Busy { since: m.at };
                        } else {
                            w.state = WorkerState::Idle { since: m.at };
                            w.requests += 1;
                        }
                    }
                }
                Some(_) => {}
                None => {
                    // Something in the worker writes where only its status
                    // reports should go: replace it (S5). Its replacement
                    // starts first; it finishes its connection, then leaves.
                    if let Some(w) = self.workers.get_mut(&pid).filter(|w| !w.replacing) {
                        w.replacing = true;
                        self.sup.limit_requests(pid, 0);
                        tracing::warn!(
                            "worker={slot} pid={pid} sent a malformed status message; replacing it"
                        );
                    }
                }
            }
        }
    }

    fn handle_signal(&mut self, sig: Signal) {
        let cmd = match sig {
            Signal::SIGQUIT => Command::GracefulStop,
            Signal::SIGTERM | Signal::SIGINT => Command::FastStop,
            Signal::SIGHUP if self.reload.is_some() && !self.sup.is_stopping() => {
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
                self.upgrade();
                return;
            }
            _ => return, // SIGCHLD: reaping follows
        };
        let what = self.sup.command(cmd, MonoTime::now());
        tracing::info!("{sig}: {what}");
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
        if let (Some(sc), ReportMode::Off) = (new.pool.scale, self.report) {
            tracing::warn!("SIGHUP: a pool that sizes itself needs busy/idle reports, which are off: keeping a fixed pool of {}", sc.min);
            new.pool.workers = sc.min;
            new.pool.scale = None;
        }
        let now = MonoTime::now();
        self.max_requests = new.max_requests.map(|n| (n, new.max_requests_jitter));
        self.next_sample = match (new.pool.scale, self.next_sample) {
            (None, _) => None,
            (Some(_), Some(t)) => Some(t),
            (Some(_), None) => Some(now),
        };
        let what = self.sup.reload_with(new.pool, now);
        tracing::info!("SIGHUP: configuration re-read; {what}");
    }

    /// waitpid(-1, WNOHANG) until nothing is left: SIGCHLDs coalesce.
    fn reap_children(&mut self) {
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
            if Some(pid) == self.new_master {
                self.new_master_exited(pid, status);
                continue;
            }
            if let Some(w) = self.workers.remove(&pid) {
                self.scoreboard.release(w.cell);
                let served = match self.scoreboard.cell(w.cell) {
                    Some(c) if self.report == ReportMode::Scoreboard => c.requests(),
                    _ => w.requests,
                };
                self.retired_requests += served;
            }
            let Some(r) = self.sup.exited(pid, status, MonoTime::now()) else {
                continue; // a child that was not a worker (an app's subprocess)
            };
            let how = match status {
                ExitStatus::Code(c) => format!("exit code {c}"),
                ExitStatus::Signaled(s) => Signal::try_from(s)
                    .map(|s| format!("killed by {s}"))
                    .unwrap_or_else(|_| format!("killed by signal {s}")),
            };
            let slot = r.slot;
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
                    tracing::debug!("worker={slot} pid={pid} spawned");
                }
                Ok(Spawned::Child(setup)) => return Ok(Some(Flow::Child(setup))),
                Err(e) => {
                    let delay = self.sup.spawn_failed(slot, now);
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
                    StopReason::Recycled => tracing::info!(
                        "worker={slot} pid={pid} reached its request limit; its replacement is ready, stopping it gracefully"
                    ),
                    StopReason::Escalated => tracing::warn!("worker={slot} pid={pid} did not stop in time; sending {signal}"),
                    StopReason::Retired => tracing::info!("worker={slot} pid={pid} retiring"),
                    StopReason::Replaced => tracing::info!("worker={slot} pid={pid} replaced by a new generation; stopping it gracefully"),
                    StopReason::Shutdown => tracing::debug!("worker={slot} pid={pid} sent {signal}"),
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

    fn spawn_worker(&mut self, slot: usize, generation: u64) -> Result<Spawned> {
        self.strategy.prepare_slot(slot)?;
        let cell = self.scoreboard.allocate().ok_or_else(|| {
            Error::sys(
                format!("spawning worker {slot}"),
                std::io::Error::other("the scoreboard is full"),
            )
        })?;
        let (status_rd, status_wr) =
            status::channel().map_err(|e| Error::sys(format!("pipe2() for worker {slot}"), e))?;
        let forked = sys::fork()
            .map_err(|e| Error::sys(format!("fork() failed while spawning worker {slot}"), e));
        let forked = match forked {
            Ok(f) => f,
            Err(e) => {
                self.scoreboard.release(cell);
                return Err(e);
            }
        };
        match forked {
            Forked::Parent(pid) => {
                drop(status_wr);
                if let Some(io) = self.strategy.master_io() {
                    io.worker_spawned(slot);
                }
                self.workers.insert(
                    pid,
                    WorkerProc {
                        slot,
                        status: Some(status_rd),
                        cell,
                        state: WorkerState::Booting,
                        requests: 0,
                        replacing: false,
                    },
                );
                Ok(Spawned::Parent(pid))
            }
            Forked::Child => {
                drop(status_rd);
                // try_clone is F_DUPFD_CLOEXEC: a plain dup(2) would drop
                // close-on-exec, and a program the app runs would inherit it.
                let master_alive = self
                    .alive_rd
                    .try_clone()
                    .map_err(|e| Error::sys("dup() of the master-alive pipe", e))?;
                Ok(Spawned::Child(WorkerSetup {
                    slot,
                    generation,
                    master_alive,
                    status: StatusWriter::new(status_wr, slot),
                    master_pid: self.pid,
                    tick: self.tick,
                    cell,
                    report: self.report,
                    user: self.user.clone(),
                    log_file: self.log_file.clone(),
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
            alive_rd,
            alive_wr,
            workers,
            scoreboard,
            status,
            ..
        } = self;
        // Close in the child what belongs to the master: other workers'
        // channels, the self-pipe, the master-alive write end, the status
        // socket. The pid file and socket files are the master's to remove.
        drop((workers, self_pipe, alive_wr, alive_rd));
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
        for pid in self.workers.keys() {
            // ESRCH: already gone, reaped on the next turn.
            let _ = kill(*pid, Signal::SIGUSR1);
        }
    }

    /// USR2: start a new master from the binary at this one's path, with
    /// the same arguments, handing it the listening sockets. Both serve
    /// until the operator QUITs one of them.
    fn upgrade(&mut self) {
        if self.sup.is_stopping() {
            tracing::warn!("USR2: this master is stopping; no binary upgrade");
            return;
        }
        // As nginx: one upgrade at a time. The old master still holds
        // `PATH.oldbin`, which a second upgrade would overwrite.
        if let Some(old) = self.old_master_running() {
            tracing::warn!(
                "USR2: the old master (pid={old}) is still running; QUIT it (or this master) first"
            );
            return;
        }
        if let Some(pid) = self.new_master {
            tracing::warn!(
                "USR2: a new master (pid={pid}) is already running; QUIT it or this master first"
            );
            return;
        }
        let Some(plan) = self.exec.clone() else {
            tracing::error!(
                "USR2: binary upgrade impossible: this program's path could not be found at start"
            );
            return;
        };
        let name = self.strategy.name();
        let mut fds: Vec<(RawFd, String)> = self
            .listeners
            .iter()
            .map(|l| (l.as_fd().as_raw_fd(), l.key().to_string()))
            .collect();
        if let Some(own) = self.strategy.own_sockets() {
            fds.extend(
                own.handover()
                    .into_iter()
                    .map(|(key, fd)| (fd.as_raw_fd(), key.encode(name))),
            );
        }
        let env = upgrade::child_env(self.pid, &fds);
        if let Some(pf) = &mut self.pid_file {
            if let Err(e) = pf.move_to_oldbin() {
                tracing::error!(
                    "USR2: binary upgrade not started: renaming the pid file {}: {e}",
                    pf.path().display()
                );
                return;
            }
        }
        // The new master binds the status socket; it is this one's again if
        // the new master exits.
        if let Some(st) = self.status.take() {
            st.remove();
        }
        match sys::fork() {
            Ok(Forked::Parent(pid)) => {
                self.new_master = Some(pid);
                if let Some(own) = self.strategy.own_sockets() {
                    own.handed_over(true);
                }
                tracing::info!(
                    "USR2: binary upgrade: started new master pid={pid} from {}; this master (pid={}) keeps serving until QUIT (QUIT the new master instead to roll back)",
                    plan.path().display(),
                    self.pid
                );
            }
            Ok(Forked::Child) => {
                // Nothing of the old master runs here: plain signal
                // dispositions, the listeners open across exec, then exec.
                let prepared = sys::reset_signals_for_exec()
                    .and_then(|()| {
                        self.listeners
                            .iter()
                            .try_for_each(|l| sys::set_inheritable(l.as_fd()))
                    })
                    .and_then(|()| match self.strategy.own_sockets() {
                        Some(own) => own
                            .handover()
                            .into_iter()
                            .try_for_each(|(_, fd)| sys::set_inheritable(fd)),
                        None => Ok(()),
                    });
                let e = match prepared {
                    Ok(()) => std::io::Error::from(plan.exec(&env)),
                    Err(e) => e,
                };
                eprintln!("error: binary upgrade: exec {}: {e}", plan.path().display());
                sys::exit_now(127);
            }
            Err(e) => {
                tracing::error!("USR2: binary upgrade not started: {e}");
                self.take_back_after_upgrade();
            }
        }
    }

    /// The old master this one took its sockets from, while it still runs
    /// (it is this master's parent until it exits).
    fn old_master_running(&self) -> Option<Pid> {
        self.inherited_from
            .filter(|&old| nix::unistd::getppid() == old)
    }

    /// The new master is gone (it failed to start, or was told to stop):
    /// this master takes back the pid file and the status socket.
    fn new_master_exited(&mut self, pid: Pid, status: ExitStatus) {
        self.new_master = None;
        if let Some(own) = self.strategy.own_sockets() {
            own.handed_over(false);
        }
        let how = match status {
            ExitStatus::Code(c) => format!("exit code {c}"),
            ExitStatus::Signaled(s) => format!("signal {s}"),
        };
        tracing::warn!(
            "new master pid={pid} exited ({how}); this master (pid={}) carries on as the only one",
            self.pid
        );
        self.take_back_after_upgrade();
    }

    fn take_back_after_upgrade(&mut self) {
        if let Some(pf) = &mut self.pid_file {
            if let Err(e) = pf.move_back() {
                tracing::error!("moving the pid file back from {}: {e}", pf.path().display());
            }
        }
        if let Some(path) = self.status_path.clone() {
            if self.status.is_none() {
                match crate::status_server::StatusServer::bind(&path) {
                    Ok(st) => self.status = Some(st),
                    Err(e) => tracing::error!("status socket: {e}"),
                }
            }
        }
    }

    /// Releases everything that outlives the process, then returns `code`.
    fn finish(mut self, code: i32) -> i32 {
        self.strategy.shutdown();
        // A Unix socket file stays while another master serves it: the new
        // one this master started, or the old one it came from (a rollback).
        let other_serves = self.new_master.is_some() || self.old_master_running().is_some();
        if !other_serves {
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
