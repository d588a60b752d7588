//! Trains a masked-LM checkpoint on fixed, already-masked batches and prints the loss of
//! every step: the berth side of `scripts/mlm_curve_parity.py`, which runs the same batches
//! through PyTorch from the same weights to compare the loss curves step by step.
//!
//!     cargo run --release -p berth-train --example mlm_replay -- CKPT BATCHES.jsonl \
//!         LR WARMUP_STEPS WEIGHT_DECAY
//!
//! BATCHES.jsonl: one batch per line, `{"ids": [[...]...], "labels": [[...]...]}` (labels
//! -100 where not masked). AdamW (betas 0.9 / 0.999, eps 1e-8), linear warmup then decay to
//! zero at the last batch, gradient clipping at 1.0, no dropout.
use std::io::BufRead;

use berth_model::HeadKind;
use berth_train::init::{load_for_task, TaskHead};
use berth_train::objectives::mlm::{masked_lm_loss, MaskedInput};
use berth_train::optim::{AdamW, AdamWConfig};
use berth_train::schedule::{Schedule, ScheduleKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, ckpt, batches, lr, warmup, wd] = args.as_slice() else {
        return Err("usage: mlm_replay CKPT BATCHES.jsonl LR WARMUP_STEPS WEIGHT_DECAY".into());
    };
    let head = TaskHead {
        kind: HeadKind::MaskedLm,
        labels: Vec::new(),
        problem_type: None,
        sentence_order: false,
    };
    let (model, _) = load_for_task(std::path::Path::new(ckpt), &head, 0)?;
    let mut batches_in = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(batches)?).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let rows = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(v[k].clone()).unwrap() };
        let inputs: Vec<MaskedInput> = rows("ids")
            .into_iter()
            .zip(rows("labels"))
            .map(|(ids, labels)| {
                let positions: Vec<u32> = (0..labels.len() as u32)
                    .filter(|&j| labels[j as usize] >= 0)
                    .collect();
                MaskedInput {
                    type_ids: vec![0; ids.len()],
                    ids: ids.iter().map(|&x| x as u32).collect(),
                    labels: positions
                        .iter()
                        .map(|&j| labels[j as usize] as u32)
                        .collect(),
                    positions,
                    pair_label: None,
                }
            })
            .collect();
        batches_in.push(inputs);
    }
    let mut opt = AdamW::new(
        &model.params,
        AdamWConfig {
            weight_decay: wd.parse()?,
            ..AdamWConfig::default()
        },
    );
    let schedule = Schedule {
        kind: ScheduleKind::Linear,
        base_lr: lr.parse()?,
        warmup: warmup.parse()?,
        total: batches_in.len() as u64,
    };
    for (step, inputs) in batches_in.iter().enumerate() {
        let loss = masked_lm_loss(&model, inputs, None)?.ok_or("a batch without masks")?;
        let value = loss.to_scalar::<f32>()?;
        let grads = model.backward(&loss)?;
        opt.accumulate(&grads, 1.0)?;
        let norm = opt.clip(Some(1.0));
        opt.step(schedule.lr(step as u64))?;
        println!(
            "{{\"step\":{},\"loss\":{value},\"grad_norm\":{norm}}}",
            step + 1
        );
    }
    Ok(())
}
