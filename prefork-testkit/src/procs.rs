//! Reading processes from /proc.

use std::fs;

/// Fields of /proc/PID/stat we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// The pid.
    pub pid: i32,
    /// Process state letter (R, S, Z, ...).
    pub state: char,
    /// Parent pid.
    pub ppid: i32,
    /// User CPU time, in clock ticks.
    pub utime: u64,
    /// System CPU time, in clock ticks.
    pub stime: u64,
    /// User CPU time of reaped children, in clock ticks.
    pub cutime: u64,
    /// System CPU time of reaped children, in clock ticks.
    pub cstime: u64,
}

/// Parses /proc/PID/stat (the command name may contain spaces and parens).
pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
        cutime: f.get(13)?.parse().ok()?,
        cstime: f.get(14)?.parse().ok()?,
    })
}

/// Live (non-zombie) children of `ppid`, sorted.
pub fn children_of(ppid: i32) -> Vec<i32> {
    all_stats()
        .filter(|s| s.ppid == ppid && s.state != 'Z')
        .map(|s| s.pid)
        .collect()
}

/// How many children `ppid` had at one instant, zombies included (a
/// worker the master has not reaped is still one of its workers). One
/// /proc scan is not a snapshot: a child reaped and another forked during
/// the scan can both be seen. So two scans are made, and only the pids seen
/// in both count: each of them existed from its first sighting to its
/// second, so all of them at once at the end of the first scan.
pub fn children_at_once(ppid: i32) -> usize {
    let scan = || -> Vec<i32> {
        all_stats()
            .filter(|s| s.ppid == ppid)
            .map(|s| s.pid)
            .collect()
    };
    let first = scan();
    let second = scan();
    first.iter().filter(|p| second.contains(p)).count()
}

/// Descriptors `pid` has open (entries of /proc/PID/fd).
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident set size of `pid` in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: i32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// PSS and RSS of `pid` in KiB, from /proc/PID/smaps_rollup.
pub fn pss_rss_kib(pid: i32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("Pss:")?, field("Rss:")?))
}

/// Zombie children of `ppid` (exited, not reaped).
pub fn zombie_children(ppid: i32) -> Vec<i32> {
    all_stats()
        .filter(|s| s.ppid == ppid && s.state == 'Z')
        .map(|s| s.pid)
        .collect()
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// True while `pid` sleeps in nanosleep/clock_nanosleep (/proc/PID/wchan):
/// how a test knows a `/sleep/MS` request has reached a worker.
pub fn is_sleeping_in_nanosleep(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
}

/// The syscall `pid` is blocked in (first field of /proc/PID/syscall), if any.
pub fn current_syscall(pid: i32) -> Option<i64> {
    fs::read_to_string(format!("/proc/{pid}/syscall"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Socket inodes open in `pid` (from the /proc/PID/fd links `socket:[N]`).
pub fn socket_inodes(pid: i32) -> Vec<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|t| {
            t.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// A TCP socket listening on a port (a row of /proc/net/tcp in state LISTEN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpListenRow {
    /// Its inode (to find which process holds it).
    pub inode: u64,
    /// For a listening socket, the rx_queue column is its accept queue:
    /// connections waiting to be accepted.
    pub accept_queue: u64,
}

/// Every IPv4 socket listening on `port` (SO_REUSEPORT gives several).
pub fn tcp_listeners(port: u16) -> Vec<TcpListenRow> {
    fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            if local_port != port || *f.get(3)? != "0A" {
                return None;
            }
            Some(TcpListenRow {
                inode: f.get(9)?.parse().ok()?,
                accept_queue: u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?,
            })
        })
        .collect()
}

/// Inodes of the SOCK_SEQPACKET Unix sockets on this machine
/// (/proc/net/unix, Type 0005): master-worker channels, never connections.
pub fn seqpacket_inodes() -> Vec<u64> {
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&"0005")).then(|| f.get(6)?.parse().ok())?
        })
        .collect()
}

/// True if any SOCK_SEQPACKET socket of `pid` has a message waiting to be
/// read (an fdpass connection handed over but not yet received), from
/// `ss -x -p` (sock_diag: /proc shows no Unix receive queues).
pub fn has_queued_seqpacket(pid: i32) -> bool {
    let Ok(out) = std::process::Command::new("ss")
        .args(["-x", "-a", "-p", "-H"])
        .output()
    else {
        return false;
    };
    let needle = format!("pid={pid},");
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.first() == Some(&"u_seq")
            && l.contains(&needle)
            && f.get(2)
                .and_then(|q| q.parse::<u64>().ok())
                .is_some_and(|q| q > 0)
    })
}

fn all_stats() -> impl Iterator<Item = ProcStat> {
    let mut pids: Vec<i32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.into_iter().filter_map(stat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_finds_a_child() {
        let me = std::process::id() as i32;
        let s = stat(me).expect("own stat");
        assert_eq!(s.pid, me);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let cpid = child.id() as i32;
        assert!(children_of(me).contains(&cpid));
        assert!(process_alive(cpid));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(!process_alive(cpid));
    }
}
