//! A process's real memory use, from /proc/PID/smaps_rollup: what the
//! status shows per worker and what `--max-memory` acts on.
//!
//! RSS counts every resident page, the copy-on-write pages a worker shares
//! with the master and its siblings included, so a killer built on RSS
//! picks a worker for memory that is not its own (puma_worker_killer #14).
//! The figures here separate them: **private** (USS: pages only this
//! process maps, what its exit gives back), **shared**, and **PSS** (each
//! shared page divided among the processes that map it; PSS summed over a
//! pool is the pool's real footprint).
//!
//! Cost: the kernel walks the process's page tables for smaps_rollup, so a
//! read costs in proportion to its resident memory: 0.12 ms for a small
//! process, 8.3 ms for 200 MiB resident (`cargo bench -p prefork-core
//! --bench memory_read`, docs/memory.md). So the master never reads its
//! workers': each worker reads its own every `--memory-check` seconds,
//! while idle (or, never idle, after a connection), and stores the figures
//! in its scoreboard cell; the master only loads them. The master reads
//! its own once per status request.

use std::io;

/// Memory of one process, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size.
    pub rss_kib: u64,
    /// Proportional set size.
    pub pss_kib: u64,
    /// Private (USS): Private_Clean + Private_Dirty.
    pub private_kib: u64,
    /// Shared: Shared_Clean + Shared_Dirty.
    pub shared_kib: u64,
}

/// Reads /proc/PID/smaps_rollup.
pub fn read(pid: i32) -> io::Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok(parse(&text))
}

/// Parses the text of smaps_rollup (fields in kB).
pub fn parse(text: &str) -> Memory {
    let mut m = Memory::default();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(kib) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        match name {
            "Rss" => m.rss_kib = kib,
            "Pss" => m.pss_kib = kib,
            "Private_Clean" | "Private_Dirty" => m.private_kib += kib,
            "Shared_Clean" | "Shared_Dirty" => m.shared_kib += kib,
            _ => {}
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps_rollup() {
        let text =
            "55d0c0a5d000-7ffd5e3fe000 ---p 00000000 00:00 0                          [rollup]\n\
Rss:              205120 kB\n\
Pss:               13650 kB\n\
Pss_Anon:           1024 kB\n\
Shared_Clean:       2048 kB\n\
Shared_Dirty:     200000 kB\n\
Private_Clean:        72 kB\n\
Private_Dirty:      3000 kB\n\
Referenced:       205120 kB\n";
        assert_eq!(
            parse(text),
            Memory {
                rss_kib: 205_120,
                pss_kib: 13_650,
                private_kib: 3_072,
                shared_kib: 202_048,
            }
        );
    }

    #[test]
    fn reads_this_process() {
        let m = read(std::process::id() as i32).expect("smaps_rollup");
        assert!(m.rss_kib > 0 && m.pss_kib > 0 && m.pss_kib <= m.rss_kib);
        assert_eq!(m.private_kib + m.shared_kib, m.rss_kib);
    }
}
