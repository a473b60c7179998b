//! `--log-file`: stderr, where the logs go, redirected to a file that USR1
//! reopens (after logrotate renamed it), first in the master, then in each
//! worker between connections, as Unicorn and nginx do. Whatever the app
//! writes to stderr goes there too.

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The log file.
#[derive(Debug, Clone)]
pub struct LogFile {
    path: PathBuf,
    /// Workers running as another user reopen it themselves: the master
    /// gives each file it creates to that user.
    owner: Option<(u32, u32)>,
}

impl LogFile {
    /// A log file at `path` (not opened yet).
    pub fn new(path: &Path) -> LogFile {
        LogFile {
            path: path.to_path_buf(),
            owner: None,
        }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Workers run as `uid`:`gid` (`--user`).
    pub fn set_owner(&mut self, uid: u32, gid: u32) {
        self.owner = Some((uid, gid));
    }

    /// Opens the path (appending; created 0640 if missing) and makes it this
    /// process's stderr. The old file is closed once nothing else holds it.
    pub fn reopen(&self) -> io::Result<()> {
        // dup2 leaves descriptor 2 without close-on-exec: it is stderr.
        nix::unistd::dup2_stderr(self.open()?)?;
        Ok(())
    }

    /// Opens (creating) the file without using it: a check at start, while
    /// errors still reach the terminal.
    pub fn check(&self) -> io::Result<()> {
        self.open().map(drop)
    }

    fn open(&self) -> io::Result<std::fs::File> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .custom_flags(libc::O_CLOEXEC)
            .open(&self.path)?;
        if let Some((uid, gid)) = self.owner {
            if nix::unistd::geteuid().is_root() {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            }
        }
        Ok(file)
    }
}
