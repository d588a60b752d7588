//! `berth data prepare`: a pretraining corpus tokenized once into checked, shuffled binary
//! shards with a held-out split, for `berth pretrain --data DIR`.
use std::path::PathBuf;

use anyhow::Context;
use berth_train::corpus::{prepare, CorpusInput, PrepareOptions};
use clap::{Args, Subcommand};

use crate::resolve;

/// Arguments of `berth data`.
#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize corpora into shards (text: a blank line between documents; JSON Lines: one
    /// document per line; gzip or not; folders recursively).
    Prepare(PrepareArgs),
}

#[derive(Args)]
struct PrepareArgs {
    /// Tokenizer folder (from `berth tokenizer train`) or a model whose tokenizer to use.
    #[arg(long)]
    tokenizer: String,
    /// Output folder (new, or without prepared data).
    #[arg(long)]
    output: PathBuf,
    /// Tokens per sequence, special tokens included.
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// Fraction of documents held out (seeded, by document).
    #[arg(long, default_value_t = 0.02)]
    val_fraction: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Drop documents identical (after cleaning) to an earlier one; the count is reported.
    #[arg(long)]
    dedup: bool,
    /// JSON Lines inputs: the field with the text.
    #[arg(long, default_value = "text")]
    field: String,
    /// Tokens per shard.
    #[arg(long, default_value_t = 1 << 24)]
    shard_tokens: usize,
    /// Another corpus with a sampling weight, `PATH=WEIGHT` (e.g. a small domain corpus
    /// up-sampled 3 times: `--mix domain/=3`); repeatable.
    #[arg(long, value_name = "PATH=WEIGHT")]
    mix: Vec<String>,
    /// Corpus files or folders (weight 1).
    inputs: Vec<PathBuf>,
}

pub fn run(a: DataArgs) -> anyhow::Result<()> {
    let DataCommand::Prepare(p) = a.command;
    let mut inputs: Vec<CorpusInput> = p
        .inputs
        .iter()
        .map(|path| CorpusInput {
            path: path.clone(),
            weight: 1.0,
        })
        .collect();
    for m in &p.mix {
        let (path, w) = m
            .rsplit_once('=')
            .with_context(|| format!("--mix {m:?}: expected PATH=WEIGHT"))?;
        let weight: f64 = w
            .parse()
            .with_context(|| format!("--mix {m:?}: weight {w:?} is not a number"))?;
        inputs.push(CorpusInput {
            path: path.into(),
            weight,
        });
    }
    if inputs.is_empty() {
        anyhow::bail!("no corpus given: pass files or folders (or --mix PATH=WEIGHT)");
    }
    let dir = resolve::model_dir(Some(&p.tokenizer))?;
    let tok = berth_text::TextTokenizer::from_dir(&dir)
        .with_context(|| format!("{}: cannot load the tokenizer", dir.display()))?;
    let opts = PrepareOptions {
        max_length: p.max_length,
        val_fraction: p.val_fraction,
        seed: p.seed,
        dedup: p.dedup,
        json_field: p.field,
        shard_tokens: p.shard_tokens,
    };
    let m = prepare(&inputs, &tok, &p.output, &opts)?;
    for c in &m.corpora {
        eprintln!(
            "{} (weight {}): {} files, {} documents ({} held out), {} duplicates dropped, {} training / {} held-out sequences",
            c.path.display(), c.weight, c.files, c.documents, c.val_documents, c.duplicates,
            c.train_sequences, c.val_sequences
        );
    }
    if m.val.is_empty() && p.val_fraction > 0.0 {
        eprintln!(
            "warning: no document was held out (--val-fraction {} of {} documents; documents are separated by blank lines): `berth pretrain` on this folder will need --dev FILE",
            p.val_fraction,
            m.corpora.iter().map(|c| c.documents).sum::<usize>()
        );
    }
    let tokens = |s: &[berth_train::corpus::ShardInfo]| s.iter().map(|x| x.tokens).sum::<usize>();
    println!(
        "{}",
        serde_json::json!({
            "output": p.output,
            "train_shards": m.train.len(),
            "train_tokens": tokens(&m.train),
            "val_shards": m.val.len(),
            "val_tokens": tokens(&m.val),
            "corpora": m.corpora,
        })
    );
    Ok(())
}
