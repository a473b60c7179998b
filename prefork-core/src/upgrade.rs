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
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

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
/// (descriptor, key) from master `from`.
pub fn child_env(from: Pid, listeners: &[(RawFd, String)]) -> Vec<CString> {
    let mut value = format!("{from}");
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
    /// programs they run must not see it).
    pub fn take_from_process() -> Inherited {
        let Some(value) = std::env::var_os(INHERIT_VAR) else {
            return Inherited::default();
        };
        // The master is single-threaded here (nothing has started a thread).
        std::env::remove_var(INHERIT_VAR);
        Inherited::parse(&value.to_string_lossy())
    }

    /// Parses `PID\nFD KEY\nFD KEY...`; malformed lines are skipped.
    pub fn parse(value: &str) -> Inherited {
        let mut lines = value.split('\n');
        let from = lines
            .next()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .map(Pid::from_raw);
        let entries = lines
            .filter_map(|l| {
                let (fd, key) = l.split_once(' ')?;
                Some((
                    fd.parse::<RawFd>().ok().filter(|&fd| fd > 2)?,
                    key.to_string(),
                ))
            })
            .collect();
        Inherited { from, entries }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_over_round_trips_keys_with_spaces_and_skips_junk() {
        let env = child_env(
            Pid::from_raw(42),
            &[(7, "127.0.0.1:0".into()), (9, "unix:/tmp/a b.sock".into())],
        );
        let line = env
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .find(|kv| kv.starts_with("PREFORK_INHERIT="))
            .expect("the variable");
        let mut got = Inherited::parse(line.strip_prefix("PREFORK_INHERIT=").expect("value"));
        assert_eq!(got.from, Some(Pid::from_raw(42)));
        assert_eq!(got.take("unix:/tmp/a b.sock"), vec![9]);
        assert_eq!(got.take("127.0.0.1:0"), vec![7]);
        assert!(got.take("127.0.0.1:0").is_empty(), "taken once");
        let mut junk = Inherited::parse("x\n1 stdout\nnine key\n12 k");
        assert_eq!(junk.from, None);
        assert_eq!(junk.rest(), vec![(12, "k".to_string())]);
    }

    #[test]
    fn the_plan_names_an_absolute_program() {
        let plan = ExecPlan::current().expect("a plan");
        assert!(plan.path().is_absolute(), "{}", plan.path().display());
        assert!(plan.path().exists());
    }
}
