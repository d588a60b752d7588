//! Sentence embeddings: pooling of the last hidden state, as sentence-transformers does.
use std::path::Path;

use berth_model::Batch;

use crate::error::{Result, TaskError};

/// How token vectors become one vector per text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Pooling {
    /// Mean over all tokens of the text (special tokens included, as sentence-transformers).
    Mean,
    /// The first token (`[CLS]` / `<s>`).
    Cls,
    /// Element-wise max over the tokens.
    Max,
    /// No pooling: one vector per token.
    None,
}

/// A sentence-transformers model's pooling setup, read from its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentenceConfig {
    /// From `1_Pooling/config.json` (or the module named in modules.json).
    pub pooling: Pooling,
    /// Whether modules.json ends in a Normalize module.
    pub normalize: bool,
    /// `max_seq_length` from sentence_bert_config.json.
    pub max_seq_length: Option<usize>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bad = |message: String| TaskError::Config {
        path: path.into(),
        message,
    };
    let text = berth_text::limits::read_text(path, berth_text::limits::MAX_JSON_BYTES)
        .map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))
}

impl SentenceConfig {
    /// Reads modules.json and friends from `dir`; `None` when the model is not a
    /// sentence-transformers model (then callers default to CLS pooling, no normalisation).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let modules_path = dir.join("modules.json");
        if !modules_path.is_file() {
            return Ok(None);
        }
        let modules = read_json(&modules_path)?;
        let list = modules.as_array().ok_or_else(|| TaskError::Config {
            path: modules_path.clone(),
            message: "expected a list of modules".into(),
        })?;
        let mut cfg = SentenceConfig {
            pooling: Pooling::Cls,
            normalize: false,
            max_seq_length: None,
        };
        for m in list {
            let ty = m["type"].as_str().unwrap_or_default();
            // sentence-transformers < 5 names `sentence_transformers.models.Pooling`; 5.x
            // `sentence_transformers.sentence_transformer.modules.pooling.Pooling`.
            let class = ty.rsplit('.').next().unwrap_or_default();
            match class {
                "Transformer" => {}
                "Pooling" => {
                    let path = dir
                        .join(m["path"].as_str().unwrap_or("1_Pooling"))
                        .join("config.json");
                    let p = read_json(&path)?;
                    let on = |k: &str| p[k].as_bool().unwrap_or(false);
                    let mode = p["pooling_mode"].as_str();
                    cfg.pooling = if mode == Some("mean") || on("pooling_mode_mean_tokens") {
                        Pooling::Mean
                    } else if mode == Some("max") || on("pooling_mode_max_tokens") {
                        Pooling::Max
                    } else if mode == Some("cls") || on("pooling_mode_cls_token") {
                        Pooling::Cls
                    } else {
                        return Err(TaskError::Config {
                            path,
                            message: format!(
                                "pooling {} is not one berth supports (mean, max, cls)",
                                mode.unwrap_or("of this config")
                            ),
                        });
                    };
                }
                "Normalize" => cfg.normalize = true,
                // A Dense or other module would change every vector: refuse rather than
                // silently leave it out.
                _ => {
                    return Err(TaskError::Config {
                        path: modules_path.clone(),
                        message: format!(
                            "module {ty:?} is not supported (berth runs Transformer, Pooling, Normalize)"
                        ),
                    })
                }
            }
        }
        let sb = dir.join("sentence_bert_config.json");
        if sb.is_file() {
            cfg.max_seq_length = read_json(&sb)?["max_seq_length"]
                .as_u64()
                .map(|v| v as usize);
        }
        // sentence-transformers 5 keeps the limit in the tokenizer's config instead.
        let tc = dir.join("tokenizer_config.json");
        if cfg.max_seq_length.is_none() && tc.is_file() {
            cfg.max_seq_length = read_json(&tc)?["model_max_length"]
                .as_u64()
                .filter(|&v| v < 1 << 20)
                .map(|v| v as usize);
        }
        Ok(Some(cfg))
    }
}

/// Pools `hidden` (row-major `[N, H]`) per sequence of `batch`; `Pooling::None` is not a
/// pooling and is refused here (callers emit the token rows themselves).
pub fn pool(hidden: &[f32], h: usize, batch: &Batch, pooling: Pooling) -> Vec<Vec<f32>> {
    (0..batch.num_sequences())
        .map(|s| {
            let r = batch.range(s);
            let rows = &hidden[r.start * h..r.end * h];
            match pooling {
                Pooling::Cls => rows[..h].to_vec(),
                Pooling::Mean => {
                    let mut acc = vec![0f32; h];
                    rows.chunks(h)
                        .for_each(|row| acc.iter_mut().zip(row).for_each(|(a, v)| *a += v));
                    let n = r.len() as f32;
                    acc.iter_mut().for_each(|a| *a /= n);
                    acc
                }
                Pooling::Max => {
                    let mut acc = vec![f32::NEG_INFINITY; h];
                    rows.chunks(h)
                        .for_each(|row| acc.iter_mut().zip(row).for_each(|(a, v)| *a = a.max(*v)));
                    acc
                }
                Pooling::None => panic!("pool() called with Pooling::None; this is a bug"),
            }
        })
        .collect()
}

/// Scales `v` to unit L2 norm (sentence-transformers' Normalize: divides by max(norm, 1e-12)).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes() {
        let b = Batch::from_sequences([(&[1u32, 2][..], &[][..]), (&[3u32][..], &[][..])]).unwrap();
        let hidden = [1.0, -1.0, 3.0, 5.0, 7.0, 9.0];
        assert_eq!(
            pool(&hidden, 2, &b, Pooling::Mean),
            vec![vec![2.0, 2.0], vec![7.0, 9.0]]
        );
        assert_eq!(
            pool(&hidden, 2, &b, Pooling::Cls),
            vec![vec![1.0, -1.0], vec![7.0, 9.0]]
        );
        assert_eq!(
            pool(&hidden, 2, &b, Pooling::Max),
            vec![vec![3.0, 5.0], vec![7.0, 9.0]]
        );
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
    }
}

/// Options of [`embed_texts`].
#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// Token pooling (not [`Pooling::None`]).
    pub pooling: Pooling,
    /// L2-normalise the final vectors.
    pub normalize: bool,
    /// Long texts: pooled vectors of overlapping windows combined, instead of truncation.
    pub windows: Option<crate::classify::Windows>,
}

/// Texts tokenized for [`embed_encoded`]: the encodings (several per text with windows)
/// and, per text, the range of encodings that belong to it.
#[derive(Debug, Clone)]
pub struct EncodedTexts {
    /// Every encoding, in text order.
    pub encs: Vec<berth_text::Encoded>,
    /// Per text, its range in `encs`.
    pub ranges: Vec<std::ops::Range<usize>>,
}

/// Tokenizes `texts` (in parallel) as [`embed_texts`] does; `first_index` numbers them in
/// error messages.
pub fn encode_for_embedding(
    p: &crate::Pipeline,
    texts: &[String],
    opts: &EmbedOptions,
    first_index: usize,
) -> Result<EncodedTexts> {
    let inputs: Vec<_> = texts.iter().map(|t| (t.clone(), None)).collect();
    let (encs, ranges) =
        crate::classify::encode_inputs(p, &inputs, opts.windows.map(|w| w.stride), first_index)?;
    Ok(EncodedTexts { encs, ranges })
}

/// Runs and pools texts already tokenized by [`encode_for_embedding`]: one vector per text.
pub fn embed_encoded(
    p: &crate::Pipeline,
    e: &EncodedTexts,
    opts: &EmbedOptions,
) -> Result<Vec<Vec<f32>>> {
    if opts.pooling == Pooling::None {
        return Err(TaskError::Options(
            "embed_texts needs a pooling other than none".into(),
        ));
    }
    let h = p.model.config.hidden_size;
    let mut vecs = Vec::with_capacity(e.encs.len());
    p.for_each_batch(&e.encs, |_, batch, hidden| {
        vecs.extend(pool(
            &hidden.flatten_all()?.to_vec1::<f32>()?,
            h,
            batch,
            opts.pooling,
        ));
        Ok(())
    })?;
    let combine = opts
        .windows
        .map_or(crate::classify::WindowPool::First, |w| w.pool);
    Ok(e.ranges
        .iter()
        .map(|r| {
            let mut v = combine.combine(&vecs[r.clone()]);
            if opts.normalize {
                normalize(&mut v);
            }
            v
        })
        .collect())
}

/// One pooled vector per text. With windows, each window is pooled on its own and the
/// window vectors combined before normalisation. Input `i` is named `first_index + i`.
pub fn embed_texts(
    p: &crate::Pipeline,
    texts: &[String],
    opts: &EmbedOptions,
    first_index: usize,
) -> Result<(Vec<Vec<f32>>, Vec<berth_text::Encoded>)> {
    if opts.pooling == Pooling::None {
        return Err(TaskError::Options(
            "embed_texts needs a pooling other than none".into(),
        ));
    }
    let e = encode_for_embedding(p, texts, opts, first_index)?;
    let vecs = embed_encoded(p, &e, opts)?;
    Ok((vecs, e.encs))
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Every token's last hidden state per text (`[text][token][hidden]`; transformers'
/// feature extraction, TEI's `embed_all`), with the encodings.
pub fn token_embeddings(
    p: &crate::Pipeline,
    texts: &[String],
) -> Result<(Vec<Vec<Vec<f32>>>, Vec<berth_text::Encoded>)> {
    let encs = p.encode(texts, 0)?;
    let h = p.model.config.hidden_size;
    let mut out: Vec<Vec<Vec<f32>>> = Vec::with_capacity(encs.len());
    p.for_each_batch(&encs, |_, batch, hidden| {
        let flat = hidden.flatten_all()?.to_vec1::<f32>()?;
        for s in 0..batch.num_sequences() {
            let r = batch.range(s);
            out.push(
                flat[r.start * h..r.end * h]
                    .chunks(h)
                    .map(<[f32]>::to_vec)
                    .collect(),
            );
        }
        Ok(())
    })?;
    Ok((out, encs))
}
