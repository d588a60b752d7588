//! config.json, as transformers writes it, for each supported architecture, and the
//! normalised [`EncoderConfig`] the model code runs on.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_kernels::Activation;
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `bert`.
    Bert,
    /// `roberta`, `xlm-roberta`, `camembert`: BERT with positions offset past the pad id.
    Roberta,
    /// `distilbert`: its own weight names, no token types, no pooler.
    DistilBert,
    /// `electra`: BERT's encoder under `electra.`, no pooler, ELECTRA's heads (replaced-token
    /// detection, the generator's masked-LM, a GELU classification head). Only checkpoints
    /// whose `embedding_size` equals `hidden_size` (no `embeddings_project`), as ELECTRA
    /// base and large and berth's own `--objective rtd` runs.
    Electra,
    /// `modernbert`: pre-norm layers with rotary positions, GeGLU feed-forward and
    /// alternating global / sliding-window attention; no position or token-type table.
    ModernBert,
}

impl Arch {
    /// The prefix transformers puts before base-model weights in a model with a head.
    pub fn base_prefix(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::Roberta => "roberta",
            Arch::DistilBert => "distilbert",
            Arch::Electra => "electra",
            Arch::ModernBert => "model",
        }
    }
}

/// config.json of ModernBERT, in the form published checkpoints carry
/// (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`) or the one
/// transformers 5 writes (`layer_types`, `rope_parameters`).
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d22")]
    pub num_hidden_layers: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d1152")]
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_activation: String,
    #[serde(default = "d8192")]
    pub max_position_embeddings: usize,
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "yes")]
    pub decoder_bias: bool,
    #[serde(default)]
    pub classifier_bias: bool,
    #[serde(default = "gelu")]
    pub classifier_activation: String,
    #[serde(default = "cls")]
    pub classifier_pooling: String,
    #[serde(default = "d128")]
    pub local_attention: usize,
    #[serde(default)]
    pub global_attn_every_n_layers: Option<usize>,
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub rope_parameters: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub attention_dropout: Option<f64>,
    #[serde(default)]
    pub mlp_dropout: Option<f64>,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    #[serde(default)]
    pub embedding_dropout: Option<f64>,
}

/// What ModernBERT adds to [`EncoderConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModernSettings {
    /// Per layer: global attention (else a sliding window).
    pub global: Vec<bool>,
    /// Rotary base of the global layers.
    pub global_rope_theta: f64,
    /// Rotary base of the local layers.
    pub local_rope_theta: f64,
    /// Tokens on either side a local layer attends to (`local_attention / 2`).
    pub half_window: usize,
    /// Whether the LayerNorms have a bias.
    pub norm_bias: bool,
    /// Whether Wqkv and the attention output have biases.
    pub attention_bias: bool,
    /// Whether Wi and the feed-forward output have biases.
    pub mlp_bias: bool,
    /// Whether the masked-LM decoder has a bias.
    pub decoder_bias: bool,
    /// Whether the heads' dense layer has a bias.
    pub classifier_bias: bool,
    /// The heads' activation.
    pub classifier_activation: Activation,
    /// How the sequence classifier pools: `cls` (first token) or `mean`.
    pub classifier_mean_pooling: bool,
    /// Dropout on the embeddings' output (training).
    pub embedding_dropout: f64,
}

/// config.json of BERT, RoBERTa, XLM-R and CamemBERT (one schema in transformers).
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct BertConfig {
    pub vocab_size: usize,
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "d512")]
    pub max_position_embeddings: usize,
    #[serde(default = "d2")]
    pub type_vocab_size: usize,
    #[serde(default = "eps12")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub hidden_dropout_prob: Option<f64>,
    #[serde(default)]
    pub attention_probs_dropout_prob: Option<f64>,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// ELECTRA: the embedding width (transformers' default 128 when absent).
    #[serde(default)]
    pub embedding_size: Option<usize>,
}

/// config.json of DistilBERT.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct DistilBertConfig {
    pub vocab_size: usize,
    #[serde(default = "d768")]
    pub dim: usize,
    #[serde(default = "d6")]
    pub n_layers: usize,
    #[serde(default = "d12")]
    pub n_heads: usize,
    #[serde(default = "d3072")]
    pub hidden_dim: usize,
    #[serde(default = "gelu")]
    pub activation: String,
    #[serde(default = "d512")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub dropout: Option<f64>,
    #[serde(default)]
    pub attention_dropout: Option<f64>,
    #[serde(default)]
    pub seq_classif_dropout: Option<f64>,
    #[serde(default)]
    pub qa_dropout: Option<f64>,
}

/// Fields common to all architectures (head labels, tying).
#[derive(Debug, Clone, Deserialize, Default)]
struct CommonConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    id2label: BTreeMap<String, String>,
    #[serde(default)]
    problem_type: Option<String>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
}

fn d2() -> usize {
    2
}
fn d22() -> usize {
    22
}
fn d128() -> usize {
    128
}
fn d1152() -> usize {
    1152
}
fn d8192() -> usize {
    8192
}
fn eps5() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn cls() -> String {
    "cls".into()
}
fn d6() -> usize {
    6
}
fn d12() -> usize {
    12
}
fn d512() -> usize {
    512
}
fn d768() -> usize {
    768
}
fn d3072() -> usize {
    3072
}
fn eps12() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

/// What the model code needs, whatever the architecture.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// The config.json this came from.
    pub path: PathBuf,
    /// Family.
    pub arch: Arch,
    /// `model_type` as written.
    pub model_type: String,
    /// `architectures` as written (decides the head and the weight prefix).
    pub architectures: Vec<String>,
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Hidden size `H`.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Attention heads `nh`.
    pub num_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Rows of the position table.
    pub max_position_embeddings: usize,
    /// Added to every position id (RoBERTa: `pad_token_id + 1`).
    pub position_offset: usize,
    /// Rows of the token-type table (0 for DistilBERT).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Label names by class index, from `id2label`.
    pub id2label: Vec<String>,
    /// `problem_type` (single_label_classification, multi_label_classification, regression).
    pub problem_type: Option<String>,
    /// Whether the MLM decoder shares the word-embedding matrix.
    pub tie_word_embeddings: bool,
    /// Training dropout rates, as transformers applies them.
    pub dropout: DropoutRates,
    /// ModernBERT's settings (`None` for the BERT family).
    pub modern: Option<ModernSettings>,
}

/// Dropout rates of one architecture (used only in training).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DropoutRates {
    /// Embeddings output and each residual branch (DistilBERT: embeddings and feed-forward).
    pub hidden: f64,
    /// Attention probabilities.
    pub attention: f64,
    /// Before the sequence-classification output layers.
    pub sequence_classifier: f64,
    /// Before the token classifier.
    pub token_classifier: f64,
    /// Before the QA outputs (BERT and RoBERTa have none).
    pub question_answering: f64,
}

/// Largest vocabulary accepted (published multilingual encoders stay under 300,000).
pub const MAX_VOCAB: usize = 10_000_000;
/// Largest hidden size accepted (the largest published encoders use 4,096).
pub const MAX_HIDDEN: usize = 65_536;
/// Most layers accepted.
pub const MAX_LAYERS: usize = 1_024;
/// Largest feed-forward width accepted.
pub const MAX_INTERMEDIATE: usize = 262_144;
/// Longest position table accepted.
pub const MAX_POSITIONS: usize = 1 << 20;

impl EncoderConfig {
    /// Reads and validates `path` (a config.json).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = berth_text::limits::read_text(path, berth_text::limits::MAX_JSON_BYTES)
            .map_err(|e| ModelError::Io {
                path: path.into(),
                error: e.into(),
            })?;
        Self::from_json(&text, path)
    }

    /// Parses config.json text; `path` is used in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| ModelError::Config {
            path: path.into(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let common: CommonConfig =
            serde_json::from_value(value.clone()).map_err(|e| bad(e.to_string()))?;
        let model_type = common
            .model_type
            .clone()
            .ok_or_else(|| bad("no \"model_type\" field".into()))?;
        let arch = match model_type.as_str() {
            "bert" => Arch::Bert,
            "roberta" | "xlm-roberta" | "camembert" => Arch::Roberta,
            "distilbert" => Arch::DistilBert,
            "electra" => Arch::Electra,
            "modernbert" => Arch::ModernBert,
            other => {
                return Err(ModelError::UnknownModelType {
                    path: path.into(),
                    model_type: other.into(),
                })
            }
        };
        let act = |name: &str| {
            Activation::from_hidden_act(name)
                .ok_or_else(|| bad(format!("unsupported activation {name:?}")))
        };
        let mut id2label: Vec<(usize, String)> = Vec::new();
        for (k, v) in &common.id2label {
            let i = k
                .parse()
                .map_err(|_| bad(format!("id2label key {k:?} is not an integer")))?;
            id2label.push((i, v.clone()));
        }
        id2label.sort();
        if id2label.iter().enumerate().any(|(i, (k, _))| i != *k) {
            return Err(bad("id2label keys are not 0..n".into()));
        }
        let mut cfg = EncoderConfig {
            path: path.into(),
            arch,
            model_type,
            architectures: common.architectures,
            vocab_size: 0,
            hidden_size: 0,
            num_layers: 0,
            num_heads: 0,
            intermediate_size: 0,
            activation: Activation::Gelu,
            max_position_embeddings: 0,
            position_offset: 0,
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
            id2label: id2label.into_iter().map(|(_, v)| v).collect(),
            problem_type: common.problem_type,
            tie_word_embeddings: common.tie_word_embeddings.unwrap_or(true),
            dropout: DropoutRates::default(),
            modern: None,
        };
        if arch == Arch::ModernBert {
            let c: ModernBertConfig =
                serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            cfg.vocab_size = c.vocab_size;
            cfg.hidden_size = c.hidden_size;
            cfg.num_layers = c.num_hidden_layers;
            cfg.num_heads = c.num_attention_heads;
            cfg.intermediate_size = c.intermediate_size;
            cfg.activation = act(&c.hidden_activation)?;
            cfg.max_position_embeddings = c.max_position_embeddings;
            cfg.layer_norm_eps = c.norm_eps;
            cfg.dropout = DropoutRates {
                hidden: c.mlp_dropout.unwrap_or(0.0),
                attention: c.attention_dropout.unwrap_or(0.0),
                sequence_classifier: c.classifier_dropout.unwrap_or(0.0),
                token_classifier: c.classifier_dropout.unwrap_or(0.0),
                question_answering: c.classifier_dropout.unwrap_or(0.0),
            };
            if let Some(p) = c.pad_token_id.filter(|&p| p as usize >= c.vocab_size) {
                return Err(bad(format!(
                    "pad_token_id {p} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
            cfg.modern = Some(modern_settings(&c).map_err(bad)?);
        } else if arch == Arch::DistilBert {
            let c: DistilBertConfig =
                serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            cfg.vocab_size = c.vocab_size;
            cfg.hidden_size = c.dim;
            cfg.num_layers = c.n_layers;
            cfg.num_heads = c.n_heads;
            cfg.intermediate_size = c.hidden_dim;
            cfg.activation = act(&c.activation)?;
            cfg.max_position_embeddings = c.max_position_embeddings;
            let hidden = c.dropout.unwrap_or(0.1);
            cfg.dropout = DropoutRates {
                hidden,
                attention: c.attention_dropout.unwrap_or(0.1),
                sequence_classifier: c.seq_classif_dropout.unwrap_or(0.2),
                token_classifier: hidden,
                question_answering: c.qa_dropout.unwrap_or(0.1),
            };
        } else {
            let c: BertConfig = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            if let Some(p) = c
                .position_embedding_type
                .as_deref()
                .filter(|p| *p != "absolute")
            {
                return Err(bad(format!(
                    "position_embedding_type {p:?} is not supported (only \"absolute\")"
                )));
            }
            if arch == Arch::Electra {
                let e = c.embedding_size.unwrap_or(128);
                if e != c.hidden_size {
                    return Err(bad(format!(
                        "ELECTRA embedding_size {e} differs from hidden_size {}: checkpoints with an \
                         embeddings_project layer (ELECTRA-small) are not supported",
                        c.hidden_size
                    )));
                }
            }
            cfg.vocab_size = c.vocab_size;
            cfg.hidden_size = c.hidden_size;
            cfg.num_layers = c.num_hidden_layers;
            cfg.num_heads = c.num_attention_heads;
            cfg.intermediate_size = c.intermediate_size;
            cfg.activation = act(&c.hidden_act)?;
            cfg.max_position_embeddings = c.max_position_embeddings;
            cfg.type_vocab_size = c.type_vocab_size;
            cfg.layer_norm_eps = c.layer_norm_eps;
            let hidden = c.hidden_dropout_prob.unwrap_or(0.1);
            let classifier = c.classifier_dropout.unwrap_or(hidden);
            cfg.dropout = DropoutRates {
                hidden,
                attention: c.attention_probs_dropout_prob.unwrap_or(0.1),
                sequence_classifier: classifier,
                token_classifier: classifier,
                question_answering: 0.0,
            };
            if let Some(p) = c.pad_token_id.filter(|&p| p as usize >= c.vocab_size) {
                // transformers refuses it too (the embedding's padding_idx must be a row).
                return Err(bad(format!(
                    "pad_token_id {p} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
            if arch == Arch::Roberta {
                cfg.position_offset = c.pad_token_id.unwrap_or(1) as usize + 1;
            }
        }
        // Sizes beyond any published encoder are a typo or an attack: refuse them before
        // anything is allocated (a 1e9-wide layer would abort in the allocator).
        for (field, v, max) in [
            ("vocab_size", cfg.vocab_size, MAX_VOCAB),
            ("hidden_size", cfg.hidden_size, MAX_HIDDEN),
            ("num_hidden_layers", cfg.num_layers, MAX_LAYERS),
            ("intermediate_size", cfg.intermediate_size, MAX_INTERMEDIATE),
            (
                "max_position_embeddings",
                cfg.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ] {
            if v == 0 || v > max {
                return Err(bad(format!("{field} {v} is outside 1..={max}")));
            }
        }
        if cfg.type_vocab_size > 1024 {
            return Err(bad(format!(
                "type_vocab_size {} is outside 0..=1024",
                cfg.type_vocab_size
            )));
        }
        if !(cfg.layer_norm_eps.is_finite() && cfg.layer_norm_eps >= 0.0) {
            return Err(bad(format!(
                "layer_norm_eps {} is not a non-negative number",
                cfg.layer_norm_eps
            )));
        }
        if cfg.num_heads == 0 || cfg.hidden_size % cfg.num_heads != 0 {
            return Err(bad(format!(
                "hidden size {} is not a multiple of {} heads",
                cfg.hidden_size, cfg.num_heads
            )));
        }
        if cfg.max_position_embeddings <= cfg.position_offset {
            return Err(bad(
                "max_position_embeddings leaves no room past the position offset".into(),
            ));
        }
        Ok(cfg)
    }

    /// Parameters of the encoder and its embeddings (heads left out: at most a few more
    /// vocabulary-sized matrices), for memory estimates before anything is allocated.
    pub fn approx_parameters(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let positions = if self.modern.is_some() {
            0
        } else {
            self.max_position_embeddings
        };
        let embeddings = (self.vocab_size + positions + self.type_vocab_size) as u64 * h;
        let layer = 4 * h * h + 2 * h * i + 9 * h + i;
        embeddings + self.num_layers as u64 * layer
    }

    /// Longest sequence the position table allows.
    pub fn max_sequence_length(&self) -> usize {
        self.max_position_embeddings - self.position_offset
    }
}

/// ModernBERT's layer pattern and rotary bases from either config form; an error message
/// when they disagree with the layer count or name something unknown.
fn modern_settings(c: &ModernBertConfig) -> std::result::Result<ModernSettings, String> {
    let n = c.num_hidden_layers;
    let global: Vec<bool> = match &c.layer_types {
        Some(types) => {
            if types.len() != n {
                return Err(format!(
                    "layer_types lists {} layers, num_hidden_layers is {n}",
                    types.len()
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(true),
                    "sliding_attention" => Ok(false),
                    other => Err(format!(
                        "layer type {other:?} (expected full_attention or sliding_attention)"
                    )),
                })
                .collect::<std::result::Result<_, _>>()?
        }
        None => {
            let every = c.global_attn_every_n_layers.unwrap_or(3);
            if every == 0 {
                return Err("global_attn_every_n_layers is 0".into());
            }
            (0..n).map(|i| i % every == 0).collect()
        }
    };
    if let (Some(every), Some(_)) = (c.global_attn_every_n_layers, &c.layer_types) {
        let implied: Vec<bool> = (0..n).map(|i| every > 0 && i % every == 0).collect();
        if implied != global {
            return Err(format!(
                "layer_types and global_attn_every_n_layers {every} name different global layers"
            ));
        }
    }
    if global.iter().any(|g| !g) {
        if c.local_attention < 2 {
            return Err(format!(
                "local_attention {} leaves the sliding-window layers no window (at least 2)",
                c.local_attention
            ));
        }
        if c.local_attention > c.max_position_embeddings {
            return Err(format!(
                "local_attention {} is larger than the context of max_position_embeddings {}",
                c.local_attention, c.max_position_embeddings
            ));
        }
    }
    // transformers 5: rope_parameters.{full,sliding}_attention.rope_theta; earlier configs:
    // global_rope_theta / local_rope_theta (defaults 160,000 and 10,000).
    let theta = |kind: &str,
                 flat: Option<f64>,
                 default: f64,
                 used: bool|
     -> std::result::Result<f64, String> {
        let nested = c.rope_parameters.as_ref().and_then(|r| r.get(kind));
        if c.rope_parameters.is_some() && nested.is_none() && flat.is_none() && used {
            return Err(format!(
                "rope_parameters has no {kind:?} entry, and a layer uses {kind}"
            ));
        }
        if let Some(p) = nested {
            if let Some(t) = p.get("rope_type").and_then(|t| t.as_str()) {
                if t != "default" {
                    return Err(format!("rope_type {t:?} for {kind} (only \"default\")"));
                }
            }
        }
        let nested_theta = nested
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64());
        let value = nested_theta.or(flat).unwrap_or(default);
        if !(value.is_finite() && value > 0.0) {
            return Err(format!(
                "rope theta {value} for {kind} is not a positive number"
            ));
        }
        Ok(value)
    };
    // Both forms present must agree.
    for (kind, field, flat) in [
        ("full_attention", "global_rope_theta", c.global_rope_theta),
        ("sliding_attention", "local_rope_theta", c.local_rope_theta),
    ] {
        let nested = c
            .rope_parameters
            .as_ref()
            .and_then(|r| r.get(kind))
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64());
        if let (Some(a), Some(b)) = (nested, flat) {
            if a != b {
                return Err(format!(
                    "rope_parameters gives {kind} rope_theta {a}, {field} gives {b}"
                ));
            }
        }
    }
    let global_rope_theta = theta(
        "full_attention",
        c.global_rope_theta,
        160_000.0,
        global.iter().any(|&g| g),
    )?;
    let local_rope_theta = theta(
        "sliding_attention",
        c.local_rope_theta.or(c.global_rope_theta),
        10_000.0,
        global.iter().any(|&g| !g),
    )?;
    let classifier_mean_pooling = match c.classifier_pooling.as_str() {
        "cls" => false,
        "mean" => true,
        other => {
            return Err(format!(
                "classifier_pooling {other:?} (expected cls or mean)"
            ))
        }
    };
    if c.hidden_size % c.num_attention_heads.max(1) != 0
        || (c.hidden_size / c.num_attention_heads.max(1)) % 2 != 0
    {
        return Err(format!(
            "head size {} / {} is not an even integer (rotary embeddings rotate pairs)",
            c.hidden_size, c.num_attention_heads
        ));
    }
    Ok(ModernSettings {
        global,
        global_rope_theta,
        local_rope_theta,
        half_window: c.local_attention / 2,
        norm_bias: c.norm_bias,
        attention_bias: c.attention_bias,
        mlp_bias: c.mlp_bias,
        decoder_bias: c.decoder_bias,
        classifier_bias: c.classifier_bias,
        classifier_activation: Activation::from_hidden_act(&c.classifier_activation)
            .ok_or_else(|| format!("unsupported activation {:?}", c.classifier_activation))?,
        classifier_mean_pooling,
        embedding_dropout: c.embedding_dropout.unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<EncoderConfig> {
        EncoderConfig::from_json(s, Path::new("config.json"))
    }

    #[test]
    fn roberta_offsets_positions_past_pad() {
        let c = parse(r#"{"model_type":"xlm-roberta","vocab_size":10,"hidden_size":8,"num_attention_heads":2,"max_position_embeddings":514,"pad_token_id":1,"type_vocab_size":1}"#).unwrap();
        assert_eq!(
            (c.arch, c.position_offset, c.max_sequence_length()),
            (Arch::Roberta, 2, 512)
        );
    }

    #[test]
    fn errors_name_the_file_and_problem() {
        let e = parse(r#"{"model_type":"gpt2","vocab_size":10}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json") && e.contains("gpt2"), "{e}");
        let e = parse("{not json").unwrap_err().to_string();
        assert!(e.contains("config.json: invalid config"), "{e}");
        let e = parse(r#"{"model_type":"bert","vocab_size":10,"hidden_act":"mish"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mish"), "{e}");
        let e = parse(r#"{"model_type":"bert"}"#).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
        // ELECTRA-small's embeddings_project (embedding_size 128, hidden 256) is refused;
        // equal widths load, and a missing embedding_size means transformers' 128.
        let small = r#"{"model_type":"electra","vocab_size":10,"hidden_size":256,"num_attention_heads":4,"embedding_size":128}"#;
        let e = parse(small).unwrap_err().to_string();
        assert!(e.contains("embeddings_project") && e.contains("128"), "{e}");
        let c = parse(r#"{"model_type":"electra","vocab_size":10,"hidden_size":256,"num_attention_heads":4,"embedding_size":256}"#).unwrap();
        assert_eq!((c.arch, c.position_offset), (Arch::Electra, 0));
        assert!(parse(
            r#"{"model_type":"electra","vocab_size":10,"hidden_size":256,"num_attention_heads":4}"#
        )
        .is_err());
    }

    #[test]
    fn distilbert_fields_map() {
        let c = parse(r#"{"model_type":"distilbert","vocab_size":10,"dim":8,"n_heads":2,"n_layers":3,"hidden_dim":16,"activation":"gelu","id2label":{"1":"b","0":"a"}}"#).unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_layers,
                c.intermediate_size,
                c.type_vocab_size
            ),
            (8, 3, 16, 0)
        );
        assert_eq!(c.id2label, ["a", "b"]);
    }
}
