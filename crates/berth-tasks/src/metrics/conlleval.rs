//! Entity-level precision / recall / F1 exactly as the official CoNLL `conlleval.pl` computes
//! them: the same chunk start / end rules (IOB1, IOB2 and its E / bracket tags), the same
//! token accuracy, the same sentence boundaries, and the same report text.
use std::collections::BTreeMap;

use serde::Serialize;

/// Counts for one entity type (or all).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ChunkCounts {
    /// Chunks in the gold column.
    pub gold: usize,
    /// Chunks in the predicted column.
    pub predicted: usize,
    /// Predicted chunks that match a gold chunk exactly (span and type).
    pub correct: usize,
}

impl ChunkCounts {
    /// Precision in percent.
    pub fn precision(&self) -> f64 {
        if self.predicted == 0 {
            0.0
        } else {
            100.0 * self.correct as f64 / self.predicted as f64
        }
    }
    /// Recall in percent.
    pub fn recall(&self) -> f64 {
        if self.gold == 0 {
            0.0
        } else {
            100.0 * self.correct as f64 / self.gold as f64
        }
    }
    /// F1 in percent.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

/// The result of a conlleval run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Conlleval {
    /// Tokens scored (boundary lines excluded).
    pub tokens: usize,
    /// Tokens whose predicted tag equals the gold tag.
    pub correct_tags: usize,
    /// Over all types.
    pub overall: ChunkCounts,
    /// Per entity type.
    pub per_type: BTreeMap<String, ChunkCounts>,
}

/// A malformed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Splits `B-PER` into (`B`, `PER`) at the first `-`; a tag without `-` has no type. A type
/// of `0` counts as none, as Perl's truthiness has it.
fn split_tag(tag: &str) -> (&str, &str) {
    let (t, ty) = tag.split_once('-').unwrap_or((tag, ""));
    (t, if ty == "0" { "" } else { ty })
}

fn end_of_chunk(prev: &str, tag: &str, prev_type: &str, ty: &str) -> bool {
    matches!(
        (prev, tag),
        ("B", "B") | ("B", "O") | ("I", "B") | ("I", "O") | ("E", "E") | ("E", "I") | ("E", "O")
    ) || (prev != "O" && prev != "." && prev_type != ty)
        || prev == "]"
        || prev == "["
}

fn start_of_chunk(prev: &str, tag: &str, prev_type: &str, ty: &str) -> bool {
    matches!(
        (prev, tag),
        ("B", "B") | ("I", "B") | ("O", "B") | ("O", "I") | ("E", "E") | ("E", "I") | ("O", "E")
    ) || (tag != "O" && tag != "." && prev_type != ty)
        || tag == "["
        || tag == "]"
}

/// Scores conlleval input: one token per line, fields separated by `delimiter` (conlleval's
/// default is one space), the gold tag second to last and the predicted tag last; an empty
/// line or one starting with `-X-` ends a sentence. Every line must have as many fields as the
/// first.
pub fn evaluate<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    delimiter: char,
) -> Result<Conlleval, LineError> {
    let mut r = Conlleval::default();
    let mut n_features: Option<usize> = None;
    let (mut last_gold, mut last_pred) = ("O".to_string(), "O".to_string());
    let (mut last_gold_type, mut last_pred_type) = (String::new(), String::new());
    let mut in_correct = false;
    for (i, line) in lines.into_iter().enumerate() {
        // Perl's split drops trailing empty fields.
        let mut fields: Vec<&str> = line.split(delimiter).collect();
        while fields.last() == Some(&"") {
            fields.pop();
        }
        match n_features {
            None => n_features = Some(fields.len()),
            Some(n) if n != fields.len() && !fields.is_empty() => {
                return Err(LineError {
                    line: i + 1,
                    message: format!("{} fields where earlier lines have {n}", fields.len()),
                })
            }
            _ => {}
        }
        let boundary = fields.is_empty() || fields[0] == "-X-";
        if boundary {
            fields = vec!["-X-", "O", "O"];
        }
        if fields.len() < 2 {
            return Err(LineError {
                line: i + 1,
                message: "needs at least a gold and a predicted tag".into(),
            });
        }
        let (mut pred, pred_type) = split_tag(fields[fields.len() - 1]);
        let (gold, gold_type) = split_tag(fields[fields.len() - 2]);
        if boundary {
            pred = "O";
        }
        if in_correct {
            let gold_end = end_of_chunk(&last_gold, gold, &last_gold_type, gold_type);
            let pred_end = end_of_chunk(&last_pred, pred, &last_pred_type, pred_type);
            if gold_end && pred_end && last_pred_type == last_gold_type {
                in_correct = false;
                r.overall.correct += 1;
                r.per_type
                    .entry(last_gold_type.clone())
                    .or_default()
                    .correct += 1;
            } else if gold_end != pred_end || pred_type != gold_type {
                in_correct = false;
            }
        }
        let gold_start = start_of_chunk(&last_gold, gold, &last_gold_type, gold_type);
        let pred_start = start_of_chunk(&last_pred, pred, &last_pred_type, pred_type);
        if gold_start && pred_start && pred_type == gold_type {
            in_correct = true;
        }
        if gold_start {
            r.overall.gold += 1;
            r.per_type.entry(gold_type.to_string()).or_default().gold += 1;
        }
        if pred_start {
            r.overall.predicted += 1;
            r.per_type
                .entry(pred_type.to_string())
                .or_default()
                .predicted += 1;
        }
        if !boundary {
            if gold == pred && pred_type == gold_type {
                r.correct_tags += 1;
            }
            r.tokens += 1;
        }
        (last_gold, last_pred) = (gold.to_string(), pred.to_string());
        (last_gold_type, last_pred_type) = (gold_type.to_string(), pred_type.to_string());
    }
    if in_correct {
        r.overall.correct += 1;
        r.per_type.entry(last_gold_type).or_default().correct += 1;
    }
    Ok(r)
}

impl Conlleval {
    /// Token accuracy in percent.
    pub fn accuracy(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            100.0 * self.correct_tags as f64 / self.tokens as f64
        }
    }

    /// The report conlleval.pl prints, byte for byte.
    pub fn report(&self) -> String {
        let o = &self.overall;
        let mut s = format!(
            "processed {} tokens with {} phrases; found: {} phrases; correct: {}.\n",
            self.tokens, o.gold, o.predicted, o.correct
        );
        if self.tokens > 0 {
            s += &format!(
                "accuracy: {:6.2}%; precision: {:6.2}%; recall: {:6.2}%; FB1: {:6.2}\n",
                self.accuracy(),
                o.precision(),
                o.recall(),
                o.f1()
            );
        }
        for (ty, c) in &self.per_type {
            s += &format!(
                "{:>17}: precision: {:6.2}%; recall: {:6.2}%; FB1: {:6.2}  {}\n",
                ty,
                c.precision(),
                c.recall(),
                c.f1(),
                c.predicted
            );
        }
        s
    }
}
