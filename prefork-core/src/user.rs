//! Running workers as another user (`--user`, `--group`), as nginx's `user`
//! directive and gunicorn's `--user` do: the master keeps root (to bind
//! ports, re-bind on reload, signal workers, remove its files), and each
//! worker gives up root right after fork, before the application's
//! `after_fork` runs and before it serves anything.
//!
//! The drop sets the supplementary groups (the user's, from the group
//! database), then the real, effective and saved gid, then the real,
//! effective and saved uid. Changing every uid away from 0 empties the
//! permitted and effective capability sets; the worker then checks that
//! `setuid(0)` fails, and refuses to serve otherwise.

use std::ffi::CString;
use std::io;

use nix::unistd::{Gid, Group, Uid, User};

use crate::error::{Error, Result};

/// Who the workers run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    /// The user's name (for logs).
    pub name: String,
    /// Its uid.
    pub uid: Uid,
    /// The gid the workers take: `--group`, or the user's primary group.
    pub gid: Gid,
    /// Supplementary groups: the user's groups in the group database.
    pub groups: Vec<Gid>,
}

impl WorkerUser {
    /// Looks up `user` (a name or a numeric uid) and `group` (a name or a
    /// numeric gid; by default the user's primary group).
    pub fn resolve(user: &str, group: Option<&str>) -> Result<WorkerUser> {
        let bad = |what: &str| Error::Config(what.to_string());
        let found = match user.parse::<u32>() {
            Ok(n) => User::from_uid(Uid::from_raw(n)),
            Err(_) => User::from_name(user),
        }
        .map_err(|e| Error::sys(format!("looking up user {user:?}"), e))?
        .ok_or_else(|| bad(&format!("--user: no such user {user:?}")))?;
        let gid = match group {
            None => found.gid,
            Some(g) => {
                match g.parse::<u32>() {
                    Ok(n) => Group::from_gid(Gid::from_raw(n)),
                    Err(_) => Group::from_name(g),
                }
                .map_err(|e| Error::sys(format!("looking up group {g:?}"), e))?
                .ok_or_else(|| bad(&format!("--group: no such group {g:?}")))?
                .gid
            }
        };
        let cname = CString::new(found.name.as_str())
            .map_err(|_| bad(&format!("--user: invalid user name {:?}", found.name)))?;
        let mut groups = nix::unistd::getgrouplist(&cname, gid)
            .map_err(|e| Error::sys(format!("getgrouplist() for user {:?}", found.name), e))?;
        groups.sort_by_key(|g| g.as_raw());
        groups.dedup();
        Ok(WorkerUser {
            name: found.name,
            uid: found.uid,
            gid,
            groups,
        })
    }

    /// Checks, in the master, that the drop can work: it needs root, unless
    /// the master already runs as that very user and group.
    pub fn check_master(&self) -> Result<()> {
        let (euid, egid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        if euid.is_root() || (euid == self.uid && egid == self.gid) {
            return Ok(());
        }
        Err(Error::Config(format!(
            "--user {}: running workers as another user needs the master to run as root (it runs as uid {euid})",
            self.name
        )))
    }

    /// In a freshly forked worker: takes on this user for good.
    pub(crate) fn become_it(&self) -> io::Result<()> {
        use nix::unistd::{setgroups, setresgid, setresuid};
        if nix::unistd::geteuid().is_root() {
            setgroups(&self.groups)?;
            // While still root (it takes CAP_SETPCAP): no capability can
            // come back, not even through a setuid-root program.
            crate::sys::drop_capability_bounding_set()?;
        }
        // And no program the app runs gains privileges on exec (setuid,
        // file capabilities).
        nix::sys::prctl::set_no_new_privs()?;
        setresgid(self.gid, self.gid, self.gid)?;
        setresuid(self.uid, self.uid, self.uid)?;
        // Root must be out of reach now.
        if !self.uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(io::Error::other("setuid(0) still succeeds after the drop"));
        }
        let ids = nix::unistd::getresuid()?;
        let gids = nix::unistd::getresgid()?;
        if [ids.real, ids.effective, ids.saved] != [self.uid; 3]
            || [gids.real, gids.effective, gids.saved] != [self.gid; 3]
        {
            return Err(io::Error::other("the uids or gids did not all change"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers_and_names_what_is_missing() {
        let root = WorkerUser::resolve("root", None).expect("root exists");
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
        assert!(root.groups.contains(&Gid::from_raw(0)));
        assert_eq!(
            WorkerUser::resolve("0", Some("0")).expect("by number"),
            root
        );
        let e = WorkerUser::resolve("no-such-user-prefork", None).expect_err("missing user");
        assert!(
            e.to_string()
                .contains("no such user \"no-such-user-prefork\""),
            "{e}"
        );
        let e =
            WorkerUser::resolve("root", Some("no-such-group-prefork")).expect_err("missing group");
        assert!(e.to_string().contains("no such group"), "{e}");
    }
}
