//! Tests of the pure supervisor on a simulated clock: no process is forked.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const MS: Duration = Duration::from_millis(1);

fn cfg(workers: usize) -> SupervisorConfig {
    SupervisorConfig {
        workers,
        graceful_timeout: Duration::from_secs(5),
        kill_timeout: Duration::from_secs(1),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(2),
        timeout: None,
        abort_grace: Duration::from_secs(1),
        boot_timeout: None,
        scale: None,
        reload_batch: None,
    }
}

const TIMEOUT: Duration = Duration::from_secs(2);
const LIMIT: u64 = 10;

/// A fake master: assigns pids, records which processes are alive and which
/// signals they got, and checks every action against the invariants.
struct Sim {
    sup: Supervisor,
    now: MonoTime,
    next_pid: i32,
    /// pid -> (slot, generation, signals received)
    alive: BTreeMap<i32, (usize, u64, Vec<Signal>)>,
    exit: Option<i32>,
    spawns: Vec<(usize, MonoTime)>,
    /// Request limit given to each spawned worker.
    limit: Option<u64>,
    /// (pid, busy for) of every frozen kill.
    frozen: Vec<(i32, Duration)>,
    /// Last observed busy state of each pid.
    busy: BTreeMap<i32, bool>,
    /// Every scale decision.
    scaled: Vec<ScaleEvent>,
    /// Last sign of life of each idle pid that sends heartbeats, and
    /// whether it said it holds nothing.
    heard: BTreeMap<i32, (MonoTime, bool)>,
    /// When the master last resumed from a stall.
    stalled_at: MonoTime,
    /// (pid, silent for) of every unresponsive kill.
    unresponsive: Vec<(i32, Duration)>,
}

impl Sim {
    fn new(workers: usize) -> Sim {
        Sim::with(cfg(workers))
    }

    fn with(c: SupervisorConfig) -> Sim {
        Sim {
            limit: None,
            frozen: Vec::new(),
            busy: BTreeMap::new(),
            scaled: Vec::new(),
            heard: BTreeMap::new(),
            stalled_at: MonoTime::from_nanos(0),
            unresponsive: Vec::new(),
            sup: Supervisor::new(c),
            now: MonoTime::from_nanos(1_000_000_000),
            next_pid: 100,
            alive: BTreeMap::new(),
            exit: None,
            spawns: Vec::new(),
        }
    }

    fn step(&mut self) {
        for action in self.sup.actions(self.now) {
            match action {
                Action::Spawn { slot, generation } => {
                    assert!(self.exit.is_none(), "spawn after exit");
                    assert!(!self.sup.is_stopping(), "spawn while stopping");
                    assert!(
                        slot < self.sup.target(),
                        "spawn of slot {slot} beyond target"
                    );
                    assert_eq!(generation, self.sup.generation());
                    // A replacement (its slot still held) only below the
                    // reload batch's cap.
                    if self.alive.values().any(|(s, ..)| *s == slot) {
                        assert!(
                            self.alive.len() < self.sup.target() + self.sup.reload_batch(),
                            "replacement of slot {slot} with {} alive, target {}, batch {}",
                            self.alive.len(),
                            self.sup.target(),
                            self.sup.reload_batch()
                        );
                    }
                    let pid = self.next_pid;
                    self.next_pid += 1;
                    self.sup
                        .spawned(slot, generation, Pid::from_raw(pid), self.now);
                    self.alive.insert(pid, (slot, generation, Vec::new()));
                    self.spawns.push((slot, self.now));
                    if let Some(l) = self.limit {
                        self.sup.limit_requests(Pid::from_raw(pid), l);
                    }
                }
                Action::Signal {
                    pid,
                    slot,
                    signal,
                    reason,
                } => {
                    if let StopReason::Frozen { busy_for, timeout } = reason {
                        assert!(busy_for > timeout, "killed {pid} busy only {busy_for:?}");
                        self.frozen.push((pid.as_raw(), busy_for));
                    }
                    if let StopReason::Unresponsive { quiet_for, limit } = reason {
                        assert!(limit >= MIN_QUIET && quiet_for > limit);
                        // Only a worker that beats, holds something, and was
                        // last heard of (or the master resumed) over the
                        // limit ago.
                        let (at, holds_nothing) = self.heard[&pid.as_raw()];
                        assert!(!holds_nothing, "killed {pid} while it held nothing");
                        assert!(
                            self.now.saturating_since(at.max(self.stalled_at)) > limit,
                            "killed {pid} heard of {:?} ago",
                            self.now.saturating_since(at)
                        );
                        assert_eq!(signal, Signal::SIGKILL);
                        self.unresponsive.push((pid.as_raw(), quiet_for));
                    }
                    let entry = self
                        .alive
                        .get_mut(&pid.as_raw())
                        .unwrap_or_else(|| panic!("signal {signal} to dead or unknown pid {pid}"));
                    assert_eq!(entry.0, slot);
                    assert!(!entry.2.contains(&signal), "{signal} sent twice to {pid}");
                    entry.2.push(signal);
                }
                Action::Exit { code } => {
                    assert!(self.alive.is_empty(), "exit with live workers");
                    self.exit = Some(code);
                }
            }
        }
        self.check_invariants();
    }

    fn check_invariants(&self) {
        let gen = self.sup.generation();
        // At most one older-generation worker serves a slot (the newest
        // ready one): superseded ones were told to leave.
        let view = self.sup.view();
        for v in &view {
            let serving_old = view
                .iter()
                .filter(|o| o.slot == v.slot && o.generation < gen && o.ready && !o.stopping)
                .count();
            assert!(
                serving_old <= 1,
                "slot {}: {serving_old} older workers serve",
                v.slot
            );
        }
        for s in 0..self.sup.target() {
            let current = self
                .sup
                .workers
                .iter()
                .filter(|w| w.slot == s && w.generation == gen && w.stop.is_none() && !w.recycling)
                .count();
            assert!(current <= 1, "slot {s} has {current} current workers");
        }
        assert_eq!(self.sup.live(), self.alive.len());
        assert!(self.sup.target() <= MAX_WORKERS);
        let waiting = self
            .sup
            .workers
            .iter()
            .filter(|w| w.recycling && w.stop.is_none())
            .count();
        assert!(waiting <= 1, "{waiting} slots recycling at once");
        if let Some(c) = self.sup.scale_config() {
            let t = self.sup.target();
            assert!(c.min >= 1 && c.min <= c.max, "range {}..{}", c.min, c.max);
            assert!(
                t == 0 || self.sup.is_stopping() || (c.min..=c.max).contains(&t),
                "target {t} outside {}..{}",
                c.min,
                c.max
            );
        }
    }

    /// The sizing policy's turn, checked: a shrink retires the top slot's
    /// worker, which was idle when last observed.
    fn scale(&mut self, backlog: bool) {
        let before = self.sup.target();
        if let Some(e) = self.sup.scale(self.now, backlog, None) {
            assert_eq!(e.from, before);
            assert_eq!(self.sup.target(), e.to);
            if matches!(e.decision, crate::scaling::Decision::Shrink { .. }) {
                let (slot, pid) = e.retired.expect("a shrink names the worker it retires");
                assert_eq!(slot, e.to, "the top slot leaves");
                assert_eq!(
                    self.busy.get(&pid.as_raw()),
                    Some(&false),
                    "retired {pid}, not seen idle"
                );
            }
            self.scaled.push(e);
        }
        self.step();
    }

    fn exit(&mut self, pid: i32, status: ExitStatus) -> Option<ExitReport> {
        self.alive.remove(&pid)?;
        let r = self.sup.exited(Pid::from_raw(pid), status, self.now);
        assert!(r.is_some(), "supervisor forgot pid {pid}");
        if let Some(d) = r.as_ref().and_then(|r| r.respawn_delay) {
            assert!(d <= cfg(1).backoff_cap, "back-off {d:?} over the cap");
        }
        r
    }

    fn ready_all(&mut self) {
        let pids: Vec<i32> = self.alive.keys().copied().collect();
        for p in pids {
            self.sup.ready(Pid::from_raw(p), self.now);
        }
    }

    /// Workers that were signalled exit, as real ones would.
    fn obey_signals(&mut self) {
        let gone: Vec<i32> = self
            .alive
            .iter()
            .filter(|(_, (_, _, sigs))| !sigs.is_empty())
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            self.exit(p, ExitStatus::Code(0));
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now + d;
    }

    fn pids_in(&self, slot: usize) -> Vec<i32> {
        self.alive
            .iter()
            .filter(|(_, (s, _, _))| *s == slot)
            .map(|(p, _)| *p)
            .collect()
    }
}

#[test]
fn starts_the_wanted_number_and_is_ready_when_all_report() {
    let mut sim = Sim::new(3);
    sim.step();
    assert_eq!(sim.alive.len(), 3);
    assert!(!sim.sup.all_ready());
    sim.ready_all();
    assert!(sim.sup.all_ready());
    sim.step();
    assert_eq!(sim.alive.len(), 3, "no extra spawn once full");
}

#[test]
fn a_dead_ready_worker_is_replaced_in_its_slot_at_once() {
    let mut sim = Sim::new(2);
    sim.step();
    sim.ready_all();
    let victim = sim.pids_in(1)[0];
    let r = sim.exit(victim, ExitStatus::Signaled(9)).expect("report");
    assert_eq!(
        (r.slot, r.expected, r.respawn_delay),
        (1, false, Some(Duration::ZERO))
    );
    sim.step();
    let now_in_slot = sim.pids_in(1);
    assert_eq!(now_in_slot.len(), 1);
    assert_ne!(now_in_slot[0], victim);
}

#[test]
fn crash_loop_backs_off_exponentially_up_to_the_cap() {
    let mut sim = Sim::new(1);
    let mut delays = Vec::new();
    for _ in 0..8 {
        sim.step();
        let pid = sim.pids_in(0)[0];
        let r = sim.exit(pid, ExitStatus::Code(1)).expect("report");
        assert!(r.before_ready);
        let delay = r.respawn_delay.expect("respawns");
        delays.push(delay);
        // Nothing spawns before the delay is over.
        sim.step();
        if !delay.is_zero() {
            assert!(sim.alive.is_empty(), "respawned before back-off ended");
            assert_eq!(sim.sup.next_deadline(), Some(sim.now + delay));
        }
        sim.advance(delay);
    }
    let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, [0, 100, 200, 400, 800, 1600, 2000, 2000]);
    // A worker that boots resets the count.
    sim.step();
    sim.ready_all();
    let pid = sim.pids_in(0)[0];
    let r = sim.exit(pid, ExitStatus::Code(1)).expect("report");
    assert_eq!(r.respawn_delay, Some(Duration::ZERO));
}

#[test]
fn boot_failure_exit_code_stops_the_slot_and_all_failed_exits_1() {
    let mut sim = Sim::new(2);
    sim.step();
    sim.ready_all();
    // Slot 1's worker dies; its replacement fails to boot.
    let p = sim.pids_in(1)[0];
    sim.exit(p, ExitStatus::Signaled(9));
    sim.step();
    let p = sim.pids_in(1)[0];
    let r = sim
        .exit(p, ExitStatus::Code(EXIT_BOOT_FAILED))
        .expect("report");
    assert!(r.boot_failed);
    sim.advance(Duration::from_secs(60));
    sim.step();
    assert!(
        sim.pids_in(1).is_empty(),
        "a boot-failed slot is not respawned"
    );
    assert!(
        sim.sup.all_ready(),
        "a boot-failed slot does not block readiness"
    );
    assert_eq!(sim.exit, None);
    // Now slot 0 also fails for good: nothing is left, the master exits 1.
    let p = sim.pids_in(0)[0];
    sim.exit(p, ExitStatus::Signaled(9));
    sim.step();
    let p = sim.pids_in(0)[0];
    sim.exit(p, ExitStatus::Code(EXIT_BOOT_FAILED));
    sim.step();
    assert_eq!(sim.exit, Some(1));
}

#[test]
fn a_reload_with_new_settings_resizes_the_pool_and_uses_the_new_deadlines() {
    let mut sim = Sim::new(3);
    sim.step();
    sim.ready_all();
    // TTIN to 4, then a reload whose configuration says 2: the configuration wins.
    sim.sup.command(Command::AddWorker, sim.now);
    assert_eq!(sim.sup.target(), 4);
    let said = sim.sup.reload_with(
        PoolSettings {
            workers: 2,
            scale: None,
            graceful_timeout: Duration::from_secs(1),
            timeout: Some(TIMEOUT),
        },
        sim.now,
    );
    assert!(
        said.contains("workers: 2") && said.contains("timeout 2s"),
        "{said}"
    );
    assert_eq!(sim.sup.target(), 2);
    for _ in 0..10 {
        sim.step();
        sim.ready_all();
        sim.obey_signals();
        sim.advance(Duration::from_millis(100));
    }
    sim.step();
    let gen = sim.sup.generation();
    assert_eq!(gen, 2);
    let slots: Vec<(usize, u64)> = sim.alive.values().map(|(s, g, _)| (*s, *g)).collect();
    assert_eq!(slots, [(0, 2), (1, 2)], "two workers of the new generation");
    // The new timeout applies: a worker busy 3 s is killed.
    let p = *sim.alive.keys().next().expect("a worker");
    let since = sim.now;
    sim.sup
        .observe(Pid::from_raw(p), WorkerState::Busy { since }, 0, None);
    sim.advance(Duration::from_secs(3));
    sim.step();
    assert_eq!(sim.frozen.len(), 1, "killed under the reloaded timeout");
    // The new graceful timeout applies: QUIT escalates to TERM after 1 s.
    sim.sup.command(Command::GracefulStop, sim.now);
    sim.step();
    sim.advance(Duration::from_millis(1100));
    sim.step();
    assert!(
        sim.alive
            .values()
            .any(|(_, _, sigs)| sigs.contains(&Signal::SIGTERM)),
        "TERM after the reloaded 1 s graceful timeout: {:?}",
        sim.alive
    );
}

#[test]
fn a_reload_can_turn_a_fixed_pool_into_one_that_sizes_itself_and_back() {
    let mut sim = Sim::new(2);
    sim.step();
    sim.ready_all();
    let range = crate::scaling::ScaleConfig {
        min: 1,
        max: 5,
        ..crate::scaling::ScaleConfig::default()
    };
    let mut settings = PoolSettings {
        workers: 2,
        scale: Some(range),
        graceful_timeout: Duration::from_secs(5),
        timeout: None,
    };
    sim.sup.reload_with(settings, sim.now);
    assert_eq!(sim.sup.target(), 1, "starts at MIN");
    assert_eq!(sim.sup.scale_config().map(|c| (c.min, c.max)), Some((1, 5)));
    settings.scale = None;
    settings.workers = 3;
    sim.sup.reload_with(settings, sim.now);
    assert_eq!(sim.sup.target(), 3);
    assert!(sim.sup.scale_config().is_none());
}

#[test]
fn reload_starts_each_new_worker_before_its_old_one_is_asked_to_leave() {
    let mut sim = Sim::with(SupervisorConfig {
        reload_batch: Some(2),
        ..cfg(2)
    });
    sim.step();
    sim.ready_all();
    let old: Vec<i32> = sim.alive.keys().copied().collect();
    sim.sup.command(Command::Reload, sim.now);
    sim.step();
    assert_eq!(sim.alive.len(), 4, "new generation spawned beside the old");
    assert!(
        old.iter().all(|p| sim.alive[p].2.is_empty()),
        "no old worker is stopped before its replacement is ready"
    );
    // Only slot 0's replacement becomes ready: only slot 0's old worker leaves.
    let new0 = *sim
        .pids_in(0)
        .iter()
        .find(|p| !old.contains(p))
        .expect("new");
    sim.sup.ready(Pid::from_raw(new0), sim.now);
    sim.step();
    let old0 = *sim
        .pids_in(0)
        .iter()
        .find(|p| old.contains(p))
        .expect("old");
    let old1 = *sim
        .pids_in(1)
        .iter()
        .find(|p| old.contains(p))
        .expect("old");
    assert_eq!(sim.alive[&old0].2, vec![Signal::SIGQUIT]);
    assert!(sim.alive[&old1].2.is_empty());
}

#[test]
fn a_reload_replaces_at_most_a_batch_of_slots_at_a_time() {
    // 8 workers: the default batch is a quarter, 2.
    let mut sim = Sim::new(8);
    sim.step();
    sim.ready_all();
    assert_eq!(sim.sup.reload_batch(), 2);
    let old: Vec<i32> = sim.alive.keys().copied().collect();
    sim.sup.command(Command::Reload, sim.now);
    let mut max_alive = 0;
    for _ in 0..20 {
        sim.step();
        max_alive = max_alive.max(sim.alive.len());
        sim.ready_all();
        sim.step();
        sim.obey_signals();
    }
    assert_eq!(
        max_alive, 10,
        "at most 8 + 2 at once, and the batch is used"
    );
    assert_eq!(sim.alive.len(), 8);
    assert!(sim.alive.keys().all(|p| !old.contains(p)), "all replaced");
    // An explicit batch of 1, and a crash of another slot meanwhile: the
    // empty slot is filled at once, whatever the batch.
    let mut sim = Sim::with(SupervisorConfig {
        reload_batch: Some(1),
        ..cfg(3)
    });
    sim.step();
    sim.ready_all();
    sim.sup.command(Command::Reload, sim.now);
    sim.step();
    assert_eq!(sim.alive.len(), 4, "one replacement");
    let crashed = *sim.pids_in(2).first().expect("slot 2");
    sim.exit(crashed, ExitStatus::Signaled(9));
    sim.step();
    assert_eq!(sim.alive.len(), 4, "slot 2 refilled at once");
    assert_eq!(sim.pids_in(2).len(), 1);
}

#[test]
fn a_second_reload_stops_the_first_ones_workers_still_booting() {
    let mut sim = Sim::with(SupervisorConfig {
        reload_batch: Some(1),
        ..cfg(1)
    });
    sim.step();
    sim.ready_all();
    let gen1 = sim.pids_in(0)[0];
    sim.sup.command(Command::Reload, sim.now);
    sim.step();
    let gen2 = *sim.pids_in(0).iter().find(|&&p| p != gen1).expect("gen 2");
    // gen 2 is still booting when the next reload comes: it would only
    // boot to be replaced, and it holds the batch.
    sim.sup.command(Command::Reload, sim.now);
    sim.step();
    assert_eq!(sim.alive[&gen2].2, [Signal::SIGQUIT]);
    assert!(sim.alive[&gen1].2.is_empty(), "the serving one stays");
    sim.obey_signals();
    sim.step();
    let gen3 = *sim
        .pids_in(0)
        .iter()
        .find(|&&p| p != gen1)
        .expect("gen 3 forked once gen 2 left");
    sim.sup.ready(Pid::from_raw(gen3), sim.now);
    sim.step();
    assert_eq!(sim.alive[&gen1].2, [Signal::SIGQUIT]);
}

#[test]
fn a_worker_ready_after_its_generation_passed_supersedes_the_older_one() {
    // Slot 0's gen-2 worker reports ready in the very turn a second reload
    // made gen 3 current: two ready workers of old generations in one slot.
    // The older one has nothing left to do and leaves; otherwise it would
    // hold a place of the batch, and with enough slots like it, the reload
    // could never fork the current workers.
    let mut sim = Sim::with(SupervisorConfig {
        reload_batch: Some(1),
        ..cfg(1)
    });
    sim.step();
    sim.ready_all();
    let gen1 = sim.pids_in(0)[0];
    sim.sup.command(Command::Reload, sim.now);
    sim.step();
    let gen2 = *sim.pids_in(0).iter().find(|&&p| p != gen1).expect("gen 2");
    sim.sup.command(Command::Reload, sim.now);
    sim.sup.ready(Pid::from_raw(gen2), sim.now);
    sim.step();
    assert_eq!(sim.alive[&gen1].2, [Signal::SIGQUIT], "superseded");
    assert!(
        sim.alive[&gen2].2.is_empty(),
        "the newest ready one serves on"
    );
    sim.obey_signals();
    sim.step();
    let gen3 = *sim
        .pids_in(0)
        .iter()
        .find(|&&p| p != gen2)
        .expect("gen 3 forked within the batch");
    sim.sup.ready(Pid::from_raw(gen3), sim.now);
    sim.step();
    assert_eq!(sim.alive[&gen2].2, [Signal::SIGQUIT]);
}

#[test]
fn an_age_limit_recycles_at_its_time_one_slot_at_a_time() {
    let mut sim = Sim::new(2);
    sim.step();
    sim.ready_all();
    let (a, b) = (sim.pids_in(0)[0], sim.pids_in(1)[0]);
    let t0 = sim.now;
    sim.sup
        .limit_age(Pid::from_raw(a), t0 + Duration::from_secs(10));
    sim.sup
        .limit_age(Pid::from_raw(b), t0 + Duration::from_secs(9));
    assert_eq!(sim.sup.next_deadline(), Some(t0 + Duration::from_secs(9)));
    sim.advance(Duration::from_secs(11));
    sim.step();
    assert_eq!(sim.alive.len(), 3, "one replacement at a time");
    let new = *sim
        .alive
        .keys()
        .find(|p| **p != a && **p != b)
        .expect("replacement");
    sim.sup.ready(Pid::from_raw(new), sim.now);
    sim.step();
    let signalled: Vec<i32> = [a, b]
        .into_iter()
        .filter(|p| sim.alive[p].2 == [Signal::SIGQUIT])
        .collect();
    assert_eq!(signalled.len(), 1, "the first one leaves once replaced");
    sim.obey_signals();
    sim.step();
    assert_eq!(sim.alive.len(), 3, "then the second one's replacement");
}

#[test]
fn reload_whose_new_workers_fail_to_boot_keeps_the_old_ones_serving() {
    let mut sim = Sim::new(1);
    sim.step();
    sim.ready_all();
    let old = sim.pids_in(0)[0];
    sim.sup.command(Command::Reload, sim.now);
    sim.step();
    let new = *sim.pids_in(0).iter().find(|&&p| p != old).expect("new");
    sim.exit(new, ExitStatus::Code(EXIT_BOOT_FAILED));
    sim.advance(Duration::from_secs(60));
    sim.step();
    assert_eq!(sim.pids_in(0), vec![old]);
    assert!(sim.alive[&old].2.is_empty(), "old generation keeps serving");
    assert_eq!(sim.exit, None);
}

/// C5: a new worker stuck before it is ready (in the app's `after_fork`)
/// holds a reload forever unless it is killed: at the boot timeout it gets
/// SIGKILL, its exit counts as a boot failure (the slot is not respawned
/// until the next reload), and the old generation keeps serving.
#[test]
fn a_new_worker_stuck_at_boot_is_killed_at_the_boot_timeout_and_the_old_one_serves_on() {
    let mut sim = Sim::with(SupervisorConfig {
        boot_timeout: Some(Duration::from_secs(3)),
        ..cfg(1)
    });
    sim.step();
    sim.ready_all();
    let old = sim.pids_in(0)[0];
    sim.sup.command(Command::Reload, sim.now);
    sim.step();
    let new = *sim.pids_in(0).iter().find(|&&p| p != old).expect("new");
    // Not yet: the deadline is 3 s after the fork, and the master is woken
    // for it.
    sim.advance(Duration::from_secs(2));
    sim.step();
    assert!(sim.alive[&new].2.is_empty(), "killed too early");
    let due = sim
        .sup
        .next_deadline()
        .expect("a deadline for the boot timeout");
    assert!(due <= sim.now + Duration::from_millis(1001), "{due:?}");
    sim.advance(Duration::from_millis(1001));
    sim.step();
    assert_eq!(sim.alive[&new].2, vec![Signal::SIGKILL]);
    let report = sim
        .exit(new, ExitStatus::Signaled(Signal::SIGKILL as i32))
        .expect("a worker");
    assert!(report.boot_failed, "{report:?}");
    sim.advance(Duration::from_secs(60));
    sim.step();
    assert_eq!(
        sim.pids_in(0),
        vec![old],
        "not respawned, the old one stays"
    );
    assert!(
        sim.alive[&old].2.is_empty(),
        "the old generation keeps serving"
    );
    assert_eq!(sim.exit, None);
}

/// A worker that gets ready in time is never touched by the boot timeout.
#[test]
fn a_worker_ready_in_time_is_not_killed_by_the_boot_timeout() {
    let mut sim = Sim::with(SupervisorConfig {
        boot_timeout: Some(Duration::from_secs(3)),
        ..cfg(2)
    });
    sim.step();
    sim.advance(Duration::from_secs(2));
    sim.ready_all();
    sim.advance(Duration::from_secs(60));
    sim.step();
    assert!(sim.alive.values().all(|(_, _, signals)| signals.is_empty()));
}

#[test]
fn graceful_stop_escalates_quit_term_kill_on_deadlines_then_exits_0() {
    let mut sim = Sim::new(2);
    sim.step();
    sim.ready_all();
    sim.sup.command(Command::GracefulStop, sim.now);
    sim.step();
    assert!(sim.alive.values().all(|w| w.2 == [Signal::SIGQUIT]));
    sim.advance(Duration::from_secs(5) - MS);
    sim.step();
    assert!(
        sim.alive.values().all(|w| w.2.len() == 1),
        "no TERM before the grace ends"
    );
    sim.advance(MS);
    sim.step();
    assert!(sim
        .alive
        .values()
        .all(|w| w.2 == [Signal::SIGQUIT, Signal::SIGTERM]));
    sim.advance(Duration::from_secs(1));
    sim.step();
    assert!(sim
        .alive
        .values()
        .all(|w| w.2 == [Signal::SIGQUIT, Signal::SIGTERM, Signal::SIGKILL]));
    let pids: Vec<i32> = sim.alive.keys().copied().collect();
    for p in pids {
        sim.exit(p, ExitStatus::Signaled(9));
    }
    sim.step();
    assert_eq!(sim.exit, Some(0));
}

#[test]
fn fast_stop_after_graceful_upgrades_to_term() {
    let mut sim = Sim::new(1);
    sim.step();
    sim.sup.command(Command::GracefulStop, sim.now);
    sim.step();
    sim.sup.command(Command::FastStop, sim.now);
    sim.step();
    let w = sim.alive.values().next().expect("one");
    assert_eq!(w.2, [Signal::SIGQUIT, Signal::SIGTERM]);
}

#[test]
fn ttin_ttou_winch_resize_and_retire_the_highest_slots() {
    let mut sim = Sim::new(2);
    sim.step();
    sim.ready_all();
    sim.sup.command(Command::AddWorker, sim.now);
    sim.step();
    assert_eq!(sim.alive.len(), 3);
    assert_eq!(sim.pids_in(2).len(), 1);
    sim.sup.command(Command::RemoveWorker, sim.now);
    sim.step();
    let p2 = sim.pids_in(2)[0];
    assert_eq!(sim.alive[&p2].2, [Signal::SIGQUIT], "slot 2 retired");
    sim.obey_signals();
    sim.sup.command(Command::RemoveWorker, sim.now);
    sim.sup.command(Command::RemoveWorker, sim.now);
    assert_eq!(sim.sup.target(), 1, "TTOU keeps one worker");
    sim.step();
    sim.obey_signals();
    sim.sup.command(Command::StopWorkers, sim.now);
    sim.step();
    sim.obey_signals();
    sim.step();
    assert!(sim.alive.is_empty(), "WINCH stops every worker");
    assert_eq!(sim.exit, None, "the master stays");
    sim.sup.command(Command::AddWorker, sim.now);
    sim.step();
    assert_eq!(
        sim.alive.len(),
        1,
        "TTIN after WINCH restores the pool size"
    );
}

impl Sim {
    /// The scoreboard says `pid` turned busy or idle now, with a heartbeat
    /// now (`Some(holds_nothing)`) or none.
    fn observe(&mut self, pid: i32, is_busy: bool, requests: u64, hb: Option<bool>) {
        let since = self.now;
        let state = if is_busy {
            WorkerState::Busy { since }
        } else {
            WorkerState::Idle { since }
        };
        let heartbeat = hb.map(|holds_nothing| Heartbeat {
            at: self.now,
            holds_nothing,
        });
        self.sup
            .observe(Pid::from_raw(pid), state, requests, heartbeat);
        self.busy.insert(pid, is_busy);
        match hb {
            Some(holds_nothing) if !is_busy => {
                self.heard.insert(pid, (self.now, holds_nothing));
            }
            _ => {
                self.heard.remove(&pid);
            }
        }
    }
}

fn busy(sim: &mut Sim, pid: i32, since: MonoTime, requests: u64) {
    sim.sup.observe(
        Pid::from_raw(pid),
        WorkerState::Busy { since },
        requests,
        None,
    );
}

#[test]
fn a_worker_busy_past_the_timeout_gets_abrt_then_kill_and_is_replaced() {
    let mut sim = Sim::with(SupervisorConfig {
        timeout: Some(TIMEOUT),
        ..cfg(2)
    });
    sim.step();
    sim.ready_all();
    let pid = sim.pids_in(1)[0];
    let t0 = sim.now;
    busy(&mut sim, pid, t0, 0);
    assert_eq!(sim.sup.next_deadline(), Some(t0 + TIMEOUT + MS));
    sim.advance(TIMEOUT);
    sim.step();
    assert!(
        sim.alive[&pid].2.is_empty(),
        "not killed at exactly the timeout"
    );
    sim.advance(MS);
    sim.step();
    assert_eq!(sim.alive[&pid].2, [Signal::SIGABRT]);
    assert_eq!(sim.frozen, [(pid, TIMEOUT + MS)]);
    sim.advance(Duration::from_secs(1));
    sim.step();
    assert_eq!(sim.alive[&pid].2, [Signal::SIGABRT, Signal::SIGKILL]);
    sim.exit(pid, ExitStatus::Signaled(9));
    sim.step();
    assert_eq!(sim.pids_in(1).len(), 1, "slot 1 is served again");
    // An idle worker without heartbeats (pipe reports) is never killed,
    // however long it idles.
    let other = sim.pids_in(0)[0];
    sim.sup.observe(
        Pid::from_raw(other),
        WorkerState::Idle { since: t0 },
        5,
        None,
    );
    sim.advance(Duration::from_secs(3600));
    sim.step();
    assert!(sim.alive[&other].2.is_empty());
}

fn idle_with_beat(sim: &mut Sim, pid: i32, since: MonoTime, beat: MonoTime, holds_nothing: bool) {
    sim.sup.observe(
        Pid::from_raw(pid),
        WorkerState::Idle { since },
        0,
        Some(Heartbeat {
            at: beat,
            holds_nothing,
        }),
    );
    sim.heard.insert(pid, (since.max(beat), holds_nothing));
}

#[test]
fn an_idle_worker_that_stops_beating_is_killed_at_the_timeout_and_replaced() {
    let mut sim = Sim::with(SupervisorConfig {
        timeout: Some(TIMEOUT),
        ..cfg(2)
    });
    sim.step();
    sim.ready_all();
    let (a, b) = (sim.pids_in(0)[0], sim.pids_in(1)[0]);
    let t0 = sim.now;
    // `a` beats every 500 ms for an hour: never killed.
    for _ in 0..7200 {
        sim.advance(Duration::from_millis(500));
        let now = sim.now;
        idle_with_beat(&mut sim, a, t0, now, false);
        idle_with_beat(&mut sim, b, t0, t0 + Duration::from_secs(1), false);
        sim.step();
        if !sim.alive[&b].2.is_empty() {
            break;
        }
    }
    assert!(sim.alive[&a].2.is_empty(), "a beating worker lives");
    // `b` beat last at t0 + 1 s: killed just past t0 + 1 s + TIMEOUT.
    assert_eq!(sim.alive[&b].2, [Signal::SIGKILL]);
    assert_eq!(sim.unresponsive.len(), 1);
    assert!(sim.now <= t0 + Duration::from_secs(1) + TIMEOUT + Duration::from_millis(500));
    sim.exit(b, ExitStatus::Signaled(9));
    sim.step();
    assert_eq!(sim.pids_in(1).len(), 1, "slot 1 is served again");
}

#[test]
fn the_quiet_deadline_is_exact_and_never_below_two_seconds() {
    let short = Duration::from_millis(300);
    let mut sim = Sim::with(SupervisorConfig {
        timeout: Some(short),
        ..cfg(1)
    });
    sim.step();
    sim.ready_all();
    let pid = sim.pids_in(0)[0];
    let t0 = sim.now;
    idle_with_beat(&mut sim, pid, t0, t0, false);
    assert_eq!(sim.sup.next_deadline(), Some(t0 + MIN_QUIET + MS));
    sim.advance(MIN_QUIET);
    sim.step();
    assert!(sim.alive[&pid].2.is_empty(), "not at the limit itself");
    sim.advance(MS);
    sim.step();
    assert_eq!(sim.alive[&pid].2, [Signal::SIGKILL]);
}

#[test]
fn a_worker_waiting_in_a_lock_queue_a_master_stall_or_no_timeout_spare_it() {
    // Queued for a lock (holds nothing): spared however long.
    let mut sim = Sim::with(SupervisorConfig {
        timeout: Some(TIMEOUT),
        ..cfg(1)
    });
    sim.step();
    sim.ready_all();
    let pid = sim.pids_in(0)[0];
    let t0 = sim.now;
    idle_with_beat(&mut sim, pid, t0, t0, true);
    assert_eq!(sim.sup.next_deadline(), None);
    sim.advance(Duration::from_secs(600));
    sim.step();
    assert!(sim.alive[&pid].2.is_empty(), "a lock waiter holds nothing");
    // It took the lock and went silent: now it counts.
    let now = sim.now;
    idle_with_beat(&mut sim, pid, t0, now, false);
    let t1 = sim.now;
    // The master itself was stopped 4 s: silence counts from its resumption.
    sim.advance(Duration::from_secs(4));
    sim.sup.stalled(sim.now);
    sim.step();
    assert!(sim.alive[&pid].2.is_empty(), "no stale-clock murder");
    sim.advance(TIMEOUT + MS);
    sim.step();
    assert_eq!(sim.alive[&pid].2, [Signal::SIGKILL]);
    assert!(sim.now.saturating_since(t1) > TIMEOUT);

    // No --timeout: never.
    let mut sim = Sim::new(1);
    sim.step();
    sim.ready_all();
    let pid = sim.pids_in(0)[0];
    let now = sim.now;
    idle_with_beat(&mut sim, pid, now, now, false);
    sim.advance(Duration::from_secs(3600));
    sim.step();
    assert!(sim.alive[&pid].2.is_empty());
}

#[test]
fn after_a_master_stall_busy_workers_get_a_fresh_timeout() {
    let mut sim = Sim::with(SupervisorConfig {
        timeout: Some(TIMEOUT),
        ..cfg(1)
    });
    sim.step();
    sim.ready_all();
    let pid = sim.pids_in(0)[0];
    let t0 = sim.now;
    busy(&mut sim, pid, t0, 0);
    // The master was stopped for 4 s: on resuming it must not kill on its
    // stale view (L9).
    sim.advance(Duration::from_secs(4));
    sim.sup.stalled(sim.now);
    sim.step();
    assert!(sim.alive[&pid].2.is_empty(), "no stale-clock murder");
    sim.advance(TIMEOUT);
    sim.step();
    assert!(sim.alive[&pid].2.is_empty());
    sim.advance(MS);
    sim.step();
    assert_eq!(
        sim.alive[&pid].2,
        [Signal::SIGABRT],
        "still stuck: killed after a fresh timeout"
    );
}

#[test]
fn recycling_starts_the_replacement_first_and_one_slot_at_a_time() {
    let mut sim = Sim::new(2);
    sim.limit = Some(LIMIT);
    sim.step();
    sim.ready_all();
    let (a, b) = (sim.pids_in(0)[0], sim.pids_in(1)[0]);
    for p in [a, b] {
        sim.sup.observe(
            Pid::from_raw(p),
            WorkerState::Idle { since: sim.now },
            LIMIT,
            None,
        );
    }
    sim.step();
    assert_eq!(sim.alive.len(), 3, "one replacement, not two");
    assert!(sim.alive[&a].2.is_empty() && sim.alive[&b].2.is_empty());
    let new = *sim
        .pids_in(0)
        .iter()
        .find(|&&p| p != a)
        .expect("replacement in slot 0");
    sim.sup.ready(Pid::from_raw(new), sim.now);
    sim.step();
    assert_eq!(
        sim.alive[&a].2,
        [Signal::SIGQUIT],
        "old leaves once the new is ready"
    );
    assert!(sim.alive[&b].2.is_empty(), "slot 1 waits its turn");
    sim.obey_signals();
    sim.step();
    let new_b = *sim
        .pids_in(1)
        .iter()
        .find(|&&p| p != b)
        .expect("slot 1's turn");
    sim.sup.ready(Pid::from_raw(new_b), sim.now);
    sim.step();
    assert_eq!(sim.alive[&b].2, [Signal::SIGQUIT]);
}

#[derive(Debug, Clone)]
enum Ev {
    /// pid index, busy, requests, heartbeat (`Some(holds_nothing)`, now).
    Observe(usize, bool, u64, Option<bool>),
    Stall,
    Cmd(Command),
    Ready(usize),
    Crash(usize, ExitStatus),
    ObeySignals,
    Advance(u64),
    Scale(bool),
    ReloadWith(PoolSettings),
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::Reload),
        Just(Command::AddWorker),
        Just(Command::RemoveWorker),
        Just(Command::StopWorkers),
        Just(Command::GracefulStop),
        Just(Command::FastStop),
    ]
}

fn event() -> impl Strategy<Value = Ev> {
    let status = prop_oneof![
        Just(ExitStatus::Code(0)),
        Just(ExitStatus::Code(1)),
        Just(ExitStatus::Code(EXIT_BOOT_FAILED)),
        Just(ExitStatus::Signaled(9)),
        Just(ExitStatus::Signaled(11)),
    ];
    prop_oneof![
        1 => command().prop_map(Ev::Cmd),
        4 => any::<usize>().prop_map(Ev::Ready),
        3 => (any::<usize>(), status).prop_map(|(i, s)| Ev::Crash(i, s)),
        2 => Just(Ev::ObeySignals),
        3 => (0u64..3_000).prop_map(Ev::Advance),
        3 => (any::<usize>(), any::<bool>(), 0u64..15, proptest::option::of(any::<bool>()))
            .prop_map(|(i, b, r, hb)| Ev::Observe(i, b, r, hb)),
        1 => Just(Ev::Stall),
        1 => pool_settings().prop_map(Ev::ReloadWith),
    ]
}

fn pool_settings() -> impl Strategy<Value = PoolSettings> {
    (
        0usize..6,
        proptest::option::of((1usize..4, 0usize..4)),
        1u64..8,
        proptest::option::of(1u64..4),
    )
        .prop_map(|(workers, scale, grace, timeout)| PoolSettings {
            workers,
            scale: scale.map(|(min, extra)| crate::scaling::ScaleConfig {
                min,
                max: min + extra,
                ..crate::scaling::ScaleConfig::default()
            }),
            graceful_timeout: Duration::from_secs(grace),
            timeout: timeout.map(Duration::from_secs),
        })
}

fn nth_pid(sim: &Sim, i: usize) -> Option<i32> {
    let n = sim.alive.len();
    (n > 0).then(|| *sim.alive.keys().nth(i % n).expect("in range"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Whatever happens: no signal to a dead pid, no spawn while stopping or
    /// beyond the target, one current worker per slot, back-off capped, exit
    /// only with no workers left (all checked inside `Sim::step`). Then, once
    /// the storm is over and workers behave, the pool converges: every wanted
    /// slot has a ready worker (or gave up booting), nothing beyond the
    /// target survives, and a stopping master exits.
    #[test]
    fn invariants_hold_and_the_pool_converges(
        workers in 0usize..5,
        events in proptest::collection::vec(event(), 0..120),
    ) {
        let mut sim = Sim::with(SupervisorConfig { timeout: Some(TIMEOUT), ..cfg(workers) });
        sim.limit = Some(LIMIT);
        sim.step();
        for ev in events {
            if sim.exit.is_some() { break; }
            match ev {
                Ev::Observe(i, is_busy, requests, hb) => if let Some(p) = nth_pid(&sim, i) {
                    sim.observe(p, is_busy, requests, hb);
                },
                Ev::Scale(_) => {}
                Ev::ReloadWith(p) => { sim.sup.reload_with(p, sim.now); }
                Ev::Stall => { sim.sup.stalled(sim.now); sim.stalled_at = sim.now; }
                Ev::Cmd(c) => { sim.sup.command(c, sim.now); }
                Ev::Ready(i) => if let Some(p) = nth_pid(&sim, i) { sim.sup.ready(Pid::from_raw(p), sim.now); },
                Ev::Crash(i, st) => if let Some(p) = nth_pid(&sim, i) { sim.exit(p, st); },
                Ev::ObeySignals => sim.obey_signals(),
                Ev::Advance(ms) => sim.advance(Duration::from_millis(ms)),
            }
            sim.step();
        }
        // Calm: workers boot and obey, time passes beyond every deadline.
        for _ in 0..40 {
            if sim.exit.is_some() { break; }
            sim.ready_all();
            sim.obey_signals();
            sim.advance(Duration::from_secs(3));
            sim.step();
        }
        if sim.sup.is_stopping() {
            prop_assert!(sim.exit.is_some(), "a stopping master exits once workers are gone: {:?}", sim.exit);
        } else if sim.exit.is_none() {
            sim.ready_all();
            prop_assert!(sim.sup.all_ready());
            let gen = sim.sup.generation();
            for (pid, (slot, g, sigs)) in &sim.alive {
                prop_assert!(*slot < sim.sup.target(), "pid {} in retired slot {}", pid, slot);
                // An older worker survives only where its replacement failed
                // to boot: the old generation keeps serving (L6).
                let current = *g == gen && sigs.is_empty();
                let kept_old = *g < gen && sigs.is_empty() && sim.sup.slot(*slot).boot_failed;
                prop_assert!(current || kept_old, "stale worker {} survived", pid);
            }
        } else {
            prop_assert_eq!(sim.exit, Some(1));
        }
    }

    /// The master sleeps until `next_deadline`: nothing is spawned before it,
    /// and at that time the backed-off slot is spawned.
    #[test]
    fn next_deadline_is_when_the_backed_off_spawn_is_due(
        workers in 1usize..4,
        crashes in 2usize..7,
    ) {
        let mut sim = Sim::new(workers);
        for _ in 0..crashes {
            sim.step();
            if let Some(p) = sim.pids_in(0).first().copied() {
                sim.exit(p, ExitStatus::Code(1));
            }
        }
        let spawned_before = sim.spawns.len();
        let t = sim.sup.next_deadline().expect("slot 0 waits for its back-off");
        prop_assert!(t > sim.now);
        let early = sim.sup.clone().actions(t - MS);
        let spawns_early = early.iter().any(|a| matches!(a, Action::Spawn { .. }));
        prop_assert!(!spawns_early, "spawned before the deadline");
        sim.now = t;
        sim.step();
        prop_assert!(sim.spawns.len() > spawned_before, "deadline passed without a spawn");
    }
}

fn scale_cfg(min: usize, max: usize) -> SupervisorConfig {
    SupervisorConfig {
        scale: Some(crate::scaling::ScaleConfig {
            min,
            max,
            spare: 1,
            window: Duration::from_secs(1),
            stall: Duration::from_millis(500),
        }),
        ..cfg(99)
    }
}

#[test]
fn a_self_sizing_pool_starts_at_min_grows_on_saturation_and_retires_an_idle_top_worker() {
    let mut sim = Sim::with(scale_cfg(2, 6));
    sim.step();
    assert_eq!(sim.alive.len(), 2, "starts at MIN");
    sim.ready_all();
    let pids: Vec<i32> = sim.alive.keys().copied().collect();
    for &p in &pids {
        let now = sim.now;
        busy(&mut sim, p, now, 1);
        sim.busy.insert(p, true);
    }
    // Both busy and connections waiting: a grow after GROW_AFTER.
    for _ in 0..3 {
        sim.scale(true);
        sim.advance(crate::scaling::SAMPLE_INTERVAL);
    }
    assert_eq!(sim.sup.target(), 3, "{:?}", sim.scaled);
    assert_eq!(sim.alive.len(), 3, "the new slot is spawned");
    let e = sim.scaled[0].to_string();
    assert!(
        e.starts_with("scale up: 2 -> 3 workers (connections waiting, all 2 busy for 0.10s)"),
        "{e}"
    );
    // Load gone: everyone idle for a window; one worker leaves, the top one.
    sim.ready_all();
    let all: Vec<i32> = sim.alive.keys().copied().collect();
    for &p in &all {
        sim.sup.observe(
            Pid::from_raw(p),
            WorkerState::Idle { since: sim.now },
            2,
            None,
        );
        sim.busy.insert(p, false);
    }
    for _ in 0..40 {
        sim.scale(false);
        sim.advance(crate::scaling::SAMPLE_INTERVAL);
    }
    let shrink = sim.scaled.last().expect("a shrink").clone();
    assert_eq!((shrink.from, shrink.to), (3, 2));
    let (slot, pid) = shrink.retired.expect("retired");
    assert_eq!(slot, 2);
    assert_eq!(
        sim.alive[&pid.as_raw()].2,
        [Signal::SIGQUIT],
        "retired gracefully"
    );
    assert!(shrink
        .to_string()
        .contains(&format!("retiring worker=2 pid={pid}")));
    // Never below MIN.
    sim.obey_signals();
    for _ in 0..200 {
        sim.scale(false);
        sim.advance(crate::scaling::SAMPLE_INTERVAL);
    }
    assert_eq!(sim.sup.target(), 2);
}

#[test]
fn ttin_and_ttou_move_the_range_with_the_pool() {
    let mut sim = Sim::with(scale_cfg(2, 4));
    sim.step();
    sim.sup.command(Command::AddWorker, sim.now);
    let c = *sim.sup.scale_config().expect("scaling");
    assert_eq!((sim.sup.target(), c.min, c.max), (3, 3, 5));
    for _ in 0..3 {
        sim.sup.command(Command::RemoveWorker, sim.now);
    }
    let c = *sim.sup.scale_config().expect("scaling");
    assert_eq!(
        (sim.sup.target(), c.min, c.max),
        (1, 1, 3),
        "TTOU stops at one worker"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The sizing policy inside the supervisor, under storms of commands,
    /// crashes and busy/idle reports: the target stays within the range
    /// (checked after every step), a shrink always retires the top slot's
    /// worker and only one last seen idle, and no signal goes to a dead pid.
    #[test]
    fn a_self_sizing_pool_keeps_its_invariants(
        min in 1usize..4,
        extra in 0usize..5,
        events in proptest::collection::vec(prop_oneof![
            6 => any::<bool>().prop_map(Ev::Scale),
            6 => event(),
        ], 0..250),
    ) {
        let mut sim = Sim::with(scale_cfg(min, min + extra));
        sim.step();
        for ev in events {
            if sim.exit.is_some() { break; }
            match ev {
                Ev::Scale(backlog) => { sim.scale(backlog); continue; }
                Ev::Observe(i, is_busy, requests, hb) => if let Some(p) = nth_pid(&sim, i) {
                    sim.observe(p, is_busy, requests, hb);
                },
                Ev::Stall => { sim.sup.stalled(sim.now); sim.stalled_at = sim.now; }
                Ev::Cmd(c) => { sim.sup.command(c, sim.now); }
                Ev::Ready(i) => if let Some(p) = nth_pid(&sim, i) { sim.sup.ready(Pid::from_raw(p), sim.now); },
                Ev::Crash(i, st) => if let Some(p) = nth_pid(&sim, i) { sim.exit(p, st); },
                Ev::ObeySignals => sim.obey_signals(),
                Ev::Advance(ms) => sim.advance(Duration::from_millis(ms / 10)),
                Ev::ReloadWith(p) => { sim.sup.reload_with(p, sim.now); }
            }
            sim.step();
        }
    }
}

#[test]
fn scale_decisions_read_as_one_line_each() {
    let grow = ScaleEvent {
        from: 2,
        to: 4,
        decision: Decision::Grow {
            by: 2,
            reason: GrowReason::Stalled(Duration::from_millis(1500)),
        },
        busy: 1,
        queued: None,
        retired: None,
        flap_hold: Some(Duration::from_secs(20)),
    };
    assert_eq!(
        grow.to_string(),
        "scale up: 2 -> 4 workers (connections waiting, no worker changed state for 1.50s); \
         a retired worker was needed again: the next retirement waits for 20.0s of surplus"
    );
    let shrink = ScaleEvent {
        from: 4,
        to: 3,
        decision: Decision::Shrink {
            min_idle: 2,
            held: Duration::from_secs(10),
        },
        busy: 1,
        queued: Some(0),
        retired: Some((3, Pid::from_raw(4242))),
        flap_hold: None,
    };
    assert_eq!(
        shrink.to_string(),
        "scale down: 4 -> 3 workers (at least 2 idle for 10.0s); retiring worker=3 pid=4242"
    );
    assert!(!shrink.to_string().contains('\n') && !grow.to_string().contains('\n'));
}
