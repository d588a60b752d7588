//! Time per token of local (sliding-window) attention against full attention as the
//! sequence grows: one sequence, bert-base's 12 heads of 64, ModernBERT's window of 128
//! (64 tokens on either side), f32, forward only, best of 3.
//!
//!     cargo run --release -p berth-kernels --example window_attention
use std::time::Instant;

use berth_kernels::{varlen_attention, window_attention};
use candle_core::{Device, Tensor};

fn best_of_3(f: impl Fn() -> candle_core::Result<Tensor>) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f().unwrap();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> candle_core::Result<()> {
    let (heads, hd) = (12, 64);
    let scale = 1.0 / (hd as f64).sqrt();
    println!("tokens | local µs/token | full µs/token | full / local");
    for len in [512, 2048, 8192] {
        let qkv = Tensor::randn(0f32, 1.0, (len, 3 * heads * hd), &Device::Cpu)?;
        let cu = [0, len];
        let local = best_of_3(|| window_attention(&qkv, &cu, heads, scale, 64));
        let full = best_of_3(|| varlen_attention(&qkv, &cu, heads, scale));
        let per = |s: f64| 1e6 * s / len as f64;
        println!(
            "{len} | {:.2} | {:.2} | {:.1}x",
            per(local),
            per(full),
            full / local
        );
    }
    Ok(())
}
