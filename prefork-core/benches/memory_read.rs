//! What one memory reading costs the master (`--max-memory`, the status):
//! a read of /proc/PID/smaps_rollup, for a process with little memory and
//! for one with 200 MiB resident (the kernel walks its page tables). Run:
//! `cargo bench -p prefork-core --bench memory_read`; docs/memory.md has
//! the figures beside the master's loop.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

fn read(c: &mut Criterion) {
    let mut g = c.benchmark_group("smaps_rollup read");
    let me = std::process::id() as i32;
    g.bench_function("this process, small", |b| {
        b.iter(|| black_box(prefork_core::memory::read(me).expect("read")))
    });
    // 200 MiB resident, every page touched.
    let big: Vec<u8> = vec![0x5a; 200 << 20];
    black_box(&big);
    g.bench_function("this process, 200 MiB resident", |b| {
        b.iter(|| black_box(prefork_core::memory::read(me).expect("read")))
    });
    g.finish();
    drop(big);
}

criterion_group!(benches, read);
criterion_main!(benches);
