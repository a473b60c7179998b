//! The many-processes comparison: N independent servers, each loading its
//! own copy of the same data, against one prefork master with N workers
//! sharing the master's copy (copy-on-write). For each N: total PSS (the
//! real footprint: each shared page divided among its mappers), the sum of
//! RSS (which counts every shared page once per process, and so misleads),
//! and the time until all N serve.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procs;
use crate::server::{Server, ServerBuilder};

/// One N, both set-ups.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    /// Servers (independent) or workers (prefork).
    pub n: usize,
    /// Independent servers: total PSS, MiB.
    pub independent_pss_mib: f64,
    /// Independent servers: sum of RSS, MiB.
    pub independent_rss_mib: f64,
    /// Independent servers: seconds until every one served a request.
    pub independent_ready_s: f64,
    /// One master, N workers: total PSS, MiB.
    pub prefork_pss_mib: f64,
    /// One master, N workers: sum of RSS, MiB.
    pub prefork_rss_mib: f64,
    /// One master, N workers: seconds until it was ready (every worker up).
    pub prefork_ready_s: f64,
}

/// Writes `mb` MiB of files (1 MiB each, pseudo-random bytes, so that
/// nothing is deduplicated or compressible) under `dir`.
pub fn make_data(dir: &Path, mb: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in 0..mb {
        let mut buf = vec![0u8; 1 << 20];
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(dir.join(format!("blob-{i:04}.bin")), &buf)?;
    }
    Ok(())
}

/// Total (PSS, RSS) in KiB of a master and all its children.
fn footprint(master: i32) -> (u64, u64) {
    std::iter::once(master)
        .chain(procs::children_of(master))
        .filter_map(procs::pss_rss_kib)
        .fold((0, 0), |(p, r), (pp, rr)| (p + pp, r + rr))
}

fn start(bin: &Path, root: &Path, workers: usize) -> std::io::Result<Server> {
    ServerBuilder::new(bin)
        .args([
            "--app",
            "static",
            "--root",
            &root.to_string_lossy(),
            "--workers",
            &workers.to_string(),
            "--bind",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .ready_timeout(Duration::from_secs(120))
        .start()
}

/// Serves one small request, so that "serves" means answered.
fn served(s: &Server) -> bool {
    crate::client::http_get(s.addr(), "/blob-0000.bin", Duration::from_secs(30))
        .is_ok_and(|r| r.status == 200)
}

const MIB: f64 = 1024.0;

/// Measures every N of `sizes` over the data under `root`.
pub fn run(bin: &Path, root: &Path, sizes: &[usize]) -> std::io::Result<Vec<MemoryRow>> {
    let mut rows = Vec::new();
    for &n in sizes {
        // N independent servers, one worker each, all started at once.
        let t0 = Instant::now();
        let servers: Vec<Server> = (0..n)
            .map(|_| start(bin, root, 1))
            .collect::<std::io::Result<_>>()?;
        if !servers.iter().all(served) {
            return Err(std::io::Error::other("an independent server did not serve"));
        }
        let independent_ready_s = t0.elapsed().as_secs_f64();
        let (ip, ir) = servers
            .iter()
            .map(|s| footprint(s.pid()))
            .fold((0, 0), |(p, r), (pp, rr)| (p + pp, r + rr));
        drop(servers);
        // One master, N workers.
        let t0 = Instant::now();
        let s = start(bin, root, n)?;
        if !served(&s) {
            return Err(std::io::Error::other("the prefork server did not serve"));
        }
        let prefork_ready_s = t0.elapsed().as_secs_f64();
        let (pp, pr) = footprint(s.pid());
        drop(s);
        let row = MemoryRow {
            n,
            independent_pss_mib: ip as f64 / MIB,
            independent_rss_mib: ir as f64 / MIB,
            independent_ready_s,
            prefork_pss_mib: pp as f64 / MIB,
            prefork_rss_mib: pr as f64 / MIB,
            prefork_ready_s,
        };
        eprintln!(
            "N={n}: independent PSS {:.0} MiB (RSS sum {:.0}), prefork PSS {:.0} MiB (RSS sum {:.0})",
            row.independent_pss_mib, row.independent_rss_mib, row.prefork_pss_mib, row.prefork_rss_mib
        );
        rows.push(row);
    }
    Ok(rows)
}

/// The table, with each set-up's PSS as a multiple of the N = first row's
/// prefork PSS (one master and one worker: "one process" holding the data).
pub fn markdown(rows: &[MemoryRow], data_mb: usize) -> String {
    let base = rows.first().map_or(1.0, |r| r.prefork_pss_mib.max(1.0));
    let mut out = format!(
        "{data_mb} MiB of files preloaded (`--app static`); PSS and RSS summed over every process of a set-up (masters and workers)\n\n\
| N | independent: PSS MiB | × | ΣRSS MiB | all serve, s | prefork: PSS MiB | × | ΣRSS MiB | ready, s |\n\
|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |\n",
            r.n,
            r.independent_pss_mib,
            r.independent_pss_mib / base,
            r.independent_rss_mib,
            r.independent_ready_s,
            r.prefork_pss_mib,
            r.prefork_pss_mib / base,
            r.prefork_rss_mib,
            r.prefork_ready_s
        ));
    }
    out
}

/// A chart: total PSS against N, both set-ups, and prefork's ΣRSS dashed.
pub fn svg(rows: &[MemoryRow]) -> String {
    let (w, h, left, top, right, bottom) = (640.0, 360.0, 70.0, 40.0, 160.0, 50.0);
    let n_max = rows.iter().map(|r| r.n).max().unwrap_or(1) as f64;
    let y_max = rows
        .iter()
        .map(|r| r.independent_pss_mib.max(r.prefork_rss_mib))
        .fold(1.0, f64::max);
    let x = |n: f64| left + n / n_max * (w - left - right);
    let y = |m: f64| top + (h - top - bottom) * (1.0 - m / y_max);
    let line = |f: &dyn Fn(&MemoryRow) -> f64, color: &str, dash: &str| {
        let pts: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.n as f64), y(f(r))))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
            pts.join(" ")
        )
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
<text x=\"{left}\" y=\"24\" font-weight=\"bold\">memory against N (MiB)</text>\n"
    );
    out.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    ));
    for r in rows {
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            x(r.n as f64),
            h - bottom + 16.0,
            r.n
        ));
    }
    for k in 0..=4 {
        let m = y_max * k as f64 / 4.0;
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{m:.0}</text>\n",
            left - 6.0,
            y(m) + 4.0
        ));
    }
    out.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">N (servers or workers)</text>\n",
        (left + w - right) / 2.0,
        h - 12.0
    ));
    out.push_str(&line(&|r| r.independent_pss_mib, "#d62728", ""));
    out.push_str(&line(&|r| r.prefork_pss_mib, "#1f77b4", ""));
    out.push_str(&line(
        &|r| r.prefork_rss_mib,
        "#1f77b4",
        " stroke-dasharray=\"6 3\"",
    ));
    let legend = [
        ("#d62728", "", "N servers: PSS"),
        ("#1f77b4", "", "1 master, N workers: PSS"),
        ("#1f77b4", " stroke-dasharray=\"6 3\"", "same: ΣRSS"),
    ];
    for (i, (c, d, label)) in legend.iter().enumerate() {
        let ly = top + 10.0 + 20.0 * i as f64;
        out.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"{d}/>\n<text x=\"{}\" y=\"{}\">{label}</text>\n",
            w - right + 10.0,
            w - right + 34.0,
            w - right + 40.0,
            ly + 4.0
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// Where the data goes for a run.
pub fn data_dir(dir: &Path) -> PathBuf {
    dir.join("static-data")
}
