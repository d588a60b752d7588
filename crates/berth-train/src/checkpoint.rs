//! Run directories and checkpoints.
//!
//! ```text
//! RUN/config.json                the full training configuration
//! RUN/metrics.jsonl              one line per logged step and per evaluation
//! RUN/checkpoints/step-N/        model.safetensors + config.json + tokenizer files
//!                                (the Hugging Face layout: `from_pretrained` loads it),
//!                                optimizer.safetensors, trainer_state.json
//! ```
//! Every checkpoint is written into a temporary directory beside its final name and renamed
//! into place, so a crash or a full disk never leaves a half-written checkpoint, and the
//! previous ones are untouched.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use berth_model::Model;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{io, Result, TrainError};
use crate::objective::{Networks, Objective};
use crate::optim::AdamW;
use berth_tasks::Pooling;

/// Version of the checkpoint layout berth writes (and the only one it resumes).
pub const FORMAT_VERSION: u32 = 1;

/// Tokenizer files copied next to a saved model when the source has them.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
];

/// Where training stands, saved with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Optimizer steps taken.
    pub step: u64,
    /// Epoch in progress (0-based).
    pub epoch: usize,
    /// Batches of that epoch already consumed (the data position).
    pub batch_in_epoch: usize,
    /// The run's seed (data order and dropout masks derive from it and the position).
    pub seed: u64,
    /// Best dev metric so far and the step that reached it.
    pub best: Option<(f64, u64)>,
    /// Evaluations since the best one (early stopping).
    pub evals_without_improvement: usize,
}

/// Writes `bytes` to `path` through a temporary file beside it (synced) and a rename, so a
/// crash or a full disk leaves the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(TrainError::Io {
            path: path.into(),
            error: e,
        });
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

/// The model's parameters under their Hugging Face names (fused weights split back).
pub fn model_tensors(model: &Model) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for p in &model.params {
        out.insert(p.name.clone(), p.view(p.var.as_tensor())?.contiguous()?);
    }
    if out.is_empty() {
        return Err(TrainError::Config(
            "the model was not loaded trainable: nothing to save".into(),
        ));
    }
    Ok(out)
}

/// Writes `model` in the Hugging Face layout into `dir` (which must exist): weights,
/// `config` as config.json, and the tokenizer files of `tokenizer_dir`.
pub fn write_model(
    dir: &Path,
    model: &Model,
    config: &serde_json::Value,
    tokenizer_dir: &Path,
) -> Result<()> {
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&model_tensors(model)?, &weights).map_err(|e| {
        TrainError::Checkpoint {
            path: weights.clone(),
            message: e.to_string(),
        }
    })?;
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::to_string_pretty(config).expect("JSON values serialise"),
    )
    .map_err(io(&cfg))?;
    copy_tokenizer_files(tokenizer_dir, dir)
}

/// Copies the tokenizer files `src` has into `dst`.
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dst.join(f)).map_err(io(&from))?;
        }
    }
    Ok(())
}

/// sentence-transformers' module files for a trained bi-encoder: copied from `base` when it
/// is a sentence-transformers model (modules.json and the module folders it names), else a
/// Transformer + Pooling pipeline with the pooling the run trained with.
pub(crate) fn write_sentence_files(
    dir: &Path,
    base: &Path,
    pooling: Pooling,
    hidden: usize,
    max_length: usize,
) -> Result<()> {
    let copy = |name: &str| -> Result<()> {
        let src = base.join(name);
        if src.is_file() {
            let dst = dir.join(name);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::copy(&src, &dst).map_err(io(&src))?;
        }
        Ok(())
    };
    let write = |name: &str, v: serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&v).expect("JSON serialises"),
        )
        .map_err(io(&p))
    };
    // The limit the model was trained with, as sentence-transformers saves `max_seq_length`.
    let sb = base.join("sentence_bert_config.json");
    let mut sentence_config: serde_json::Value = std::fs::read_to_string(&sb)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| serde_json::json!({"do_lower_case": false}));
    sentence_config["max_seq_length"] = max_length.into();
    write("sentence_bert_config.json", sentence_config)?;
    let modules = base.join("modules.json");
    if modules.is_file() {
        copy("modules.json")?;
        copy("config_sentence_transformers.json")?;
        let text = std::fs::read_to_string(&modules).map_err(io(&modules))?;
        let list: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
                path: modules.clone(),
                message: e.to_string(),
            })?;
        for m in list.as_array().into_iter().flatten() {
            let sub = m["path"].as_str().unwrap_or("");
            if sub.is_empty() {
                continue;
            }
            std::fs::create_dir_all(dir.join(sub)).map_err(io(&dir.join(sub)))?;
            if let Ok(entries) = std::fs::read_dir(base.join(sub)) {
                for e in entries.flatten() {
                    if e.path().is_file() {
                        copy(&format!("{sub}/{}", e.file_name().to_string_lossy()))?;
                    }
                }
            }
        }
        return Ok(());
    }
    write(
        "modules.json",
        serde_json::json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
        ]),
    )?;
    write(
        "1_Pooling/config.json",
        serde_json::json!({
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": pooling == Pooling::Cls,
            "pooling_mode_mean_tokens": pooling == Pooling::Mean,
            "pooling_mode_max_tokens": pooling == Pooling::Max,
            "pooling_mode_mean_sqrt_len_tokens": false
        }),
    )
}

/// Writes a checkpoint atomically to `checkpoints/step-N` under `run`: the main network,
/// each companion (ELECTRA's generator) in the subfolder it names, the objective's own
/// files, optimizer and trainer state.
pub fn save(
    run: &Path,
    nets: &Networks,
    tokenizer_dir: &Path,
    objective: &dyn Objective,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let root = run.join("checkpoints");
    // A diverged network is never written: its checkpoint would load and predict garbage.
    for p in nets.params() {
        let v = p.view(p.var.as_tensor())?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            return Err(TrainError::Config(format!(
                "step {}: parameter {} holds {x} — the run diverged (lower --lr or raise \
                 --warmup); no checkpoint was written for this step",
                state.step, p.name
            )));
        }
    }
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let dst = root.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let written = (|| -> Result<()> {
        write_model(&tmp, &nets.main, &nets.config, tokenizer_dir)?;
        objective.write_extras(nets, &tmp)?;
        // Networks trained with the model (ELECTRA's generator) in subfolders.
        for c in &nets.companions {
            let sub = tmp.join(c.dir);
            std::fs::create_dir(&sub).map_err(io(&sub))?;
            write_model(&sub, &c.model, &c.config, tokenizer_dir)?;
        }
        let opt_path = tmp.join("optimizer.safetensors");
        candle_core::safetensors::save(&opt.state_tensors()?, &opt_path).map_err(|e| {
            TrainError::Checkpoint {
                path: opt_path.clone(),
                message: e.to_string(),
            }
        })?;
        let st = tmp.join("trainer_state.json");
        std::fs::write(
            &st,
            serde_json::to_string_pretty(state).expect("state serialises"),
        )
        .map_err(io(&st))?;
        // On disk before the rename makes the checkpoint visible (power loss, not only a
        // killed process, must leave either the old state or the whole new one).
        sync_tree(&tmp)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp); // leave nothing half-written behind
        return Err(e);
    }
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(io(&dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    sync_dir(&root)?;
    Ok(dst)
}

/// fsyncs every file under `dir`, then the directories themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = e.map_err(io(dir))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
        }
    }
    sync_dir(dir)
}

/// fsyncs a directory, so the names created or renamed in it survive a power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

/// Checkpoints under `run`, oldest first, as (step, path).
pub fn list(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run.join("checkpoints");
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&root).map_err(io(&root))? {
        let e = e.map_err(io(&root))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes all but the newest `keep` checkpoints and the best one.
pub fn rotate(run: &Path, keep: usize, best_step: Option<u64>) -> Result<()> {
    let all = list(run)?;
    let cut = all.len().saturating_sub(keep);
    for (step, path) in &all[..cut] {
        if Some(*step) != best_step {
            std::fs::remove_dir_all(path).map_err(io(path))?;
        }
    }
    Ok(())
}

/// Reads a checkpoint's trainer state and optimizer tensors.
pub fn read_state(ckpt: &Path) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let st = ckpt.join("trainer_state.json");
    let text = std::fs::read_to_string(&st).map_err(io(&st))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: st.clone(),
        message: e.to_string(),
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(TrainError::Checkpoint {
            path: st,
            message: format!(
                "format version {} (this berth reads {FORMAT_VERSION})",
                state.format_version
            ),
        });
    }
    let opt = ckpt.join("optimizer.safetensors");
    let tensors = candle_core::safetensors::load(&opt, &candle_core::Device::Cpu).map_err(|e| {
        TrainError::Checkpoint {
            path: opt.clone(),
            message: e.to_string(),
        }
    })?;
    Ok((state, tensors))
}

/// Exclusive ownership of a run directory while a run writes into it: `.berth.lock` holds the
/// owner's pid under an advisory `flock`, so a second run started into the same `--output`
/// is refused instead of interleaving its checkpoints and metrics. The kernel drops the lock
/// when the owner exits (even when killed), so a stale file never blocks a later run; a run
/// that ends removes the file (and the directory, if it created it and left it empty).
pub struct RunLock {
    file: std::fs::File,
    path: PathBuf,
    created_dir: Option<PathBuf>,
}

impl RunLock {
    /// Name of the lock file inside the run directory.
    pub const FILE: &'static str = ".berth.lock";

    /// Locks `run` (created if missing), or says which process holds it.
    pub fn acquire(run: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        let created_dir = (!run.exists()).then(|| run.to_path_buf());
        std::fs::create_dir_all(run).map_err(io(run))?;
        let path = run.join(Self::FILE);
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io(&path))?;
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                return Err(TrainError::Checkpoint {
                    path: run.into(),
                    message: format!(
                        "another berth run (pid {}) is writing here; wait for it or choose another --output",
                        owner.trim()
                    ),
                });
            }
            // The previous owner may have removed the file between our open and our lock:
            // then we hold a lock on a name that no longer exists, and try again.
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            let written = file
                .set_len(0)
                .and_then(|_| file.rewind())
                .and_then(|_| writeln!(file, "{}", std::process::id()));
            written.map_err(io(&path))?;
            return Ok(RunLock {
                file,
                path,
                created_dir,
            });
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still locked, so no other run can have locked this file meanwhile.
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file;
        if let Some(dir) = &self.created_dir {
            let _ = std::fs::remove_dir(dir); // only if the run left it empty
        }
    }
}
