//! The service manager's notify protocol (sd_notify(3)), without
//! libsystemd: the `sd-notify` crate writes the datagrams (a few lines
//! around a Unix datagram socket, well kept, no dependency of its own, so
//! there is nothing for us to write by hand).
//!
//! What the master says, and when:
//! * `READY=1` with a `STATUS=` line once every worker has booted; a master
//!   started by USR2 also says `MAINPID=` its own pid, so that systemd
//!   follows it and does not take the old master's exit for the service's;
//! * `RELOADING=1` with `MONOTONIC_USEC=` on HUP, then `READY=1` when the
//!   new generation is up;
//! * `STOPPING=1` on QUIT, TERM and INT;
//! * `WATCHDOG=1` every half `WATCHDOG_USEC`, from the master loop itself,
//!   so a loop that is stuck stops the pings and systemd acts;
//! * `STATUS=` again when the busy/idle counts change (at most once a
//!   second).
//!
//! Nothing is sent when `NOTIFY_SOCKET` is not set. The variable stays in
//! the environment so that a master started by USR2 can notify too.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::clock::MonoTime;

/// The master's side of the notify protocol.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    /// Ping every this (half `WATCHDOG_USEC`), if the watchdog is on.
    ping_every: Option<Duration>,
    next_ping: MonoTime,
    /// A HUP's new generation is not up yet.
    reloading: bool,
    /// Last `STATUS=` sent, and when the next may go.
    status: String,
    next_status: MonoTime,
    /// Started by USR2 from this pid: say `MAINPID=` at ready.
    upgraded_from: Option<u32>,
}

impl Notifier {
    /// From the environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`). The watchdog is this process's when `WATCHDOG_PID`
    /// is unset, names it, or names the master it was upgraded from (the
    /// new master takes the pings over).
    pub fn from_env(upgraded_from: Option<u32>) -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&u| u > 0);
        let pid_ok = match std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            None => true,
            Some(p) => p == std::process::id() || Some(p) == upgraded_from,
        };
        let ping_every = usec
            .filter(|_| enabled && pid_ok)
            .map(|u| Duration::from_micros(u / 2));
        Notifier {
            enabled,
            ping_every,
            next_ping: MonoTime::now(),
            reloading: false,
            status: String::new(),
            next_status: MonoTime::now(),
            upgraded_from,
        }
    }

    /// True when a service manager listens.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!("notify socket: {e}");
        }
    }

    /// Every worker booted: at start, or after a reload.
    pub fn ready(&mut self, status: &str) {
        self.reloading = false;
        self.status = status.to_string();
        let pid = std::process::id();
        let mut states = vec![NotifyState::Ready, NotifyState::Status(status)];
        if self.upgraded_from.take().is_some() {
            states.push(NotifyState::MainPid(pid));
        }
        self.send(&states);
    }

    /// HUP: the workers are being replaced.
    pub fn reloading(&mut self) {
        self.reloading = true;
        let usec = i128::from(MonoTime::now().as_nanos() / 1000);
        self.send(&[NotifyState::Reloading, NotifyState::MonotonicUsec(usec)]);
    }

    /// A reload is under way (`READY=1` is due when its workers are up).
    pub fn is_reloading(&self) -> bool {
        self.reloading
    }

    /// QUIT, TERM, INT.
    pub fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// One master turn: the watchdog ping, when due.
    pub fn turn(&mut self, now: MonoTime) {
        if let Some(every) = self.ping_every {
            if now >= self.next_ping {
                self.next_ping = now + every;
                self.send(&[NotifyState::Watchdog]);
            }
        }
    }

    /// True when the status may be sent again (at most once a second).
    pub fn status_due(&self, now: MonoTime) -> bool {
        self.enabled && now >= self.next_status
    }

    /// The status, sent if it changed.
    pub fn status(&mut self, now: MonoTime, line: String) {
        self.next_status = now + Duration::from_secs(1);
        if line != self.status {
            self.send(&[NotifyState::Status(&line)]);
            self.status = line;
        }
    }

    /// When the next watchdog ping is due (the master sleeps no longer).
    pub fn next_deadline(&self) -> Option<MonoTime> {
        self.ping_every.map(|_| self.next_ping)
    }
}
