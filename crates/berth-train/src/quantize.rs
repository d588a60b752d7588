//! `berth quantize`: a copy of a checkpoint whose encoder matrices are stored in the number
//! format berth runs them in, so loading it neither quantizes nor rounds anything.
//!
//! - **int8** (berth-specific): each matrix [`Model::packed_linears`] packs becomes
//!   `NAME` (safetensors I8 `[O, I]`) and `NAME_scale` (F32 `[O]`) with `W[c, :] = scale[c]
//!   q[c, :]`, quantized exactly as `--dtype int8` quantizes at load
//!   ([`berth_kernels::amx::int8::quantize_channel`]); berth packs the stored values as they
//!   are, so `--dtype int8` gives the same outputs from either checkpoint. The file's
//!   metadata says `format: berth-int8`, which transformers refuses to load (it would read
//!   the int8 values as weights).
//! - **bf16**: the same matrices stored as BF16 (everything else unchanged). An ordinary
//!   mixed-precision checkpoint transformers loads; `--dtype bf16` packs the same tiles
//!   from it as from the f32 original.
//!
//! Everything else (embeddings, LayerNorm, biases, heads) keeps its stored type. config.json
//! records `berth_quantization`; the other files of the folder are copied.
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use berth_model::{Model, Precision, Weights};
use candle_core::{DType, Tensor};
use safetensors::{Dtype, View};

use crate::error::{io, Result, TrainError};

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// The weights file written.
    pub weights: PathBuf,
    /// Matrices stored in the new format.
    pub matrices: usize,
    /// Bytes of the source's weight files and of the new one.
    pub bytes_before: u64,
    /// Bytes of the new weights file.
    pub bytes_after: u64,
}

/// One tensor's bytes as safetensors stores them.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn checkpoint_error(path: &Path, message: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.into(),
        message: message.to_string(),
    }
}

/// A tensor as it is, in its own type.
fn raw(t: &Tensor) -> Raw {
    let t = t.contiguous().expect("contiguous copy");
    Raw {
        dtype: t.dtype().into(),
        shape: t.dims().to_vec(),
        data: View::data(&t).into_owned(),
    }
}

fn f32_rows(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Writes `src` with its encoder matrices in `dtype` (int8 or bf16) into the new folder
/// `dst` (through `dst.partial-PID` and a rename: never a half-written checkpoint).
pub fn quantize_checkpoint(src: &Path, dst: &Path, dtype: Precision) -> Result<QuantizeReport> {
    let label = match dtype {
        Precision::Int8 => "int8",
        Precision::Bf16 => "bf16",
        Precision::F32 => {
            return Err(TrainError::Config(
                "berth quantize: --dtype must be int8 or bf16 (f32 is the unquantized model)"
                    .into(),
            ))
        }
    };
    let config_path = src.join("config.json");
    let text = berth_text::limits::read_text(&config_path, berth_text::limits::MAX_JSON_BYTES)
        .map_err(|e| checkpoint_error(&config_path, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| checkpoint_error(&config_path, e))?;
    if let Some(q) = config.get("berth_quantization") {
        return Err(checkpoint_error(
            &config_path,
            format!("is already quantized ({q}); quantize the original f32 checkpoint"),
        ));
    }
    if dst.exists() {
        return Err(TrainError::Config(format!(
            "{} exists; berth quantize writes a new folder",
            dst.display()
        )));
    }
    // The matrices inference packs, found by building the model as inference does from the
    // same tensors (read once: candle tensors are shared, not copied).
    let (tensors, source) = Weights::read_dir(src)?;
    let packed: BTreeSet<String> = {
        let config = berth_model::EncoderConfig::from_file(&config_path)?;
        let w = Weights::from_tensors(tensors.clone(), source.clone(), false)?;
        let (model, _) = Model::from_weights(config, w, src)?;
        model
            .packed_linears()
            .iter()
            .flat_map(|l| l.weight_keys.iter().cloned())
            .collect()
    };
    let bytes_before = weight_bytes(src, &source);
    let mut out: HashMap<String, Raw> = HashMap::with_capacity(tensors.len() + packed.len());
    for (name, t) in &tensors {
        if !packed.contains(name) {
            out.insert(name.clone(), raw(t));
            continue;
        }
        let (o, i) = t.dims2()?;
        match dtype {
            Precision::Int8 => {
                let w = f32_rows(t)?;
                let mut q = Vec::with_capacity(w.len());
                let mut scale = Vec::with_capacity(o);
                for row in w.chunks(i.max(1)) {
                    let (s, v) = berth_kernels::amx::int8::quantize_channel(row);
                    scale.push(s);
                    q.extend(v.into_iter().map(|x| x as u8));
                }
                out.insert(
                    name.clone(),
                    Raw {
                        dtype: Dtype::I8,
                        shape: vec![o, i],
                        data: q,
                    },
                );
                out.insert(
                    berth_model::Int8Weight::scale_key(name),
                    Raw {
                        dtype: Dtype::F32,
                        shape: vec![o],
                        data: scale.iter().flat_map(|s| s.to_le_bytes()).collect(),
                    },
                );
            }
            _ => {
                let data = f32_rows(t)?
                    .into_iter()
                    .flat_map(|v| berth_kernels::amx::to_bf16(v).to_le_bytes())
                    .collect();
                out.insert(
                    name.clone(),
                    Raw {
                        dtype: Dtype::BF16,
                        shape: vec![o, i],
                        data,
                    },
                );
            }
        }
    }

    let tmp = dst.with_extension(format!("partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    crate::init::copy_tree(src, &tmp)?;
    // A training checkpoint's optimizer state and trainer state are not part of the model.
    for f in ["optimizer.safetensors", "trainer_state.json"] {
        let p = tmp.join(f);
        if p.is_file() {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    let weights = tmp.join("model.safetensors");
    let format = if dtype == Precision::Int8 {
        "berth-int8"
    } else {
        "pt"
    };
    let metadata = HashMap::from([("format".to_string(), format.to_string())]);
    let mut names: Vec<&String> = out.keys().collect();
    names.sort();
    let views: Vec<(&String, &Raw)> = names.iter().map(|n| (*n, &out[*n])).collect();
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| checkpoint_error(&weights, e))?;
    crate::checkpoint::write_atomic(&weights, &bytes)?;
    config["berth_quantization"] = serde_json::json!({
        "dtype": label,
        "matrices": packed.len(),
        "scheme": if dtype == Precision::Int8 {
            "symmetric per output channel: NAME (I8) with NAME_scale (F32)"
        } else {
            "encoder matrices rounded to bf16 (nearest even)"
        },
    });
    crate::checkpoint::write_atomic(
        &tmp.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("JSON values serialise")
            .as_bytes(),
    )?;
    std::fs::rename(&tmp, dst).map_err(io(dst))?;
    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::checkpoint::sync_dir(parent)?;
    }
    Ok(QuantizeReport {
        weights: dst.join("model.safetensors"),
        matrices: packed.len(),
        bytes_before,
        bytes_after: bytes.len() as u64,
    })
}

/// Bytes of the weight files of `dir` (`source` is the file or index they were read from).
fn weight_bytes(dir: &Path, source: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    if source.extension().is_some_and(|e| e == "json") {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("model-") && n.ends_with(".safetensors")
            })
            .map(|e| size(&e.path()))
            .sum()
    } else {
        size(source)
    }
}
