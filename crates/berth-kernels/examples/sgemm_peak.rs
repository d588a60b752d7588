//! Micro-benchmark of the f32 micro-kernel with everything in L1, and of whole products.
//!     cargo run --release -p berth-kernels --example sgemm_peak
use berth_kernels::sgemm::{sgemm, Init, PackedB};
use std::time::Instant;

fn main() {
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
