//! The master's view of its worker processes: who they are, their status
//! channels, their scoreboard cells, and what they reported.
//!
//! The [`Pool`] turns what workers say (status channel messages, scoreboard
//! stores) into observations for the [`Supervisor`]; it decides nothing.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::unistd::Pid;

use crate::report::ReportMode;
use crate::scoreboard::{Scoreboard, WorkerState};
use crate::status::{self, StatusKind, StatusMessage};
use crate::supervisor::Supervisor;

/// One live worker process.
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

/// The worker processes the master has forked and not yet reaped.
#[derive(Debug)]
pub(crate) struct Pool {
    workers: HashMap<Pid, WorkerProc>,
    scoreboard: Scoreboard,
    report: ReportMode,
    /// Connections served by workers already reaped.
    retired_requests: u64,
    /// Their request durations.
    retired_durations: crate::scoreboard::Durations,
    /// Scratch space for reading a status channel.
    msgs: Vec<Option<StatusMessage>>,
}

impl Pool {
    /// An empty pool whose workers report through `report`.
    pub(crate) fn new(scoreboard: Scoreboard, report: ReportMode) -> Pool {
        Pool {
            workers: HashMap::new(),
            scoreboard,
            report,
            retired_requests: 0,
            retired_durations: crate::scoreboard::Durations::default(),
            msgs: Vec::new(),
        }
    }

    /// How workers report busy and idle.
    pub(crate) fn report(&self) -> ReportMode {
        self.report
    }

    /// A scoreboard cell for a worker about to be forked.
    pub(crate) fn allocate_cell(&mut self) -> Option<usize> {
        self.scoreboard.allocate()
    }

    /// Gives back a cell whose worker was never forked.
    pub(crate) fn release_cell(&mut self, cell: usize) {
        self.scoreboard.release(cell);
    }

    /// A worker was forked into `slot`, reporting on `status`, with `cell`.
    pub(crate) fn add(&mut self, pid: Pid, slot: usize, status: OwnedFd, cell: usize) {
        self.workers.insert(
            pid,
            WorkerProc {
                slot,
                status: Some(status),
                cell,
                state: WorkerState::Booting,
                requests: 0,
                replacing: false,
            },
        );
    }

    /// A worker was reaped: its cell is free again, and what it served is
    /// counted. `false` when `pid` was not a worker.
    pub(crate) fn remove(&mut self, pid: Pid) -> bool {
        let Some(w) = self.workers.remove(&pid) else {
            return false;
        };
        self.scoreboard.release(w.cell);
        let served = match self.scoreboard.cell(w.cell) {
            Some(c) if self.report == ReportMode::Scoreboard => c.requests(),
            _ => w.requests,
        };
        self.retired_requests += served;
        if let Some(c) = self.scoreboard.cell(w.cell) {
            self.retired_durations.add(&c.durations());
        }
        true
    }

    /// Tells every worker that the coming stop is final (see
    /// [`crate::scoreboard::Cell::set_final_stop`]).
    pub(crate) fn mark_final_stop(&self) {
        for w in self.workers.values() {
            if let Some(c) = self.scoreboard.cell(w.cell) {
                c.set_final_stop();
            }
        }
    }

    /// Request durations of every worker, reaped ones included.
    pub(crate) fn durations(&self) -> crate::scoreboard::Durations {
        let mut d = self.retired_durations;
        for w in self.workers.values() {
            if let Some(c) = self.scoreboard.cell(w.cell) {
                d.add(&c.durations());
            }
        }
        d
    }

    /// Every live worker's pid.
    pub(crate) fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.workers.keys().copied()
    }

    /// The status channels still open, with their workers' pids.
    pub(crate) fn channels(&self) -> impl Iterator<Item = (Pid, BorrowedFd<'_>)> + '_ {
        self.workers
            .iter()
            .filter_map(|(pid, w)| w.status.as_ref().map(|fd| (*pid, fd.as_fd())))
    }

    /// The last observed state of `pid` (booting when unknown).
    pub(crate) fn state(&self, pid: Pid) -> WorkerState {
        self.workers
            .get(&pid)
            .map_or(WorkerState::Booting, |w| w.state)
    }

    /// `pid`'s last reading of its own memory (from its scoreboard cell).
    pub(crate) fn memory(&self, pid: Pid) -> Option<crate::memory::Memory> {
        let w = self.workers.get(&pid)?;
        self.scoreboard.cell(w.cell)?.memory()
    }

    /// Connections served by workers already reaped.
    pub(crate) fn retired_requests(&self) -> u64 {
        self.retired_requests
    }

    /// Reads what `pid` wrote on its status channel and tells the
    /// supervisor: ready, busy and idle (with `--status-report pipe`), or
    /// garbage, which gets the worker replaced (S5: its replacement starts
    /// first; it finishes its connection, then leaves).
    pub(crate) fn read_reports(&mut self, pid: Pid, sup: &mut Supervisor) {
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        let Some(fd) = &w.status else { return };
        self.msgs.clear();
        let eof = status::read_messages(fd.as_fd(), &mut self.msgs) == status::ChannelState::Closed;
        if eof {
            w.status = None; // stop polling it; the exit is seen through SIGCHLD
        }
        let slot = w.slot;
        for m in &self.msgs {
            let pipe = self.report == ReportMode::Pipe;
            match m {
                Some(m) => match m.kind {
                    StatusKind::Ready => {
                        if sup.ready(pid, m.at) {
                            tracing::info!("worker={slot} pid={pid} ready");
                        }
                    }
                    StatusKind::Busy if pipe => w.state = WorkerState::Busy { since: m.at },
                    StatusKind::Idle if pipe => {
                        w.state = WorkerState::Idle { since: m.at };
                        w.requests += 1;
                    }
                    StatusKind::KeepAlive if pipe => {
                        w.state = WorkerState::KeepAlive { since: m.at };
                        w.requests += 1;
                    }
                    StatusKind::Released if pipe => w.state = WorkerState::Idle { since: m.at },
                    StatusKind::Busy
                    | StatusKind::Idle
                    | StatusKind::KeepAlive
                    | StatusKind::Released => {}
                },
                None if !w.replacing => {
                    // Something in the worker writes where only its status
                    // reports should go.
                    w.replacing = true;
                    sup.limit_requests(pid, 0);
                    tracing::warn!(
                        "worker={slot} pid={pid} sent a malformed status message; replacing it"
                    );
                }
                None => {}
            }
        }
    }

    /// Feeds every worker's busy/idle state to the supervisor (read from
    /// the scoreboard, or as the pipe last reported it).
    pub(crate) fn observe(&mut self, sup: &mut Supervisor) {
        for (pid, w) in self.workers.iter_mut() {
            let mut heartbeat = None;
            if self.report == ReportMode::Scoreboard {
                if let Some(cell) = self.scoreboard.cell(w.cell) {
                    w.state = cell.state();
                    w.requests = cell.requests();
                    heartbeat = Some(cell.heartbeat());
                }
            }
            sup.observe(*pid, w.state, w.requests, heartbeat);
        }
    }

    /// In a forked worker: the other workers' channels are closed; the
    /// scoreboard stays, for this worker's own cell.
    pub(crate) fn into_scoreboard(self) -> Scoreboard {
        self.scoreboard
    }
}
