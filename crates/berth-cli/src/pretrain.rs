//! `berth pretrain`: masked-language-model pretraining from scratch (a new BERT or RoBERTa
//! of the given size on a trained vocabulary) or continued from a checkpoint.
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
    #[arg(long, conflicts_with_all = ["tokenizer", "layers", "hidden", "heads", "intermediate"])]
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
    /// Write the training sequences in training order to FILE (JSON Lines), so a peer
    /// (scripts/pretrain_peer.py) can train on the same data order.
    #[arg(long)]
    dump_order: Option<PathBuf>,
}

pub fn run(a: PretrainArgs) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&a.mask_rate) || a.mask_rate == 0.0 {
        anyhow::bail!("--mask-rate {} must be in (0, 1)", a.mask_rate);
    }
    let model = match (&a.from, &a.tokenizer) {
        (Some(from), _) => resolve::model_dir(Some(from))?,
        (None, Some(tok_dir)) => {
            let tok = berth_text::TextTokenizer::from_dir(tok_dir)?;
            let (layers, hidden) = (a.layers.unwrap_or(4), a.hidden.unwrap_or(256));
            let heads = a.heads.unwrap_or((hidden / 64).max(1));
            let roberta = a.arch == ArchArg::Roberta;
            let pad = tok
                .token_to_id(if roberta { "<pad>" } else { "[PAD]" })
                .unwrap_or(0);
            let config = serde_json::json!({
                "architectures": [if roberta { "RobertaModel" } else { "BertModel" }],
                "model_type": if roberta { "roberta" } else { "bert" },
                "vocab_size": tok.vocab_size(),
                "hidden_size": hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "intermediate_size": a.intermediate.unwrap_or(4 * hidden),
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
            berth_train::init::write_random_encoder(&init, &config, tok_dir, a.seed)
                .with_context(|| format!("writing the initial model to {}", init.display()))?;
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
    cfg.mask_rate = a.mask_rate;
    cfg.whole_word = a.whole_word;
    cfg.sentence_objective = match a.objective {
        ObjectiveArg::Mlm => None,
        ObjectiveArg::Nsp => Some(berth_train::pretrain::SentenceObjective::Nsp),
        ObjectiveArg::Sop => Some(berth_train::pretrain::SentenceObjective::Sop),
    };
    cfg.dump_order = a.dump_order;
    cfg.save_every = a.save_every;
    cfg.log_every = a.log_every.max(1);
    crate::finetune::execute(&cfg, a.resume)
}
