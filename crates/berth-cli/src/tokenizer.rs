//! `berth tokenizer train`: a new WordPiece / byte-level BPE / Unigram vocabulary from a
//! corpus, written in the Hugging Face layout.
use std::path::PathBuf;

use berth_text::train::{train_vocabulary, VocabKind, VocabOptions};
use clap::{Args, Subcommand, ValueEnum};

/// Arguments of `berth tokenizer`.
#[derive(Args)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    command: TokenizerCommand,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a vocabulary on text files (plain or gzip; folders recursively).
    Train(TrainArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    /// BERT's WordPiece (tokenizer.json + vocab.txt).
    Wordpiece,
    /// RoBERTa's byte-level BPE (tokenizer.json + vocab.json + merges.txt).
    Bpe,
    /// XLM-R / CamemBERT's Unigram (tokenizer.json).
    Unigram,
}

#[derive(Args)]
struct TrainArgs {
    #[arg(long, value_enum)]
    kind: KindArg,
    /// Vocabulary size, special tokens included.
    #[arg(long)]
    vocab_size: usize,
    /// Lowercase (WordPiece: and strip accents), as uncased BERT.
    #[arg(long)]
    lowercase: bool,
    /// WordPiece / BPE: merges seen fewer times are not made.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// model_max_length in tokenizer_config.json.
    #[arg(long, default_value_t = 512)]
    model_max_length: usize,
    /// Output folder.
    #[arg(long)]
    output: PathBuf,
    /// Corpus files or folders.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub fn run(a: TokenizerArgs) -> anyhow::Result<()> {
    let TokenizerCommand::Train(t) = a.command;
    let opts = VocabOptions {
        kind: match t.kind {
            KindArg::Wordpiece => VocabKind::WordPiece,
            KindArg::Bpe => VocabKind::Bpe,
            KindArg::Unigram => VocabKind::Unigram,
        },
        vocab_size: t.vocab_size,
        lowercase: t.lowercase,
        min_frequency: t.min_frequency,
        model_max_length: t.model_max_length,
    };
    let done = train_vocabulary(&t.files, &opts, &t.output)?;
    println!(
        "{}",
        serde_json::json!({"vocab_size": done.vocab_size, "lines": done.lines,
            "files": done.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>()})
    );
    Ok(())
}
