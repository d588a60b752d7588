//! Reading Hugging Face weight files: `model.safetensors`, sharded safetensors with
//! `model.safetensors.index.json`, or `pytorch_model.bin` (read by candle's pickle reader,
//! which interprets the pickle opcodes itself and never executes code from the file).
//!
//! [`Weights`] hands out tensors by checkpoint key, checks shapes against the config, and
//! remembers which keys were used so unused ones can be reported as transformers does.
//! In trainable mode every tensor it hands out is a leaf [`Var`] recorded as a [`Param`].
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{ModelError, Result};

/// A trainable parameter under its Hugging Face name: rows `rows` of `var` (all rows when
/// `None`). Fused weights (QKV) are one `Var` seen as several parameters.
#[derive(Debug, Clone)]
pub struct Param {
    /// Checkpoint key, e.g. `bert.encoder.layer.0.attention.self.query.weight`.
    pub name: String,
    /// The variable holding it.
    pub var: Var,
    /// Row range within `var`, for fused weights.
    pub rows: Option<(usize, usize)>,
}

impl Param {
    /// This parameter's slice of a tensor shaped like its variable (a value or a gradient).
    pub fn view(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        match self.rows {
            Some((start, len)) => t.narrow(0, start, len),
            None => Ok(t.clone()),
        }
    }
}

/// A weight stored quantized per output channel (`berth quantize --dtype int8`): key
/// `NAME` holds `q` as safetensors I8 `[O, I]` and `NAME_scale` the f32 `scale [O]`, with
/// `W[c, :] = scale[c] q[c, :]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Weight {
    /// `[O, I]` row-major.
    pub q: Vec<i8>,
    /// `[O]`.
    pub scale: Vec<f32>,
    /// `O`.
    pub outputs: usize,
    /// `I`.
    pub inputs: usize,
}

impl Int8Weight {
    /// The key of the scale tensor beside the weight `name`.
    pub fn scale_key(name: &str) -> String {
        format!("{name}_scale")
    }

    /// `W = scale ⊙ q` as f32 `[O, I]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks(self.inputs.max(1))
            .zip(&self.scale)
            .flat_map(|(row, &s)| row.iter().map(move |&v| v as f32 * s))
            .collect()
    }
}

/// int8 weights of a checkpoint by key.
pub type Int8Weights = HashMap<String, Arc<Int8Weight>>;

/// All tensors of a checkpoint, by key, as f32 on the CPU.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Weights the checkpoint stores as int8 (their dequantized f32 values are in `tensors`).
    int8: Int8Weights,
    source: PathBuf,
    used: RefCell<BTreeSet<String>>,
    params: Option<RefCell<Vec<Param>>>,
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::CorruptWeights {
        path: path.into(),
        message: e.to_string(),
    }
}

/// The first NaN or infinity in an f32 tensor, if any.
fn first_non_finite(t: &Tensor) -> Result<Option<f32>> {
    let t = t.flatten_all()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let all = cpu.as_slice::<f32>()?;
    let v = match layout.contiguous_offsets() {
        Some((a, b)) => &all[a..b],
        None => all,
    };
    Ok(v.iter().copied().find(|x| !x.is_finite()))
}

/// Every tensor file is checked to be a regular file before it is read (a FIFO or a device
/// named model.safetensors would block or never end).
fn open_regular(path: &Path) -> Result<()> {
    berth_text::limits::regular_file(path, u64::MAX)
        .map(|_| ())
        .map_err(|e| corrupt(path, e))
}

fn read_safetensors(
    path: &Path,
    out: &mut HashMap<String, Tensor>,
    int8: &mut Int8Weights,
) -> Result<()> {
    open_regular(path)?;
    let data = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.into(),
        error: source,
    })?;
    let (tensors, quantized) = Weights::parse_safetensors_int8(&data, path)?;
    out.extend(tensors);
    int8.extend(quantized);
    Ok(())
}

/// The int8 weight `name` (I8 `[O, I]`, bytes `data`) with its scale tensor from `scales`.
fn int8_weight(
    name: &str,
    shape: &[usize],
    data: &[u8],
    scales: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<Int8Weight> {
    let &[outputs, inputs] = shape else {
        return Err(corrupt(
            source,
            format!(
                "int8 tensor {name:?} has shape {shape:?}; only matrices [O, I] are stored as int8"
            ),
        ));
    };
    let key = Int8Weight::scale_key(name);
    let scale = scales.get(&key).ok_or_else(|| {
        corrupt(
            source,
            format!("int8 tensor {name:?} has no {key:?} beside it"),
        )
    })?;
    if scale.dtype() != DType::F32 || scale.dims() != [outputs] {
        return Err(corrupt(
            source,
            format!(
                "{key:?} is {:?} {:?}; expected F32 [{outputs}]",
                scale.dtype(),
                scale.dims()
            ),
        ));
    }
    let scale = scale.to_vec1::<f32>()?;
    if let Some(bad) = scale.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(corrupt(
            source,
            format!("{key:?} holds {bad}; scales must be finite and positive"),
        ));
    }
    Ok(Int8Weight {
        q: data.iter().map(|&b| b as i8).collect(),
        scale,
        outputs,
        inputs,
    })
}

impl Weights {
    /// Loads the weights of the model directory `dir` (see the module docs for the formats).
    pub fn from_dir(dir: &Path, trainable: bool) -> Result<Self> {
        let (tensors, int8, source) = Self::read_dir_int8(dir)?;
        let mut w = Self::from_tensors(tensors, source, trainable)?;
        w.int8 = int8;
        Ok(w)
    }

    /// Every tensor of the model directory `dir` by key (int8 weights dequantized to f32),
    /// with the file they came from.
    pub fn read_dir(dir: &Path) -> Result<(HashMap<String, Tensor>, PathBuf)> {
        Self::read_dir_int8(dir).map(|(t, _, source)| (t, source))
    }

    /// [`Self::read_dir`], and the int8 form of the weights the checkpoint stores as int8.
    pub fn read_dir_int8(dir: &Path) -> Result<(HashMap<String, Tensor>, Int8Weights, PathBuf)> {
        let mut tensors = HashMap::new();
        let mut int8 = HashMap::new();
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let bin = dir.join("pytorch_model.bin");
        // `exists`, not `is_file`: a directory or FIFO under a weight file's name is an
        // error about that file, not "no weights".
        let source = if single.exists() {
            read_safetensors(&single, &mut tensors, &mut int8)?;
            single
        } else if index.exists() {
            let text = berth_text::limits::read_text(&index, berth_text::limits::MAX_JSON_BYTES)
                .map_err(|e| corrupt(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| corrupt(&index, e))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| corrupt(&index, "no \"weight_map\" object"))?;
            let mut files = BTreeSet::new();
            for (key, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    corrupt(&index, format!("weight_map[{key:?}] is not a file name"))
                })?;
                // Shards live in the model folder: no absolute paths, no `..`.
                let plain = Path::new(f)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if f.is_empty() || !plain {
                    return Err(corrupt(
                        &index,
                        format!("weight_map[{key:?}] = {f:?} is outside the model folder"),
                    ));
                }
                files.insert(f);
            }
            for f in files {
                read_safetensors(&dir.join(f), &mut tensors, &mut int8)?;
            }
            for key in map.keys() {
                if !tensors.contains_key(key) {
                    return Err(corrupt(
                        &index,
                        format!("lists {key:?} but no shard holds it"),
                    ));
                }
            }
            index
        } else if bin.exists() {
            open_regular(&bin)?;
            for (name, t) in candle_core::pickle::read_all(&bin).map_err(|e| corrupt(&bin, e))? {
                tensors.insert(name, t);
            }
            bin
        } else {
            return Err(ModelError::NoWeights { dir: dir.into() });
        };
        Ok((tensors, int8, source))
    }

    /// The tensors of safetensors bytes (a file's contents; `source` names it in errors);
    /// int8 weights come dequantized to f32.
    pub fn parse_safetensors(data: &[u8], source: &Path) -> Result<HashMap<String, Tensor>> {
        Self::parse_safetensors_int8(data, source).map(|(t, _)| t)
    }

    /// [`Self::parse_safetensors`], and the int8 form of the weights stored as int8 (their
    /// `NAME_scale` tensors are consumed, not returned).
    pub fn parse_safetensors_int8(
        data: &[u8],
        source: &Path,
    ) -> Result<(HashMap<String, Tensor>, Int8Weights)> {
        let st = candle_core::safetensors::SliceSafetensors::new(data)
            .map_err(|e| corrupt(source, e))?;
        let mut out = HashMap::new();
        let mut raw_int8 = Vec::new();
        for (name, view) in st.tensors() {
            if view.dtype() == safetensors::Dtype::I8 {
                raw_int8.push((name, view.shape().to_vec(), view.data()));
                continue;
            }
            let t = st
                .load(&name, &Device::Cpu)
                .map_err(|e| corrupt(source, e))?;
            out.insert(name, t);
        }
        let mut int8 = HashMap::new();
        for (name, shape, data) in raw_int8 {
            let w = int8_weight(&name, &shape, data, &out, source)?;
            let t = Tensor::from_vec(w.dequantize(), (w.outputs, w.inputs), &Device::Cpu)?;
            out.remove(&Int8Weight::scale_key(&name));
            out.insert(name.clone(), t);
            int8.insert(name, Arc::new(w));
        }
        Ok((out, int8))
    }

    /// Wraps tensors already in memory; `source` names them in errors.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        source: PathBuf,
        trainable: bool,
    ) -> Result<Self> {
        let mut out = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            // Old TF-converted BERT checkpoints call LayerNorm parameters gamma / beta;
            // transformers renames them on load, and so do we.
            let name = if let Some(p) = name.strip_suffix(".gamma") {
                format!("{p}.weight")
            } else if let Some(p) = name.strip_suffix(".beta") {
                format!("{p}.bias")
            } else {
                name
            };
            let float = matches!(
                t.dtype(),
                DType::F32 | DType::F16 | DType::BF16 | DType::F64
            );
            // Integer tensors in encoder checkpoints are index buffers (position_ids); an
            // integer weight is a corrupt or mislabelled file, not something to convert.
            if !float && !name.ends_with("_ids") {
                return Err(corrupt(
                    &source,
                    format!(
                        "tensor {name:?} is {:?}; weights must be floating point",
                        t.dtype()
                    ),
                ));
            }
            let t = if t.dtype() == DType::F32 {
                t
            } else {
                t.to_dtype(DType::F32)?
            };
            if float {
                let bad = first_non_finite(&t)?;
                if let Some(x) = bad {
                    return Err(corrupt(
                        &source,
                        format!("tensor {name:?} holds {x}; weights must be finite"),
                    ));
                }
            }
            out.insert(name, t);
        }
        Ok(Weights {
            tensors: out,
            int8: HashMap::new(),
            source,
            used: RefCell::new(BTreeSet::new()),
            params: trainable.then(|| RefCell::new(Vec::new())),
        })
    }

    /// A trained model's own tensors (already f32, keys already normalised), untracked:
    /// [`crate::Model::detached`]'s source. No checks — they were checked when loaded, and
    /// a diverged run's non-finite weights must still evaluate (to NaN), not fail.
    pub(crate) fn in_memory(tensors: HashMap<String, Tensor>, source: PathBuf) -> Self {
        Weights {
            tensors,
            int8: HashMap::new(),
            source,
            used: RefCell::new(BTreeSet::new()),
            params: None,
        }
    }

    /// The file (or index) the weights came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether `name` is in the checkpoint.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All keys in the checkpoint.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    fn raw(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::WeightMissing {
                name: name.into(),
                path: self.source.clone(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.into(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
                path: self.source.clone(),
            });
        }
        self.used.borrow_mut().insert(name.into());
        Ok(t.clone())
    }

    fn register(&self, t: Tensor, parts: &[(String, Option<(usize, usize)>)]) -> Result<Tensor> {
        match &self.params {
            None => Ok(t),
            Some(params) => {
                let var = Var::from_tensor(&t)?;
                for (name, rows) in parts {
                    params.borrow_mut().push(Param {
                        name: name.clone(),
                        var: var.clone(),
                        rows: *rows,
                    });
                }
                Ok(var.as_tensor().clone())
            }
        }
    }

    /// Checks `name` has `shape` and marks it used without handing it out (a tied copy:
    /// no separate trainable parameter).
    pub fn mark_used(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.raw(name, shape).map(|_| ())
    }

    /// The tensor `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.raw(name, shape)?;
        self.register(t, &[(name.into(), None)])
    }

    /// Several tensors concatenated along rows as one weight (QKV fusion). In trainable
    /// mode they become one variable seen as one [`Param`] per original name.
    pub fn get_fused(&self, names: &[String], shape: &[usize]) -> Result<Tensor> {
        let parts: Vec<Tensor> = names
            .iter()
            .map(|n| self.raw(n, shape))
            .collect::<Result<_>>()?;
        let fused = Tensor::cat(&parts, 0)?;
        let rows = shape[0];
        let names: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), Some((i * rows, rows))))
            .collect();
        self.register(fused, &names)
    }

    /// The int8 form of the weights `names` fused along rows, when the checkpoint stores
    /// every one of them as int8 (inference loads only: a trainable load gets none).
    pub fn int8(&self, names: &[String]) -> Option<Arc<Int8Weight>> {
        if self.params.is_some() {
            return None;
        }
        let parts: Vec<&Arc<Int8Weight>> = names
            .iter()
            .map(|n| self.int8.get(n))
            .collect::<Option<_>>()?;
        match parts.as_slice() {
            [one] => Some(Arc::clone(one)),
            _ => Some(Arc::new(Int8Weight {
                q: parts.iter().flat_map(|p| p.q.iter().copied()).collect(),
                scale: parts.iter().flat_map(|p| p.scale.iter().copied()).collect(),
                outputs: parts.iter().map(|p| p.outputs).sum(),
                inputs: parts[0].inputs,
            })),
        }
    }

    /// Keys of the checkpoint no module asked for (the `position_ids` buffer older
    /// checkpoints carry is not a weight; transformers ignores it too).
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k) && !k.ends_with("position_ids"))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Whether tensors are handed out as trainable variables.
    pub fn is_trainable(&self) -> bool {
        self.params.is_some()
    }

    /// The trainable parameters handed out so far (empty unless loaded trainable).
    pub fn params(&self) -> Vec<Param> {
        self.params
            .as_ref()
            .map(|p| p.borrow().clone())
            .unwrap_or_default()
    }
}
