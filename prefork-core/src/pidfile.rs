//! The master's pid file, written atomically and never followed through a link.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// A pid file this process wrote; removed by [`PidFile::remove`] if it still
/// holds our pid.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
    /// While a new master runs (binary upgrade), `path` is `PATH.oldbin`
    /// and this is `PATH`.
    moved_from: Option<PathBuf>,
}

impl PidFile {
    /// Writes `pid` to `path` (through a temporary file and rename(2), so a
    /// reader never sees a partial file).
    ///
    /// An existing file naming a live process is refused (another server is
    /// probably running); a stale one is replaced; a symlink, FIFO or any
    /// other non-regular file at the path is refused and left alone.
    pub fn create(path: &Path, pid: u32) -> Result<PidFile> {
        let err = |reason: String| Error::PidFile {
            path: path.to_path_buf(),
            reason,
        };
        // The existing file is read through one descriptor opened without
        // following a link and without blocking (a FIFO swapped in after a
        // check by path could otherwise block the open forever), and is
        // checked to be a regular file on that descriptor.
        let existing = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path);
        let not_regular =
            || err("exists and is not a regular file; refusing to follow or replace it".into());
        match existing {
            Ok(mut file) => {
                if !file.metadata().map_err(|e| err(e.to_string()))?.is_file() {
                    return Err(not_regular());
                }
                let mut text = String::new();
                let _ = (&mut file).take(64).read_to_string(&mut text);
                match text.trim().parse::<i32>() {
                    Ok(old) if old > 0 && old as u32 != pid && process_exists(old) => {
                        return Err(err(format!(
                            "names running process {old}; is prefork already running? \
                             (remove the file if that process is not prefork)"
                        )))
                    }
                    Ok(old) => {
                        tracing::info!(path = %path.display(), old, "replacing stale pid file")
                    }
                    Err(_) => {
                        tracing::warn!(path = %path.display(), "replacing unreadable pid file")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // ELOOP: a symbolic link; ENXIO: a FIFO or socket with no peer.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO)) => {
                return Err(not_regular())
            }
            Err(e) => return Err(err(e.to_string())),
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| err("is not a file path".into()))?
            .to_string_lossy();
        let tmp = dir.join(format!(".{name}.{pid}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
        let written = writeln!(f, "{pid}")
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e.to_string()));
        }
        Ok(PidFile {
            path: path.to_path_buf(),
            pid,
            moved_from: None,
        })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the file to `PATH.oldbin` for a new master to write `PATH`
    /// (binary upgrade, as nginx and Unicorn name it).
    pub fn move_to_oldbin(&mut self) -> std::io::Result<()> {
        if self.moved_from.is_some() {
            return Ok(());
        }
        let mut old = self.path.clone().into_os_string();
        old.push(".oldbin");
        let old = PathBuf::from(old);
        std::fs::rename(&self.path, &old)?;
        self.moved_from = Some(std::mem::replace(&mut self.path, old));
        Ok(())
    }

    /// Moves it back to `PATH` (the new master is gone).
    pub fn move_back(&mut self) -> std::io::Result<()> {
        if let Some(orig) = self.moved_from.take() {
            std::fs::rename(&self.path, &orig)?;
            self.path = orig;
        }
        Ok(())
    }

    /// Removes the file if it still names this process (a newer master may
    /// have written its own pid there).
    pub fn remove(self) {
        if let Ok(text) = std::fs::read_to_string(&self.path) {
            if text.trim() == self.pid.to_string() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn process_exists(pid: i32) -> bool {
    // kill(pid, 0) checks existence without sending anything.
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replaces_stale_and_refuses_live_or_non_regular() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.pid");
        let me = std::process::id();

        let pf = PidFile::create(&path, me).expect("create");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{me}\n")
        );
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o644
        );
        pf.remove();
        assert!(!path.exists());

        // A pid that cannot exist is stale: replaced.
        std::fs::write(&path, "2147483646\n").expect("write");
        PidFile::create(&path, me).expect("stale replaced");

        // A live process that is not us (pid 1 always exists): refused, untouched.
        std::fs::write(&path, "1\n").expect("write");
        let e = PidFile::create(&path, me).expect_err("live").to_string();
        assert!(e.contains("running process 1"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "1\n");

        // A symlink is never followed.
        let target = dir.path().join("victim");
        std::fs::write(&target, "precious").expect("write");
        let link = dir.path().join("l.pid");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let e = PidFile::create(&link, me).expect_err("symlink").to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "precious");

        // A FIFO is refused without blocking on it.
        let fifo = dir.path().join("f.pid");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        assert!(PidFile::create(&fifo, me).is_err());

        // An unwritable directory names the path.
        let e = PidFile::create(Path::new("/proc/nope/x.pid"), me).expect_err("unwritable");
        assert!(e.to_string().contains("/proc/nope/x.pid"), "{e}");
    }

    #[test]
    fn remove_leaves_a_file_rewritten_by_another_master() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.pid");
        let pf = PidFile::create(&path, std::process::id()).expect("create");
        std::fs::write(&path, "4242\n").expect("overwrite");
        pf.remove();
        assert_eq!(std::fs::read_to_string(&path).expect("kept"), "4242\n");
    }
}
