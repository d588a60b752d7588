//! `berth pretrain`: masked-language-model pretraining from scratch (a new BERT or RoBERTa
//! of the given size on a trained vocabulary) or continued from a checkpoint, or ELECTRA's
//! replaced-token detection (`--objective rtd`).
use std::path::PathBuf;

use anyhow::Context;
use berth_train::schedule::ScheduleKind;
use berth_train::trainer::{Task, TrainConfig};
use clap::{Args, ValueEnum};

use crate::resolve;

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

/// `--position-init` values.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PositionInitArg {
    /// Normal with the initializer range (transformers' init).
    Normal,
    /// The original Transformer's sinusoids at the same scale: relative offsets are linear
    /// maps of the table from the first step, so attention to neighbouring tokens is easier
    /// to learn. Still ordinary learned position embeddings.
    Sinusoidal,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ArchArg {
    Bert,
    Roberta,
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
    #[arg(long, default_value_t = 0.02)]
    val_fraction: f64,
    /// Run directory.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value_t = ArchArg::Bert)]
    arch: ArchArg,
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    hidden: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    intermediate: Option<usize>,
    /// How a new model's position embeddings start (from scratch only).
    #[arg(long, value_enum, default_value_t = PositionInitArg::Normal, conflicts_with = "from")]
    position_init: PositionInitArg,
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
    #[arg(long, default_value_t = berth_train::rtd::DEFAULT_WEIGHT)]
    rtd_weight: f64,
    /// Tokens per sequence, special tokens included.
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Train exactly N optimizer steps (overrides --epochs; the schedule spans them).
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Warmup: a fraction of all steps (< 1) or a step count (>= 1).
    #[arg(long, default_value_t = 0.06)]
    warmup: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate and checkpoint every N steps (default: each epoch).
    #[arg(long)]
    save_every: Option<u64>,
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    #[arg(long)]
    resume: bool,
    /// Pretrain without dropout (Cramming's and ModernBERT's choice for short, single-pass
    /// runs: dropout only slows learning when no sequence is seen many times). The
    /// checkpoint's config keeps its dropout rates for fine-tuning.
    #[arg(long)]
    no_dropout: bool,
    /// Write the training sequences in training order to FILE (JSON Lines), so a peer
    /// (scripts/pretrain_peer.py) can train on the same data order.
    #[arg(long)]
    dump_order: Option<PathBuf>,
}

pub fn run(a: PretrainArgs) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&a.mask_rate) || a.mask_rate == 0.0 {
        anyhow::bail!("--mask-rate {} must be in (0, 1)", a.mask_rate);
    }
    let rtd = a.objective == ObjectiveArg::Rtd;
    if rtd && a.arch == ArchArg::Roberta {
        anyhow::bail!(
            "--objective rtd trains an ELECTRA (BERT's architecture, model_type electra): drop --arch roberta"
        );
    }
    let model = match (&a.from, &a.tokenizer) {
        (Some(from), _) => {
            let dir = resolve::model_dir(Some(from))?;
            if rtd {
                let generator = dir.join(berth_train::rtd::GENERATOR_DIR);
                let cfg = berth_model::EncoderConfig::from_file(&dir.join("config.json"))?;
                if cfg.arch != berth_model::Arch::Electra
                    || !generator.join("config.json").is_file()
                {
                    anyhow::bail!(
                        "{}: --objective rtd continues an ELECTRA run's checkpoint (model_type electra with a {}/ folder);                          start a new one from scratch with --tokenizer",
                        dir.display(),
                        berth_train::rtd::GENERATOR_DIR
                    );
                }
            }
            dir
        }
        (None, Some(tok_dir)) => {
            let tok = berth_text::TextTokenizer::from_dir(tok_dir)?;
            let (layers, hidden) = (a.layers.unwrap_or(4), a.hidden.unwrap_or(256));
            let heads = a.heads.unwrap_or((hidden / 64).max(1));
            let intermediate = a.intermediate.unwrap_or(4 * hidden);
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
            let init = a.output.join("init");
            let positions = match a.position_init {
                PositionInitArg::Normal => berth_train::init::PositionInit::Normal,
                PositionInitArg::Sinusoidal => berth_train::init::PositionInit::Sinusoidal,
            };
            if rtd {
                // ELECTRA: embeddings as wide as the encoder (no embeddings_project).
                config["embedding_size"] = hidden.into();
            }
            berth_train::init::write_random_encoder(&init, &config, tok_dir, a.seed, positions)
                .with_context(|| format!("writing the initial model to {}", init.display()))?;
            if rtd {
                let mut generator = config.clone();
                generator["num_hidden_layers"] =
                    a.generator_layers.unwrap_or((layers / 3).max(1)).into();
                generator["intermediate_size"] = a
                    .generator_intermediate
                    .unwrap_or((intermediate / 2).max(1))
                    .into();
                let dir = init.join(berth_train::rtd::GENERATOR_DIR);
                berth_train::init::write_random_encoder(
                    &dir,
                    &generator,
                    tok_dir,
                    a.seed ^ 0x6e,
                    positions,
                )
                .with_context(|| format!("writing the initial generator to {}", dir.display()))?;
            }
            init
        }
        (None, None) => {
            anyhow::bail!("--tokenizer DIR (from scratch) or --from CHECKPOINT is needed")
        }
    };
    let mut cfg = TrainConfig::new(Task::Pretrain, model, a.data, a.output);
    cfg.dev = a.dev;
    cfg.dev_fraction = a.val_fraction;
    cfg.epochs = a.epochs;
    cfg.max_steps = a.max_steps;
    cfg.lr = a.lr;
    cfg.batch_size = a.batch_size;
    cfg.grad_accum = a.grad_accum;
    cfg.max_length = a.max_length;
    if a.warmup >= 1.0 {
        cfg.warmup_steps = Some(a.warmup as u64);
    } else {
        cfg.warmup_ratio = a.warmup;
    }
    cfg.schedule = ScheduleKind::Linear;
    cfg.adamw.weight_decay = a.weight_decay;
    cfg.max_grad_norm = (a.max_grad_norm > 0.0).then_some(a.max_grad_norm);
    cfg.seed = a.seed;
    cfg.dropout = !a.no_dropout;
    cfg.mask_rate = a.mask_rate;
    cfg.whole_word = a.whole_word;
    cfg.sentence_objective = match a.objective {
        ObjectiveArg::Mlm | ObjectiveArg::Rtd => None,
        ObjectiveArg::Nsp => Some(berth_train::pretrain::SentenceObjective::Nsp),
        ObjectiveArg::Sop => Some(berth_train::pretrain::SentenceObjective::Sop),
    };
    cfg.rtd_weight = rtd.then_some(a.rtd_weight);
    cfg.dump_order = a.dump_order;
    cfg.save_every = a.save_every;
    cfg.log_every = a.log_every.max(1);
    crate::finetune::execute(&cfg, a.resume)
}
