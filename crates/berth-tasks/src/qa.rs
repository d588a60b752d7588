//! Extractive question answering with transformers' QuestionAnsweringPipeline semantics:
//! the context split into windows (`max_seq_len`, `doc_stride`), start/end probabilities per
//! window, spans up to `max_answer_len` tokens, answers aligned to words, identical answers
//! from several windows merged, and the null answer when asked for.
use berth_text::{char_slice, char_to_byte_table, Encoded};
use serde::Serialize;

use crate::classify::require_head;
use crate::error::{Result, TaskError};
use crate::pipeline::Pipeline;

/// Options of [`answer`], with transformers' defaults.
#[derive(Debug, Clone)]
pub struct QaOptions {
    /// Answers per question.
    pub top_k: usize,
    /// Window size in tokens (question + context + special tokens); default
    /// `min(model max length, 384)`.
    pub max_seq_len: Option<usize>,
    /// Tokens shared by consecutive windows; default `min(max_seq_len / 2, 128)`.
    pub doc_stride: Option<usize>,
    /// Longest answer in tokens.
    pub max_answer_len: usize,
    /// Questions longer than this (in tokens) are cut.
    pub max_question_len: usize,
    /// Also offer the empty answer, scored by the [CLS] start × end probability.
    pub handle_impossible_answer: bool,
    /// Widen answers to whole words.
    pub align_to_words: bool,
}

impl Default for QaOptions {
    fn default() -> Self {
        QaOptions {
            top_k: 1,
            max_seq_len: None,
            doc_stride: None,
            max_answer_len: 15,
            max_question_len: 64,
            handle_impossible_answer: false,
            align_to_words: true,
        }
    }
}

/// One answer: a character span of the context.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    /// The span's text (empty for the null answer).
    pub answer: String,
    /// start × end probability (summed over windows and spans giving the same text).
    pub score: f64,
    /// Start character offset in the context.
    pub start: usize,
    /// End character offset in the context.
    pub end: usize,
}

/// A question and its context.
#[derive(Debug, Clone)]
pub struct QaInput {
    /// The question.
    pub question: String,
    /// The text holding the answer.
    pub context: String,
}

/// The question cut to `max_len` tokens (special tokens not counted), at a token boundary.
fn cut_question(p: &Pipeline, q: &str, max_len: usize, index: usize) -> Result<String> {
    let e = p
        .tokenizer
        .encode(q, None, usize::MAX, berth_text::Truncation::Truncate, index)?;
    let content: Vec<usize> = (0..e.len()).filter(|&i| !e.special[i]).collect();
    if content.len() <= max_len || max_len == 0 {
        return Ok(q.to_string());
    }
    let end = e.offsets[content[max_len - 1]].1;
    Ok(char_slice(q, &char_to_byte_table(q), 0, end))
}

/// Answers each question from its context. Input `i` is named `first_index + i` in errors.
pub fn answer(
    p: &Pipeline,
    inputs: &[QaInput],
    opts: &QaOptions,
    first_index: usize,
) -> Result<Vec<Vec<Answer>>> {
    require_head(&p.model, berth_model::HeadKind::QuestionAnswering)?;
    if opts.top_k == 0 || opts.max_answer_len == 0 {
        return Err(TaskError::Options(
            "top_k and max_answer_len must be at least 1".into(),
        ));
    }
    let max_seq_len = opts.max_seq_len.unwrap_or(p.max_length.min(384));
    if max_seq_len > p.max_length {
        return Err(TaskError::Options(format!(
            "max_seq_len {max_seq_len} exceeds the model's {} positions",
            p.max_length
        )));
    }
    let stride = opts.doc_stride.unwrap_or((max_seq_len / 2).min(128));
    if stride > max_seq_len {
        return Err(TaskError::Options(format!(
            "doc_stride ({stride}) is larger than max_seq_len ({max_seq_len})"
        )));
    }
    let cls = p.tokenizer.cls_id();
    let mut windows: Vec<Encoded> = Vec::new();
    let mut owner = Vec::new();
    for (i, x) in inputs.iter().enumerate() {
        let index = first_index + i;
        if x.context.trim().is_empty() {
            return Err(TaskError::Input {
                index,
                message: "empty context".into(),
            });
        }
        if x.question.trim().is_empty() {
            return Err(TaskError::Input {
                index,
                message: "empty question".into(),
            });
        }
        let q = cut_question(p, &x.question, opts.max_question_len, index)?;
        let ws = p
            .tokenizer
            .encode_windows(&q, Some(&x.context), max_seq_len, stride, index)?;
        owner.extend(std::iter::repeat_n(i, ws.len()));
        windows.extend(ws);
    }
    let mut logits: Vec<(Vec<f32>, Vec<f32>)> = Vec::with_capacity(windows.len());
    p.for_each_batch(&windows, |_, batch, hidden| {
        let (s, e) = p.model.qa_logits(hidden)?;
        let (s, e) = (s.to_vec1::<f32>()?, e.to_vec1::<f32>()?);
        for k in 0..batch.num_sequences() {
            logits.push((s[batch.range(k)].to_vec(), e[batch.range(k)].to_vec()));
        }
        Ok(())
    })?;
    let mut out: Vec<Vec<Answer>> = vec![Vec::new(); inputs.len()];
    let mut min_null = vec![1_000_000f64; inputs.len()];
    let pre_topk = if opts.align_to_words {
        opts.top_k * 2 + 10
    } else {
        opts.top_k
    };
    for ((w, (start, end)), &i) in windows.iter().zip(&logits).zip(&owner) {
        // Tokens an answer may use: the context's, and [CLS] (whose probability is then
        // zeroed after it served the null answer).
        let allowed: Vec<bool> = (0..w.len())
            .map(|t| w.sequence_ids[t] == Some(1) || Some(w.ids[t]) == cls)
            .collect();
        let mut ps = masked_softmax(start, &allowed);
        let mut pe = masked_softmax(end, &allowed);
        if opts.handle_impossible_answer {
            min_null[i] = min_null[i].min(ps[0] * pe[0]);
        }
        ps[0] = 0.0;
        pe[0] = 0.0;
        let context = &inputs[i].context;
        let table = char_to_byte_table(context);
        for (s, e, score) in best_spans(&ps, &pe, &allowed, opts.max_answer_len, pre_topk) {
            let (cs, ce) = char_span(w, s, e, opts.align_to_words);
            let text = char_slice(context, &table, cs, ce);
            let key = text.to_lowercase();
            match out[i].iter_mut().find(|a| a.answer.to_lowercase() == key) {
                Some(a) => a.score += score,
                None => out[i].push(Answer {
                    answer: text,
                    score,
                    start: cs,
                    end: ce,
                }),
            }
        }
    }
    for (answers, null) in out.iter_mut().zip(min_null) {
        if opts.handle_impossible_answer {
            answers.push(Answer {
                answer: String::new(),
                score: null,
                start: 0,
                end: 0,
            });
        }
        answers.sort_by(|a, b| b.score.total_cmp(&a.score)); // stable, as Python's sorted
        answers.truncate(opts.top_k);
    }
    Ok(out)
}

/// Softmax over the window with the disallowed tokens' logits set to -10000 (as transformers
/// does; they come out as exactly zero).
fn masked_softmax(logits: &[f32], allowed: &[bool]) -> Vec<f64> {
    let x: Vec<f64> = logits
        .iter()
        .zip(allowed)
        .map(|(&l, &a)| if a { l as f64 } else { -10000.0 })
        .collect();
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&v| (v - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// The `k` best spans `(start, end, p_start × p_end)` with `start ≤ end < start + max_len`,
/// both ends on allowed tokens and a positive score.
fn best_spans(
    ps: &[f64],
    pe: &[f64],
    allowed: &[bool],
    max_len: usize,
    k: usize,
) -> Vec<(usize, usize, f64)> {
    let mut c = Vec::new();
    for s in (0..ps.len()).filter(|&s| allowed[s] && ps[s] > 0.0) {
        for e in (s..(s + max_len).min(pe.len())).filter(|&e| allowed[e]) {
            let score = ps[s] * pe[e];
            if score > 0.0 {
                c.push((s, e, score));
            }
        }
    }
    c.sort_by(|a, b| b.2.total_cmp(&a.2));
    c.truncate(k);
    c
}

/// Character span of tokens `s..=e` of the context: whole words when aligning (falling back
/// to the tokens' offsets where a token has no word), as transformers' `get_indices`.
fn char_span(w: &Encoded, s: usize, e: usize, align: bool) -> (usize, usize) {
    if align {
        let span = |t: usize| w.word_ids[t].and_then(|word| w.word_to_chars(word, 1));
        if let (Some(a), Some(b)) = (span(s), span(e)) {
            return (a.0, b.1);
        }
    }
    (w.offsets[s].0, w.offsets[e].1)
}
