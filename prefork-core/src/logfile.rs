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

    /// Opens the file for appending, refusing anything but a regular file
    /// at the path itself: a symbolic link is not followed (O_NOFOLLOW), and
    /// a FIFO swapped in cannot block the open (O_NONBLOCK). Only a file
    /// this open created is given to `--user`: a file that was already there
    /// keeps its owner, so a link planted by the workers' user cannot make
    /// the root master hand it another file (RELIABILITY S6).
    fn open(&self) -> io::Result<std::fs::File> {
        let flags = libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let created = std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(flags)
            .open(&self.path);
        let file = match created {
            Ok(file) => {
                if let Some((uid, gid)) = self.owner {
                    if nix::unistd::geteuid().is_root() {
                        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
                    }
                }
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => std::fs::OpenOptions::new()
                .append(true)
                .custom_flags(flags)
                .open(&self.path)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) => {
                        io::Error::new(e.kind(), "it is a symbolic link, which is not followed")
                    }
                    _ => e,
                })?,
            Err(e) => return Err(e),
        };
        if !file.metadata()?.file_type().is_file() {
            return Err(io::Error::other("it is not a regular file"));
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_at_the_path_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("secret");
        std::fs::write(&target, "do not touch\n").expect("target");
        let path = dir.path().join("app.log");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let err = LogFile::new(&path)
            .check()
            .expect_err("a symlink is refused");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&target).expect("read"),
            "do not touch\n"
        );
    }

    #[test]
    fn a_fifo_at_the_path_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.log");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        // O_WRONLY|O_NONBLOCK on a FIFO with no reader fails at once
        // (ENXIO); without O_NONBLOCK it would wait for a reader forever.
        assert!(LogFile::new(&path).check().is_err());
    }

    #[test]
    fn an_existing_file_is_appended_to_and_a_new_one_created_0640() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.log");
        LogFile::new(&path).check().expect("created");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        std::fs::write(&path, "kept\n").expect("write");
        let mut f = LogFile::new(&path).open().expect("opened");
        std::io::Write::write_all(&mut f, b"more\n").expect("append");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "kept\nmore\n"
        );
    }
}
