//! Runs a model's forward pass on S x L synthetic tokens in a loop, for `perf`.
//!     cargo run --release -p berth-model --example profile_model -- DIR S L ITERS [f32|bf16|int8]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use berth_model::{Batch, Model};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mut model, _) = Model::load(args[1].as_ref(), false).expect("model loads");
    if let Some(p) = args.get(5) {
        model.set_precision(p.parse().unwrap()).unwrap();
    }
    let (s, l, iters): (usize, usize, usize) = (
        args[2].parse().unwrap(),
        args[3].parse().unwrap(),
        args[4].parse().unwrap(),
    );
    let ids: Vec<u32> = (0..l as u32).map(|i| 1000 + i * 7).collect();
    let batch = Batch::from_sequences((0..s).map(|_| (&ids[..], &[][..]))).unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        model.forward(&batch).unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:.1} seq/s ({:.2} ms per forward)",
        (s * iters) as f64 / secs,
        secs * 1e3 / iters as f64
    );
}
