//! FT capture pause per epoch against bytes dirtied, with the best dirty tracker
//! (userfaultfd where available; `AVAIL_TRACKER=shadow` for the portable one),
//! against a plain copy of the same dirty bytes (the floor any capture pays) in the same
//! run. A 64 MiB guest memory; the host dirties N bytes spread over whole pages, then
//! one capture (dirty scan + copy + globals) is timed; median of several epochs.
//!
//! `cargo run --release -p avail-bench --bin capture_pause [epochs]`

use std::time::{Duration, Instant};

use avail_bench::machine;
use avail_statepoint::capture::Capturer;
use avail_statepoint::dirty::shadow::ShadowTracker;
use avail_statepoint::{PAGE_BYTES, rewrite};
use wasm_encoder::{ExportKind, ExportSection, MemorySection, MemoryType, Module};

const MEMORY_MIB: u64 = 64;

fn guest() -> Vec<u8> {
    let mut m = Module::new();
    let mut mems = MemorySection::new();
    mems.memory(MemoryType {
        minimum: MEMORY_MIB * 16,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    m.section(&mems);
    let mut ex = ExportSection::new();
    ex.export("memory", ExportKind::Memory, 0);
    m.section(&ex);
    m.finish()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let epochs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(9);
    let rw = rewrite::rewrite(&guest()).expect("rewrite");
    let mut config = wasmtime::Config::new();
    config.memory_init_cow(false);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let module = wasmtime::Module::new(&engine, &rw.bytes).unwrap();
    let mut store = wasmtime::Store::new(&engine, ());
    let inst = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
    let mem = inst.get_memory(&mut store, "memory").unwrap();
    // AVAIL_TRACKER=shadow forces the portable tracker; otherwise the best available.
    let mut cap = if std::env::var("AVAIL_TRACKER").is_ok_and(|t| t == "shadow") {
        Capturer::new(rw.layout.clone(), || Box::new(ShadowTracker::default()))
    } else {
        Capturer::new(rw.layout.clone(), avail_statepoint::dirty::best)
    };
    cap.capture(&mut store, &inst, vec![]).unwrap(); // the first, full capture
    println!(
        "machine: {}; guest memory {MEMORY_MIB} MiB; tracker {}; median of {epochs} epochs",
        machine(),
        cap.tracker_name()
    );
    println!(
        "| dirtied | capture pause | copy-only baseline | pause / baseline | pause per MiB dirtied |"
    );
    println!("|---|---|---|---|---|");
    let total_pages = (MEMORY_MIB as usize) << 20 >> 12;
    let mut scratch = vec![0u8; 64 << 20];
    let mut round = 1u8;
    for dirty_kib in [64usize, 256, 1024, 4096, 16384, 65536] {
        let pages = dirty_kib * 1024 / PAGE_BYTES;
        let stride = (total_pages / pages).max(1);
        let (mut pauses, mut copies) = (Vec::new(), Vec::new());
        for _ in 0..epochs {
            round = round.wrapping_add(1).max(1);
            {
                let data = mem.data_mut(&mut store);
                for p in 0..pages {
                    data[p * stride * PAGE_BYTES + 17] = round;
                }
            }
            let t = Instant::now();
            let delta = cap.capture(&mut store, &inst, vec![]).unwrap();
            pauses.push(t.elapsed());
            assert_eq!(delta.memories[0].pages.len(), pages);
            // Baseline: copying the same pages, nothing else.
            let data = mem.data(&store);
            let t = Instant::now();
            for p in 0..pages {
                let at = p * stride * PAGE_BYTES;
                scratch[p * PAGE_BYTES..(p + 1) * PAGE_BYTES]
                    .copy_from_slice(&data[at..at + PAGE_BYTES]);
            }
            copies.push(t.elapsed());
            std::hint::black_box(&scratch);
        }
        let (p, c) = (median(pauses), median(copies));
        let mib = dirty_kib as f64 / 1024.0;
        println!(
            "| {dirty_kib} KiB | {:.2} ms | {:.3} ms | {:.0}x | {:.2} ms |",
            p.as_secs_f64() * 1e3,
            c.as_secs_f64() * 1e3,
            p.as_secs_f64() / c.as_secs_f64().max(1e-9),
            p.as_secs_f64() * 1e3 / mib
        );
    }
}
