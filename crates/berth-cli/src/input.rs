//! Reading input texts: from arguments, or one per line from a file or stdin.
use std::io::{BufRead, Read};

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

    /// Where the texts come from, for error messages: the `--input` file, `<stdin>`, or
    /// `arguments`.
    pub fn source(&self) -> &str {
        match self.input.as_deref() {
            Some("-") => "<stdin>",
            Some(f) => f,
            None => "arguments",
        }
    }

    /// The texts: from `--input`, or the positional arguments.
    pub fn texts(&self, args: &[String]) -> anyhow::Result<(Vec<String>, bool)> {
        read_texts(self.input.as_deref(), args)
    }
}

/// Longest input line accepted. The whole file is never read before its lines are checked,
/// so an endless input without newlines (`/dev/zero`) ends here instead of filling memory.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Reads UTF-8 lines (`\r\n` accepted; the newline that ends the last line is not an extra
/// empty line), at most [`MAX_LINE_BYTES`] each; errors name `name` and the line.
fn read_lines_from(mut reader: impl BufRead, name: &str) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("{name}:{number}: cannot read"))?;
        if n == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() > MAX_LINE_BYTES {
            bail!(
                "{name}:{number}: line longer than {} MiB (one text per line)",
                MAX_LINE_BYTES >> 20
            );
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let text = std::str::from_utf8(&line).map_err(|e| {
            anyhow::anyhow!("{name}:{number}: invalid UTF-8 at byte {}", e.valid_up_to())
        })?;
        texts.push(text.to_string());
    }
    Ok(texts)
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
    let name = if path == "-" { "<stdin>" } else { path };
    let reader: Box<dyn BufRead> = if path == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        berth_text::limits::readable_stream(std::path::Path::new(path))
            .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("{path}: cannot read"))?,
        ))
    };
    let texts = read_lines_from(reader, name)?;
    if texts.is_empty() {
        bail!("{name}: no input lines");
    }
    Ok((texts, true))
}
