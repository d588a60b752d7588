//! Token classification (NER, punctuation restoration, ...) with transformers'
//! TokenClassificationPipeline semantics: aggregation strategies, B-/I- grouping, character
//! offsets into the original text, ignored labels, and long texts in overlapping windows.
use berth_text::{char_slice, char_to_byte_table, Encoded};
use serde::Serialize;

use crate::classify::{encode_inputs, require_head};
use crate::error::{Result, TaskError};
use crate::pipeline::Pipeline;

/// How tokens are merged into entities (transformers' `aggregation_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Aggregation {
    /// Every token with its own label.
    None,
    /// Adjacent tokens with the same entity type grouped (B- starts a new group).
    Simple,
    /// Words take the label of their first token, then grouped.
    First,
    /// Words take the label of their tokens' averaged scores, then grouped.
    Average,
    /// Words take the label of their highest-scoring token, then grouped.
    Max,
}

/// Options of [`token_classify`].
#[derive(Debug, Clone)]
pub struct NerOptions {
    /// Aggregation strategy.
    pub aggregation: Aggregation,
    /// Labels (or entity groups) left out of the output; transformers' default is `["O"]`.
    pub ignore_labels: Vec<String>,
    /// Long texts: windows of the pipeline's max length sharing `stride` tokens (needs an
    /// aggregation other than `None`, as in transformers).
    pub stride: Option<usize>,
    /// Read S- (single) and E- (end) tags as BIOES does. transformers knows only B- and
    /// I-, so it reads `S-PER` as a continuation of a type named `S-PER`; off by default
    /// for parity with it.
    pub bioes: bool,
}

/// One token (`Aggregation::None`) or one entity group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entity {
    /// The token's label (only without aggregation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    /// The group's entity type, B-/I- prefix removed (with aggregation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity_group: Option<String>,
    /// Probability of the label (mean over the group's tokens or words).
    pub score: f32,
    /// Token position in its window (only without aggregation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The tokens decoded back to text.
    pub word: String,
    /// Start character offset in the input text.
    pub start: usize,
    /// End character offset in the input text.
    pub end: usize,
}

/// A token before aggregation.
struct PreEntity {
    word: String,
    scores: Vec<f32>,
    start: usize,
    end: usize,
    index: usize,
    is_subword: bool,
}

/// A labelled token or word before grouping.
struct Labelled {
    label: String,
    score: f32,
    word: String,
    start: usize,
    end: usize,
    index: Option<usize>,
}

fn softmax(row: &[f32]) -> Vec<f32> {
    crate::classify::ClassFunction::Softmax.apply(row)
}

/// First index of the maximum, as numpy's argmax (0 for an empty slice).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Entities of each text. Input `i` is named `first_index + i` in errors.
pub fn token_classify(
    p: &Pipeline,
    texts: &[String],
    opts: &NerOptions,
    first_index: usize,
) -> Result<(Vec<Vec<Entity>>, Vec<Encoded>)> {
    require_head(&p.model, berth_model::HeadKind::TokenClassification)?;
    if opts.stride.is_some() && opts.aggregation == Aggregation::None {
        return Err(TaskError::Options(
            "a stride needs an aggregation strategy other than `none`, as in transformers".into(),
        ));
    }
    let inputs: Vec<_> = texts.iter().map(|t| (t.clone(), None)).collect();
    let (encs, ranges) = encode_inputs(p, &inputs, opts.stride, first_index)?;
    let mut logits: Vec<Vec<Vec<f32>>> = Vec::with_capacity(encs.len());
    p.for_each_batch(&encs, |_, batch, hidden| {
        let all = p.model.token_logits(hidden)?.to_vec2::<f32>()?;
        for s in 0..batch.num_sequences() {
            logits.push(all[batch.range(s)].to_vec());
        }
        Ok(())
    })?;
    let classes = logits
        .first()
        .and_then(|l| l.first())
        .map_or(0, |r| r.len());
    let labels = p.labels(classes)?;
    let mut out = Vec::with_capacity(texts.len());
    for (text, r) in texts.iter().zip(ranges) {
        let table = char_to_byte_table(text);
        let mut entities = Vec::new();
        for w in r.clone() {
            let pre = gather(p, text, &table, &encs[w], &logits[w], opts.aggregation);
            let grouped = aggregate(p, pre, opts.aggregation, &labels, opts.bioes)?;
            entities.extend(grouped.into_iter().filter(|e| {
                let name = e
                    .entity
                    .as_ref()
                    .or(e.entity_group.as_ref())
                    .expect("entity or group is set");
                !opts.ignore_labels.contains(name)
            }));
        }
        if r.len() > 1 {
            entities = merge_overlapping(entities);
        }
        out.push(entities);
    }
    Ok((out, encs))
}

/// transformers' `gather_pre_entities`: drops special tokens and tells subwords apart.
fn gather(
    p: &Pipeline,
    text: &str,
    table: &[usize],
    e: &Encoded,
    logits: &[Vec<f32>],
    agg: Aggregation,
) -> Vec<PreEntity> {
    let word_aware = p.tokenizer.continuing_subword_prefix().is_some();
    let unk = p.tokenizer.unk_id();
    let _ = agg; // every strategy gathers the same way
    let mut pre = Vec::new();
    for (idx, row) in logits.iter().enumerate() {
        if e.special[idx] {
            continue;
        }
        let (start, end) = e.offsets[idx];
        let word_ref = char_slice(text, table, start, end);
        let mut word = e.tokens[idx].clone();
        let mut is_subword = if word_aware {
            word.chars().count() != word_ref.chars().count()
        } else {
            // transformers' fallback for tokenizers without word boundaries: a token not
            // preceded by a space continues a word.
            start > 0 && !char_slice(text, table, start - 1, start + 1).contains(' ')
        };
        if Some(e.ids[idx]) == unk {
            word = word_ref;
            is_subword = false;
        }
        pre.push(PreEntity {
            word,
            scores: softmax(row),
            start,
            end,
            index: idx,
            is_subword,
        });
    }
    pre
}

fn aggregate(
    p: &Pipeline,
    pre: Vec<PreEntity>,
    agg: Aggregation,
    labels: &[String],
    bioes: bool,
) -> Result<Vec<Entity>> {
    let labelled: Vec<Labelled> = match agg {
        Aggregation::None | Aggregation::Simple => pre
            .into_iter()
            .map(|t| {
                let i = argmax(&t.scores);
                Labelled {
                    label: labels[i].clone(),
                    score: t.scores[i],
                    word: t.word,
                    start: t.start,
                    end: t.end,
                    index: Some(t.index),
                }
            })
            .collect(),
        _ => {
            let mut words = Vec::new();
            let mut group: Vec<PreEntity> = Vec::new();
            for t in pre {
                if !group.is_empty() && !t.is_subword {
                    words.push(aggregate_word(p, std::mem::take(&mut group), agg, labels)?);
                }
                group.push(t);
            }
            if !group.is_empty() {
                words.push(aggregate_word(p, group, agg, labels)?);
            }
            words
        }
    };
    if agg == Aggregation::None {
        return Ok(labelled
            .into_iter()
            .map(|l| Entity {
                entity: Some(l.label),
                entity_group: None,
                score: l.score,
                index: l.index,
                word: l.word,
                start: l.start,
                end: l.end,
            })
            .collect());
    }
    group_entities(p, labelled, bioes)
}

/// One word from its tokens (transformers' `aggregate_word`).
fn aggregate_word(
    p: &Pipeline,
    tokens: Vec<PreEntity>,
    agg: Aggregation,
    labels: &[String],
) -> Result<Labelled> {
    let word = p
        .tokenizer
        .tokens_to_string(&tokens.iter().map(|t| t.word.clone()).collect::<Vec<_>>())?;
    let scores: Vec<f32> = match agg {
        Aggregation::First => tokens[0].scores.clone(),
        Aggregation::Max => {
            // The first token whose best score is highest.
            let best = |t: &PreEntity| t.scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut pick = &tokens[0];
            for t in &tokens[1..] {
                if best(t) > best(pick) {
                    pick = t;
                }
            }
            pick.scores.clone()
        }
        Aggregation::Average => {
            let n = tokens.len() as f32;
            (0..labels.len())
                .map(|c| tokens.iter().map(|t| t.scores[c]).sum::<f32>() / n)
                .collect()
        }
        Aggregation::None | Aggregation::Simple => {
            unreachable!("token strategies do not aggregate words")
        }
    };
    let i = argmax(&scores);
    Ok(Labelled {
        label: labels[i].clone(),
        score: scores[i],
        word,
        start: tokens[0].start,
        end: tokens[tokens.len() - 1].end,
        index: None,
    })
}

/// B-/I- prefix and entity type: `B-PER` → (B, PER); a label without either prefix
/// continues (I) an entity of its own name, as transformers reads it.
fn tag(label: &str, bioes: bool) -> (char, &str) {
    if bioes {
        if let Some(t) = label.strip_prefix("S-") {
            return ('S', t);
        }
        if let Some(t) = label.strip_prefix("E-") {
            return ('E', t);
        }
    }
    if let Some(t) = label.strip_prefix("B-") {
        ('B', t)
    } else if let Some(t) = label.strip_prefix("I-") {
        ('I', t)
    } else {
        ('I', label)
    }
}

/// Where each item starts a new group (transformers' `group_entities` rule: a change of
/// type, or a B- tag; with `bioes`, also S- tags and whatever follows an S- or E- tag).
fn group_starts(labels: &[&str], bioes: bool) -> Vec<bool> {
    labels
        .iter()
        .enumerate()
        .map(|(i, label)| {
            if i == 0 {
                return true;
            }
            let (bi, t) = tag(label, bioes);
            let (last_bi, last_t) = tag(labels[i - 1], bioes);
            t != last_t || bi == 'B' || bi == 'S' || last_bi == 'E' || last_bi == 'S'
        })
        .collect()
}

/// Groups adjacent entities of one type (transformers' `group_entities`).
fn group_entities(p: &Pipeline, items: Vec<Labelled>, bioes: bool) -> Result<Vec<Entity>> {
    let labels: Vec<&str> = items.iter().map(|i| i.label.as_str()).collect();
    let starts = group_starts(&labels, bioes);
    let mut groups = Vec::new();
    let mut current: Vec<Labelled> = Vec::new();
    for (item, start) in items.into_iter().zip(starts) {
        if start && !current.is_empty() {
            groups.push(group(p, std::mem::take(&mut current))?);
        }
        current.push(item);
    }
    if !current.is_empty() {
        groups.push(group(p, current)?);
    }
    Ok(groups)
}

fn group(p: &Pipeline, items: Vec<Labelled>) -> Result<Entity> {
    let first = &items[0].label;
    let entity_group = first
        .split_once('-')
        .map_or(first.as_str(), |(_, t)| t)
        .to_string();
    let score = items.iter().map(|i| i.score).sum::<f32>() / items.len() as f32;
    let word = p
        .tokenizer
        .tokens_to_string(&items.iter().map(|i| i.word.clone()).collect::<Vec<_>>())?;
    Ok(Entity {
        entity: None,
        entity_group: Some(entity_group),
        score,
        index: None,
        word,
        start: items[0].start,
        end: items[items.len() - 1].end,
    })
}

/// Resolves entities found twice in overlapping windows: sorted by start, an entity that
/// starts inside the previous one replaces it when longer (or as long and more confident).
fn merge_overlapping(mut entities: Vec<Entity>) -> Vec<Entity> {
    if entities.is_empty() {
        return entities;
    }
    entities.sort_by_key(|e| e.start); // stable, as Python's sorted
    let mut out = Vec::new();
    // The first entity is compared with itself too, as in transformers (an empty-span
    // entity therefore appears twice there, and here).
    let mut prev = entities[0].clone();
    for e in entities {
        if prev.start <= e.start && e.start < prev.end {
            let (len, prev_len) = (e.end - e.start, prev.end - prev.start);
            if len > prev_len || (len == prev_len && e.score > prev.score) {
                prev = e;
            }
        } else {
            out.push(std::mem::replace(&mut prev, e));
        }
    }
    out.push(prev);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(labels: &[&str], bioes: bool) -> Vec<bool> {
        group_starts(labels, bioes)
    }

    #[test]
    fn iob2_and_iob1_runs_group_as_transformers_does() {
        // IOB2: B- starts, I- continues; a type change starts a group.
        assert_eq!(
            starts(&["B-PER", "I-PER", "B-PER", "I-LOC"], false),
            [true, false, true, true]
        );
        // IOB1: an I- run after another type starts a group; B- only splits same-type runs.
        assert_eq!(
            starts(&["I-PER", "I-PER", "B-PER", "I-ORG"], false),
            [true, false, true, true]
        );
    }

    #[test]
    fn bioes_singles_and_ends_close_their_groups() {
        let tags = [
            "S-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "B-LOC", "E-LOC",
        ];
        assert_eq!(
            starts(&tags, true),
            [true, true, true, false, false, true, false]
        );
        // As transformers reads them: S-PER twice is one run of a type named "S-PER", and
        // E-LOC is a type of its own.
        assert_eq!(
            starts(&tags, false),
            [true, false, true, false, true, true, true]
        );
    }
}
