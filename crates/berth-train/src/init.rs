//! A model ready to fine-tune for a task: the checkpoint's encoder, and its head when it has
//! one for the same labels, else a fresh head initialised as transformers initialises one
//! (normal with `initializer_range` for weights, zeros for biases).
use std::collections::HashMap;
use std::path::Path;

use berth_model::{Arch, EncoderConfig, HeadKind, Model, Weights};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{io, Result, TrainError};

/// What the fine-tuned model predicts.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskHead {
    /// The head.
    pub kind: HeadKind,
    /// Label names (empty for question answering).
    pub labels: Vec<String>,
    /// transformers' `problem_type` for sequence classification.
    pub problem_type: Option<String>,
    /// Masked-LM (BERT): also the sentence-pair head on the pooler (`BertForPreTraining`:
    /// `bert.pooler.dense`, `cls.seq_relationship`).
    pub sentence_order: bool,
}

fn class_name(arch: Arch, head: &TaskHead) -> String {
    if head.sentence_order && head.kind == HeadKind::MaskedLm && arch == Arch::Bert {
        return "BertForPreTraining".into();
    }
    if head.kind == HeadKind::ReplacedTokenDetection {
        return "ElectraForPreTraining".into();
    }
    let kind = head.kind;
    let prefix = match arch {
        Arch::Bert => "Bert",
        Arch::Roberta => "Roberta",
        Arch::DistilBert => "DistilBert",
        Arch::Electra => "Electra",
        Arch::ModernBert => "ModernBert",
    };
    let suffix = match kind {
        HeadKind::MaskedLm => "ForMaskedLM",
        HeadKind::SequenceClassification => "ForSequenceClassification",
        HeadKind::TokenClassification => "ForTokenClassification",
        HeadKind::QuestionAnswering => "ForQuestionAnswering",
        HeadKind::ReplacedTokenDetection => unreachable!("returned above"),
    };
    format!("{prefix}{suffix}")
}

/// Head weight names and shapes for `kind` (`c` outputs) on an encoder of `cfg`.
fn head_shapes(cfg: &EncoderConfig, kind: HeadKind, c: usize) -> Vec<(String, Vec<usize>)> {
    let (arch, h) = (cfg.arch, cfg.hidden_size);
    let lin = |name: &str, o: usize, i: usize| {
        vec![
            (format!("{name}.weight"), vec![o, i]),
            (format!("{name}.bias"), vec![o]),
        ]
    };
    if let Some(m) = &cfg.modern {
        // ModernBERT: every head starts with the prediction head (dense → act → norm), its
        // biases as the config says; then the classifier, or the tied decoder's bias.
        let mut shapes = vec![("head.dense.weight".to_string(), vec![h, h])];
        if m.classifier_bias {
            shapes.push(("head.dense.bias".into(), vec![h]));
        }
        shapes.push(("head.norm.weight".into(), vec![h]));
        if m.norm_bias {
            shapes.push(("head.norm.bias".into(), vec![h]));
        }
        match kind {
            HeadKind::MaskedLm if m.decoder_bias => shapes.push(("decoder.bias".into(), vec![c])),
            HeadKind::MaskedLm | HeadKind::ReplacedTokenDetection => {}
            HeadKind::QuestionAnswering => shapes.extend(lin("classifier", 2, h)),
            _ => shapes.extend(lin("classifier", c, h)),
        }
        return shapes;
    }
    match (kind, arch) {
        (HeadKind::SequenceClassification, Arch::Bert) => {
            [lin("bert.pooler.dense", h, h), lin("classifier", c, h)].concat()
        }
        (HeadKind::SequenceClassification, Arch::Roberta | Arch::Electra) => [
            lin("classifier.dense", h, h),
            lin("classifier.out_proj", c, h),
        ]
        .concat(),
        (HeadKind::SequenceClassification, Arch::DistilBert) => {
            [lin("pre_classifier", h, h), lin("classifier", c, h)].concat()
        }
        (HeadKind::SequenceClassification, Arch::ModernBert) => {
            unreachable!("ModernBERT heads returned above (its config has `modern`)")
        }
        (HeadKind::TokenClassification, _) => lin("classifier", c, h),
        (HeadKind::QuestionAnswering, _) => lin("qa_outputs", 2, h),
        (HeadKind::ReplacedTokenDetection, _) => [
            lin("discriminator_predictions.dense", h, h),
            lin("discriminator_predictions.dense_prediction", 1, h),
        ]
        .concat(),
        // Transform dense + LayerNorm and the decoder bias; the decoder is the word embedding
        // matrix (tied, as every BERT-family checkpoint here is).
        (HeadKind::MaskedLm, _) => {
            let [dense, ln, _, bias] = berth_model::mlm_head_keys(arch);
            [
                lin(dense, h, h),
                vec![
                    (format!("{ln}.weight"), vec![h]),
                    (format!("{ln}.bias"), vec![h]),
                    (bias.to_string(), vec![c]),
                ],
            ]
            .concat()
        }
    }
}

/// Whether a checkpoint key belongs to a task head (never prefixed with the base model's name).
fn is_head_key(k: &str) -> bool {
    [
        "classifier.",
        "pre_classifier.",
        "qa_outputs.",
        "cls.",
        "lm_head.",
        "vocab_",
        "discriminator_predictions.",
        "generator_",
        // ModernBERT's prediction head and masked-LM decoder.
        "head.",
        "decoder.",
    ]
    .iter()
    .any(|h| k.starts_with(h))
}

/// One standard normal draw (Box-Muller) from `rng`.
fn normal(rng: &mut rand::rngs::StdRng) -> f64 {
    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// `n` draws of a normal with `std`, redrawn outside `±cutoff · std` (torch's
/// `trunc_normal_(std=std, a=-cutoff·std, b=cutoff·std)`, as ModernBERT initialises).
fn truncated_normal(rng: &mut rand::rngs::StdRng, n: usize, std: f64, cutoff: f64) -> Vec<f32> {
    (0..n)
        .map(|_| loop {
            let z = normal(rng);
            if z.abs() <= cutoff {
                break (z * std) as f32;
            }
        })
        .collect()
}

/// ModernBERT's `initializer_cutoff_factor` (transformers' default 2).
fn cutoff_factor(config: &serde_json::Value) -> f64 {
    config["initializer_cutoff_factor"]
        .as_f64()
        .filter(|c| c.is_finite() && *c > 0.0)
        .unwrap_or(2.0)
}

/// The config.json for the fine-tuned model: the checkpoint's, with the head's class,
/// labels and problem type.
pub fn task_config(dir: &Path, head: &TaskHead) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let arch = EncoderConfig::from_json(&text, &path)?.arch;
    if head.sentence_order && (head.kind != HeadKind::MaskedLm || arch != Arch::Bert) {
        return Err(TrainError::Config(format!(
            "{}: next-sentence / sentence-order objectives are BERT's (BertForPreTraining); this is a {arch:?} model",
            dir.display()
        )));
    }
    v["architectures"] = serde_json::json!([class_name(arch, head)]);
    if head.kind == HeadKind::QuestionAnswering {
        // transformers sizes the start / end classifier by the label count: two (its
        // default when the config names none).
        if v["id2label"].as_object().is_some_and(|m| m.len() != 2) {
            v["id2label"] = serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"});
            v["label2id"] = serde_json::json!({"LABEL_0": 0, "LABEL_1": 1});
        }
    } else if head.labels.is_empty() {
        // No labels (masked LM): no label maps, rather than empty ones transformers would
        // read as zero labels.
        if let Some(o) = v.as_object_mut() {
            o.remove("id2label");
            o.remove("label2id");
        }
    } else {
        let id2label: serde_json::Map<String, serde_json::Value> = head
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.clone().into()))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = head
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i.into()))
            .collect();
        v["id2label"] = id2label.into();
        v["label2id"] = label2id.into();
    }
    if let Some(p) = &head.problem_type {
        v["problem_type"] = p.clone().into();
    }
    Ok(v)
}

/// Loads `dir` as a trainable model with `head`. A base checkpoint (`*Model`, keys without
/// the `bert.` / `roberta.` / `distilbert.` prefix) gets the prefix, as transformers does
/// when loading a base model into a head model. Head weights absent from the checkpoint are
/// initialised from `seed`; present ones must fit the label count.
pub fn load_for_task(dir: &Path, head: &TaskHead, seed: u64) -> Result<(Model, serde_json::Value)> {
    let config_json = task_config(dir, head)?;
    let config = EncoderConfig::from_json(&config_json.to_string(), &dir.join("config.json"))?;
    let (raw, source) = Weights::read_dir(dir)?;
    let prefix = format!("{}.", config.arch.base_prefix());
    let has_prefix = raw.keys().any(|k| k.starts_with(&prefix));
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(raw.len());
    for (k, t) in raw {
        // Parts the task's model does not have: the pooler outside sequence classification
        // (transformers builds those models without it), another task's head.
        let other_head = is_head_key(&k)
            && !head_shapes(&config, head.kind, 1)
                .iter()
                .any(|(n, _)| k.split('.').next() == n.split('.').next());
        let keeps_pooler = head.kind == HeadKind::SequenceClassification || head.sentence_order;
        if other_head || (!keeps_pooler && k.contains("pooler.")) {
            continue;
        }
        let head_key = is_head_key(&k);
        let key = if has_prefix || head_key {
            k
        } else {
            format!("{prefix}{k}")
        };
        tensors.insert(key, t);
    }
    let c = match head.kind {
        HeadKind::QuestionAnswering => 2,
        HeadKind::MaskedLm => config.vocab_size,
        _ => head.labels.len(),
    };
    let init_range = config_json["initializer_range"].as_f64().unwrap_or(0.02);
    let cutoff = cutoff_factor(&config_json);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut shapes = head_shapes(&config, head.kind, c);
    if head.sentence_order {
        let h = config.hidden_size;
        shapes.extend([
            ("bert.pooler.dense.weight".to_string(), vec![h, h]),
            ("bert.pooler.dense.bias".to_string(), vec![h]),
            ("cls.seq_relationship.weight".to_string(), vec![2, h]),
            ("cls.seq_relationship.bias".to_string(), vec![2]),
        ]);
    }
    for (name, shape) in shapes {
        match tensors.get(&name) {
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(TrainError::Config(format!(
                    "{}: head weight {name} has shape {:?} but the task needs {shape:?} ({} labels); start from the base model or use the checkpoint's labels",
                    source.display(),
                    t.dims(),
                    c
                )))
            }
            Some(_) => {}
            None => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = if name.ends_with(".bias") {
                    vec![0.0; n]
                } else if crate::optim::is_norm_weight(&name) {
                    vec![1.0; n]
                } else if config.modern.is_some() {
                    // transformers' ModernBERT init: truncated normal, the prediction head
                    // at the output-projection scale, the classifier at hidden^-1/2.
                    let std = if name.starts_with("classifier.") {
                        (config.hidden_size as f64).powf(-0.5)
                    } else {
                        init_range / (2.0 * config.num_layers as f64).sqrt()
                    };
                    truncated_normal(&mut rng, n, std, cutoff)
                } else {
                    // Box-Muller from the seeded generator.
                    (0..n).map(|_| (normal(&mut rng) * init_range) as f32).collect()
                };
                tensors.insert(name, Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?);
            }
        }
    }
    let w = Weights::from_tensors(tensors, source, true)?;
    let (model, report) = Model::from_weights(config, w, dir)?;
    if let Some((kind, key)) = report.missing_head {
        return Err(TrainError::Config(format!(
            "{}: the {} head is incomplete (missing {key})",
            dir.display(),
            kind.name()
        )));
    }
    Ok((model, config_json))
}

/// Loads `dir`'s encoder alone, trainable, for sentence-embedding training: heads are
/// dropped and a `bert.` / `roberta.` / `distilbert.` prefix is removed, so the saved model
/// is the bare `*Model` sentence-transformers loads. A BERT pooler is kept unchanged (it
/// receives no gradient, as in sentence-transformers, where mean pooling never uses it).
pub fn load_encoder(dir: &Path) -> Result<(Model, serde_json::Value)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let mut config_json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let arch = EncoderConfig::from_json(&text, &path)?.arch;
    let mlm = TaskHead {
        kind: HeadKind::MaskedLm,
        labels: Vec::new(),
        problem_type: None,
        sentence_order: false,
    };
    let base = class_name(arch, &mlm).replace("ForMaskedLM", "Model");
    config_json["architectures"] = serde_json::json!([base]);
    if let Some(o) = config_json.as_object_mut() {
        for k in ["id2label", "label2id", "problem_type"] {
            o.remove(k);
        }
    }
    let config = EncoderConfig::from_json(&config_json.to_string(), &path)?;
    let (raw, source) = Weights::read_dir(dir)?;
    let prefix = format!("{}.", arch.base_prefix());
    let tensors: HashMap<String, Tensor> = raw
        .into_iter()
        .filter(|(k, _)| !is_head_key(k))
        .map(|(k, t)| (k.strip_prefix(&prefix).map(str::to_string).unwrap_or(k), t))
        .collect();
    let w = Weights::from_tensors(tensors, source, true)?;
    let (model, _) = Model::from_weights(config, w, dir)?;
    Ok((model, config_json))
}

/// A trained checkpoint to run forward only (evaluation, a distillation teacher): f32, not
/// trainable, with the head `needed` present.
pub fn load_frozen(dir: &Path, needed: Option<HeadKind>) -> Result<Model> {
    let (mut model, report) = Model::load(dir, false)?;
    if let Some(kind) = needed {
        if !model.has_head(kind) {
            // The missing-head error names the folder and the head already.
            return Err(TrainError::Config(format!(
                "{}{}",
                model.missing_head(kind),
                report
                    .missing_head
                    .map_or(String::new(), |(_, key)| format!("; missing {key}"))
            )));
        }
    }
    model.set_precision(berth_model::Precision::F32)?;
    Ok(model)
}

/// The layers a student of `n` layers takes from a teacher of `total`: layer `⌊i · total / n⌋`
/// for student layer `i`, evenly spaced from the first (DistilBERT took 0, 2, …, 10 of
/// BERT-base's 12; all-MiniLM-L6-v2's 6 give 0, 2, 4 for 3).
pub fn student_layers(total: usize, n: usize) -> Vec<usize> {
    (0..n).map(|i| i * total / n).collect()
}

/// Writes a student of `n` layers of the checkpoint `src` into `dst` (which must not exist):
/// every weight outside the encoder layers unchanged, layer `student_layers(L, n)[i]` of
/// `src` as layer `i`, config.json with the new depth, and every other file of `src`
/// (tokenizer, sentence-transformers modules) copied. Returns the layers taken. Written to a
/// temporary folder and renamed, so `dst` is whole or absent.
pub fn write_student(src: &Path, dst: &Path, n: usize) -> Result<Vec<usize>> {
    let config_path = src.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let config = EncoderConfig::from_json(&text, &config_path)?;
    let total = config.num_layers;
    if n == 0 || n > total {
        return Err(TrainError::Config(format!(
            "--student-layers {n}: {} has {total} layers (take 1 to {total})",
            src.display()
        )));
    }
    let taken = student_layers(total, n);
    let (raw, _) = Weights::read_dir(src)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(raw.len());
    for (k, t) in raw {
        // `...layer.{k}.rest` (BERT, RoBERTa, ELECTRA: encoder.layer; DistilBERT:
        // transformer.layer) becomes `...layer.{i}.rest` for the student's layer i.
        let Some(at) = k
            .find("layer.")
            .filter(|&a| k[..a].ends_with("encoder.") || k[..a].ends_with("transformer."))
        else {
            tensors.insert(k, t);
            continue;
        };
        let rest = &k[at + "layer.".len()..];
        let (num, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let Ok(layer) = num.parse::<usize>() else {
            tensors.insert(k, t);
            continue;
        };
        if let Some(i) = taken.iter().position(|&l| l == layer) {
            tensors.insert(format!("{}layer.{i}.{tail}", &k[..at]), t);
        }
    }
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
    let depth_key = if json.get("n_layers").is_some() {
        "n_layers"
    } else {
        "num_hidden_layers"
    };
    json[depth_key] = n.into();
    let tmp = dst.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    copy_tree(src, &tmp)?;
    let weights = tmp.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).map_err(|e| TrainError::Checkpoint {
        path: weights.clone(),
        message: e.to_string(),
    })?;
    let cfg = tmp.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::to_string_pretty(&json).expect("JSON serialises"),
    )
    .map_err(io(&cfg))?;
    std::fs::rename(&tmp, dst).map_err(io(dst))?;
    Ok(taken)
}

/// Whether `name` is a checkpoint weights file (single, sharded, index or PyTorch pickle).
fn is_weights_file(name: &str) -> bool {
    matches!(
        name,
        "model.safetensors" | "model.safetensors.index.json" | "pytorch_model.bin"
    ) || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// Copies the regular files of `src` (recursively) into the new folder `dst`, except the
/// weights: the student's are written anew.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for e in std::fs::read_dir(src).map_err(io(src))? {
        let e = e.map_err(io(src))?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let name = e.file_name().to_string_lossy().into_owned();
        if from.is_dir() {
            copy_tree(&from, &to)?;
        } else if from.is_file() && !is_weights_file(&name) {
            std::fs::copy(&from, &to).map_err(io(&from))?;
        }
    }
    Ok(())
}

/// How a new encoder's (learned, absolute) position embeddings start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum PositionInit {
    /// Normal with `initializer_range`, as transformers initialises them.
    Normal,
    /// The original Transformer's sinusoids (sin at even, cos at odd dimensions, wavelengths
    /// up to 10,000 · 2π), scaled to the root-mean-square of the normal init. Still learned
    /// weights of the same shape: the checkpoint is an ordinary BERT.
    Sinusoidal,
}

/// `[n, h]` sinusoidal position table with root-mean-square `rms`.
fn sinusoidal_positions(n: usize, h: usize, rms: f64) -> Result<Tensor> {
    let scale = rms * std::f64::consts::SQRT_2;
    let rates: Vec<f64> = (0..h)
        .map(|d| 10_000f64.powf(-((d / 2 * 2) as f64) / h as f64))
        .collect();
    let data: Vec<f32> = (0..n)
        .flat_map(|pos| {
            rates.iter().enumerate().map(move |(d, rate)| {
                let angle = pos as f64 * rate;
                (scale * if d % 2 == 0 { angle.sin() } else { angle.cos() }) as f32
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (n, h), &Device::Cpu)?)
}

/// Creates `dir` with `config` as its config.json, parsed back as berth reads it.
fn write_new_config(
    dir: &Path,
    config: &serde_json::Value,
) -> Result<(EncoderConfig, std::path::PathBuf)> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg_path = dir.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(config).expect("JSON serialises"),
    )
    .map_err(io(&cfg_path))?;
    Ok((EncoderConfig::from_file(&cfg_path)?, cfg_path))
}

/// Writes a new model's weights and the tokenizer files of `tokenizer_dir` into `dir`.
fn save_new_weights(dir: &Path, t: &HashMap<String, Tensor>, tokenizer_dir: &Path) -> Result<()> {
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(t, &weights).map_err(|e| TrainError::Checkpoint {
        path: weights.clone(),
        message: e.to_string(),
    })?;
    crate::checkpoint::copy_tokenizer_files(tokenizer_dir, dir)
}

/// Writes a randomly initialised base encoder (`BertModel` / `RobertaModel`, as transformers
/// initialises one: weights normal with `initializer_range`, biases zero, LayerNorm one and
/// zero, the padding row of the word embeddings zero) with `config` and the tokenizer files
/// of `tokenizer_dir` into `dir`, to pretrain from scratch.
pub fn write_random_encoder(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer_dir: &Path,
    seed: u64,
    positions: PositionInit,
) -> Result<()> {
    let (cfg, _) = write_new_config(dir, config)?;
    let (h, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let init_range = config["initializer_range"].as_f64().unwrap_or(0.02);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut normal_tensor = |shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (normal(&mut rng) * init_range) as f32)
            .collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    };
    let fill = |n: usize, value: f32| Tensor::from_vec(vec![value; n], n, &Device::Cpu);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut words = normal_tensor(&[v, h])?;
    if let Some(pad) = config["pad_token_id"]
        .as_u64()
        .filter(|&p| (p as usize) < v)
    {
        let mut rows = words.to_vec2::<f32>()?;
        rows[pad as usize].fill(0.0);
        words = Tensor::new(rows, &Device::Cpu)?;
    }
    t.insert("embeddings.word_embeddings.weight".into(), words);
    // Drawn either way, so the other weights are the same draw whatever the position init.
    let normal_positions = normal_tensor(&[cfg.max_position_embeddings, h])?;
    t.insert(
        "embeddings.position_embeddings.weight".into(),
        match positions {
            PositionInit::Normal => normal_positions,
            PositionInit::Sinusoidal => {
                sinusoidal_positions(cfg.max_position_embeddings, h, init_range)?
            }
        },
    );
    if cfg.type_vocab_size > 0 {
        t.insert(
            "embeddings.token_type_embeddings.weight".into(),
            normal_tensor(&[cfg.type_vocab_size, h])?,
        );
    }
    t.insert("embeddings.LayerNorm.weight".into(), fill(h, 1.0)?);
    t.insert("embeddings.LayerNorm.bias".into(), fill(h, 0.0)?);
    for i in 0..cfg.num_layers {
        let p = format!("encoder.layer.{i}");
        for (name, o, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", f, h),
            ("output.dense", h, f),
        ] {
            t.insert(format!("{p}.{name}.weight"), normal_tensor(&[o, inp])?);
            t.insert(format!("{p}.{name}.bias"), fill(o, 0.0)?);
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            t.insert(format!("{p}.{ln}.weight"), fill(h, 1.0)?);
            t.insert(format!("{p}.{ln}.bias"), fill(h, 0.0)?);
        }
    }
    save_new_weights(dir, &t, tokenizer_dir)
}

/// Writes a randomly initialised `ModernBertModel` with `config` (a ModernBERT config.json)
/// and the tokenizer files of `tokenizer_dir` into `dir`, initialised as transformers
/// initialises one: truncated normals (cut at `initializer_cutoff_factor` standard
/// deviations) with `initializer_range` for the token embeddings and the input projections
/// (`Wqkv`, `Wi`), `initializer_range / sqrt(2 · layers)` for the output projections (`Wo`),
/// norms one, biases (where the config has them) zero. The masked-LM head is added by
/// [`load_for_task`] (the prediction head at the output scale, the decoder tied).
pub fn write_random_modernbert(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer_dir: &Path,
    seed: u64,
) -> Result<()> {
    let (cfg, cfg_path) = write_new_config(dir, config)?;
    let Some(m) = cfg.modern.clone() else {
        return Err(TrainError::Config(format!(
            "{}: not a ModernBERT config",
            cfg_path.display()
        )));
    };
    let (h, i, v, layers) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_layers,
    );
    let init_range = config["initializer_range"].as_f64().unwrap_or(0.02);
    let out_std = init_range / (2.0 * layers as f64).sqrt();
    let cutoff = cutoff_factor(config);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut draw = |name: String, shape: &[usize], std: f64| -> Result<()> {
        let n = shape.iter().product();
        let data = truncated_normal(&mut rng, n, std, cutoff);
        t.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    draw(
        "embeddings.tok_embeddings.weight".into(),
        &[v, h],
        init_range,
    )?;
    for k in 0..layers {
        let p = format!("layers.{k}");
        draw(format!("{p}.attn.Wqkv.weight"), &[3 * h, h], init_range)?;
        draw(format!("{p}.attn.Wo.weight"), &[h, h], out_std)?;
        draw(format!("{p}.mlp.Wi.weight"), &[2 * i, h], init_range)?;
        draw(format!("{p}.mlp.Wo.weight"), &[h, i], out_std)?;
    }
    let fill = |n: usize, value: f32| Tensor::from_vec(vec![value; n], n, &Device::Cpu);
    let mut norms = vec!["embeddings.norm".to_string(), "final_norm".into()];
    for k in 0..layers {
        if k > 0 {
            norms.push(format!("layers.{k}.attn_norm"));
        }
        norms.push(format!("layers.{k}.mlp_norm"));
    }
    for n in norms {
        t.insert(format!("{n}.weight"), fill(h, 1.0)?);
        if m.norm_bias {
            t.insert(format!("{n}.bias"), fill(h, 0.0)?);
        }
    }
    for k in 0..layers {
        let p = format!("layers.{k}");
        let biases = [
            (m.attention_bias, "attn.Wqkv", 3 * h),
            (m.attention_bias, "attn.Wo", h),
            (m.mlp_bias, "mlp.Wi", 2 * i),
            (m.mlp_bias, "mlp.Wo", h),
        ];
        for (on, name, n) in biases {
            if on {
                t.insert(format!("{p}.{name}.bias"), fill(n, 0.0)?);
            }
        }
    }
    save_new_weights(dir, &t, tokenizer_dir)?;
    // ModernBERT takes no token type ids: tokenizers loaded by transformers and
    // sentence-transformers must not produce them; its context is the position limit.
    let tc_path = dir.join("tokenizer_config.json");
    let mut tc: serde_json::Value = match std::fs::read_to_string(&tc_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: tc_path.clone(),
            message: e.to_string(),
        })?,
        Err(_) => serde_json::json!({}),
    };
    if let Some(o) = tc.as_object_mut() {
        o.insert(
            "model_input_names".into(),
            serde_json::json!(["input_ids", "attention_mask"]),
        );
        o.insert(
            "model_max_length".into(),
            cfg.max_position_embeddings.into(),
        );
    }
    std::fs::write(
        &tc_path,
        serde_json::to_string_pretty(&tc).expect("JSON serialises"),
    )
    .map_err(io(&tc_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new ModernBERT and the heads fine-tuning adds start as transformers 4.57 starts
    /// them. Reference statistics from transformers (ModernBertForMaskedLM /
    /// ModernBertForSequenceClassification, hidden 64, 4 layers, initializer_range 0.02,
    /// cutoff 2, torch.manual_seed(0)): token embeddings and Wqkv / Wi std 0.0176, max 0.04;
    /// Wo std 0.0062, max 0.0141; head.dense std 0.0061-0.0063; classifier std 0.107
    /// (hidden^-1/2 cut at 2 sigma); norms one; no biases.
    #[test]
    fn new_modernbert_weights_follow_transformers_init() {
        let tmp = tempfile::tempdir().unwrap();
        let tokenizer =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vocab/wordpiece");
        let config = serde_json::json!({
            "architectures": ["ModernBertModel"], "model_type": "modernbert", "vocab_size": 2000,
            "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
            "intermediate_size": 96, "initializer_range": 0.02, "initializer_cutoff_factor": 2.0,
            "pad_token_id": 0, "local_attention": 8, "max_position_embeddings": 64,
        });
        let dir = tmp.path().join("m");
        write_random_modernbert(&dir, &config, &tokenizer, 3).unwrap();
        let t =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        assert!(t.keys().all(|k| !k.ends_with(".bias")), "{:?}", t.keys());
        assert!(!t.contains_key("layers.0.attn_norm.weight"));
        let stats = |t: &Tensor| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            (var.sqrt(), max)
        };
        let close = |name: &str, t: &Tensor, std: f64, max: f64| {
            let (s, m) = stats(t);
            assert!((s - std).abs() <= 0.06 * std, "{name}: std {s} vs {std}");
            assert!(
                m <= max * 1.0001 && m > 0.9 * max,
                "{name}: max {m} vs {max}"
            );
        };
        close(
            "tok_embeddings",
            &t["embeddings.tok_embeddings.weight"],
            0.0176,
            0.04,
        );
        for k in 0..4 {
            close(
                "Wqkv",
                &t[&format!("layers.{k}.attn.Wqkv.weight")],
                0.0176,
                0.04,
            );
            close("Wi", &t[&format!("layers.{k}.mlp.Wi.weight")], 0.0176, 0.04);
            close(
                "attn Wo",
                &t[&format!("layers.{k}.attn.Wo.weight")],
                0.0062,
                0.014142,
            );
            close(
                "mlp Wo",
                &t[&format!("layers.{k}.mlp.Wo.weight")],
                0.0062,
                0.014142,
            );
        }
        for (k, v) in &t {
            if k.ends_with("norm.weight") {
                assert_eq!(stats(v), (0.0, 1.0), "{k}");
            }
        }
        let head = TaskHead {
            kind: HeadKind::SequenceClassification,
            labels: vec!["a".into(), "b".into()],
            problem_type: None,
            sentence_order: false,
        };
        let (model, _) = load_for_task(&dir, &head, 5).unwrap();
        let get = |name: &str| {
            model
                .params
                .iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("no parameter {name}"))
                .var
                .as_tensor()
                .clone()
        };
        close("head.dense", &get("head.dense.weight"), 0.0062, 0.014142);
        close("classifier", &get("classifier.weight"), 0.110, 0.25);
        assert_eq!(stats(&get("head.norm.weight")), (0.0, 1.0));
        assert_eq!(stats(&get("classifier.bias")), (0.0, 0.0));
    }

    /// Label maps transformers reads right: a masked-LM config carries none (an empty map
    /// would read as zero labels), a QA config two (its classifier's width).
    #[test]
    fn task_configs_carry_the_label_count_transformers_needs() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("config.json"),
            r#"{"model_type":"bert","vocab_size":10,"hidden_size":8,"num_attention_heads":2,"id2label":{},"label2id":{}}"#,
        )
        .unwrap();
        let head = |kind| TaskHead {
            kind,
            labels: Vec::new(),
            problem_type: None,
            sentence_order: false,
        };
        let mlm = task_config(tmp.path(), &head(HeadKind::MaskedLm)).unwrap();
        assert!(
            mlm.get("id2label").is_none() && mlm.get("label2id").is_none(),
            "{mlm}"
        );
        let qa = task_config(tmp.path(), &head(HeadKind::QuestionAnswering)).unwrap();
        assert_eq!(qa["id2label"].as_object().unwrap().len(), 2, "{qa}");
        assert_eq!(qa["architectures"][0], "BertForQuestionAnswering");
    }

    #[test]
    fn students_take_evenly_spaced_layers_from_the_first() {
        assert_eq!(student_layers(12, 6), [0, 2, 4, 6, 8, 10]);
        assert_eq!(student_layers(6, 3), [0, 2, 4]);
        assert_eq!(student_layers(6, 6), [0, 1, 2, 3, 4, 5]);
        assert_eq!(student_layers(2, 1), [0]);
        assert_eq!(student_layers(12, 4), [0, 3, 6, 9]);
    }

    /// The sinusoidal table: every (sin, cos) dimension pair turns by a fixed angle from one
    /// position to the next (so an offset is the same linear map at every position) on a
    /// circle of fixed radius, the first pair at one radian per position and later pairs
    /// slower; the table's root-mean-square is the initializer range, as the normal init's.
    #[test]
    fn sinusoidal_positions_rotate_at_fixed_rates_with_the_normal_scale() {
        let tmp = tempfile::tempdir().unwrap();
        let tokenizer =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vocab/wordpiece");
        let config = serde_json::json!({
            "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 2000,
            "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 64, "type_vocab_size": 2,
            "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        });
        let table = |kind, dir: &str| {
            let dir = tmp.path().join(dir);
            write_random_encoder(&dir, &config, &tokenizer, 7, kind).unwrap();
            let t = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
                .unwrap();
            let get = |k: &str| t[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = get("encoder.layer.0.attention.self.query.weight");
            (
                t["embeddings.position_embeddings.weight"]
                    .to_vec2::<f32>()
                    .unwrap(),
                q,
            )
        };
        let ((sin, q_sin), (normal, q_normal)) = (
            table(PositionInit::Sinusoidal, "s"),
            table(PositionInit::Normal, "n"),
        );
        let rms = |t: &Vec<Vec<f32>>| {
            let n = (t.len() * t[0].len()) as f64;
            (t.iter().flatten().map(|&v| (v as f64).powi(2)).sum::<f64>() / n).sqrt()
        };
        assert!(
            (rms(&normal) - 0.02).abs() < 0.002,
            "normal rms {}",
            rms(&normal)
        );
        assert!(
            (rms(&sin) - 0.02).abs() < 0.001,
            "sinusoidal rms {}",
            rms(&sin)
        );
        let radius = 0.02 * std::f64::consts::SQRT_2;
        let mut last_step = f64::INFINITY;
        for pair in 0..8 {
            let angle = |p: usize| (sin[p][2 * pair] as f64).atan2(sin[p][2 * pair + 1] as f64);
            let step = (angle(1) - angle(0)).rem_euclid(std::f64::consts::TAU);
            for p in 0..63 {
                let (s, c) = (sin[p][2 * pair] as f64, sin[p][2 * pair + 1] as f64);
                assert!(
                    ((s * s + c * c).sqrt() - radius).abs() < 1e-6,
                    "pair {pair} pos {p}"
                );
                let d = (angle(p + 1) - angle(p)).rem_euclid(std::f64::consts::TAU);
                assert!(
                    (d - step).abs() < 1e-4,
                    "pair {pair} pos {p}: {d} vs {step}"
                );
            }
            assert!(
                step < last_step,
                "pair {pair} turns at {step}, not slower than {last_step}"
            );
            last_step = step;
        }
        assert!((sin[1][0] as f64 / radius - 1f64.sin()).abs() < 1e-6);
        // Only the position table differs: the other weights are the same draw either way.
        assert_eq!(q_sin, q_normal);
    }
}
