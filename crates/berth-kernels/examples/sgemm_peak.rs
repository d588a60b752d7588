//! Micro-benchmark of the f32 micro-kernel with everything in L1, and of whole products.
//!     cargo run --release -p berth-kernels --example sgemm_peak [small | amx]
//!     SHAPE=m,n,k SECS=3 cargo run --release -p berth-kernels --example sgemm_peak
//!     MIMALLOC_PURGE_DELAY=-1 cargo run --release -p berth-kernels --example sgemm_peak \
//!         unpacked m,n,k[,rows] ...
// As the CLI (with its purge setting through the environment): freed buffers are reused,
// not returned to the OS and faulted in again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use berth_kernels::sgemm::{sgemm, sgemm_unpacked, Init, PackedB};
use std::time::Instant;

fn main() {
    if std::env::args().any(|a| a == "small") {
        return small();
    }
    if std::env::args().any(|a| a == "amx") {
        return amx_products();
    }
    if std::env::args().nth(1).is_some_and(|a| a == "unpacked") {
        return unpacked(std::env::args().skip(2).collect());
    }
    if let Ok(shape) = std::env::var("SHAPE") {
        return one(&shape);
    }
    for &(m, n, k, reps) in &[
        (8usize, 48usize, 128usize, 200000usize),
        (256, 48, 128, 5000),
        (256, 480, 128, 500),
        (4096, 1536, 384, 20),
        (4096, 384, 1536, 20),
    ] {
        let a = vec![0.5f32; m * k];
        let w = vec![0.25f32; n * k];
        let b = PackedB::pack_transposed(&w, n, k);
        let mut c = vec![0f32; m * n];
        let t = Instant::now();
        for _ in 0..reps {
            sgemm(m, &a, k, 1, &b, &mut c, n, Init::Zero);
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{m}x{n}x{k}: {:.1} GFLOP/s",
            2.0 * (m * n * k * reps) as f64 / s / 1e9
        );
    }
}

/// Whole products in bf16 and int8 on AMX tiles (activation conversion included).
#[allow(dead_code)]
fn amx_products() {
    use berth_kernels::amx::{int8::PackedI8, linear_bf16, PackedBf16};
    for &(m, n, k, reps) in &[
        (32usize, 1536usize, 384usize, 200usize),
        (512, 1536, 384, 50),
        (4096, 1536, 384, 20),
        (4096, 384, 1536, 20),
        (1024, 3072, 768, 10),
    ] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 1000) as f32 / 5000.0 - 0.1)
            .collect();
        let b = vec![0.1f32; n];
        let flops = 2.0 * (m * n * k * reps) as f64;
        if berth_kernels::amx::available() {
            let p = PackedBf16::pack(&w, &b, n, k);
            linear_bf16(&x, m, &p, None);
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(linear_bf16(&x, m, &p, None));
            }
            println!(
                "bf16 {m}x{n}x{k}: {:.1} GFLOP/s",
                flops / t.elapsed().as_secs_f64() / 1e9
            );
        }
        let p = PackedI8::quantize(&w, &b, n, k);
        berth_kernels::amx::int8::linear_i8(&x, m, &p, None);
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(berth_kernels::amx::int8::linear_i8(&x, m, &p, None));
        }
        println!(
            "int8 {m}x{n}x{k}: {:.1} GOP/s",
            flops / t.elapsed().as_secs_f64() / 1e9
        );
    }
}

/// Batch-1 shapes: `M` (default 16) rows through MiniLM's 24 weight matrices (42 MB, beyond
/// L2), as in a batch-1 forward.
fn small() {
    let shapes = [(1152usize, 384usize), (384, 384), (1536, 384), (384, 1536)];
    let weights: Vec<PackedB> = (0..24)
        .map(|i| {
            let (n, k) = shapes[i % 4];
            PackedB::pack_transposed(&vec![0.25f32; n * k], n, k)
        })
        .collect();
    let m: usize = std::env::var("M").map(|v| v.parse().unwrap()).unwrap_or(16);
    let a = vec![0.5f32; m * 1536];
    let mut c = vec![0f32; m * 1536];
    for round in 0..3 {
        {
            let (mut flops, t) = (0usize, Instant::now());
            while t.elapsed().as_secs_f64() < 1.0 {
                for b in &weights {
                    sgemm(m, &a, b.k(), 1, b, &mut c, b.n(), Init::Zero);
                    flops += 2 * m * b.k() * b.n();
                }
            }
            println!(
                "{m} rows, round {round}: {:.1} GFLOP/s",
                flops as f64 / t.elapsed().as_secs_f64() / 1e9
            );
        }
    }
}

/// One product shape (`SHAPE=m,n,k`) repeated for `SECS` seconds (default 3). `TA=1` reads
/// `A` transposed (packed per call, as a weight gradient's `dyᵀ`); `PACK=1` packs `B` in
/// every call (as training does with activations and updated weights).
fn one(shape: &str) {
    let d: Vec<usize> = shape.split(',').map(|v| v.parse().unwrap()).collect();
    let (m, n, k) = (d[0], d[1], d[2]);
    let secs: f64 = std::env::var("SECS").map_or(3.0, |v| v.parse().unwrap());
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let b = PackedB::pack_transposed(&w, n, k);
    let mut c = vec![0f32; m * n];
    let flag = |v: &str| std::env::var(v).is_ok_and(|v| v == "1");
    let (a_rs, a_cs) = if flag("TA") { (1, m) } else { (k, 1) };
    if flag("PACKONLY") {
        // ROWMAJOR=1: `w` read as a row-major `[K, N]` B (the backward's packs of W and X).
        let rowmajor = flag("ROWMAJOR");
        let (mut packs, t) = (0usize, Instant::now());
        while t.elapsed().as_secs_f64() < secs {
            if rowmajor {
                std::hint::black_box(PackedB::pack(&w, n, 1, k, n));
            } else {
                std::hint::black_box(PackedB::pack_transposed(&w, n, k));
            }
            packs += 1;
        }
        let us = t.elapsed().as_secs_f64() / packs as f64 * 1e6;
        let what = if rowmajor {
            "pack (row-major)"
        } else {
            "pack_transposed"
        };
        return println!("{what} {n}x{k}: {us:.0} us");
    }
    let (mut flops, t) = (0usize, Instant::now());
    while t.elapsed().as_secs_f64() < secs {
        if flag("PACK") {
            let b = PackedB::pack_transposed(&w, n, k);
            sgemm(m, &a, a_rs, a_cs, &b, &mut c, n, Init::Zero);
        } else {
            sgemm(m, &a, a_rs, a_cs, &b, &mut c, n, Init::Zero);
        }
        flops += 2 * m * n * k;
    }
    println!(
        "{m}x{n}x{k}: {:.1} GFLOP/s",
        flops as f64 / t.elapsed().as_secs_f64() / 1e9
    );
}

/// A weight used once, as at a training step: packed whole, then the product
/// (`PackedB::pack` + `sgemm`), against `sgemm_unpacked` (panel by panel where it chooses
/// to), alternating call by call in one process, each call after a pass over 4 MB that
/// evicts the weight and the last call's panels from L2. Each shape `m,n,k` is a forward
/// product (`B = Wᵀ`, `W [N, K]`); `m,n,k,rows` an input gradient (`B = W [K, N]`).
fn unpacked(shapes: Vec<String>) {
    let mut junk = vec![1f32; 1 << 20];
    for shape in shapes {
        let d: Vec<&str> = shape.split(',').collect();
        let [m, n, k] = [0, 1, 2].map(|i| d[i].parse::<usize>().expect("m,n,k"));
        let (rs, cs) = if d.len() > 3 { (n, 1) } else { (1, k) };
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let bias = vec![0.1f32; n];
        let mut c = vec![0f32; m * n];
        let mut call = |panel_by_panel: bool, c: &mut [f32]| {
            junk.iter_mut().step_by(16).for_each(|x| *x += 1.0);
            std::hint::black_box(&junk);
            let t = Instant::now();
            if panel_by_panel {
                sgemm_unpacked(m, &a, k, 1, (&w, rs, cs), (k, n), c, n, Init::Bias(&bias));
            } else {
                let b = PackedB::pack(&w, rs, cs, k, n);
                sgemm(m, &a, k, 1, &b, c, n, Init::Bias(&bias));
            }
            t.elapsed().as_secs_f64()
        };
        let calls = ((15e9 / (2 * m * n * k) as f64) as usize).clamp(20, 400);
        // Warm-up: the pool's threads, the buffers' first touch.
        call(false, &mut c);
        call(true, &mut c);
        let mut secs = [0f64; 2];
        for r in 0..calls {
            for which in [r % 2, 1 - r % 2] {
                secs[which] += call(which == 1, &mut c);
            }
        }
        let gflop = 2.0 * (m * n * k * calls) as f64 / 1e9;
        println!(
            "{shape}: packed whole {:.1} GFLOP/s, sgemm_unpacked {:.1} GFLOP/s ({:.3}x)",
            gflop / secs[0],
            gflop / secs[1],
            secs[0] / secs[1]
        );
    }
}
