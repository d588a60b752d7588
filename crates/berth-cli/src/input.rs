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
    /// Read texts from FILE (`-` = stdin): one per line, or rows of a CSV / TSV file with
    /// a header, a JSON Lines file or a Parquet file (see --format, --text-column).
    #[arg(long)]
    pub input: Option<String>,
    /// How --input is read; default: by its extension (.csv, .tsv, .jsonl / .json,
    /// .parquet), else one text per line.
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// Column of a CSV / TSV / JSON Lines / Parquet --input holding the text: header name
    /// (JSON Lines: field) or 0-based index. Default: text.
    #[arg(long)]
    pub text_column: Option<String>,
    /// classify --pair: the column holding each row's second text.
    #[arg(long)]
    pub pair_column: Option<String>,
    /// Column copied to each output line as "id".
    #[arg(long)]
    pub id_column: Option<String>,
    /// Further columns copied to each output line under their names (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub keep_columns: Vec<String>,
    /// Tokens per packed batch: larger batches run matmuls more efficiently but hold
    /// more activation memory (~6 KB per token per 384 hidden).
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Number format of the encoder's matrix products: f32; bf16 (Intel AMX tiles, AVX-512
    /// BF16 or AVX-512 F FMAs; outputs within ~1e-5 cosine of f32); or int8 (weights per channel,
    /// activations per token; AMX int8 tiles, AVX-512 VNNI or AVX2 (on AVX2 no faster
    /// than f32), a slow portable loop elsewhere; outputs within ~1e-3 cosine).
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

    /// The texts: from `--input`, or the positional arguments. Commands that do not carry
    /// ids or kept columns to their output refuse those flags here.
    pub fn texts(&self, args: &[String]) -> anyhow::Result<(Vec<String>, bool)> {
        if self.id_column.is_some() || !self.keep_columns.is_empty() {
            bail!("--id-column / --keep-columns apply to classify, ner and embed");
        }
        if self.pair_column.is_some() {
            bail!("--pair-column applies to classify --pair");
        }
        let inputs = self.inputs(args)?;
        Ok((inputs.texts, inputs.from_file))
    }

    /// The inputs with their per-row metadata (`--id-column`, `--keep-columns`) and, with
    /// `--pair-column`, second texts.
    pub fn inputs(&self, args: &[String]) -> anyhow::Result<Inputs> {
        let format = match (&self.input, self.format) {
            (_, Some(f)) => f,
            (Some(path), None) => InputFormat::of(path),
            (None, None) => InputFormat::Lines,
        };
        let columns = self.text_column.is_some()
            || self.pair_column.is_some()
            || self.id_column.is_some()
            || !self.keep_columns.is_empty();
        if format == InputFormat::Lines || self.input.is_none() {
            if columns {
                bail!("--text-column / --pair-column / --id-column / --keep-columns need a CSV, TSV, JSON Lines or Parquet --input (or --format)");
            }
            let (texts, from_file) = read_texts(self.input.as_deref(), args)?;
            if from_file {
                if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
                    bail!(
                        "{}:{}: empty line (one text per line)",
                        self.source(),
                        i + 1
                    );
                }
            }
            return Ok(Inputs {
                meta: vec![serde_json::Map::new(); texts.len()],
                texts,
                pairs: None,
                from_file,
            });
        }
        if !args.is_empty() {
            bail!("give texts either as arguments or with --input, not both");
        }
        let path = self.input.as_deref().expect("checked above");
        read_table(path, format, self)
    }
}

/// `--format` values.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum InputFormat {
    /// One text per line.
    Lines,
    /// Comma-separated values with a header row (RFC 4180 quoting).
    Csv,
    /// Tab-separated values with a header row (no quoting).
    Tsv,
    /// One JSON object per line.
    Jsonl,
    /// An Apache Parquet file (rows numbered from 1 in errors).
    Parquet,
}

impl InputFormat {
    fn of(path: &str) -> Self {
        let ext = std::path::Path::new(path)
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("csv") => InputFormat::Csv,
            Some("tsv") => InputFormat::Tsv,
            Some("jsonl") | Some("json") => InputFormat::Jsonl,
            Some("parquet") => InputFormat::Parquet,
            _ => InputFormat::Lines,
        }
    }
}

/// Texts read from `--input` or arguments, with what each output line carries besides.
pub struct Inputs {
    /// The texts.
    pub texts: Vec<String>,
    /// Second texts (`--pair-column`).
    pub pairs: Option<Vec<String>>,
    /// Per row: `"id"` and kept columns, copied to the row's output line.
    pub meta: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Whether they came from a file (which turns on the progress bar).
    pub from_file: bool,
}

/// Appends a row's `meta` fields to a serialised JSON object line, after its own fields
/// (the line's own formatting, f32 scores included, is kept as it is).
pub fn with_meta(
    mut line: String,
    meta: Option<&serde_json::Map<String, serde_json::Value>>,
) -> String {
    let Some(meta) = meta.filter(|m| !m.is_empty()) else {
        return line;
    };
    if line.ends_with('}') {
        line.pop();
        for (k, v) in meta {
            line.push(',');
            line.push_str(&serde_json::Value::String(k.clone()).to_string());
            line.push(':');
            line.push_str(&v.to_string());
        }
        line.push('}');
    }
    line
}

/// Fields of the output lines a kept column may not shadow.
const OUTPUT_KEYS: [&str; 4] = ["index", "labels", "entities", "embedding"];

/// `path` (`-` = stdin) opened for streaming, with the name errors use; a device or
/// directory is refused (pipes are fine).
fn open_input(path: &str) -> anyhow::Result<(&str, Box<dyn BufRead>)> {
    if path == "-" {
        return Ok(("<stdin>", Box::new(std::io::stdin().lock())));
    }
    berth_text::limits::readable_stream(std::path::Path::new(path))
        .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    let f = std::fs::File::open(path).with_context(|| format!("{path}: cannot read"))?;
    Ok((path, Box::new(std::io::BufReader::new(f))))
}

/// Reads a CSV / TSV (header row) or JSON Lines file into inputs, naming file and line in
/// every error: a missing column, a short row, an empty text.
fn read_table(path: &str, format: InputFormat, a: &TextArgs) -> anyhow::Result<Inputs> {
    use serde_json::Value;
    let name = if path == "-" { "<stdin>" } else { path };
    // Where a row is: `FILE:LINE`, or `FILE: row N` in a Parquet file (no lines).
    let at = |line: u64| {
        if format == InputFormat::Parquet {
            format!("{name}: row {line}")
        } else {
            format!("{name}:{line}")
        }
    };
    let text_col = a.text_column.clone().unwrap_or_else(|| "text".into());
    // (output key, column) for each kept column; the id goes out as "id".
    let mut kept: Vec<(String, String)> = a
        .id_column
        .iter()
        .map(|c| ("id".into(), c.clone()))
        .collect();
    kept.extend(a.keep_columns.iter().map(|c| (c.clone(), c.clone())));
    // A kept column must not repeat a key the output line already has.
    let mut keys = std::collections::HashSet::new();
    for (key, _) in &kept {
        if OUTPUT_KEYS.contains(&key.as_str()) || !keys.insert(key.as_str()) {
            bail!("--keep-columns {key:?}: the output lines already have a {key:?} field");
        }
    }
    let mut out = Inputs {
        texts: Vec::new(),
        pairs: a.pair_column.as_ref().map(|_| Vec::new()),
        meta: Vec::new(),
        from_file: true,
    };
    let mut push = |line: u64, get: &dyn Fn(&str) -> Option<Value>| -> anyhow::Result<()> {
        let text = |col: &str| -> anyhow::Result<String> {
            match get(col) {
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
                Some(Value::String(_)) => bail!("{}: empty text in column {col:?}", at(line)),
                Some(Value::Number(n)) => Ok(n.to_string()),
                _ => bail!("{}: no text in column {col:?}", at(line)),
            }
        };
        out.texts.push(text(&text_col)?);
        if let (Some(p), Some(col)) = (out.pairs.as_mut(), &a.pair_column) {
            p.push(text(col)?);
        }
        let mut m = serde_json::Map::new();
        for (key, col) in &kept {
            let v = get(col).with_context(|| format!("{}: no column {col:?}", at(line)))?;
            m.insert(key.clone(), v);
        }
        out.meta.push(m);
        Ok(())
    };
    if format == InputFormat::Parquet {
        read_parquet(path, &text_col, a.pair_column.as_deref(), &kept, &mut push)?;
    } else if format == InputFormat::Jsonl {
        let (_, reader) = open_input(path)?;
        let lines = read_lines_from(reader, name)?;
        for (i, l) in lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = serde_json::from_str(l.trim_start_matches('\u{feff}'))
                .with_context(|| format!("{name}:{}: invalid JSON", i + 1))?;
            let get = |col: &str| v.get(col).cloned();
            push(i as u64 + 1, &get)?;
        }
    } else {
        // The whole table is read first: the csv crate reads an unterminated quoted field to
        // the end of the file as one field, so the quotes are checked before it parses.
        let (_, reader) = open_input(path)?;
        let mut bytes = Vec::new();
        let mut reader = reader;
        reader
            .read_to_end(&mut bytes)
            .with_context(|| format!("{name}: cannot read"))?;
        if format == InputFormat::Csv {
            if let Some(line) = berth_text::limits::unterminated_csv_quote(&bytes) {
                bail!("{name}:{line}: unterminated quoted field");
            }
        }
        let reader = std::io::Cursor::new(bytes);
        let mut r = csv::ReaderBuilder::new()
            .delimiter(if format == InputFormat::Tsv {
                b'\t'
            } else {
                b','
            })
            .quoting(format == InputFormat::Csv)
            .from_reader(reader);
        let header: Vec<String> = r
            .headers()
            .with_context(|| format!("{name}:1: cannot read the header"))?
            .iter()
            .map(|h| h.trim_start_matches('\u{feff}').trim().to_string())
            .collect();
        let find = |col: &str| -> Option<usize> {
            header
                .iter()
                .position(|h| h == col)
                .or_else(|| col.parse().ok().filter(|&i: &usize| i < header.len()))
        };
        for col in std::iter::once(&text_col)
            .chain(&a.pair_column)
            .chain(kept.iter().map(|(_, c)| c))
        {
            if find(col).is_none() {
                bail!(
                    "{name}:1: no column {col:?} in the header (columns: {})",
                    header.join(", ")
                );
            }
        }
        for record in r.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, |p| p.line());
                anyhow::anyhow!("{name}:{line}: {e}")
            })?;
            let line = record.position().map_or(0, |p| p.line());
            let get = |col: &str| {
                find(col)
                    .and_then(|i| record.get(i))
                    .map(|s| Value::String(s.to_string()))
            };
            push(line, &get)?;
        }
    }
    if out.texts.is_empty() {
        bail!("{name}: no input rows");
    }
    Ok(out)
}

/// The rows of a Parquet `--input`, handed to `push` with their 1-based row numbers.
#[cfg(feature = "parquet")]
fn read_parquet(
    path: &str,
    text_col: &str,
    pair_col: Option<&str>,
    kept: &[(String, String)],
    push: &mut dyn FnMut(u64, &dyn Fn(&str) -> Option<serde_json::Value>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut wanted: Vec<&str> = vec![text_col];
    wanted.extend(pair_col);
    wanted.extend(kept.iter().map(|(_, c)| c.as_str()));
    wanted.dedup();
    let table = crate::parquet_io::read_columns(path, &wanted)?;
    for row in 0..table.rows {
        let get = |col: &str| table.columns.get(col).and_then(|c| c.get(row)).cloned();
        push(row as u64 + 1, &get)?;
    }
    Ok(())
}

#[cfg(not(feature = "parquet"))]
fn read_parquet(
    path: &str,
    _: &str,
    _: Option<&str>,
    _: &[(String, String)],
    _: &mut dyn FnMut(u64, &dyn Fn(&str) -> Option<serde_json::Value>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    bail!("{path}: this berth was built without Parquet support (cargo feature `parquet`)")
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
        // A UTF-8 byte-order mark (Windows editors write one) is not part of the first text.
        let start = if number == 1 && line.starts_with(b"\xef\xbb\xbf") {
            3
        } else {
            0
        };
        let text = std::str::from_utf8(&line[start..]).map_err(|e| {
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
    let (name, reader) = open_input(path)?;
    let texts = read_lines_from(reader, name)?;
    if texts.is_empty() {
        bail!("{name}: no input lines");
    }
    Ok((texts, true))
}
