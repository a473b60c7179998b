//! The supervisor: every decision the master makes, as a pure state machine.
//!
//! It is fed events (an operator command, a worker spawned, ready or exited)
//! with the time passed in, and [`Supervisor::actions`] returns what to do now:
//! spawn a slot, signal a pid, exit. It never makes a syscall and never reads
//! a clock, so its invariants are tested with proptest on a simulated clock.
//!
//! The model is reconciliation: each slot `0..target` should hold one worker
//! of the current generation that has not been asked to stop. Everything else
//! (a worker in a slot beyond the target, an older generation whose
//! replacement is ready) is asked to stop, and stops escalate QUIT → TERM →
//! KILL on deadlines.

use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::clock::MonoTime;
use crate::scaling::{Decision, GrowReason, Sample, ScaleConfig, Scaler};
use crate::scoreboard::{Heartbeat, WorkerState};

/// Exit code a worker uses to say "I cannot boot; do not respawn me"
/// (gunicorn's WORKER_BOOT_ERROR).
pub const EXIT_BOOT_FAILED: i32 = 3;

/// The shortest silence for which an idle worker is killed as stopped,
/// whatever `--timeout` says: four accept ticks, so that a worker that
/// beats every tick on a loaded machine is never taken for a stopped one.
pub const MIN_QUIET: Duration = Duration::from_secs(2);

/// Hard ceiling on the pool, whatever TTIN asks for.
pub const MAX_WORKERS: usize = 1024;

/// A sizing range within 1..=MAX_WORKERS, `min <= max`.
fn clamp_scale(scale: Option<ScaleConfig>) -> Option<ScaleConfig> {
    scale.map(|mut s| {
        s.min = s.min.clamp(1, MAX_WORKERS);
        s.max = s.max.clamp(s.min, MAX_WORKERS);
        s
    })
}

/// Timing and size settings.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Workers to keep.
    pub workers: usize,
    /// After QUIT, how long a worker may take to finish before TERM.
    pub graceful_timeout: Duration,
    /// After TERM, how long before KILL.
    pub kill_timeout: Duration,
    /// First back-off delay of a crash loop (the first failure respawns at once).
    pub backoff_base: Duration,
    /// Longest back-off delay.
    pub backoff_cap: Duration,
    /// A worker busy on one connection longer than this is killed
    /// (`--timeout`); `None` never.
    pub timeout: Option<Duration>,
    /// After the soft signal (SIGABRT) to a frozen worker, how long before KILL.
    pub abort_grace: Duration,
    /// A worker not ready this long after its fork (stuck in the app's
    /// `after_fork`, say) is killed and counted as a boot failure, so a
    /// reload cannot wait on it forever (`--boot-timeout`); `None` never.
    pub boot_timeout: Option<Duration>,
    /// Size the pool between `min` and `max` from the busy/idle stream
    /// (`--workers MIN:MAX`); `None` keeps `workers`. The pool starts at `min`.
    pub scale: Option<ScaleConfig>,
    /// How many slots a reload (or a recycle) replaces at a time: a slot's
    /// replacement is forked only while fewer than `target + batch` workers
    /// live, so memory peaks at that and boots do not dogpile
    /// (`--reload-batch`); `None`: a quarter of the target, at least 1.
    /// An empty slot (a crash, a grown pool) is filled whatever the batch.
    pub reload_batch: Option<usize>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            workers: 1,
            graceful_timeout: Duration::from_secs(30),
            kill_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(10),
            timeout: None,
            abort_grace: Duration::from_secs(1),
            boot_timeout: None,
            scale: None,
            reload_batch: None,
        }
    }
}

/// What a reload may change (HUP with a configuration the program re-read):
/// the pool and its deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Workers to keep (ignored when `scale` is set: the pool starts at `scale.min`).
    pub workers: usize,
    /// Size the pool between a minimum and a maximum.
    pub scale: Option<ScaleConfig>,
    /// After QUIT, how long a worker may take to finish before TERM.
    pub graceful_timeout: Duration,
    /// Kill a worker busy on one connection longer than this.
    pub timeout: Option<Duration>,
}

/// What an operator asked for (the master maps signals to these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// QUIT: workers finish the connection in hand, then the master exits.
    GracefulStop,
    /// TERM, INT: workers stop at once.
    FastStop,
    /// HUP: replace every worker, each new one up before the old one leaves.
    Reload,
    /// TTIN: one worker more.
    AddWorker,
    /// TTOU: one worker less.
    RemoveWorker,
    /// WINCH: stop every worker, keep the master.
    StopWorkers,
}

/// How a worker process ended (from waitpid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// exit(code).
    Code(i32),
    /// Killed by a signal.
    Signaled(i32),
}

/// Why a worker is being signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The master is stopping.
    Shutdown,
    /// The pool shrank (TTOU, WINCH).
    Retired,
    /// Its replacement of a newer generation is ready (HUP).
    Replaced,
    /// It did not stop within the deadline of the previous signal.
    Escalated,
    /// Busy on one connection longer than the timeout.
    Frozen {
        /// How long it has been busy.
        busy_for: Duration,
        /// The timeout.
        timeout: Duration,
    },
    /// It reached a limit (requests, `--max-age`, `--max-memory`); its
    /// replacement is ready.
    Recycled {
        /// Which, for the log ("reached its request limit", ...).
        why: &'static str,
    },
    /// Not ready within the boot timeout (counted as a boot failure).
    BootTimeout {
        /// The boot timeout.
        timeout: Duration,
    },
    /// Idle or kept alive, but silent (no heartbeat) longer than the
    /// timeout: stopped or stuck while the strategy counts on it (C4).
    Unresponsive {
        /// How long it has been silent.
        quiet_for: Duration,
        /// The limit: the timeout, at least [`MIN_QUIET`].
        limit: Duration,
    },
}

/// A change of pool size decided by the sizing policy, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleEvent {
    /// Workers wanted before.
    pub from: usize,
    /// Workers wanted now.
    pub to: usize,
    /// What the policy saw.
    pub decision: Decision,
    /// Busy workers at the decision.
    pub busy: usize,
    /// Connections waiting, when known.
    pub queued: Option<u32>,
    /// The worker retired by a shrink: (slot, pid).
    pub retired: Option<(usize, Pid)>,
    /// Set when this grow follows a retirement too soon (a flap): the
    /// surplus must now last this long before the next retirement.
    pub flap_hold: Option<Duration>,
}

impl std::fmt::Display for ScaleEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queued = match self.queued {
            Some(q) => format!("{q} connections waiting"),
            None => "connections waiting".to_string(),
        };
        match self.decision {
            Decision::Grow { reason, .. } => {
                write!(f, "scale up: {} -> {} workers (", self.from, self.to)?;
                match reason {
                    GrowReason::Saturated(d) => write!(
                        f,
                        "{queued}, all {} busy for {:.2}s)",
                        self.busy,
                        d.as_secs_f64()
                    ),
                    GrowReason::Stalled(d) => write!(
                        f,
                        "{queued}, no worker changed state for {:.2}s)",
                        d.as_secs_f64()
                    ),
                }?;
                if let Some(hold) = self.flap_hold {
                    write!(
                        f,
                        "; a retired worker was needed again: the next retirement waits for {:.1}s of surplus",
                        hold.as_secs_f64()
                    )?;
                }
                Ok(())
            }
            Decision::Shrink { min_idle, held } => {
                write!(
                    f,
                    "scale down: {} -> {} workers (at least {min_idle} idle for {:.1}s)",
                    self.from,
                    self.to,
                    held.as_secs_f64()
                )?;
                if let Some((slot, pid)) = self.retired {
                    write!(f, "; retiring worker={slot} pid={pid}")?;
                }
                Ok(())
            }
            Decision::Hold => write!(f, "workers: {}", self.to),
        }
    }
}

/// Something for the master to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fork a worker for this slot; report the pid with [`Supervisor::spawned`].
    Spawn {
        /// The slot.
        slot: usize,
        /// Its generation (bumped by each reload).
        generation: u64,
    },
    /// Send `signal` to a live worker.
    Signal {
        /// The worker.
        pid: Pid,
        /// Its slot.
        slot: usize,
        /// QUIT, TERM or KILL.
        signal: Signal,
        /// Why.
        reason: StopReason,
    },
    /// Nothing is left to supervise: the master exits with this code.
    Exit {
        /// 0 after a stop; 1 when every worker failed to boot.
        code: i32,
    },
}

/// What [`Supervisor::exited`] concluded about a worker's exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    /// The slot it held.
    pub slot: usize,
    /// How long it lived.
    pub uptime: Duration,
    /// True if the master had asked it to stop.
    pub expected: bool,
    /// True if it died before saying it was ready.
    pub before_ready: bool,
    /// Set when the slot will not be respawned (exit code [`EXIT_BOOT_FAILED`]).
    pub boot_failed: bool,
    /// Delay before the slot is respawned (crash-loop back-off).
    pub respawn_delay: Option<Duration>,
}

/// A live worker as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    /// Its pid.
    pub pid: Pid,
    /// Its slot.
    pub slot: usize,
    /// Its generation.
    pub generation: u64,
    /// It said it is ready.
    pub ready: bool,
    /// It was asked to stop.
    pub stopping: bool,
    /// It is being replaced for reaching its request limit.
    pub recycling: bool,
    /// When it was forked.
    pub spawned_at: MonoTime,
    /// Connections served, as last observed.
    pub requests: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Stopping { fast: bool },
}

#[derive(Debug, Clone)]
struct Worker {
    pid: Pid,
    slot: usize,
    generation: u64,
    spawned_at: MonoTime,
    ready_at: Option<MonoTime>,
    /// Last stop signal sent and when.
    stop: Option<(Signal, MonoTime)>,
    /// Busy since, as last observed.
    busy_since: Option<MonoTime>,
    /// Waiting in place on a kept-alive connection, as last observed: not
    /// timed out, but not available either.
    kept_alive: bool,
    /// Connections served, as last observed.
    requests: u64,
    /// Recycle after this many connections.
    limit: Option<u64>,
    /// Being replaced because it reached its limit.
    recycling: bool,
    /// Killed for not being ready within the boot timeout.
    boot_timed_out: bool,
    /// Idle or kept alive and last heard of then (its state change or its
    /// heartbeat, the later), as last observed; `None` when busy, booting,
    /// waiting in a queue that holds nothing, or without heartbeats.
    quiet_since: Option<MonoTime>,
    /// Recycle it from then on (`--max-age`, jitter applied by the caller).
    retire_at: Option<MonoTime>,
    /// Why it is (to be) recycled, for the log.
    recycle_why: &'static str,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    failures: u32,
    next_spawn_at: MonoTime,
    boot_failed: bool,
    spawning: bool,
}

/// The pure supervisor. See the module docs.
#[derive(Debug, Clone)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    phase: Phase,
    target: usize,
    /// Pool size to restore when TTIN or HUP follows WINCH.
    before_winch: Option<usize>,
    generation: u64,
    workers: Vec<Worker>,
    slots: Vec<Slot>,
    exit_code: i32,
    /// When the master last came back from a stall (stopped or starved):
    /// busy time counts from here at the earliest.
    resumed_at: MonoTime,
    /// The sizing policy (`--workers MIN:MAX`).
    scaler: Option<Scaler>,
    /// A worker changed state since the last [`Supervisor::scale`].
    activity: bool,
}

impl Supervisor {
    /// A supervisor that wants `cfg.workers` workers.
    pub fn new(cfg: SupervisorConfig) -> Supervisor {
        let scale = clamp_scale(cfg.scale);
        let target = scale.map_or(cfg.workers, |s| s.min).min(MAX_WORKERS);
        Supervisor {
            cfg,
            phase: Phase::Running,
            target,
            before_winch: None,
            generation: 1,
            workers: Vec::new(),
            slots: Vec::new(),
            exit_code: 0,
            resumed_at: MonoTime::default(),
            scaler: scale.map(Scaler::new),
            activity: false,
        }
    }

    /// HUP with new settings: the pool size (a TTIN/TTOU or WINCH change is
    /// replaced by the configured size), its sizing range and the deadlines
    /// change, then every worker is replaced as by [`Command::Reload`].
    /// Ignored while stopping. Returns a description for the log.
    pub fn reload_with(&mut self, new: PoolSettings, now: MonoTime) -> String {
        if self.phase != Phase::Running {
            return self.command(Command::Reload, now);
        }
        let scale = clamp_scale(new.scale);
        let before = (
            self.target,
            self.scale_config().copied(),
            self.cfg.graceful_timeout,
            self.cfg.timeout,
        );
        self.cfg.workers = new.workers;
        self.cfg.graceful_timeout = new.graceful_timeout;
        self.cfg.timeout = new.timeout;
        if scale != self.scale_config().copied() {
            self.scaler = scale.map(Scaler::new);
        }
        self.cfg.scale = scale;
        self.target = scale.map_or(new.workers, |s| s.min).min(MAX_WORKERS);
        self.before_winch = None;
        let mut changes = Vec::new();
        if before.0 != self.target || before.1 != scale {
            changes.push(self.describe_size());
        }
        if before.2 != new.graceful_timeout {
            changes.push(format!("graceful timeout {:?}", new.graceful_timeout));
        }
        if before.3 != new.timeout {
            changes.push(match new.timeout {
                Some(t) => format!("timeout {t:?}"),
                None => "no timeout".into(),
            });
        }
        let what = self.command(Command::Reload, now);
        if changes.is_empty() {
            what
        } else {
            format!("{what}; now {}", changes.join(", "))
        }
    }

    /// The sizing range, when the pool sizes itself.
    pub fn scale_config(&self) -> Option<&ScaleConfig> {
        self.scaler.as_ref().map(Scaler::config)
    }

    /// How long a graceful stop lets a worker finish before TERM.
    pub fn graceful_timeout(&self) -> Duration {
        self.cfg.graceful_timeout
    }

    /// The busy-too-long limit (`--timeout`), if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.cfg.timeout
    }

    /// Workers wanted now.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Live worker processes (all generations, including those stopping).
    pub fn live(&self) -> usize {
        self.workers.len()
    }

    /// The current generation (starts at 1, +1 per reload).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True once a stop was requested.
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    /// Pids of live workers with their slots.
    pub fn pids(&self) -> impl Iterator<Item = (Pid, usize)> + '_ {
        self.workers.iter().map(|w| (w.pid, w.slot))
    }

    /// Every live worker, for the status interface.
    pub fn view(&self) -> Vec<WorkerView> {
        self.workers
            .iter()
            .map(|w| WorkerView {
                pid: w.pid,
                slot: w.slot,
                generation: w.generation,
                ready: w.ready_at.is_some(),
                stopping: w.stop.is_some(),
                recycling: w.recycling,
                spawned_at: w.spawned_at,
                requests: w.requests,
            })
            .collect()
    }

    /// The slot of a live worker.
    pub fn slot_of(&self, pid: Pid) -> Option<usize> {
        self.worker(pid).map(|w| w.slot)
    }

    /// True when every wanted slot has a ready worker of the current
    /// generation, or has given up booting.
    pub fn all_ready(&self) -> bool {
        self.phase == Phase::Running
            && (0..self.target).all(|s| {
                self.slot(s).boot_failed
                    || self.workers.iter().any(|w| {
                        w.slot == s
                            && w.generation == self.generation
                            && w.ready_at.is_some()
                            && w.stop.is_none()
                    })
            })
    }

    /// An operator command. Returns a short description for the log.
    pub fn command(&mut self, cmd: Command, _now: MonoTime) -> String {
        match (cmd, self.phase) {
            (Command::GracefulStop, Phase::Running) => {
                self.phase = Phase::Stopping { fast: false };
                "graceful stop: workers finish the connection in hand".into()
            }
            (Command::FastStop, Phase::Running | Phase::Stopping { fast: false }) => {
                self.phase = Phase::Stopping { fast: true };
                "fast stop: workers stop at once".into()
            }
            (_, Phase::Stopping { .. }) => "already stopping; ignored".into(),
            (Command::Reload, Phase::Running) => {
                self.generation += 1;
                for s in &mut self.slots {
                    s.failures = 0;
                    s.boot_failed = false;
                    s.next_spawn_at = MonoTime::default();
                }
                if let Some(n) = self.before_winch.take() {
                    self.target = n;
                }
                format!(
                    "reload: replacing {} workers with generation {}",
                    self.target, self.generation
                )
            }
            (Command::AddWorker, Phase::Running) => {
                if let (0, Some(n)) = (self.target, self.before_winch) {
                    self.before_winch = None;
                    self.target = n;
                } else if self.target < MAX_WORKERS {
                    self.target += 1;
                    // A self-sizing pool: the range moves with it.
                    if let Some(sc) = &mut self.scaler {
                        let c = *sc.config();
                        sc.set_range((c.min + 1).min(MAX_WORKERS), (c.max + 1).min(MAX_WORKERS));
                    }
                }
                self.describe_size()
            }
            (Command::RemoveWorker, Phase::Running) => {
                if self.target > 1 {
                    self.target -= 1;
                    if let Some(sc) = &mut self.scaler {
                        let c = *sc.config();
                        let min = c.min.saturating_sub(1).max(1);
                        sc.set_range(min, c.max.saturating_sub(1).max(min));
                    }
                    self.describe_size()
                } else {
                    format!(
                        "workers: {} (TTOU keeps at least one; WINCH stops all)",
                        self.target
                    )
                }
            }
            (Command::StopWorkers, Phase::Running) => {
                if self.target > 0 {
                    self.before_winch = Some(self.target);
                }
                self.target = 0;
                "stopping every worker; the master stays (TTIN or HUP brings them back)".into()
            }
        }
    }

    /// The pool sizing policy's turn (every [`crate::scaling::SAMPLE_INTERVAL`]
    /// when it sizes itself): `backlog` says a listener has a connection
    /// waiting, `queued` how many when the kernel tells. Returns the change
    /// of size decided, already applied to the target: a grow is spawned and
    /// a shrink retired by the next [`Supervisor::actions`].
    ///
    /// Paused (and its measurements restarted) while stopping, after
    /// WINCH, and while a reload replaces workers.
    pub fn scale(
        &mut self,
        now: MonoTime,
        backlog: bool,
        queued: Option<u32>,
    ) -> Option<ScaleEvent> {
        let activity = std::mem::take(&mut self.activity);
        let gen = self.generation;
        let paused = self.phase != Phase::Running
            || self.target == 0
            || self.workers.iter().any(|w| w.generation != gen);
        let target = self.target;
        let scaler = self.scaler.as_mut()?;
        if paused {
            scaler.reset();
            return None;
        }
        let mut sample = Sample {
            size: target,
            backlog,
            queued,
            activity,
            ..Sample::default()
        };
        let mut busy = 0;
        for s in 0..target {
            let slot = self.slots.get(s).cloned().unwrap_or_default();
            let current = self
                .workers
                .iter()
                .find(|w| w.slot == s && w.generation == gen && w.stop.is_none() && !w.recycling);
            match current {
                Some(w) if w.ready_at.is_some() => {
                    if w.busy_since.is_none() && !w.kept_alive {
                        sample.idle += 1;
                        sample.top_idle = s + 1 == target;
                    } else {
                        busy += 1;
                    }
                }
                _ if slot.boot_failed => {}
                _ => sample.starting += 1,
            }
        }
        let penalty = scaler.penalty();
        let decision = scaler.decide(&sample, now);
        let flap_hold = (scaler.penalty() > penalty).then(|| scaler.hold());
        let (to, retired) = match decision {
            Decision::Hold => return None,
            Decision::Grow { by, .. } => ((target + by).min(MAX_WORKERS), None),
            Decision::Shrink { .. } => {
                let top = self
                    .workers
                    .iter()
                    .find(|w| w.slot == target - 1 && w.generation == gen && w.stop.is_none())
                    .map(|w| (w.slot, w.pid));
                (target - 1, top)
            }
        };
        self.target = to;
        Some(ScaleEvent {
            from: target,
            to,
            decision,
            busy,
            queued,
            retired,
            flap_hold,
        })
    }

    fn describe_size(&self) -> String {
        match self.scale_config() {
            Some(c) => format!("workers: {} (range {}..{})", self.target, c.min, c.max),
            None => format!("workers: {}", self.target),
        }
    }

    /// The master forked `pid` for `slot`.
    pub fn spawned(&mut self, slot: usize, generation: u64, pid: Pid, now: MonoTime) {
        self.slot_mut(slot).spawning = false;
        self.workers.push(Worker {
            pid,
            slot,
            generation,
            spawned_at: now,
            ready_at: None,
            stop: None,
            busy_since: None,
            kept_alive: false,
            requests: 0,
            limit: None,
            recycling: false,
            boot_timed_out: false,
            quiet_since: None,
            retire_at: None,
            recycle_why: "",
        });
    }

    /// `pid` is to be recycled after `n` connections (`--max-requests`,
    /// jitter already applied by the caller).
    pub fn limit_requests(&mut self, pid: Pid, n: u64) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            w.limit = Some(n);
        }
    }

    /// `pid` is to be recycled from `at` on (`--max-age`): gracefully, its
    /// replacement first, one slot at a time, as for a request limit.
    pub fn limit_age(&mut self, pid: Pid, at: MonoTime) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            w.retire_at = Some(at);
        }
    }

    /// `pid` is to be recycled as soon as its turn comes (its memory grew
    /// past `--max-memory`): as for a request limit.
    pub fn recycle(&mut self, pid: Pid) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            w.limit = Some(0);
            w.recycle_why = "grew past --max-memory";
        }
    }

    /// What the scoreboard says `pid` is doing, how much it served, and
    /// its last heartbeat (`None`: the worker sends none, as with
    /// `--status-report pipe`; it is then never timed out while idle).
    pub fn observe(
        &mut self,
        pid: Pid,
        state: WorkerState,
        requests: u64,
        heartbeat: Option<Heartbeat>,
    ) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            let busy_since = match state {
                WorkerState::Busy { since } => Some(since),
                _ => None,
            };
            w.quiet_since = match (state, heartbeat) {
                (WorkerState::Idle { since } | WorkerState::KeepAlive { since }, Some(hb))
                    if !hb.holds_nothing =>
                {
                    Some(since.max(hb.at))
                }
                _ => None,
            };
            let kept_alive = matches!(state, WorkerState::KeepAlive { .. });
            if busy_since != w.busy_since || requests != w.requests || kept_alive != w.kept_alive {
                self.activity = true;
            }
            w.busy_since = busy_since;
            w.kept_alive = kept_alive;
            w.requests = requests;
        }
    }

    /// The master was stopped or starved until `now`: its view of busy
    /// times may be stale, so every busy worker gets a fresh timeout from
    /// now instead of being killed on an old clock (L9).
    pub fn stalled(&mut self, now: MonoTime) {
        self.resumed_at = now;
    }

    /// fork() failed for `slot`: back off as for a crash.
    pub fn spawn_failed(&mut self, slot: usize, now: MonoTime) -> Duration {
        let delay = self.backoff(slot, now);
        self.slot_mut(slot).spawning = false;
        delay
    }

    /// `pid` finished booting and accepts connections.
    pub fn ready(&mut self, pid: Pid, now: MonoTime) -> bool {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return false;
        };
        if w.ready_at.is_none() {
            w.ready_at = Some(now);
        }
        let slot = w.slot;
        self.slot_mut(slot).failures = 0;
        true
    }

    /// `pid` was reaped. Forgets it at once: it is never signalled again.
    pub fn exited(&mut self, pid: Pid, status: ExitStatus, now: MonoTime) -> Option<ExitReport> {
        let i = self.workers.iter().position(|w| w.pid == pid)?;
        let w = self.workers.swap_remove(i);
        let expected = w.stop.is_some();
        let before_ready = w.ready_at.is_none();
        let mut report = ExitReport {
            slot: w.slot,
            uptime: now.saturating_since(w.spawned_at),
            expected,
            before_ready,
            boot_failed: false,
            respawn_delay: None,
        };
        let current = w.generation == self.generation;
        if w.boot_timed_out && current && !self.is_stopping() {
            // Stuck before it was ready: a boot failure, not a crash to
            // retry at once (the next one would most likely be stuck too).
            self.slot_mut(w.slot).boot_failed = true;
            report.boot_failed = true;
            return Some(report);
        }
        if expected || !current || self.is_stopping() {
            return Some(report);
        }
        if status == ExitStatus::Code(EXIT_BOOT_FAILED) {
            self.slot_mut(w.slot).boot_failed = true;
            report.boot_failed = true;
        } else if before_ready {
            report.respawn_delay = Some(self.backoff(w.slot, now));
        } else {
            // It had served: respawn at once and forget earlier failures.
            let s = self.slot_mut(w.slot);
            s.failures = 0;
            s.next_spawn_at = now;
            report.respawn_delay = Some(Duration::ZERO);
        }
        Some(report)
    }

    /// What to do at `now`. Each returned action is already accounted for:
    /// a signalled worker is marked, a spawning slot is not spawned twice.
    pub fn actions(&mut self, now: MonoTime) -> Vec<Action> {
        let mut out = Vec::new();
        match self.phase {
            Phase::Running => {
                self.kill_frozen(now, &mut out);
                self.kill_unresponsive(now, &mut out);
                self.kill_stuck_at_boot(now, &mut out);
                self.mark_one_for_recycling(now);
                self.stop_superseded(now, &mut out);
                self.spawn_missing(now, &mut out);
                self.retire_surplus(now, &mut out);
                if self.workers.is_empty()
                    && self.target > 0
                    && (0..self.target).all(|s| self.slot(s).boot_failed)
                {
                    self.exit_code = 1;
                    out.push(Action::Exit { code: 1 });
                    return out;
                }
            }
            Phase::Stopping { fast } => {
                let first = if fast {
                    Signal::SIGTERM
                } else {
                    Signal::SIGQUIT
                };
                for w in &mut self.workers {
                    let upgrade = fast && matches!(w.stop, Some((Signal::SIGQUIT, _)));
                    if w.stop.is_none() || upgrade {
                        tell(w, first, StopReason::Shutdown, now, &mut out);
                    }
                }
                if self.workers.is_empty() {
                    out.push(Action::Exit {
                        code: self.exit_code,
                    });
                    return out;
                }
            }
        }
        self.escalate(now, &mut out);
        out
    }

    /// The next time [`Supervisor::actions`] would do something without a new
    /// event: a back-off expiring, a stop to escalate.
    pub fn next_deadline(&self) -> Option<MonoTime> {
        let mut next: Option<MonoTime> = None;
        let mut consider = |t: MonoTime| next = Some(next.map_or(t, |n| n.min(t)));
        for w in &self.workers {
            if let Some((sig, at)) = w.stop {
                match sig {
                    Signal::SIGQUIT => consider(at + self.cfg.graceful_timeout),
                    Signal::SIGTERM => consider(at + self.cfg.kill_timeout),
                    Signal::SIGABRT => consider(at + self.cfg.abort_grace),
                    _ => {}
                }
            } else if let (Some(since), Some(t)) = (w.busy_since, self.cfg.timeout) {
                consider(since.max(self.resumed_at) + t + Duration::from_millis(1));
            } else if let (Some(since), Some(t)) = (w.quiet_since, self.quiet_limit()) {
                consider(since.max(self.resumed_at) + t + Duration::from_millis(1));
            } else if let (None, Some(t)) = (w.ready_at, self.cfg.boot_timeout) {
                consider(w.spawned_at.max(self.resumed_at) + t + Duration::from_millis(1));
            }
        }
        // An age limit to reach (one at a time: while a worker recycles,
        // its replacement's readiness is the next event).
        if self.phase == Phase::Running && !self.recycling_one() {
            let gen = self.generation;
            for w in self
                .workers
                .iter()
                .filter(|w| w.generation == gen && w.stop.is_none() && w.ready_at.is_some())
            {
                if let Some(t) = w.retire_at {
                    consider(t);
                }
            }
        }
        if self.phase == Phase::Running {
            for s in 0..self.target {
                let slot = self.slot(s);
                if !slot.boot_failed && !self.has_current(s) {
                    consider(slot.next_spawn_at);
                }
            }
        }
        next
    }

    /// Replacements at a time (see [`SupervisorConfig::reload_batch`]).
    pub fn reload_batch(&self) -> usize {
        self.cfg
            .reload_batch
            .unwrap_or(self.target.div_ceil(4))
            .max(1)
    }

    /// Workers of an older generation that no longer serve a purpose are
    /// told to leave at once, so that they do not hold places of the reload
    /// batch (and, with it, the reload itself):
    /// * one still booting only boots to be replaced (a reload came before
    ///   it was ready);
    /// * one that is ready while a newer ready worker serves its slot is
    ///   superseded (reloads came faster than the slot was replaced: the
    ///   newest ready one serves until the current one is ready).
    fn stop_superseded(&mut self, now: MonoTime, out: &mut Vec<Action>) {
        let gen = self.generation;
        let newest_ready: Vec<(usize, u64)> = self
            .workers
            .iter()
            .filter(|w| w.ready_at.is_some() && w.stop.is_none())
            .map(|w| (w.slot, w.generation))
            .collect();
        let superseded = |w: &Worker| {
            w.ready_at.is_some()
                && newest_ready
                    .iter()
                    .any(|&(slot, g)| slot == w.slot && g > w.generation)
        };
        for w in self.workers.iter_mut().filter(|w| {
            w.generation < gen && w.stop.is_none() && (w.ready_at.is_none() || superseded(w))
        }) {
            tell(w, Signal::SIGQUIT, StopReason::Replaced, now, out);
        }
    }

    fn spawn_missing(&mut self, now: MonoTime, out: &mut Vec<Action>) {
        // Workers alive or being forked: a replacement (a slot still held
        // by an older or recycling worker) waits while this is at the cap.
        let cap = self.target.saturating_add(self.reload_batch());
        let mut live = self.workers.len() + self.slots.iter().filter(|s| s.spawning).count();
        let mut replacements = Vec::new();
        for s in 0..self.target {
            if self.has_current(s) {
                // Once the current worker is ready, the others in its slot
                // (older generation, or being recycled) leave.
                let ready = self
                    .workers
                    .iter()
                    .any(|w| w.slot == s && self.is_current(w) && w.ready_at.is_some());
                if ready {
                    let gen = self.generation;
                    for w in self.workers.iter_mut().filter(|w| {
                        w.slot == s && (w.generation != gen || w.recycling) && w.stop.is_none()
                    }) {
                        tell(
                            w,
                            Signal::SIGQUIT,
                            if w.recycling {
                                StopReason::Recycled { why: w.recycle_why }
                            } else {
                                StopReason::Replaced
                            },
                            now,
                            out,
                        );
                    }
                }
                continue;
            }
            let slot = self.slot(s);
            if slot.boot_failed || slot.spawning || now < slot.next_spawn_at {
                continue;
            }
            if self.workers.iter().any(|w| w.slot == s) {
                replacements.push(s);
            } else {
                // An empty slot is filled whatever the batch.
                live += 1;
                self.spawn(s, out);
            }
        }
        for s in replacements {
            if live >= cap {
                break;
            }
            live += 1;
            self.spawn(s, out);
        }
    }

    fn spawn(&mut self, slot: usize, out: &mut Vec<Action>) {
        self.slot_mut(slot).spawning = true;
        out.push(Action::Spawn {
            slot,
            generation: self.generation,
        });
    }

    /// SIGABRT (last words) to every worker busy on one connection longer
    /// than the timeout, counted from when the master last resumed at the
    /// earliest; escalation to KILL follows after `abort_grace`.
    fn kill_frozen(&mut self, now: MonoTime, out: &mut Vec<Action>) {
        let Some(timeout) = self.cfg.timeout else {
            return;
        };
        let resumed = self.resumed_at;
        for w in self.workers.iter_mut().filter(|w| w.stop.is_none()) {
            let Some(since) = w.busy_since else { continue };
            if now.saturating_since(since.max(resumed)) > timeout {
                tell(
                    w,
                    Signal::SIGABRT,
                    StopReason::Frozen {
                        busy_for: now.saturating_since(since),
                        timeout,
                    },
                    now,
                    out,
                );
            }
        }
    }

    /// The silence after which an idle worker counts as stopped: the
    /// timeout, at least [`MIN_QUIET`]; `None` without a timeout.
    fn quiet_limit(&self) -> Option<Duration> {
        self.cfg.timeout.map(|t| t.max(MIN_QUIET))
    }

    /// SIGKILL to every idle or kept-alive worker silent longer than the
    /// quiet limit, counted from when the master last resumed at the
    /// earliest (Unicorn's idle heartbeat): a stopped worker may hold the
    /// accept lock, or be handed connections it never takes. No last words:
    /// it serves no request, and a stopped process gets no SIGABRT anyway.
    fn kill_unresponsive(&mut self, now: MonoTime, out: &mut Vec<Action>) {
        let Some(limit) = self.quiet_limit() else {
            return;
        };
        let resumed = self.resumed_at;
        for w in self
            .workers
            .iter_mut()
            .filter(|w| w.stop.is_none() && w.ready_at.is_some())
        {
            let Some(since) = w.quiet_since else { continue };
            if now.saturating_since(since.max(resumed)) > limit {
                tell(
                    w,
                    Signal::SIGKILL,
                    StopReason::Unresponsive {
                        quiet_for: now.saturating_since(since),
                        limit,
                    },
                    now,
                    out,
                );
            }
        }
    }

    /// Workers not ready within the boot timeout of their fork get SIGKILL:
    /// a worker stuck before it serves has no request to finish, and its
    /// last words (SIGABRT) are for requests. Its exit counts as a boot
    /// failure (see [`Supervisor::exited`]).
    fn kill_stuck_at_boot(&mut self, now: MonoTime, out: &mut Vec<Action>) {
        let Some(timeout) = self.cfg.boot_timeout else {
            return;
        };
        let resumed = self.resumed_at;
        let mut failed = Vec::new();
        for w in self
            .workers
            .iter_mut()
            .filter(|w| w.stop.is_none() && w.ready_at.is_none())
        {
            if now.saturating_since(w.spawned_at.max(resumed)) > timeout {
                w.boot_timed_out = true;
                failed.push((w.slot, w.generation));
                tell(
                    w,
                    Signal::SIGKILL,
                    StopReason::BootTimeout { timeout },
                    now,
                    out,
                );
            }
        }
        // A boot failure from now on, not once its exit is seen: the slot
        // must not be respawned in the same turn.
        for (slot, generation) in failed {
            if generation == self.generation {
                self.slot_mut(slot).boot_failed = true;
            }
        }
    }

    /// At most one slot recycles at a time: mark the first current worker
    /// past its request limit, unless another one is still waiting for its
    /// replacement to be ready (one that was told to leave no longer counts:
    /// its replacement already serves).
    fn mark_one_for_recycling(&mut self, now: MonoTime) {
        if self.recycling_one() {
            return;
        }
        let gen = self.generation;
        if let Some(w) = self.workers.iter_mut().find(|w| {
            w.generation == gen
                && w.stop.is_none()
                && w.ready_at.is_some()
                && (w.limit.is_some_and(|l| w.requests >= l)
                    || w.retire_at.is_some_and(|t| now >= t))
        }) {
            w.recycling = true;
            if w.recycle_why.is_empty() {
                w.recycle_why = if w.limit.is_some_and(|l| w.requests >= l) {
                    "reached its request limit"
                } else {
                    "reached its maximum age (--max-age)"
                };
            }
        }
    }

    /// A worker is being replaced for its limit and still serves.
    fn recycling_one(&self) -> bool {
        self.workers.iter().any(|w| w.recycling && w.stop.is_none())
    }

    fn retire_surplus(&mut self, now: MonoTime, out: &mut Vec<Action>) {
        let target = self.target;
        for w in self
            .workers
            .iter_mut()
            .filter(|w| w.slot >= target && w.stop.is_none())
        {
            tell(w, Signal::SIGQUIT, StopReason::Retired, now, out);
        }
    }

    fn escalate(&mut self, now: MonoTime, out: &mut Vec<Action>) {
        let (grace, kill, abort) = (
            self.cfg.graceful_timeout,
            self.cfg.kill_timeout,
            self.cfg.abort_grace,
        );
        for w in &mut self.workers {
            let next = match w.stop {
                Some((Signal::SIGQUIT, at)) if now >= at + grace => Signal::SIGTERM,
                Some((Signal::SIGTERM, at)) if now >= at + kill => Signal::SIGKILL,
                Some((Signal::SIGABRT, at)) if now >= at + abort => Signal::SIGKILL,
                _ => continue,
            };
            tell(w, next, StopReason::Escalated, now, out);
        }
    }

    /// Records a failure of `slot` and returns the delay before its respawn:
    /// none for the first, then base, 2·base, 4·base … up to the cap.
    fn backoff(&mut self, slot: usize, now: MonoTime) -> Duration {
        let (base, cap) = (self.cfg.backoff_base, self.cfg.backoff_cap);
        let s = self.slot_mut(slot);
        s.failures = s.failures.saturating_add(1);
        let delay = if s.failures <= 1 {
            Duration::ZERO
        } else {
            let shift = (s.failures - 2).min(30);
            base.saturating_mul(1u32 << shift).min(cap)
        };
        s.next_spawn_at = now + delay;
        delay
    }

    fn has_current(&self, slot: usize) -> bool {
        self.workers
            .iter()
            .any(|w| self.is_current(w) && w.slot == slot)
    }

    /// Of the current generation, not stopping, not being recycled.
    fn is_current(&self, w: &Worker) -> bool {
        w.generation == self.generation && w.stop.is_none() && !w.recycling
    }

    fn worker(&self, pid: Pid) -> Option<&Worker> {
        self.workers.iter().find(|w| w.pid == pid)
    }

    fn slot(&self, s: usize) -> Slot {
        self.slots.get(s).cloned().unwrap_or_default()
    }

    fn slot_mut(&mut self, s: usize) -> &mut Slot {
        if self.slots.len() <= s {
            self.slots.resize_with(s + 1, Slot::default);
        }
        &mut self.slots[s]
    }
}

#[cfg(test)]
mod tests;

/// Asks worker `w` to stop with `signal` for `reason`: marks it (it is
/// never told the same twice, and its stop escalates from now) and emits
/// the action.
fn tell(w: &mut Worker, signal: Signal, reason: StopReason, now: MonoTime, out: &mut Vec<Action>) {
    w.stop = Some((signal, now));
    out.push(Action::Signal {
        pid: w.pid,
        slot: w.slot,
        signal,
        reason,
    });
}
