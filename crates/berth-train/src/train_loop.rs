//! The training loop, task-blind and readable top to bottom:
//! data → networks → for each optimizer step: learning rate → forward / backward over the
//! accumulated micro-batches (dropout on) → all-reduce (overlapped with the last backward
//! where the collective allows) → clip → AdamW step → log; at each
//! epoch end (or every `save_every` steps): evaluate on dev → checkpoint → early stopping.
//! What is learned comes from an [`Objective`]; how processes cooperate from a
//! [`Collective`].
//!
//! Determinism: the data order of epoch `e` is a shuffle seeded by `(seed, e)`, and the
//! dropout masks and the batch's own randomness (masking) of micro-batch `k` are seeded by
//! `(seed, k)`. Nothing else is random, so the same config and seed give the same losses,
//! and a resumed run (which restores weights, optimizer moments and the data position)
//! continues exactly.
use std::path::{Path, PathBuf};
use std::time::Instant;

use berth_model::Dropout;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::checkpoint::{self, TrainerState, FORMAT_VERSION};
use crate::config::RunConfig;
use crate::dist::Collective;
use crate::error::{io, Result, TrainError};
use crate::objective::{Env, Metrics, Objective};
use crate::optim::AdamW;
use crate::schedule::Schedule;

/// What the loop reports as it goes.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Event {
    /// An optimizer step.
    Step {
        /// Steps taken.
        step: u64,
        /// Total steps of the schedule.
        total: u64,
        /// Epoch (fractional).
        epoch: f64,
        /// Mean training loss of the step's micro-batches.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
        /// Training tokens per second over the step.
        tokens_per_s: f64,
    },
    /// A dev evaluation.
    Eval {
        /// Steps taken.
        step: u64,
        /// Epoch (fractional).
        epoch: f64,
        /// Metric name → value.
        eval: Metrics,
    },
}

/// Numbers derived from the config and data, printed before step 0.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Training examples.
    pub train_examples: usize,
    /// Dev examples.
    pub dev_examples: usize,
    /// Labels.
    pub labels: Vec<String>,
    /// Micro-batches per epoch.
    pub batches_per_epoch: usize,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Optimizer steps in all.
    pub total_steps: u64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Effective batch size (batch size × accumulation).
    pub effective_batch: usize,
    /// Trainable parameters.
    pub parameters: usize,
    /// Training tokens per epoch (no padding: what is computed).
    pub tokens_per_epoch: usize,
    /// Malformed rows skipped.
    pub skipped_rows: usize,
    /// Step resumed from (0 for a fresh run).
    pub resumed_at: u64,
    /// The metric that picks the best checkpoint.
    pub main_metric: &'static str,
    /// Settings a resumed run changed that do not move the data position (learning rate,
    /// schedule, length, ...), as `name: old -> new`; the caller should show them.
    pub resume_changes: Vec<String>,
}

/// Settings of the run's config.json a resumed run may not change: the data order and the
/// position in it depend on them (the task half — data files, columns, max length — and
/// the batch shape and seed). `output` and `model` are where, not what (the weights come
/// from the checkpoint).
fn fixed_on_resume(key: &str) -> bool {
    key.starts_with("task.")
        || [
            "loop.batch_size",
            "loop.grad_accum",
            "loop.seed",
            "loop.dropout",
        ]
        .contains(&key)
}

/// Compares a resumed run's settings with the config.json its first start wrote: refuses
/// changes that move the data position, returns the others as `key: old -> new`.
fn compare_with_saved(cfg: &RunConfig) -> Result<Vec<String>> {
    let path = cfg.run.output.join("config.json");
    let Ok(text) = berth_text::limits::read_text(&path, berth_text::limits::MAX_JSON_BYTES) else {
        return Ok(Vec::new()); // a run from before config.json was written
    };
    let saved: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            message: format!("not a run config: {e}"),
        })?;
    let now = serde_json::to_value(cfg).expect("config serialises");
    let (mut old, mut new) = (Vec::new(), Vec::new());
    flatten("", &saved, &mut old);
    flatten("", &now, &mut new);
    let old: std::collections::BTreeMap<_, _> = old.into_iter().collect();
    let new: std::collections::BTreeMap<_, _> = new.into_iter().collect();
    let same_file = |a: &serde_json::Value, b: &serde_json::Value| match (a.as_str(), b.as_str()) {
        (Some(a), Some(b)) => std::fs::canonicalize(a)
            .ok()
            .is_some_and(|x| std::fs::canonicalize(b).ok() == Some(x)),
        _ => false,
    };
    let (mut refused, mut changed) = (Vec::new(), Vec::new());
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for key in keys {
        let null = serde_json::Value::Null;
        let Some(a) = old.get(key) else {
            continue; // a setting the first start's berth did not have
        };
        let b = new.get(key).unwrap_or(&null);
        if a == b || same_file(a, b) || ["loop.output", "loop.model"].contains(&key.as_str()) {
            continue;
        }
        let line = format!("{key}: {a} -> {b}");
        if fixed_on_resume(key) {
            refused.push(line);
        } else {
            changed.push(line);
        }
    }
    if !refused.is_empty() {
        return Err(TrainError::Checkpoint {
            path: path.clone(),
            message: format!(
                "--resume with settings that move the data position: {} (resume with the first start's settings, or start again with --overwrite)",
                refused.join("; ")
            ),
        });
    }
    Ok(changed)
}

/// `value`'s leaves under dotted keys.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
    match value {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.clone())),
    }
}

/// Writes `cfg` as the run's config.json, atomically (a full disk must not leave a
/// truncated config behind).
fn write_config(cfg: &RunConfig) -> Result<()> {
    let out = &cfg.run.output;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let text = serde_json::to_string_pretty(cfg).expect("config serialises");
    checkpoint::write_atomic(&out.join("config.json"), text.as_bytes())
}

/// FNV-1a over 32-bit words: a fingerprint, not a checksum against attacks.
fn fnv(h: &mut u64, words: impl IntoIterator<Item = u32>) {
    for w in words {
        *h = (*h ^ w as u64).wrapping_mul(0x0100_0000_01b3);
    }
}

/// Ranks of one run must start alike: the same settings (paths aside: hosts may mount the
/// files elsewhere), the same training examples and the same starting weights. Each rank
/// fingerprints the three, every rank sees every rank's, and all end with the same error
/// naming the first rank and part that differ from rank 0 (no rank is left waiting).
fn check_ranks_agree(
    cfg: &RunConfig,
    data: &dyn crate::objective::TrainSet,
    nets: &crate::objective::Networks,
    step: u64,
    collective: &dyn Collective,
) -> Result<()> {
    const FNV0: u64 = 0xcbf2_9ce4_8422_2325;
    let mut settings = Vec::new();
    flatten(
        "",
        &serde_json::to_value(cfg).expect("config serialises"),
        &mut settings,
    );
    let paths = [
        ".model",
        ".output",
        ".train",
        ".dev",
        ".teacher",
        ".dump_order",
    ];
    let settings: Vec<String> = settings
        .into_iter()
        .filter(|(k, _)| !paths.iter().any(|p| k.ends_with(p)))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut h_settings = FNV0;
    fnv(&mut h_settings, settings.join("\n").bytes().map(u32::from));
    // The examples: count, tokens, and the ids of up to 4,096 evenly spaced ones.
    let mut h_data = FNV0;
    let n = data.len();
    fnv(
        &mut h_data,
        [n as u32, (n >> 32) as u32, data.tokens() as u32],
    );
    for i in (0..n).step_by(n.div_ceil(4096).max(1)) {
        fnv(&mut h_data, data.ids(i));
    }
    let mut h_weights = FNV0;
    fnv(&mut h_weights, [step as u32]);
    for p in nets.params() {
        fnv(&mut h_weights, p.name.bytes().map(u32::from));
        let t = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        fnv(&mut h_weights, t.iter().map(|x| x.to_bits()));
    }
    let mine = [h_settings, h_data, h_weights];
    let bytes: Vec<u8> = mine.iter().flat_map(|h| h.to_le_bytes()).collect();
    let all = collective.gather_all(&bytes)?;
    let parts = [
        "settings (flags other than paths)",
        "training data (the examples read)",
        "starting weights (the model or checkpoint)",
    ];
    for (rank, theirs) in all.iter().enumerate().skip(1) {
        for (k, part) in parts.iter().enumerate() {
            if theirs[8 * k..8 * k + 8] != all[0][8 * k..8 * k + 8] {
                return Err(TrainError::Config(format!(
                    "rank {rank}'s {part} differ from rank 0's: every rank must run the same \
                     command on the same files"
                )));
            }
        }
    }
    Ok(())
}

/// Opens the run's metrics.jsonl for appending. A resumed run's file is checked first: a
/// last line without its newline (the run was killed while writing it) is cut off with a
/// warning; any other line that is not JSON is an error now rather than when the curve is
/// drawn at the end of the run.
fn open_metrics(path: &Path) -> Result<std::fs::File> {
    if let Ok(bytes) = std::fs::read(path) {
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for (i, line) in bytes[..whole].split(|&b| b == b'\n').enumerate() {
            if !line.is_empty() && serde_json::from_slice::<serde_json::Value>(line).is_err() {
                return Err(TrainError::Checkpoint {
                    path: path.into(),
                    message: format!(
                        "line {} is not JSON: repair or delete the file to resume",
                        i + 1
                    ),
                });
            }
        }
        if whole < bytes.len() {
            eprintln!(
                "warning: {}: dropped an unfinished last line ({} bytes; the run was stopped while writing it)",
                path.display(),
                bytes.len() - whole
            );
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            f.set_len(whole as u64).map_err(io(path))?;
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))
}

/// Runs (or resumes) a training run of `objective`; `on_plan` sees the derived numbers
/// before step 0 and `on_event` every logged step and evaluation. Returns the path of the
/// best checkpoint.
pub fn train(
    cfg: &RunConfig,
    objective: &mut dyn Objective,
    collective: &dyn Collective,
    resume: bool,
    on_plan: &mut dyn FnMut(&Plan),
    on_event: &mut dyn FnMut(&Event),
) -> Result<PathBuf> {
    let lc = &cfg.run;
    lc.check()?;
    cfg.task.data.check()?;
    let writer = collective.is_writer();
    let world = collective.world_size();

    // Data (a token limit with no room for text is refused before anything is encoded).
    crate::objective::check_min_length(objective.max_length(), &lc.model)?;
    let env = Env::new(&lc.model, lc.seed).with_collective(collective);
    let summary = objective.prepare(&env)?;

    // Networks and optimizer: fresh, or from the newest checkpoint.
    let latest = if resume {
        checkpoint::list(&lc.output)?.pop()
    } else {
        None
    };
    let from = latest
        .as_ref()
        .map_or(lc.model.as_path(), |(_, d)| d.as_path());
    let mut nets = objective.build(from, &env)?;
    nets.set_train_products(lc.dtype.products())?;
    // The word table's gradient as the rows a step used (one process: the ranks' sums
    // over the network run on dense gradients).
    if world == 1 {
        nets.use_sparse_word_grads();
    }
    crate::objective::check_max_length(objective.max_length(), &nets.main, &lc.model)?;
    let mut opt = AdamW::new(&nets.params(), lc.adamw);
    let mut state = TrainerState {
        format_version: FORMAT_VERSION,
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        seed: lc.seed,
        best: None,
        evals_without_improvement: 0,
    };
    let mut resume_changes = Vec::new();
    if let Some((_, dir)) = &latest {
        resume_changes = compare_with_saved(cfg)?;
        let (saved, tensors) = checkpoint::read_state(dir)?;
        if saved.seed != lc.seed {
            return Err(TrainError::Checkpoint {
                path: dir.clone(),
                message: format!("was trained with seed {}, not {}", saved.seed, lc.seed),
            });
        }
        opt.load_state(&tensors, saved.step, &dir.join("optimizer.safetensors"))?;
        state = saved;
    }

    if world > 1 {
        check_ranks_agree(cfg, objective.train_set(), &nets, state.step, collective)?;
    }

    // The schedule.
    let train_len = objective.train_set().len();
    let batches_per_epoch = train_len.div_ceil(lc.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(lc.grad_accum) as u64;
    let total = lc.max_steps.unwrap_or(steps_per_epoch * lc.epochs as u64);
    let epochs = total.div_ceil(steps_per_epoch.max(1)) as usize;
    let warmup = lc
        .warmup_steps
        .unwrap_or((lc.warmup_ratio * total as f64).ceil() as u64);
    if state.step > total {
        return Err(TrainError::Config(format!(
            "{}: the checkpoint is at step {}, past this run's {total} steps (--epochs / --max-steps)",
            lc.output.display(),
            state.step
        )));
    }
    let schedule = Schedule {
        kind: lc.schedule,
        base_lr: lc.lr,
        warmup,
        total,
    };
    if writer {
        on_plan(&Plan {
            train_examples: train_len,
            dev_examples: summary.dev_examples,
            labels: summary.labels.clone(),
            batches_per_epoch,
            steps_per_epoch,
            total_steps: total,
            warmup_steps: warmup,
            effective_batch: lc.batch_size * lc.grad_accum,
            parameters: nets.main.num_parameters(),
            tokens_per_epoch: objective.train_set().tokens(),
            skipped_rows: summary.skipped,
            resumed_at: state.step,
            main_metric: objective.main_metric(),
            resume_changes,
        });
    }

    // The run's files appear only once data and networks are ready: a start that fails
    // (bad data, a wrong checkpoint) leaves the output folder as it was.
    if writer {
        write_config(cfg)?;
    }
    let metrics_path = lc.output.join("metrics.jsonl");
    let mut log = if writer {
        Some(open_metrics(&metrics_path)?)
    } else {
        None
    };
    let mut emit = |e: &Event| -> Result<()> {
        if let Some(log) = log.as_mut() {
            use std::io::Write;
            writeln!(
                log,
                "{}",
                serde_json::to_string(e).expect("events serialise")
            )
            .map_err(io(&metrics_path))?;
        }
        // The other ranks' steps are the writer's: it alone reports them.
        if writer {
            on_event(e);
        }
        Ok(())
    };
    // A resumed run's best so far is the checkpoint its state names (rotation keeps it),
    // not necessarily the newest one.
    let mut best_dir = state
        .best
        .map(|(_, step)| lc.output.join("checkpoints").join(format!("step-{step}")))
        .filter(|d| d.is_dir())
        .or_else(|| latest.as_ref().map(|(_, d)| d.clone()));
    let (mut loss_acc, mut loss_count, mut tokens, mut t0) =
        (0.0f64, 0usize, 0usize, Instant::now());
    // Time waiting on collectives, time the gradient sums ran behind the backward, and the
    // run's time (several ranks: reported at the end).
    let (mut comm, mut summing, started) = (
        std::time::Duration::ZERO,
        std::time::Duration::ZERO,
        Instant::now(),
    );

    'epochs: for epoch in state.epoch..epochs {
        // The epoch's data order.
        let mut order: Vec<usize> = (0..train_len).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
            berth_kernels::seed_stream(lc.seed, epoch as u64),
        ));
        if let (Some(path), true) = (&lc.dump_order, writer) {
            dump_order(path, epoch, &order, objective)?;
        }
        let batches: Vec<&[usize]> = order.chunks(lc.batch_size).collect();
        let first = if epoch == state.epoch {
            state.batch_in_epoch
        } else {
            0
        };
        for group_start in (first..batches.len()).step_by(lc.grad_accum) {
            if state.step >= total {
                break 'epochs;
            }
            let group = &batches[group_start..(group_start + lc.grad_accum).min(batches.len())];
            // Forward and backward over the step's micro-batches, dropout seeded by position.
            let lr = schedule.lr(state.step);
            // Whether the gradients were summed during the last backward.
            let mut summed = false;
            for (k, global) in group.iter().enumerate() {
                let micro = (epoch * batches.len() + group_start + k) as u64;
                let mine = collective.shard(global);
                // The global batch's examples before this rank's share (none in one process).
                let before = &global[..collective.shard_range(global.len()).start];
                // Dropout keyed by the share's place in the packed global batch.
                let dropout = lc.dropout.then(|| {
                    let set = objective.train_set();
                    let tokens: usize = before.iter().map(|&i| set.example_tokens(i)).sum();
                    Dropout::at(
                        berth_kernels::seed_stream(lc.seed ^ 0xd0d0, micro),
                        tokens as u64,
                        before.len() as u64,
                    )
                });
                // Masking is drawn afresh each time a batch is seen (dynamic masking).
                let batch_seed = berth_kernels::seed_stream(lc.seed ^ 0x3a5c, micro);
                if world > 1 {
                    // Each rank's mean loss, weighted by its share of the batch's loss units
                    // (summed over ranks first), so the all-reduced gradient and the logged
                    // loss are the one-process batch's.
                    // (An objective that gathers values of every rank runs on empty shares too.)
                    let out = if mine.is_empty() && !objective.gathers() {
                        None
                    } else {
                        Some(objective.loss_at(
                            &nets,
                            mine,
                            before,
                            batch_seed,
                            dropout.as_ref(),
                            collective,
                        )?)
                    };
                    // Up to two means (masked-LM and sentence-pair losses), each with
                    // its units: value and units summed over ranks per mean.
                    let (mut parts, mut toks, mut whole, mut passes) = ([None, None], 0, false, 1);
                    if let Some(o) = out {
                        (toks, whole, passes) = (o.tokens, o.whole_batch, o.passes);
                        parts[0] = o.loss.map(|l| (l, o.units));
                        parts[1] = o.second;
                    }
                    let mut sums = [0.0; 5];
                    sums[2] = toks as f64;
                    for (p, at) in parts.iter().zip([0, 3]) {
                        if let Some((l, units)) = p {
                            let v = l.to_scalar::<f32>()? as f64;
                            sums[at] = *units;
                            sums[at + 1] = v * units;
                        }
                    }
                    let c0 = Instant::now();
                    collective.all_reduce_sum_f64(&mut sums)?;
                    comm += c0.elapsed();
                    let all_tokens = sums[2];
                    let all_units = [sums[0], sums[3]];
                    if all_units.iter().any(|&u| u > 0.0) {
                        let value: f64 = [(sums[0], sums[1]), (sums[3], sums[4])]
                            .iter()
                            .filter(|(u, _)| *u > 0.0)
                            .map(|(u, s)| s / u)
                            .sum();
                        if !value.is_finite() {
                            return Err(diverged(state.step + 1, "training loss", value));
                        }
                        loss_acc += value;
                        loss_count += 1;
                    }
                    let mut total: Option<candle_core::Tensor> = None;
                    for (p, all) in parts.into_iter().zip(all_units) {
                        if let Some((l, units)) = p {
                            // A whole-batch loss is the batch's already; a share's mean is
                            // weighted by the share's units.
                            let weight = if whole { 1.0 } else { units / all };
                            let share = (l * (weight / lc.grad_accum as f64))?;
                            total = Some(match total {
                                Some(t) => (t + share)?,
                                None => share,
                            });
                        }
                    }
                    match collective.background() {
                        // The step's last backward: its gradients are summed over the ranks
                        // layer by layer while it runs.
                        Some(bg) if k + 1 == group.len() => {
                            let (busy, waited) = opt.backward_summed(
                                bg,
                                &nets.fused_weights(),
                                passes,
                                &|l| nets.set_grad_listener(l),
                                || {
                                    total
                                        .map(|t| {
                                            let g = nets.backward(&t)?;
                                            if !g.rows.is_empty() {
                                                return Err(TrainError::Config(
                                                    "row gradients cannot be summed over ranks \
                                                     during the backward"
                                                        .into(),
                                                ));
                                            }
                                            Ok(g.dense)
                                        })
                                        .transpose()
                                },
                            )?;
                            (comm, summing) = (comm + waited, summing + busy);
                            summed = true;
                        }
                        _ => {
                            if let Some(t) = total {
                                opt.accumulate_grads(&nets.backward(&t)?, 1.0)?;
                            }
                        }
                    }
                    tokens += all_tokens as usize;
                    continue;
                }
                // Forward and backward on a pool worker (`on_pool`: their kernels' parallel
                // regions would each wake the pool from this thread otherwise).
                let objective: &dyn Objective = objective;
                let (value, out_tokens) = berth_kernels::on_pool(|| -> Result<_> {
                    let out = objective.loss(&nets, mine, batch_seed, dropout.as_ref())?;
                    let Some(loss) = out.loss else {
                        return Ok((None, out.tokens));
                    };
                    let value = loss.to_scalar::<f32>()? as f64;
                    if value.is_finite() {
                        let scaled = (loss / lc.grad_accum as f64)?;
                        opt.accumulate_grads(&nets.backward(&scaled)?, 1.0)?;
                    }
                    Ok((Some(value), out.tokens))
                })?;
                if let Some(value) = value {
                    if !value.is_finite() {
                        return Err(diverged(state.step + 1, "training loss", value));
                    }
                    loss_acc += value;
                    loss_count += 1;
                }
                tokens += out_tokens;
            }
            let c0 = Instant::now();
            if !summed {
                opt.all_reduce(collective)?;
            }
            opt.touched_anywhere(collective)?;
            comm += c0.elapsed();
            let grad_norm = berth_kernels::on_pool(|| -> Result<f64> {
                let grad_norm = opt.clip(lc.max_grad_norm);
                // A non-finite norm skips the update: the weights stay as the last finite
                // step left them.
                if grad_norm.is_finite() {
                    opt.step(lr)?;
                }
                Ok(grad_norm)
            })?;
            if !grad_norm.is_finite() {
                return Err(diverged(state.step + 1, "gradient norm", grad_norm));
            }
            state.step += 1;
            state.batch_in_epoch = group_start + group.len();
            state.epoch = epoch;
            if state.batch_in_epoch == batches.len() {
                state.epoch = epoch + 1;
                state.batch_in_epoch = 0;
            }
            let epoch_f = epoch as f64 + (group_start + group.len()) as f64 / batches.len() as f64;
            if state.step.is_multiple_of(lc.log_every) || state.step == total {
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                emit(&Event::Step {
                    step: state.step,
                    total,
                    epoch: epoch_f,
                    loss: loss_acc / loss_count.max(1) as f64,
                    lr,
                    grad_norm,
                    tokens_per_s: tokens as f64 / secs,
                })?;
                (loss_acc, loss_count, tokens, t0) = (0.0, 0, 0, Instant::now());
            }
            // Evaluate, checkpoint, and maybe stop.
            let boundary = match lc.save_every {
                Some(n) => state.step.is_multiple_of(n),
                None => state.batch_in_epoch == 0,
            };
            if !(boundary || state.step == total) {
                continue;
            }
            // Rank 0 alone evaluates, checkpoints and decides whether to stop; the others
            // learn its decision (and wait for it, so no rank runs ahead of a checkpoint).
            if !writer {
                let mut stop = Vec::new();
                collective.broadcast(&mut stop)?;
                if stop.first() == Some(&1) {
                    break 'epochs;
                }
                continue;
            }
            let paused = Instant::now();
            // On untracked weights: no autograd graph keeps the batches' activations alive.
            let eval = objective.evaluate(&nets.detached()?)?;
            let score = eval
                .get(objective.main_metric())
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN);
            emit(&Event::Eval {
                step: state.step,
                epoch: epoch_f,
                eval,
            })?;
            let improved = state.best.is_none_or(|(b, _)| score > b);
            if improved {
                state.best = Some((score, state.step));
                state.evals_without_improvement = 0;
            } else {
                state.evals_without_improvement += 1;
            }
            let dir = checkpoint::save(&lc.output, &nets, &lc.model, objective, &opt, &state)?;
            if improved {
                best_dir = Some(dir);
            }
            checkpoint::rotate(&lc.output, lc.keep_checkpoints, state.best.map(|b| b.1))?;
            // Evaluation and checkpointing are not training time: tokens/s leaves them out.
            t0 += paused.elapsed();
            let stop = lc
                .early_stopping_patience
                .is_some_and(|p| state.evals_without_improvement >= p);
            if world > 1 {
                collective.broadcast(&mut vec![u8::from(stop)])?;
            }
            if stop {
                break 'epochs;
            }
        }
    }
    if world > 1 && writer {
        let total = started.elapsed().as_secs_f64();
        eprintln!(
            "{world} ranks: {:.1} s of {total:.1} s in gradient and loss reductions ({:.1} %)",
            comm.as_secs_f64(),
            100.0 * comm.as_secs_f64() / total.max(1e-9)
        );
        if !summing.is_zero() {
            eprintln!(
                "{world} ranks: the gradient sums ran {:.1} s on their own thread during the \
                 backward; the time above is only what the backward did not hide",
                summing.as_secs_f64()
            );
        }
    }
    if !writer {
        // Only the writing rank keeps checkpoints; the others report the run directory.
        return Ok(lc.output.clone());
    }
    best_dir
        .ok_or_else(|| TrainError::Config("no step was run (the run had already finished?)".into()))
}

/// The error that stops a run whose loss or gradients stopped being finite. Stopping (not
/// skipping the step, as loss-scaled mixed-precision trainers do) because berth trains in
/// f32, where a non-finite value means the run diverged, not that a scale overflowed.
fn diverged(step: u64, what: &str, value: f64) -> TrainError {
    TrainError::Config(format!(
        "step {step}: the {what} is {value} — the run diverged (lower --lr, raise --warmup or \
         keep --max-grad-norm on); nothing was saved after the last finite step"
    ))
}

/// Appends one epoch's training order to `path` (`{"epoch", "ids"}` per example).
fn dump_order(
    path: &std::path::Path,
    epoch: usize,
    order: &[usize],
    objective: &dyn Objective,
) -> Result<()> {
    use std::io::Write;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    let mut w = std::io::BufWriter::new(f);
    for &i in order {
        writeln!(
            w,
            "{}",
            serde_json::json!({"epoch": epoch, "ids": objective.train_set().ids(i)})
        )
        .map_err(io(path))?;
    }
    w.flush().map_err(io(path))
}
