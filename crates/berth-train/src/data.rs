//! Training data readers: CSV / TSV with a header, JSON Lines, CoNLL column files. Every
//! malformed row is an error naming file and line, or — with `skip_bad_rows` — skipped and
//! counted; never silently dropped.
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Result, TrainError};

/// A column, by header name or 0-based index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// Header name (JSON Lines: the field name).
    Name(String),
    /// 0-based position.
    Index(usize),
}

impl std::fmt::Display for Column {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Column::Name(n) => write!(f, "{n:?}"),
            Column::Index(i) => write!(f, "column {i}"),
        }
    }
}

impl Column {
    /// `"3"` is an index, anything else a name.
    pub fn parse(s: &str) -> Self {
        s.parse()
            .map(Column::Index)
            .unwrap_or_else(|_| Column::Name(s.to_string()))
    }
}

/// One text (or pair) with its label.
#[derive(Debug, Clone, PartialEq)]
pub struct TextExample {
    /// The text.
    pub text: String,
    /// The second text of a pair.
    pub pair: Option<String>,
    /// The label as written (a class name, or a number for regression; "" without a label
    /// column).
    pub label: String,
    /// A third text (a hard negative), if read.
    pub extra: Option<String>,
    /// 1-based line in its file.
    pub line: usize,
}

/// One sentence of a CoNLL file: words and their tags.
#[derive(Debug, Clone, PartialEq)]
pub struct TaggedSentence {
    /// Words (first column).
    pub words: Vec<String>,
    /// Tags (the tag column).
    pub tags: Vec<String>,
    /// 1-based line of the first word.
    pub line: usize,
}

/// Which columns hold what.
#[derive(Debug, Clone)]
pub struct Columns {
    /// The text.
    pub text: Column,
    /// The second text of a pair, if any.
    pub pair: Option<Column>,
    /// The label (`None`: unlabelled, e.g. anchor / positive pairs).
    pub label: Option<Column>,
    /// A third text (a hard negative), if any.
    pub extra: Option<Column>,
}

fn data_err(path: &Path, line: usize, message: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        line,
        message: message.into(),
    }
}

/// A data file as text: a regular file or a pipe (never a device or directory), valid
/// UTF-8, without the byte-order mark some editors put first (MRPC's files have one).
pub(crate) fn read_utf8(path: &Path) -> Result<String> {
    berth_text::limits::readable_stream(path).map_err(|e| data_err(path, 0, e.to_string()))?;
    let bytes = std::fs::read(path).map_err(crate::error::io(path))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        data_err(path, line, "invalid UTF-8")
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// The records of a CSV (RFC 4180 quoting: fields may hold commas, doubled quotes and
/// newlines) or TSV (tabs, no quoting) text, read with the `csv` crate, each with its
/// 1-based starting line. Rows may differ in length (the caller names the line).
fn table_records(text: &str, path: &Path, tsv: bool) -> Result<Vec<(usize, Vec<String>)>> {
    if !tsv {
        if let Some(line) = berth_text::limits::unterminated_csv_quote(text.as_bytes()) {
            return Err(data_err(path, line, "unterminated quoted field"));
        }
    }
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(if tsv { b'\t' } else { b',' })
        .quoting(!tsv)
        .from_reader(text.as_bytes());
    let mut out = Vec::new();
    for record in r.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            data_err(path, line, e.to_string())
        })?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        out.push((line, record.iter().map(str::to_string).collect()));
    }
    Ok(out)
}

/// Reads labelled texts from CSV (`.csv`), JSON Lines (`.jsonl` / `.json`) or TSV (anything
/// else; fields split on tabs, no quoting). CSV and TSV need a header row. Returns the
/// examples and how many bad rows were skipped.
pub fn read_text_examples(
    path: &Path,
    cols: &Columns,
    skip_bad_rows: bool,
) -> Result<(Vec<TextExample>, usize)> {
    let text = read_utf8(path)?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut examples = Vec::new();
    let mut skipped = 0;
    let bad = |line: usize, msg: String, skipped: &mut usize| -> Result<()> {
        if skip_bad_rows {
            *skipped += 1;
            Ok(())
        } else {
            Err(data_err(path, line, msg))
        }
    };
    if ext == "jsonl" || ext == "json" {
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let line = i + 1;
            let v: serde_json::Value = match serde_json::from_str(l) {
                Ok(v) => v,
                Err(e) => {
                    bad(line, format!("invalid JSON: {e}"), &mut skipped)?;
                    continue;
                }
            };
            let field = |c: &Column| -> Option<String> {
                let f = match c {
                    Column::Name(n) => v.get(n),
                    Column::Index(_) => None,
                }?;
                match f {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    serde_json::Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                }
            };
            let optional = |c: &Option<Column>| c.as_ref().map(field);
            match (
                field(&cols.text),
                optional(&cols.pair),
                optional(&cols.label),
                optional(&cols.extra),
            ) {
                (Some(text), pair, label, extra)
                    if [&pair, &label, &extra]
                        .iter()
                        .all(|f| f.as_ref().is_none_or(|v| v.is_some())) =>
                {
                    examples.push(TextExample {
                        text,
                        pair: pair.flatten(),
                        label: label.flatten().unwrap_or_default(),
                        extra: extra.flatten(),
                        line,
                    })
                }
                _ => bad(
                    line,
                    format!(
                        "needs string fields {}",
                        [
                            Some(&cols.text),
                            cols.pair.as_ref(),
                            cols.label.as_ref(),
                            cols.extra.as_ref()
                        ]
                        .into_iter()
                        .flatten()
                        .map(Column::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                    ),
                    &mut skipped,
                )?,
            }
        }
    } else {
        let records = table_records(&text, path, ext != "csv")?;
        let mut records = records
            .into_iter()
            .filter(|(_, r)| !(r.len() == 1 && r[0].trim().is_empty()));
        let Some((_, header)) = records.next() else {
            return Err(data_err(path, 0, "empty file: no header and no examples"));
        };
        let find = |c: &Column| -> Result<usize> {
            match c {
                Column::Index(i) if *i < header.len() => Ok(*i),
                Column::Index(i) => Err(data_err(
                    path,
                    1,
                    format!(
                        "column {i} is out of range: the header has {} columns",
                        header.len()
                    ),
                )),
                Column::Name(n) => header.iter().position(|h| h.trim() == n).ok_or_else(|| {
                    data_err(
                        path,
                        1,
                        format!(
                            "no column {n:?} in the header (columns: {})",
                            header.join(", ")
                        ),
                    )
                }),
            }
        };
        let ti = find(&cols.text)?;
        let li = cols.label.as_ref().map(find).transpose()?;
        let pi = cols.pair.as_ref().map(find).transpose()?;
        let xi = cols.extra.as_ref().map(find).transpose()?;
        for (line, r) in records {
            if r.len() != header.len() {
                bad(
                    line,
                    format!("{} fields where the header has {}", r.len(), header.len()),
                    &mut skipped,
                )?;
                continue;
            }
            examples.push(TextExample {
                text: r[ti].clone(),
                pair: pi.map(|p| r[p].clone()),
                label: li.map(|l| r[l].trim().to_string()).unwrap_or_default(),
                extra: xi.map(|x| r[x].clone()),
                line,
            });
        }
    }
    if examples.is_empty() {
        return Err(data_err(path, 0, "no examples"));
    }
    Ok((examples, skipped))
}

/// Reads a CoNLL column file: one token per line (`WORD ... TAG`, spaces or tabs), a blank
/// line between sentences, `-DOCSTART-` lines skipped. The tag is column `tag_column`
/// (default: the last). Every token line must have as many columns as the first.
pub fn read_conll(
    path: &Path,
    tag_column: Option<usize>,
    skip_bad_rows: bool,
) -> Result<(Vec<TaggedSentence>, usize)> {
    let text = read_utf8(path)?;
    let mut out = Vec::new();
    let mut skipped = 0;
    let mut width: Option<usize> = None;
    let mut cur = TaggedSentence {
        words: Vec::new(),
        tags: Vec::new(),
        line: 1,
    };
    let mut broken = false;
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        let fields: Vec<&str> = l.split_whitespace().collect();
        if fields.is_empty() || fields[0] == "-DOCSTART-" {
            if !cur.words.is_empty() && !broken {
                out.push(std::mem::replace(
                    &mut cur,
                    TaggedSentence {
                        words: Vec::new(),
                        tags: Vec::new(),
                        line: line + 1,
                    },
                ));
            } else {
                cur = TaggedSentence {
                    words: Vec::new(),
                    tags: Vec::new(),
                    line: line + 1,
                };
            }
            broken = false;
            continue;
        }
        let w = *width.get_or_insert(fields.len());
        let tc = tag_column.unwrap_or(w - 1);
        let problem = if fields.len() != w {
            Some(format!(
                "{} columns where the file's first token line has {w}",
                fields.len()
            ))
        } else if w < 2 {
            Some("a token line needs a word and a tag".to_string())
        } else if tc >= w {
            Some(format!("tag column {tc} is out of range ({w} columns)"))
        } else {
            None
        };
        if let Some(msg) = problem {
            if !skip_bad_rows {
                return Err(data_err(path, line, msg));
            }
            skipped += 1;
            broken = true; // the whole sentence goes: a hole would shift the tags
            continue;
        }
        if cur.words.is_empty() {
            cur.line = line;
        }
        cur.words.push(fields[0].to_string());
        cur.tags.push(fields[tc].to_string());
    }
    if !cur.words.is_empty() && !broken {
        out.push(cur);
    }
    if out.is_empty() {
        return Err(data_err(path, 0, "no sentences"));
    }
    Ok((out, skipped))
}

/// One SQuAD question.
#[derive(Debug, Clone, PartialEq)]
pub struct SquadQuestion {
    /// Question id.
    pub id: String,
    /// The question.
    pub question: String,
    /// Its paragraph.
    pub context: String,
    /// Gold answers: text and character start in the context (empty: unanswerable).
    pub answers: Vec<(String, usize)>,
}

/// Reads SQuAD JSON (v1.1 or v2.0: `data` → `paragraphs` → `qas`). Answer starts count
/// characters (code points), as SQuAD does; an answer whose text is not at its start in the
/// context is an error naming the question (or skipped with `skip_bad_rows`).
pub fn read_squad(path: &Path, skip_bad_rows: bool) -> Result<(Vec<SquadQuestion>, usize)> {
    let text = read_utf8(path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| data_err(path, e.line(), format!("invalid JSON: {e}")))?;
    let articles = v["data"]
        .as_array()
        .ok_or_else(|| data_err(path, 0, "no \"data\" list (SQuAD format)"))?;
    let mut out = Vec::new();
    let mut skipped = 0;
    for para in articles
        .iter()
        .flat_map(|a| a["paragraphs"].as_array().into_iter().flatten())
    {
        let Some(context) = para["context"].as_str() else {
            return Err(data_err(path, 0, "a paragraph without \"context\""));
        };
        let chars: Vec<char> = context.chars().collect();
        for qa in para["qas"].as_array().into_iter().flatten() {
            let id = match &qa["id"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let question = qa["question"].as_str().unwrap_or_default().to_string();
            let mut answers = Vec::new();
            let mut problem = question
                .trim()
                .is_empty()
                .then(|| "empty question".to_string());
            for a in qa["answers"].as_array().into_iter().flatten() {
                let (Some(t), Some(st)) = (a["text"].as_str(), a["answer_start"].as_u64()) else {
                    problem = Some("an answer without \"text\" and \"answer_start\"".into());
                    break;
                };
                let st = st as usize;
                let found: String = chars.iter().skip(st).take(t.chars().count()).collect();
                if found != t {
                    problem = Some(format!(
                        "answer {t:?} is not at character {st} of the context"
                    ));
                    break;
                }
                answers.push((t.to_string(), st));
            }
            match problem {
                Some(msg) if skip_bad_rows => {
                    let _ = msg;
                    skipped += 1;
                }
                Some(msg) => return Err(data_err(path, 0, format!("question {id}: {msg}"))),
                None => out.push(SquadQuestion {
                    id,
                    question,
                    context: context.to_string(),
                    answers,
                }),
            }
        }
    }
    if out.is_empty() {
        return Err(data_err(path, 0, "no questions"));
    }
    Ok((out, skipped))
}

/// A seeded split: `dev_fraction` of the items (at least one) for dev, the rest for training,
/// both in their original order.
pub fn split<T: Clone>(items: &[T], dev_fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let n_dev = ((items.len() as f64 * dev_fraction).round() as usize)
        .clamp(1, items.len().saturating_sub(1).max(1));
    let mut dev_idx = idx[..n_dev].to_vec();
    let mut train_idx = idx[n_dev..].to_vec();
    dev_idx.sort_unstable();
    train_idx.sort_unstable();
    (
        train_idx.iter().map(|&i| items[i].clone()).collect(),
        dev_idx.iter().map(|&i| items[i].clone()).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn cols() -> Columns {
        Columns {
            text: Column::Name("sentence".into()),
            pair: None,
            label: Some(Column::Name("label".into())),
            extra: None,
        }
    }

    #[test]
    fn reads_tsv_csv_and_jsonl() {
        let d = tempfile::tempdir().unwrap();
        let tsv = write(
            d.path(),
            "a.tsv",
            "sentence\tlabel\ngood \"film\"\t1\nbad\t0\n",
        );
        let (ex, _) = read_text_examples(&tsv, &cols(), false).unwrap();
        assert_eq!(
            (ex[0].text.as_str(), ex[0].label.as_str(), ex[1].line),
            ("good \"film\"", "1", 3)
        );
        let csv = write(
            d.path(),
            "a.csv",
            "label,sentence\r\npos,\"a, b \"\"c\"\"\nd\"\nneg,plain\n",
        );
        let (ex, _) = read_text_examples(&csv, &cols(), false).unwrap();
        assert_eq!(ex[0].text, "a, b \"c\"\nd");
        assert_eq!((ex[1].label.as_str(), ex[1].line), ("neg", 4));
        let jl = write(
            d.path(),
            "a.jsonl",
            "{\"sentence\": \"x\", \"label\": 2}\n\n{\"sentence\": \"y\", \"label\": \"b\"}\n",
        );
        let (ex, _) = read_text_examples(&jl, &cols(), false).unwrap();
        assert_eq!((ex[0].label.as_str(), ex[1].line), ("2", 3));
    }

    #[test]
    fn bad_rows_are_errors_or_counted() {
        let d = tempfile::tempdir().unwrap();
        let tsv = write(
            d.path(),
            "b.tsv",
            "sentence\tlabel\nok\t1\nbroken row\nfine\t0\n",
        );
        let e = read_text_examples(&tsv, &cols(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.tsv:3") && e.contains("1 fields"), "{e}");
        let (ex, skipped) = read_text_examples(&tsv, &cols(), true).unwrap();
        assert_eq!((ex.len(), skipped), (2, 1));
        let nolabel = write(d.path(), "c.tsv", "sentence\ttarget\nok\t1\n");
        let e = read_text_examples(&nolabel, &cols(), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no column \"label\"") && e.contains("sentence, target"),
            "{e}"
        );
        let empty = write(d.path(), "e.tsv", "");
        assert!(read_text_examples(&empty, &cols(), false)
            .unwrap_err()
            .to_string()
            .contains("empty file"));
        let header_only = write(d.path(), "h.tsv", "sentence\tlabel\n");
        assert!(read_text_examples(&header_only, &cols(), false)
            .unwrap_err()
            .to_string()
            .contains("no examples"));
        let latin1 = d.path().join("l.tsv");
        std::fs::write(&latin1, b"sentence\tlabel\ncaf\xe9\t1\n").unwrap();
        assert!(read_text_examples(&latin1, &cols(), false)
            .unwrap_err()
            .to_string()
            .contains("l.tsv:2: invalid UTF-8"));
    }

    #[test]
    fn reads_conll_and_reports_broken_lines() {
        let d = tempfile::tempdir().unwrap();
        let ok = write(
            d.path(),
            "a.conll",
            "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n",
        );
        let (s, _) = read_conll(&ok, None, false).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].words.clone(), s[0].tags.clone(), s[1].line),
            (
                vec!["EU".to_string(), "rejects".into()],
                vec!["B-ORG".to_string(), "O".into()],
                6
            )
        );
        let broken = write(
            d.path(),
            "b.conll",
            "EU NNP B-NP B-ORG\nrejects O\n\nPeter NNP B-NP B-PER\n",
        );
        let e = read_conll(&broken, None, false).unwrap_err().to_string();
        assert!(e.contains("b.conll:2") && e.contains("2 columns"), "{e}");
        let (s, skipped) = read_conll(&broken, None, true).unwrap();
        assert_eq!((s.len(), skipped, s[0].words[0].as_str()), (1, 1, "Peter"));
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let items: Vec<usize> = (0..100).collect();
        let (a, b) = split(&items, 0.2, 42);
        assert_eq!((a.len(), b.len()), (80, 20));
        assert_eq!(split(&items, 0.2, 42), (a.clone(), b.clone()));
        assert!(b.iter().all(|x| !a.contains(x)));
        assert_ne!(split(&items, 0.2, 43).1, b);
    }
}
