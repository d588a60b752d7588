//! `berth pretrain`: masked-language-model pretraining from scratch (a new BERT or RoBERTa
//! of the given size on a trained vocabulary) or continued from a checkpoint, or ELECTRA's
//! replaced-token detection (`--objective rtd`).
use std::path::PathBuf;

use anyhow::Context;
use berth_train::config::RunConfig;
use berth_train::init::PositionInit;
use berth_train::objective::DataConfig;
use berth_train::objectives::mlm::MlmConfig;
use berth_train::objectives::rtd::{RtdConfig, GENERATOR_DIR};
use berth_train::objectives::{TaskConfig, TaskKind};
use berth_train::pretrain::SentenceObjective;
use clap::{Args, ValueEnum};

use crate::resolve;
use crate::train_args::{DistillArgs, LoopArgs, LoopDefaults};

/// `--objective` values.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ObjectiveArg {
    /// Masked-LM only (RoBERTa's recipe).
    Mlm,
    /// Masked-LM + next-sentence prediction (BERT's recipe; BERT only).
    Nsp,
    /// Masked-LM + sentence-order prediction (ALBERT's; BERT only).
    Sop,
    /// Replaced-token detection (ELECTRA): a small generator (masked-LM, sharing the
    /// model's embeddings) fills the masked positions with sampled tokens and the model
    /// learns to tell replaced tokens from originals at every position. Checkpoints are
    /// `ElectraForPreTraining`, with the generator (`ElectraForMaskedLM`) in `generator/`.
    Rtd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ArchArg {
    Bert,
    Roberta,
    /// ModernBERT: pre-norm layers without biases, rotary positions, GeGLU feed-forward,
    /// attention global every third layer and within a 128-token window otherwise, no
    /// dropout (its recipe); 8,192 positions.
    Modernbert,
}

/// Arguments of `berth pretrain`.
#[derive(Args)]
pub struct PretrainArgs {
    /// Tokenizer folder (from `berth tokenizer train`) for a model trained from scratch.
    #[arg(long, required_unless_present = "from")]
    tokenizer: Option<PathBuf>,
    /// Continue pretraining this checkpoint (its tokenizer; a missing MLM head is created).
    #[arg(long, conflicts_with_all = ["tokenizer", "layers", "hidden", "heads", "intermediate", "generator_layers", "generator_intermediate"])]
    from: Option<String>,
    /// Corpus: a folder from `berth data prepare` (its held-out split is the dev set), or
    /// text / gzip files or folders (one paragraph per line, blank line between documents).
    #[arg(long)]
    data: PathBuf,
    /// Held-out corpus; without it a seeded --val-fraction of the sequences is held out.
    #[arg(long)]
    dev: Option<PathBuf>,
    /// Held-out share of the sequences of a text corpus (default 0.02; a prepared folder
    /// brings its own).
    #[arg(long, conflicts_with = "dev")]
    val_fraction: Option<f64>,
    /// Run directory.
    #[arg(long)]
    output: PathBuf,
    /// Architecture of a new model: BERT (WordPiece, token types), RoBERTa (byte-level
    /// BPE, no token types) or ModernBERT (any tokenizer; rotary positions, local / global
    /// attention).
    #[arg(long, value_enum, default_value_t = ArchArg::Bert)]
    arch: ArchArg,
    /// Encoder layers of a new model (default 4): cost grows linearly with depth.
    #[arg(long)]
    layers: Option<usize>,
    /// Hidden size of a new model (default 256): cost grows about quadratically with width.
    #[arg(long)]
    hidden: Option<usize>,
    /// Attention heads (default hidden / 64, at least 1); must divide --hidden.
    #[arg(long)]
    heads: Option<usize>,
    /// Feed-forward width (default 4 x hidden; ModernBERT: 3/2 x hidden, each of GeGLU's
    /// two halves), most of a layer's parameters and time.
    #[arg(long)]
    intermediate: Option<usize>,
    /// How a new model's position embeddings start (from scratch only).
    #[arg(long, value_enum, default_value_t = PositionInit::Normal, conflicts_with = "from")]
    position_init: PositionInit,
    /// Fraction of tokens masked (80 % mask token, 10 % random, 10 % kept).
    #[arg(long, default_value_t = 0.15)]
    mask_rate: f64,
    /// Mask whole words (word ids from the tokenizer).
    #[arg(long)]
    whole_word: bool,
    /// Training objective: masked-LM alone, or with a sentence-pair task on the pooled
    /// first token (each sequence cut into segments A and B at a random word boundary;
    /// checkpoints are then `BertForPreTraining`).
    #[arg(long, value_enum, default_value_t = ObjectiveArg::Mlm)]
    objective: ObjectiveArg,
    /// RTD: generator layers (default a third of the model's, at least 1). The generator
    /// has the model's width (the embeddings are shared) and is smaller by depth.
    #[arg(long)]
    generator_layers: Option<usize>,
    /// RTD: generator feed-forward width (default half the model's).
    #[arg(long)]
    generator_intermediate: Option<usize>,
    /// RTD: weight of the discriminator's loss (ELECTRA's lambda).
    #[arg(long, default_value_t = berth_train::objectives::rtd::DEFAULT_WEIGHT)]
    rtd_weight: f64,
    /// Tokens per sequence, special tokens included (longer: more context per sequence,
    /// quadratic attention cost).
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// Write the training sequences in training order to FILE (JSON Lines), so a peer
    /// (scripts/pretrain_peer.py) can train on the same data order.
    #[arg(long)]
    dump_order: Option<PathBuf>,
    #[command(flatten)]
    train_loop: LoopArgs,
    #[command(flatten)]
    distill: DistillArgs,
}

pub fn run(a: PretrainArgs) -> anyhow::Result<()> {
    let world = berth_train::dist::world()?;
    let result = run_on(a, world.as_ref());
    crate::finetune::end_ranks_on_error(result, world.as_ref())
}

fn run_on(a: PretrainArgs, world: &dyn berth_train::dist::Collective) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&a.mask_rate) || a.mask_rate == 0.0 {
        anyhow::bail!("--mask-rate {} must be in (0, 1)", a.mask_rate);
    }
    let rtd = a.objective == ObjectiveArg::Rtd;
    if !(a.rtd_weight.is_finite() && a.rtd_weight > 0.0 && a.rtd_weight <= 1e6) {
        anyhow::bail!(
            "--rtd-weight {} must be a positive number (at most 1e6)",
            a.rtd_weight
        );
    }
    for (flag, v, max) in [
        (
            "--generator-layers",
            a.generator_layers,
            berth_model::MAX_LAYERS,
        ),
        (
            "--generator-intermediate",
            a.generator_intermediate,
            berth_model::MAX_INTERMEDIATE,
        ),
    ] {
        if let Some(v) = v.filter(|&v| v == 0 || v > max) {
            anyhow::bail!("{flag} {v} is outside 1..={max}");
        }
    }
    let seed = a.train_loop.seed;
    if rtd && a.arch != ArchArg::Bert {
        let arch = a.arch.to_possible_value().expect("no skipped values");
        anyhow::bail!(
            "--objective rtd trains an ELECTRA (BERT's architecture, model_type electra): drop --arch {}",
            arch.get_name()
        );
    }
    let modern = a.arch == ArchArg::Modernbert;
    if modern && a.tokenizer.is_some() {
        if matches!(a.objective, ObjectiveArg::Nsp | ObjectiveArg::Sop) {
            anyhow::bail!(
                "--objective nsp / sop are BERT's sentence-pair heads; ModernBERT pretrains with --objective mlm"
            );
        }
        if a.position_init != PositionInit::Normal {
            anyhow::bail!(
                "--position-init: ModernBERT has no position table (rotary positions inside attention)"
            );
        }
    }
    // Under mpirun every rank runs this; rank 0 alone owns the run folder and writes the
    // initial model, which the others read after it (the barrier below).
    let several = world.world_size() > 1;
    let _lock = a
        .train_loop
        .claim_output_of(world, &a.output, &LoopDefaults::PRETRAIN)?;
    let model = match (&a.from, &a.tokenizer) {
        (Some(from), _) => {
            let dir = resolve::model_dir(Some(from))?;
            if rtd {
                let generator = dir.join(GENERATOR_DIR);
                let cfg = berth_model::EncoderConfig::from_file(&dir.join("config.json"))?;
                if cfg.arch != berth_model::Arch::Electra
                    || !generator.join("config.json").is_file()
                {
                    anyhow::bail!(
                        "{}: --objective rtd continues an ELECTRA run's checkpoint (model_type electra with a {}/ folder); start a new one from scratch with --tokenizer",
                        dir.display(),
                        GENERATOR_DIR
                    );
                }
            }
            // Rank 0 writes a --student-layers student; the others read it after the barrier
            // below.
            if world.is_writer() {
                a.distill.student(dir, &a.output, a.train_loop.resume)?
            } else {
                a.distill.student_dir(dir, &a.output)
            }
        }
        (None, Some(tok_dir)) => {
            if a.distill.student_layers.is_some() {
                anyhow::bail!("--student-layers takes layers of a checkpoint: pass --from CKPT");
            }
            let tok = berth_text::TextTokenizer::from_dir(tok_dir)?;
            let (layers, hidden) = (a.layers.unwrap_or(4), a.hidden.unwrap_or(256));
            let heads = a.heads.unwrap_or((hidden / 64).max(1));
            let intermediate = a.intermediate.unwrap_or(if modern {
                (3 * hidden / 2).max(1)
            } else {
                4 * hidden
            });
            check_sizes(
                layers,
                hidden,
                heads,
                intermediate,
                tok.vocab_size(),
                a.max_length,
            )?;
            if modern && (hidden / heads) % 2 != 0 {
                anyhow::bail!(
                    "--hidden {hidden} / --heads {heads} gives an odd head size; ModernBERT's rotary embeddings rotate pairs"
                );
            }
            let init = a.output.join("init");
            if modern {
                if world.is_writer() {
                    let config =
                        modernbert_config(&tok, layers, hidden, heads, intermediate, a.max_length);
                    berth_train::init::write_random_modernbert(&init, &config, tok_dir, seed)
                        .with_context(|| {
                            format!("writing the initial model to {}", init.display())
                        })?;
                }
                init
            } else {
                let roberta = a.arch == ArchArg::Roberta;
                let pad = tok
                    .token_to_id(if roberta { "<pad>" } else { "[PAD]" })
                    .unwrap_or(0);
                let (class, model_type) = match (rtd, roberta) {
                    (true, _) => ("ElectraModel", "electra"),
                    (false, true) => ("RobertaModel", "roberta"),
                    (false, false) => ("BertModel", "bert"),
                };
                let mut config = serde_json::json!({
                    "architectures": [class],
                    "model_type": model_type,
                    "vocab_size": tok.vocab_size(),
                    "hidden_size": hidden,
                    "num_hidden_layers": layers,
                    "num_attention_heads": heads,
                    "intermediate_size": intermediate,
                    "hidden_act": "gelu",
                    "hidden_dropout_prob": 0.1,
                    "attention_probs_dropout_prob": 0.1,
                    // RoBERTa's positions start past the padding index.
                    "max_position_embeddings": if roberta { a.max_length.max(512) + pad as usize + 1 } else { a.max_length.max(512) },
                    "type_vocab_size": if roberta { 1 } else { 2 },
                    "initializer_range": 0.02,
                    "layer_norm_eps": 1e-12,
                    "pad_token_id": pad,
                    "tie_word_embeddings": true,
                });
                let positions = a.position_init;
                if rtd {
                    // ELECTRA: embeddings as wide as the encoder (no embeddings_project).
                    config["embedding_size"] = hidden.into();
                }
                if world.is_writer() {
                    berth_train::init::write_random_encoder(
                        &init, &config, tok_dir, seed, positions,
                    )
                    .with_context(|| format!("writing the initial model to {}", init.display()))?;
                }
                if rtd && world.is_writer() {
                    let mut generator = config.clone();
                    generator["num_hidden_layers"] =
                        a.generator_layers.unwrap_or((layers / 3).max(1)).into();
                    generator["intermediate_size"] = a
                        .generator_intermediate
                        .unwrap_or((intermediate / 2).max(1))
                        .into();
                    let dir = init.join(GENERATOR_DIR);
                    berth_train::init::write_random_encoder(
                        &dir,
                        &generator,
                        tok_dir,
                        seed ^ 0x6e,
                        positions,
                    )
                    .with_context(|| {
                        format!("writing the initial generator to {}", dir.display())
                    })?;
                }
                init
            }
        }
        (None, None) => {
            anyhow::bail!("--tokenizer DIR (from scratch) or --from CHECKPOINT is needed")
        }
    };
    if several {
        // The other ranks read the initial model rank 0 has written.
        world.broadcast(&mut Vec::new())?;
    }
    let mut data = DataConfig::new(a.data);
    data.dev = a.dev;
    if a.val_fraction.is_some() && data.train.join("manifest.json").is_file() {
        anyhow::bail!(
            "--val-fraction: {} is a prepared folder, which brings its own held-out split (set it with `berth data prepare --val-fraction`)",
            data.train.display()
        );
    }
    data.dev_fraction = a.val_fraction.unwrap_or(0.02);
    data.max_length = a.max_length;
    let kind = match a.objective {
        ObjectiveArg::Rtd => TaskKind::Rtd(RtdConfig {
            mask_rate: a.mask_rate,
            whole_word: a.whole_word,
            rtd_weight: a.rtd_weight,
        }),
        _ if a.distill.config()?.is_some() && rtd => {
            anyhow::bail!("--teacher distils masked-LM pretraining, not --objective rtd")
        }
        o => TaskKind::Pretrain(MlmConfig {
            distill: a.distill.config()?,
            mask_rate: a.mask_rate,
            whole_word: a.whole_word,
            sentence_objective: match o {
                ObjectiveArg::Nsp => Some(SentenceObjective::Nsp),
                ObjectiveArg::Sop => Some(SentenceObjective::Sop),
                _ => None,
            },
        }),
    };
    let mut run = a
        .train_loop
        .config(model, a.output, &LoopDefaults::PRETRAIN);
    run.dump_order = a.dump_order;
    let cfg = RunConfig {
        run,
        task: TaskConfig { data, kind },
    };
    crate::finetune::execute(&cfg, &a.train_loop, "pretrain", world)
}

/// config.json of a new ModernBERT: the published models' settings (ModernBERT-base's
/// attention pattern, rotary bases, bias-free layers, no dropout, mean pooling for
/// classifiers), the given sizes, 8,192 positions or `max_length` if longer, and the
/// tokenizer's special tokens.
fn modernbert_config(
    tok: &berth_text::TextTokenizer,
    layers: usize,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    max_length: usize,
) -> serde_json::Value {
    let id = |names: &[&str]| names.iter().find_map(|n| tok.token_to_id(n));
    let pad = id(&["[PAD]", "<pad>", "<|padding|>"]).unwrap_or(0);
    let cls = id(&["[CLS]", "<s>"]);
    let sep = id(&["[SEP]", "</s>"]);
    let mut config = serde_json::json!({
        "architectures": ["ModernBertModel"],
        "model_type": "modernbert",
        "vocab_size": tok.vocab_size(),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "hidden_activation": "gelu",
        "max_position_embeddings": max_length.max(8192),
        "initializer_range": 0.02,
        "initializer_cutoff_factor": 2.0,
        "norm_eps": 1e-5,
        "norm_bias": false,
        "pad_token_id": pad,
        "global_rope_theta": 160000.0,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "global_attn_every_n_layers": 3,
        "local_attention": 128,
        "local_rope_theta": 10000.0,
        "embedding_dropout": 0.0,
        "mlp_bias": false,
        "mlp_dropout": 0.0,
        "decoder_bias": true,
        "classifier_pooling": "mean",
        "classifier_dropout": 0.0,
        "classifier_bias": false,
        "classifier_activation": "gelu",
        "sparse_prediction": false,
        "sparse_pred_ignore_index": -100,
        "tie_word_embeddings": true,
    });
    for (key, value) in [
        ("cls_token_id", cls),
        ("bos_token_id", cls),
        ("sep_token_id", sep),
        ("eos_token_id", sep),
    ] {
        if let Some(v) = value {
            config[key] = v.into();
        }
    }
    config
}

/// Refuses sizes of a new model that no run can use, naming the flag, before anything is
/// allocated: zero or absurd widths, and models whose training state (weights, gradients
/// and two AdamW moments, 16 bytes per parameter) would not fit in this machine's memory.
fn check_sizes(
    layers: usize,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    vocab: usize,
    max_length: usize,
) -> anyhow::Result<()> {
    use berth_model::{MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS};
    for (flag, v, max) in [
        ("--layers", layers, MAX_LAYERS),
        ("--hidden", hidden, MAX_HIDDEN),
        ("--heads", heads, hidden.max(1)),
        ("--intermediate", intermediate, MAX_INTERMEDIATE),
        ("--max-length", max_length, MAX_POSITIONS),
    ] {
        if v == 0 || v > max {
            anyhow::bail!("{flag} {v} is outside 1..={max}");
        }
    }
    if hidden % heads != 0 {
        anyhow::bail!("--heads {heads} must divide --hidden {hidden}");
    }
    let (h, i, l) = (hidden as u64, intermediate as u64, layers as u64);
    let params = (vocab as u64 + max_length as u64 + 2) * h + l * (4 * h * h + 2 * h * i);
    let need = params.saturating_mul(16);
    if let Some(have) = berth_text::limits::memory_bytes() {
        if need > have {
            anyhow::bail!(
                "--layers {layers} --hidden {hidden} --intermediate {intermediate}: {:.1} M parameters need ~{:.1} GiB to train (weights, gradients, AdamW moments), more than this machine's {:.1} GiB",
                params as f64 / 1e6,
                need as f64 / (1u64 << 30) as f64,
                have as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}
