//! Times one training step's parts on all-MiniLM-L6-v2 for a dense batch (default 32 × 128)
//! and a short-sentence batch: forward, backward, optimizer. For finding where training time
//! goes; not a benchmark against peers.
//!
//!     cargo run --release -p berth-train --example profile_train [MODEL_DIR] [SEQS] [LEN]
// As the CLI: large activations stay in the heap (run with MIMALLOC_PURGE_DELAY=-1 to
// match its purge setting).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use berth_model::{Batch, Dropout, HeadKind};
use berth_train::init::{load_for_task, TaskHead};
use berth_train::loss;
use berth_train::optim::{AdamW, AdamWConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let home = std::env::var("HOME")?;
    let dir = args
        .get(1)
        .cloned()
        .unwrap_or(format!("{home}/.cache/berth/models/all-MiniLM-L6-v2"));
    let seqs: usize = args.get(2).map_or(32, |s| s.parse().unwrap());
    let len: usize = args.get(3).map_or(128, |s| s.parse().unwrap());
    let head = TaskHead {
        kind: HeadKind::SequenceClassification,
        labels: vec!["a".into(), "b".into()],
        problem_type: None,
        sentence_order: false,
    };
    let (model, _) = load_for_task(std::path::Path::new(&dir), &head, 0)?;
    let mut opt = AdamW::new(&model.params, AdamWConfig::default());
    let ids: Vec<Vec<u32>> = (0..seqs)
        .map(|s| {
            (0..len)
                .map(|t| (1000 + (s * 31 + t * 17) % 20000) as u32)
                .collect()
        })
        .collect();
    let types: Vec<Vec<u32>> = ids.iter().map(|v| vec![0; v.len()]).collect();
    let batch = Batch::from_sequences(
        ids.iter()
            .zip(&types)
            .map(|(a, b)| (a.as_slice(), b.as_slice())),
    )?;
    let labels: Vec<Option<u32>> = (0..seqs).map(|s| Some((s % 2) as u32)).collect();
    for round in 0..4 {
        for dropout in [false, true] {
            let d = dropout.then(|| Dropout::new(round));
            let t = Instant::now();
            // As the trainer: the last layer computes the first tokens only.
            let rows = berth_model::Model::first_token_rows(&batch);
            let first = model.forward_train_rows(&batch, d.as_ref(), &rows)?;
            let logits = model.sequence_logits_first(&first, d.as_ref())?;
            let l = loss::cross_entropy(&logits, &labels)?.expect("labels");
            let _ = l.to_scalar::<f32>()?;
            let tf = t.elapsed();
            let grads = model.backward(&l)?;
            let tb = t.elapsed();
            opt.accumulate(&grads, 1.0)?;
            opt.clip(Some(1.0));
            opt.step(1e-5)?;
            let to = t.elapsed();
            if round > 0 {
                println!(
                    "{seqs}x{len} dropout {dropout}: forward {:.0} ms, backward {:.0} ms, optimizer {:.0} ms, {:.0} tokens/s",
                    tf.as_secs_f64() * 1e3,
                    (tb - tf).as_secs_f64() * 1e3,
                    (to - tb).as_secs_f64() * 1e3,
                    (seqs * len) as f64 / to.as_secs_f64()
                );
            }
        }
    }
    Ok(())
}
