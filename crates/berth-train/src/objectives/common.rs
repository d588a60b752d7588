//! Helpers every objective uses: the train / dev split, packing, the unseen-label error,
//! argmax, and loading a trained checkpoint for evaluation.
use std::path::{Path, PathBuf};

use berth_model::{Batch, HeadKind};
use berth_text::Encoded;

use crate::error::{Result, TrainError};
use crate::objective::{DataConfig, Networks};

/// Training and dev items: the dev file when there is one, else a seeded `dev_fraction` of
/// the training items; with the file the dev items came from and the rows skipped.
pub(crate) struct Split<T> {
    pub train: Vec<T>,
    pub dev: Vec<T>,
    pub dev_path: PathBuf,
    /// Whether the dev items were split off the training file (no dev file).
    pub held_out: bool,
    pub skipped: usize,
}

/// Reads `data`'s training and dev items with `read` (items, rows skipped).
pub(crate) fn split<T: Clone>(
    data: &DataConfig,
    seed: u64,
    read: impl Fn(&Path) -> Result<(Vec<T>, usize)>,
) -> Result<Split<T>> {
    let (train, mut skipped) = read(&data.train)?;
    Ok(match &data.dev {
        Some(d) => {
            let (dev, s) = read(d)?;
            skipped += s;
            Split {
                train,
                dev,
                dev_path: d.clone(),
                held_out: false,
                skipped,
            }
        }
        None => {
            if train.len() < 2 {
                return Err(TrainError::Data {
                    path: data.train.clone(),
                    line: 0,
                    message: format!(
                        "{} example(s): too few to hold out a dev split; pass a --dev file",
                        train.len()
                    ),
                });
            }
            let (train, dev) = crate::data::split(&train, data.dev_fraction, seed);
            Split {
                train,
                dev,
                dev_path: data.train.clone(),
                held_out: true,
                skipped,
            }
        }
    })
}

/// The error for a dev label the training data never shows.
pub(crate) fn unseen<T>(s: &Split<T>, line: usize, label: &str) -> TrainError {
    let message = if s.held_out {
        format!(
            "label {label:?} occurs only in the rows held out for dev (--dev-fraction), not in \
             the {} rows left for training; pass a --dev file or add examples",
            s.train.len()
        )
    } else {
        format!("label {label:?} does not occur in the training data")
    };
    TrainError::Data {
        path: s.dev_path.clone(),
        line,
        message,
    }
}

/// Packs encoded sequences into one batch (no padding).
pub(crate) fn pack<'a>(encs: impl IntoIterator<Item = &'a Encoded>) -> Result<Batch> {
    Ok(berth_tasks::pack(&encs.into_iter().collect::<Vec<_>>())?)
}

/// Runs `model` on `encs` in the inference pipelines' token-budget batches (evaluation),
/// handing each batch's range of `encs`, its packing and its hidden states to `f`.
pub(crate) fn dev_batches(
    model: &berth_model::Model,
    encs: &[&Encoded],
    f: impl FnMut(std::ops::Range<usize>, &Batch, &candle_core::Tensor) -> Result<()>,
) -> Result<()> {
    berth_tasks::run_batches(model, encs, berth_tasks::DEFAULT_BATCH_TOKENS, f)
}

/// A trained checkpoint as the networks of a run, for evaluation ([`crate::init::load_frozen`];
/// the config is not needed to evaluate).
pub(crate) fn trained_networks(dir: &Path, needed: Option<HeadKind>) -> Result<Networks> {
    Ok(Networks::single(
        crate::init::load_frozen(dir, needed)?,
        serde_json::Value::Null,
    ))
}
