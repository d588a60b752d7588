//! SQuAD exact match and F1, as the official evaluation script (and transformers'
//! `squad_metrics`) compute them: answers normalised (lower case, ASCII punctuation removed,
//! the articles a / an / the removed, whitespace collapsed), the best score over the gold
//! answers taken per question.
use std::collections::HashMap;

/// Python's `string.punctuation`.
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The official `normalize_answer`.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !PUNCTUATION.contains(*c))
        .collect();
    // re.sub(r"\b(a|an|the)\b", " ", text): whole runs of word characters only.
    let mut no_articles = String::with_capacity(no_punct.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punct.chars() {
        if is_word_char(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut no_articles);
            no_articles.push(c);
        }
    }
    flush(&mut word, &mut no_articles);
    no_articles.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// 1 when the normalised answers are equal, else 0.
pub fn exact_match(gold: &str, pred: &str) -> f64 {
    if normalize_answer(gold) == normalize_answer(pred) {
        1.0
    } else {
        0.0
    }
}

/// Token-overlap F1 of the normalised answers (1 when both are empty, 0 when only one is).
pub fn f1(gold: &str, pred: &str) -> f64 {
    let g = normalize_answer(gold);
    let p = normalize_answer(pred);
    let gt: Vec<&str> = g.split_whitespace().collect();
    let pt: Vec<&str> = p.split_whitespace().collect();
    if gt.is_empty() || pt.is_empty() {
        return if gt == pt { 1.0 } else { 0.0 };
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0;
    for t in &pt {
        if let Some(c) = counts.get_mut(t).filter(|c| **c > 0) {
            *c -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let (precision, recall) = (same as f64 / pt.len() as f64, same as f64 / gt.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// Best exact match and F1 of `pred` over the gold answers. Gold answers that normalise to
/// nothing are dropped, and a question left with none is unanswerable (gold `""`), as in
/// transformers' `squad_metrics.get_raw_scores`.
pub fn score(golds: &[String], pred: &str) -> (f64, f64) {
    let mut kept: Vec<&str> = golds
        .iter()
        .map(String::as_str)
        .filter(|g| !normalize_answer(g).is_empty())
        .collect();
    if kept.is_empty() {
        kept.push("");
    }
    let em = kept
        .iter()
        .map(|g| exact_match(g, pred))
        .fold(0.0, f64::max);
    let f = kept.iter().map(|g| f1(g, pred)).fold(0.0, f64::max);
    (em, f)
}
