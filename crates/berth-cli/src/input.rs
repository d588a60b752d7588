//! Reading input texts: from arguments, or one per line from a file or stdin.
use std::io::Read;

use anyhow::{bail, Context};
use berth_model::Precision;
use berth_tasks::{PipelineOptions, WindowPool};
use berth_text::Truncation;

/// Input flags shared by the commands that read texts.
#[derive(clap::Args)]
pub struct TextArgs {
    /// Token limit per text; default: the model's (sentence-transformers' max_seq_length
    /// when the model has one). Longer limits cost quadratic attention time.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Refuse over-long texts instead of truncating them (with a warning).
    #[arg(long)]
    pub no_truncate: bool,
    /// Read texts one per line from FILE (`-` = stdin).
    #[arg(long)]
    pub input: Option<String>,
    /// Tokens per packed batch: larger batches run matmuls more efficiently but hold
    /// more activation memory (~6 KB per token per 384 hidden).
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Number format of the encoder's matrix products: f32; bf16 (Intel AMX; outputs
    /// within ~1e-5 cosine of f32); or int8 (weights per channel, activations per token;
    /// AMX int8 tiles, a slow portable loop elsewhere; outputs within ~1e-3 cosine).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
}

/// Long-document flags shared by classify and embed.
#[derive(clap::Args)]
pub struct WindowArgs {
    /// Long texts: split into windows of --max-length tokens sharing N tokens, run each, and
    /// pool the window outputs (instead of truncating).
    #[arg(long, value_name = "N")]
    pub stride: Option<usize>,
    /// How window outputs are pooled (with --stride).
    #[arg(long, value_enum, default_value_t = WindowPool::Mean)]
    pub window_pool: WindowPool,
}

impl WindowArgs {
    /// The window setting these flags ask for.
    pub fn windows(&self) -> Option<berth_tasks::Windows> {
        let pool = self.window_pool;
        self.stride
            .map(|stride| berth_tasks::Windows { stride, pool })
    }
}

/// Reads a whole file (`-` = stdin) as UTF-8 lines, naming the file and line on bad bytes.
pub fn read_lines(path: &str) -> anyhow::Result<Vec<String>> {
    let (texts, _) = read_texts(Some(path), &[])?;
    Ok(texts)
}

impl TextArgs {
    /// The pipeline options these flags ask for (berth-tasks fills in the rest).
    pub fn pipeline_options(&self) -> PipelineOptions {
        let truncation = if self.no_truncate {
            Truncation::Error
        } else {
            Truncation::Truncate
        };
        PipelineOptions {
            precision: self.dtype,
            max_length: self.max_length,
            truncation,
            batch_tokens: self.batch_tokens,
        }
    }

    /// The texts: from `--input`, or the positional arguments.
    pub fn texts(&self, args: &[String]) -> anyhow::Result<(Vec<String>, bool)> {
        read_texts(self.input.as_deref(), args)
    }
}

/// Texts from `--input` (`-` = stdin; one per line, `\r\n` accepted) or from arguments.
/// Invalid UTF-8 is an error naming the file and line. Returns the texts and whether they
/// came from a file (which turns on the progress bar).
pub fn read_texts(input: Option<&str>, args: &[String]) -> anyhow::Result<(Vec<String>, bool)> {
    let Some(path) = input else {
        if args.is_empty() {
            bail!("no input: give texts as arguments or --input FILE (- for stdin)");
        }
        return Ok((args.to_vec(), false));
    };
    if !args.is_empty() {
        bail!("give texts either as arguments or with --input, not both");
    }
    let mut bytes = Vec::new();
    let name = if path == "-" { "<stdin>" } else { path };
    if path == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("<stdin>")?;
    } else {
        bytes = std::fs::read(path).with_context(|| format!("{path}: cannot read"))?;
    }
    let mut texts = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = std::str::from_utf8(line).map_err(|e| {
            anyhow::anyhow!(
                "{name}:{}: invalid UTF-8 at byte {}",
                i + 1,
                e.valid_up_to()
            )
        })?;
        texts.push(text.to_string());
    }
    if texts.last().is_some_and(|t| t.is_empty()) {
        texts.pop(); // the newline that ends the last line
    }
    if texts.is_empty() {
        bail!("{name}: no input lines");
    }
    Ok((texts, true))
}
