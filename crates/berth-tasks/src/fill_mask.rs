//! Fill-mask: the top-k tokens for each mask position, as transformers' FillMaskPipeline.
use berth_text::Encoded;
use serde::Serialize;

use crate::error::{Result, TaskError};
use crate::pipeline::Pipeline;

/// One candidate for one mask.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    /// The token as decoded alone.
    pub token: String,
    /// Its id.
    pub token_id: u32,
    /// Softmax probability at the mask position.
    pub score: f32,
    /// The text with this mask filled (special tokens kept when the text has several masks,
    /// as transformers does).
    pub sequence: String,
}

/// Predictions for each mask of each encoded text (from [`Pipeline::encode`]):
/// `[text][mask][k]`. Input `i` is named `first_index + i` in errors.
pub fn fill_mask(
    p: &Pipeline,
    encs: &[Encoded],
    top_k: usize,
    first_index: usize,
) -> Result<Vec<Vec<Vec<Prediction>>>> {
    let (mask, mask_id) = p.tokenizer.mask_token().ok_or_else(|| TaskError::Config {
        path: p.tokenizer.source().into(),
        message: "the tokenizer has no mask token".into(),
    })?;
    let mut rows = Vec::new();
    for (i, e) in encs.iter().enumerate() {
        let before = rows.len();
        rows.extend(
            e.ids
                .iter()
                .enumerate()
                .filter(|(_, &id)| id == mask_id)
                .map(|(j, _)| (i, j)),
        );
        if rows.len() == before {
            return Err(TaskError::Input {
                index: first_index + i,
                message: format!("no {mask} token in the text"),
            });
        }
    }
    let (batch, hidden) = p.run(encs)?;
    let flat: Vec<u32> = rows
        .iter()
        .map(|&(i, j)| (batch.cu_seqlens[i] + j) as u32)
        .collect();
    let logits = p
        .model
        .mlm_logits(&berth_model::Model::select_rows(&hidden, &flat)?)?; // [R, V]
    let probs = berth_kernels::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
    let mut out: Vec<Vec<Vec<Prediction>>> = vec![Vec::new(); encs.len()];
    for (&(i, j), row) in rows.iter().zip(&probs) {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        let several = encs[i].ids.iter().filter(|&&id| id == mask_id).count() > 1;
        let mut preds = Vec::with_capacity(top_k);
        for &id in order.iter().take(top_k) {
            let mut ids = encs[i].ids.clone();
            ids[j] = id;
            preds.push(Prediction {
                token: p.tokenizer.decode(&[id], false)?,
                token_id: id,
                score: row[id as usize],
                sequence: p.tokenizer.decode(&ids, !several)?,
            });
        }
        out[i].push(preds);
    }
    Ok(out)
}
