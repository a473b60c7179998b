//! Rendering: the markdown table, the side-by-side section and the SVG
//! chart.

use super::run::{RunResult, Scenario};
use super::stats::{lowest_p99, median, paired, Aggregate};

/// The comparison as a markdown table.
pub fn markdown(aggs: &[Aggregate]) -> String {
    let mut s = String::from(
        "| scenario | server | req/s | p50 µs | p99 µs | p99.9 µs | fast p99 µs | fairness | busiest | errors | CPU µs/req | master µs/req | wakeups/conn | PSS MiB |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for a in aggs {
        let r = &a.median;
        let l = &r.load;
        let spread = if a.runs > 1 {
            format!(" ({:.0}–{:.0})", a.rps_range.0, a.rps_range.1)
        } else {
            String::new()
        };
        let fair = if r.server == "nginx" || r.server == "c-blocking" {
            ("n/a".to_string(), "n/a".to_string())
        } else {
            (
                format!("{:.3}", l.fairness),
                format!("{:.1}%", 100.0 * l.max_share),
            )
        };
        s.push_str(&format!(
            "| {} | {} | {:.0}{} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            r.scenario,
            r.server,
            l.rps,
            spread,
            l.latency_us.p50,
            l.latency_us.p99,
            l.latency_us.p999,
            l.fast_latency_us.p99,
            fair.0,
            fair.1,
            l.errors.total(),
            r.cpu_us_per_req,
            r.master_cpu_us_per_req,
            r.wakeups_per_conn,
            r.pss_kib as f64 / 1024.0
        ));
    }
    let per_conn: Vec<String> = aggs
        .iter()
        .filter_map(|a| {
            let kib = a.median.master_kib_per_conn?;
            Some(format!("{} {kib:.2}", a.median.server))
        })
        .collect();
    if !per_conn.is_empty() {
        s.push_str(&format!(
            "\nkeepalive-idle, the master's RSS per connection held open, KiB: {}\n",
            per_conn.join(", ")
        ));
    }
    s
}

/// The comparisons the issues ask for, made only between runs of the same
/// round: closed-loop req/s against `blocking`, CPU per request against the
/// C server (`c-blocking`), and who had the lowest p99 in each open-loop
/// round. Empty when there is nothing to pair.
pub fn side_by_side(results: &[RunResult]) -> String {
    let fmt = |rows: Vec<(String, Vec<f64>)>| {
        rows.iter()
            .filter_map(|(s, v)| {
                let each: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
                Some(format!("{s} **{:.2}** ({})", median(v)?, each.join(", ")))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut lines = Vec::new();
    for sc in Scenario::ALL {
        let name = sc.name();
        if !results.iter().any(|r| r.scenario == name) {
            continue;
        }
        if !sc.open_loop() {
            let rows = paired(results, name, "blocking", |r| r.load.rps);
            if !rows.is_empty() {
                lines.push(format!("- {name}, req/s ÷ blocking's: {}", fmt(rows)));
            }
        }
        let rows = paired(results, name, "c-blocking", |r| r.cpu_us_per_req);
        if !rows.is_empty() {
            lines.push(format!(
                "- {name}, CPU µs/req ÷ c-blocking's: {}",
                fmt(rows)
            ));
        }
        if sc.open_loop() {
            let wins: Vec<String> = lowest_p99(results, name)
                .into_iter()
                .map(|(s, w, n)| format!("{s} {w} of {n}"))
                .collect();
            // Lowest of one server says nothing.
            if wins.len() > 1 {
                lines.push(format!(
                    "- {name}, rounds with the lowest p99 (among the runs with the fewest errors): {}",
                    wins.join(", ")
                ));
            }
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\nSide by side, each run against the one of the same round (median **bold**, then every round):\n\n{}\n",
        lines.join("\n")
    )
}

/// Series colours of the SVG charts.
pub(crate) const COLORS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f",
];

/// A row of colour swatches with labels at height `ly`.
pub(crate) fn svg_legend(out: &mut String, items: &[(&str, &str)], left: f64, ly: f64) {
    for (i, (label, color)) in items.iter().enumerate() {
        let x = left + i as f64 * 130.0;
        out.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{ly}\">{label}</text>\n",
            ly - 10.0,
            x + 16.0
        ));
    }
}

/// A chart a person can look at: requests/s and p99 per server, one group
/// of bars per scenario. Plain SVG (rectangles and text).
pub fn svg(aggs: &[Aggregate]) -> String {
    let scenarios: Vec<&str> = {
        let mut v: Vec<&str> = aggs.iter().map(|a| a.median.scenario).collect();
        v.dedup();
        v
    };
    let servers: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for a in aggs {
            if !v.contains(&a.median.server) {
                v.push(a.median.server.clone());
            }
        }
        v
    };
    let (w, panel_h, top, left) = (900.0, 260.0, 40.0, 70.0);
    let group_w = (w - left - 20.0) / scenarios.len().max(1) as f64;
    let bar_w = (group_w - 30.0) / servers.len().max(1) as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * panel_h + 2.0 * top + 60.0
    );
    fn rps(r: &RunResult) -> f64 {
        r.load.rps
    }
    fn p99_ms(r: &RunResult) -> f64 {
        r.load.latency_us.p99 as f64 / 1000.0
    }
    type Panel = (&'static str, fn(&RunResult) -> f64);
    let panels: [Panel; 2] = [
        ("requests/s (higher is better)", rps),
        ("p99 latency, ms (lower is better)", p99_ms),
    ];
    for (pi, (title, value)) in panels.iter().enumerate() {
        let y0 = top + pi as f64 * (panel_h + top);
        out.push_str(&format!(
            "<text x=\"{left}\" y=\"{}\" font-weight=\"bold\">{title}; each scenario scaled to its own maximum</text>\n",
            y0 - 10.0
        ));
        out.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>\n",
            y0 + panel_h,
            w - 20.0,
            y0 + panel_h
        ));
        for (si, sc) in scenarios.iter().enumerate() {
            let gx = left + si as f64 * group_w + 15.0;
            let max = aggs
                .iter()
                .filter(|a| a.median.scenario == *sc)
                .map(|a| value(&a.median))
                .fold(0.0, f64::max)
                .max(1e-9);
            out.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{sc}</text>\n",
                gx + (group_w - 30.0) / 2.0,
                y0 + panel_h + 16.0
            ));
            for (ki, sv) in servers.iter().enumerate() {
                let Some(a) = aggs
                    .iter()
                    .find(|a| a.median.scenario == *sc && a.median.server == *sv)
                else {
                    continue;
                };
                let v = value(&a.median);
                let h = v / max * (panel_h - 20.0);
                let x = gx + ki as f64 * bar_w;
                out.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\n",
                    y0 + panel_h - h,
                    bar_w - 4.0,
                    COLORS[ki % COLORS.len()]
                ));
                out.push_str(&format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>\n",
                    x + (bar_w - 4.0) / 2.0,
                    y0 + panel_h - h - 3.0,
                    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
                ));
            }
        }
    }
    let items: Vec<(&str, &str)> = servers
        .iter()
        .enumerate()
        .map(|(ki, sv)| (sv.as_str(), COLORS[ki % COLORS.len()]))
        .collect();
    svg_legend(&mut out, &items, left, 2.0 * panel_h + 2.0 * top + 40.0);
    out.push_str("</svg>\n");
    out
}
