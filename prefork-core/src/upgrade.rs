//! Binary upgrade on USR2, the way Unicorn and nginx do it.
//!
//! The old master forks a child that execs the binary at the path the
//! master was started from (so a new build installed there, or a symlink
//! switched to one, is what runs), with the same arguments and environment,
//! and with the listening sockets left open across exec. Their descriptor
//! numbers and the `--bind` each came from travel in `PREFORK_INHERIT`; the
//! new master adopts the socket for each `--bind` it finds there instead of
//! binding again, so not one connection is refused during the overlap. Both
//! generations then serve. The operator finishes with QUIT to the old master
//! (or rolls back with QUIT to the new one); the old master renames its pid
//! file to `PATH.oldbin` while the new one runs, and back if it exits.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

use crate::error::Result;
use crate::listener::{self, BindOptions, BindSpec, Listener};
use crate::pidfile::PidFile;
use crate::status_server::StatusServer;
use crate::strategy::{SlotKey, SlotSocket, HANDOVER_MARK};
use crate::sys::{self, Forked};

/// The variable that hands the sockets over.
pub const INHERIT_VAR: &str = "PREFORK_INHERIT";

/// How to start this program again: an absolute path and the arguments.
#[derive(Debug, Clone)]
pub struct ExecPlan {
    path: CString,
    argv: Vec<CString>,
}

impl ExecPlan {
    /// This process's own command line, with `argv[0]` made absolute now
    /// (relative to the starting directory, or found on `PATH`), so that a
    /// later `chdir` or an unlinked binary does not matter.
    pub fn current() -> Option<ExecPlan> {
        let args: Vec<OsString> = std::env::args_os().collect();
        let argv0 = PathBuf::from(args.first()?);
        let path = if argv0.is_absolute() {
            argv0
        } else if argv0.components().count() > 1 {
            // (Collecting the components drops a leading `./`.)
            std::env::current_dir()
                .ok()?
                .join(argv0)
                .components()
                .collect()
        } else {
            find_on_path(&argv0)?
        };
        let c = |s: Vec<u8>| CString::new(s).ok();
        Some(ExecPlan {
            path: c(path.into_os_string().into_vec())?,
            argv: args
                .into_iter()
                .map(|a| c(a.into_vec()))
                .collect::<Option<_>>()?,
        })
    }

    /// The program's path.
    pub fn path(&self) -> &Path {
        Path::new(std::ffi::OsStr::from_bytes(self.path.as_bytes()))
    }

    /// In the forked child: exec the program with `env`. Returns only on
    /// failure.
    pub(crate) fn exec(&self, env: &[CString]) -> nix::Error {
        match nix::unistd::execve(&self.path, &self.argv, env) {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }
}

fn find_on_path(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The environment of the new master: this one's, without socket-activation
/// variables or an older hand-over, plus the hand-over of `listeners`
/// (descriptor, key) from master `from` to the process `to` (the child that
/// execs the new master: a hand-over is adopted only by the process it is
/// addressed to, as systemd's LISTEN_PID).
pub fn child_env(from: Pid, to: Pid, listeners: &[(RawFd, String)]) -> Vec<CString> {
    let mut value = format!("{from}>{to}");
    for (fd, key) in listeners {
        value.push_str(&format!("\n{fd} {key}"));
    }
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| {
            !matches!(
                k.to_str(),
                Some("LISTEN_PID" | "LISTEN_FDS" | "LISTEN_FDNAMES" | INHERIT_VAR)
            )
        })
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            CString::new(kv).ok()
        })
        .collect();
    env.extend(CString::new(format!("{INHERIT_VAR}={value}")));
    env
}

/// Sockets handed over by an old master.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The old master's pid.
    pub from: Option<Pid>,
    entries: Vec<(RawFd, String)>,
}

impl Inherited {
    /// Reads the hand-over and removes it from the environment (workers and
    /// programs they run must not see it). One addressed to another process
    /// is ignored; one that names a descriptor twice is an error.
    pub fn take_from_process() -> Result<Inherited> {
        let Some(value) = std::env::var_os(INHERIT_VAR) else {
            return Ok(Inherited::default());
        };
        // The master is single-threaded here (nothing has started a thread).
        std::env::remove_var(INHERIT_VAR);
        Inherited::parse(&value.to_string_lossy(), nix::unistd::getpid())
            .map_err(crate::Error::Config)
    }

    /// Parses `FROM>TO\nFD KEY\nFD KEY...` for the process `me`. A
    /// hand-over addressed to another process (or to none) is ignored, with
    /// a warning; malformed lines are skipped; a descriptor named twice is
    /// an error (it would have two owners, and be closed twice).
    pub fn parse(value: &str, me: Pid) -> std::result::Result<Inherited, String> {
        let mut lines = value.split('\n');
        let head = lines.next().unwrap_or("");
        let pid = |p: &str| p.trim().parse::<i32>().ok().map(Pid::from_raw);
        let (from, to) = match head.split_once('>') {
            Some((f, t)) => (pid(f), pid(t)),
            None => (pid(head), None),
        };
        if to != Some(me) {
            tracing::warn!(
                "{INHERIT_VAR} is addressed to {}, not to this process (pid {me}); ignored",
                to.map_or("no process".to_string(), |p| format!("pid {p}"))
            );
            return Ok(Inherited::default());
        }
        let mut entries: Vec<(RawFd, String)> = Vec::new();
        for l in lines {
            let Some((fd, key)) = l.split_once(' ') else {
                continue;
            };
            let Some(fd) = fd.parse::<RawFd>().ok().filter(|&fd| fd > 2) else {
                continue;
            };
            if entries.iter().any(|(f, _)| *f == fd) {
                return Err(format!("{INHERIT_VAR} names descriptor {fd} twice"));
            }
            entries.push((fd, key.to_string()));
        }
        Ok(Inherited { from, entries })
    }

    /// Refuses a hand-over that names a descriptor this process owns by
    /// another way already (systemd's LISTEN_FDS, a `--bind fd:N`).
    pub fn reject_overlaps(&self, owned: &[RawFd]) -> Result<()> {
        match self.entries.iter().find(|(fd, _)| owned.contains(fd)) {
            Some((fd, key)) => Err(crate::Error::Config(format!(
                "{INHERIT_VAR} hands over descriptor {fd} ({key}), which this process already owns (socket activation or --bind fd:N)"
            ))),
            None => Ok(()),
        }
    }

    /// The descriptors handed over for `key` (removed from the hand-over).
    pub fn take(&mut self, key: &str) -> Vec<RawFd> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|(_, k)| k == key);
        self.entries = rest;
        mine.into_iter().map(|(fd, _)| fd).collect()
    }

    /// The descriptors whose key starts with `prefix`, with their keys
    /// (removed from the hand-over).
    pub fn take_prefixed(&mut self, prefix: &str) -> Vec<(RawFd, String)> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|(_, k)| k.starts_with(prefix));
        self.entries = rest;
        mine
    }

    /// What no `--bind` asked for.
    pub fn rest(&mut self) -> Vec<(RawFd, String)> {
        std::mem::take(&mut self.entries)
    }
}

/// What an old master handed over, sorted (binary upgrade, in a new master).
#[derive(Debug, Default)]
pub(crate) struct TakenOver {
    /// The listeners: one for each `--bind` (handed over, or bound now when
    /// the old master had none for it), then any other it listened on
    /// (from systemd).
    pub listeners: Vec<Listener>,
    /// The strategy's own sockets, under their typed keys.
    pub own: Vec<SlotSocket>,
    /// The old master's pid.
    pub from: Option<Pid>,
}

/// Binds `binds`, taking for each the socket an old master handed over for
/// it, if any (`PREFORK_INHERIT`), and sorts the rest: the sockets of
/// `strategy`'s own (another strategy's are closed: the upgrade changed
/// `--strategy`), and what no `--bind` asked for.
pub(crate) fn take_over(
    binds: &[BindSpec],
    opts: &BindOptions,
    strategy: &str,
    owned: &[RawFd],
) -> Result<TakenOver> {
    let mut inherited = Inherited::take_from_process()?;
    let named: Vec<RawFd> = binds
        .iter()
        .filter_map(|b| match b {
            BindSpec::Fd(fd) => Some(*fd),
            _ => None,
        })
        .chain(owned.iter().copied())
        .collect();
    inherited.reject_overlaps(&named)?;
    let mut taken = TakenOver {
        listeners: listener::bind_all_inheriting(binds, opts, &mut inherited)?,
        own: Vec::new(),
        from: inherited.from,
    };
    let sorted = sort_handed_over(&mut inherited, opts, strategy, &mut taken);
    if sorted.is_err() {
        for l in &mut taken.listeners {
            l.remove_socket_file();
        }
    }
    sorted.map(|()| taken)
}

fn sort_handed_over(
    inherited: &mut Inherited,
    opts: &BindOptions,
    strategy: &str,
    taken: &mut TakenOver,
) -> Result<()> {
    for (fd, key) in inherited.take_prefixed(HANDOVER_MARK) {
        match SlotKey::decode(strategy, &key) {
            Some(slot_key) => taken.own.push(SlotSocket {
                key: slot_key,
                listener: listener::adopt_handed_over(fd, &key, opts)?,
            }),
            None => {
                tracing::warn!(
                    "binary upgrade: {key} is not a socket of the {strategy} strategy; closing this master's copy"
                );
                drop(sys::adopt_fd(fd));
            }
        }
    }
    for (fd, key) in inherited.rest() {
        taken
            .listeners
            .push(listener::adopt_handed_over(fd, &key, opts)?);
    }
    if let Some(old) = taken.from {
        tracing::info!(
            "binary upgrade: took over {} listening socket(s) from master pid={old}",
            taken.listeners.len()
        );
    }
    Ok(())
}

/// What a binary upgrade moves between masters and takes back when the new
/// one exits: the pid file (to `PATH.oldbin` and back) and the status
/// socket (the new master binds it).
#[derive(Debug)]
pub(crate) struct MasterFiles<'a> {
    pub pid_file: Option<&'a mut PidFile>,
    pub status: &'a mut Option<StatusServer>,
}

/// The binary upgrade (USR2), one component of the master: how to start
/// this program again, and the masters before and after this one.
#[derive(Debug)]
pub(crate) struct Upgrade {
    /// How to start this program again.
    exec: Option<ExecPlan>,
    /// The new master started by USR2, while it runs.
    new_master: Option<Pid>,
    /// The old master this one took its sockets from.
    inherited_from: Option<Pid>,
    /// The status socket's path, to bind again after a failed upgrade.
    status_path: Option<PathBuf>,
}

impl Upgrade {
    /// This master came from `inherited_from` (if it was started by USR2),
    /// and serves its status on `status_path`.
    pub(crate) fn new(inherited_from: Option<Pid>, status_path: Option<PathBuf>) -> Upgrade {
        Upgrade {
            exec: ExecPlan::current(),
            new_master: None,
            inherited_from,
            status_path,
        }
    }

    /// The old master this one took its sockets from, while it still runs
    /// (it is this master's parent until it exits).
    pub(crate) fn old_master_running(&self) -> Option<Pid> {
        self.inherited_from
            .filter(|&old| nix::unistd::getppid() == old)
    }

    /// Another master shares the sockets: the new one this master started,
    /// or the old one it came from (a roll-back).
    pub(crate) fn another_master_serves(&self) -> bool {
        self.new_master.is_some() || self.old_master_running().is_some()
    }

    /// USR2: start a new master from the binary at this one's path, with
    /// the same arguments, handing it `handover` (each descriptor with its
    /// key). Both serve until the operator QUITs one of them. Returns the
    /// new master's pid when one was started.
    pub(crate) fn start(
        &mut self,
        me: Pid,
        handover: &[(BorrowedFd<'_>, String)],
        files: MasterFiles<'_>,
    ) -> Option<Pid> {
        // As nginx: one upgrade at a time. The old master still holds
        // `PATH.oldbin`, which a second upgrade would overwrite.
        if let Some(old) = self.old_master_running() {
            tracing::warn!(
                "USR2: the old master (pid={old}) is still running; QUIT it (or this master) first"
            );
            return None;
        }
        if let Some(pid) = self.new_master {
            tracing::warn!(
                "USR2: a new master (pid={pid}) is already running; QUIT it or this master first"
            );
            return None;
        }
        let Some(plan) = self.exec.clone() else {
            tracing::error!(
                "USR2: binary upgrade impossible: this program's path could not be found at start"
            );
            return None;
        };
        let fds: Vec<(RawFd, String)> = handover
            .iter()
            .map(|(fd, key)| (fd.as_raw_fd(), key.clone()))
            .collect();
        let MasterFiles {
            mut pid_file,
            status,
        } = files;
        if let Some(pf) = pid_file.as_deref_mut() {
            if let Err(e) = pf.move_to_oldbin() {
                tracing::error!(
                    "USR2: binary upgrade not started: renaming the pid file {}: {e}",
                    pf.path().display()
                );
                return None;
            }
        }
        // The new master binds the status socket; it is this one's again if
        // the new master exits.
        if let Some(st) = status.take() {
            st.remove();
        }
        match sys::fork() {
            Ok(Forked::Parent(pid)) => {
                self.new_master = Some(pid);
                tracing::info!(
                    "USR2: binary upgrade: started new master pid={pid} from {}; this master (pid={me}) keeps serving until QUIT (QUIT the new master instead to roll back)",
                    plan.path().display()
                );
                Some(pid)
            }
            Ok(Forked::Child) => {
                // Nothing of the old master runs here: plain signal
                // dispositions, the handed-over descriptors open across
                // exec, then exec, with the hand-over addressed to this
                // process (which the new master will be).
                let env = child_env(me, nix::unistd::getpid(), &fds);
                let prepared = sys::reset_signals_for_exec().and_then(|()| {
                    handover
                        .iter()
                        .try_for_each(|(fd, _)| sys::set_inheritable(*fd))
                });
                let e = match prepared {
                    Ok(()) => std::io::Error::from(plan.exec(&env)),
                    Err(e) => e,
                };
                eprintln!("error: binary upgrade: exec {}: {e}", plan.path().display());
                sys::exit_now(127);
            }
            Err(e) => {
                tracing::error!("USR2: binary upgrade not started: fork(): {e}");
                self.take_back(MasterFiles { pid_file, status });
                None
            }
        }
    }

    /// `pid` was reaped: if it was the new master (it failed to start, or was
    /// told to stop), this master carries on as the only one and takes back
    /// the pid file and the status socket. Returns whether it was.
    pub(crate) fn reaped(&mut self, pid: Pid, how: &str, me: Pid, files: MasterFiles<'_>) -> bool {
        if self.new_master != Some(pid) {
            return false;
        }
        self.new_master = None;
        tracing::warn!(
            "new master pid={pid} exited ({how}); this master (pid={me}) carries on as the only one"
        );
        self.take_back(files);
        true
    }

    fn take_back(&mut self, files: MasterFiles<'_>) {
        if let Some(pf) = files.pid_file {
            if let Err(e) = pf.move_back() {
                tracing::error!("moving the pid file back from {}: {e}", pf.path().display());
            }
        }
        if let Some(path) = &self.status_path {
            if files.status.is_none() {
                match StatusServer::bind(path) {
                    Ok(st) => *files.status = Some(st),
                    Err(e) => tracing::error!("status socket: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_over_round_trips_keys_with_spaces_and_skips_junk() {
        let env = child_env(
            Pid::from_raw(42),
            Pid::from_raw(43),
            &[(7, "127.0.0.1:0".into()), (9, "unix:/tmp/a b.sock".into())],
        );
        let line = env
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .find(|kv| kv.starts_with("PREFORK_INHERIT="))
            .expect("the variable");
        let mut got = Inherited::parse(
            line.strip_prefix("PREFORK_INHERIT=").expect("value"),
            Pid::from_raw(43),
        )
        .expect("addressed to 43");
        assert_eq!(got.from, Some(Pid::from_raw(42)));
        assert_eq!(got.take("unix:/tmp/a b.sock"), vec![9]);
        assert_eq!(got.take("127.0.0.1:0"), vec![7]);
        assert!(got.take("127.0.0.1:0").is_empty(), "taken once");
        let mut junk =
            Inherited::parse("x>7\n1 stdout\nnine key\n12 k", Pid::from_raw(7)).expect("parsed");
        assert_eq!(junk.from, None);
        assert_eq!(junk.rest(), vec![(12, "k".to_string())]);
    }

    #[test]
    fn a_hand_over_for_another_process_is_ignored_and_a_descriptor_named_twice_refused() {
        let me = Pid::from_raw(500);
        let other = Inherited::parse("42>501\n7 127.0.0.1:80", me).expect("ignored, not an error");
        assert_eq!(other.from, None);
        assert!(other.entries.is_empty(), "nothing adopted");
        let old_form = Inherited::parse("42\n7 127.0.0.1:80", me).expect("ignored");
        assert!(
            old_form.entries.is_empty(),
            "a hand-over addressed to nobody"
        );
        let err = Inherited::parse("42>500\n7 a\n7 b", me).expect_err("twice");
        assert!(err.contains("descriptor 7 twice"), "{err}");
        let ok = Inherited::parse("42>500\n7 a\n8 b", me).expect("fine");
        assert_eq!(ok.from, Some(Pid::from_raw(42)));
        let clash = ok
            .reject_overlaps(&[3, 8])
            .expect_err("fd 8 is owned already");
        assert!(clash.to_string().contains("descriptor 8 (b)"), "{clash}");
        assert!(ok.reject_overlaps(&[3, 4]).is_ok());
    }

    #[test]
    fn the_plan_names_an_absolute_program() {
        let plan = ExecPlan::current().expect("a plan");
        assert!(plan.path().is_absolute(), "{}", plan.path().display());
        assert!(plan.path().exists());
    }
}
