//! Evaluation metrics, each written to agree with the reference implementation people quote:
//! scikit-learn for classification scores, ROC-AUC and nDCG, scipy for correlations,
//! `conlleval.pl` for entity F1 ([`conlleval`]), the SQuAD script for EM / F1 ([`squad`]).
pub mod conlleval;
pub mod squad;

use std::collections::BTreeMap;

use serde::Serialize;

/// Precision, recall, F1 and support of one class (or an average).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Prf {
    /// Precision (0 when nothing was predicted, as scikit-learn's `zero_division=0`).
    pub precision: f64,
    /// Recall (0 when the class never occurs).
    pub recall: f64,
    /// Harmonic mean of the two (0 when both are 0).
    pub f1: f64,
    /// Gold examples of the class.
    pub support: usize,
}

fn prf(tp: usize, pred: usize, gold: usize) -> Prf {
    let div = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (p, r) = (div(tp, pred), div(tp, gold));
    let f1 = if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    };
    Prf {
        precision: p,
        recall: r,
        f1,
        support: gold,
    }
}

/// Single-label classification scores.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassificationReport {
    /// Examples scored.
    pub examples: usize,
    /// Fraction predicted correctly.
    pub accuracy: f64,
    /// Unweighted mean over the classes seen in gold or predictions (scikit-learn `macro`).
    pub macro_avg: Prf,
    /// From the pooled counts (scikit-learn `micro`; equals accuracy for single-label).
    pub micro_avg: Prf,
    /// Support-weighted mean (scikit-learn `weighted`).
    pub weighted_avg: Prf,
    /// Per class, by name.
    pub per_class: BTreeMap<String, Prf>,
}

/// Accuracy and precision / recall / F1 per class, macro, micro and weighted, over the
/// labels that occur in `gold` or `pred` (as scikit-learn with `labels=None`).
pub fn classification_report(gold: &[String], pred: &[String]) -> ClassificationReport {
    assert_eq!(
        gold.len(),
        pred.len(),
        "gold and predictions differ in length"
    );
    let mut counts: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new(); // tp, predicted, gold
    for (g, p) in gold.iter().zip(pred) {
        counts.entry(g).or_default().2 += 1;
        counts.entry(p).or_default().1 += 1;
        if g == p {
            counts.entry(g).or_default().0 += 1;
        }
    }
    let per_class: BTreeMap<String, Prf> = counts
        .iter()
        .map(|(k, &(tp, p, g))| (k.to_string(), prf(tp, p, g)))
        .collect();
    let n = per_class.len().max(1) as f64;
    let mean = |f: fn(&Prf) -> f64| per_class.values().map(f).sum::<f64>() / n;
    let total: usize = gold.len();
    let weighted = |f: fn(&Prf) -> f64| {
        if total == 0 {
            0.0
        } else {
            per_class
                .values()
                .map(|c| f(c) * c.support as f64)
                .sum::<f64>()
                / total as f64
        }
    };
    let tp: usize = counts.values().map(|c| c.0).sum();
    ClassificationReport {
        examples: total,
        accuracy: if total == 0 {
            0.0
        } else {
            tp as f64 / total as f64
        },
        macro_avg: Prf {
            precision: mean(|c| c.precision),
            recall: mean(|c| c.recall),
            f1: mean(|c| c.f1),
            support: total,
        },
        micro_avg: prf(tp, total, total),
        weighted_avg: Prf {
            precision: weighted(|c| c.precision),
            recall: weighted(|c| c.recall),
            f1: weighted(|c| c.f1),
            support: total,
        },
        per_class,
    }
}

/// Multi-label scores ([`multi_label`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MultiLabelReport {
    /// Rows with every label right.
    pub subset_accuracy: f64,
    /// F1 over all (row, label) decisions.
    pub micro_f1: f64,
    /// Mean of the per-label F1 (0 for a label never predicted nor gold, as scikit-learn's
    /// `zero_division=0`).
    pub macro_f1: f64,
}

/// Multi-label scores from (gold targets, predicted flags) per row; a target above 0.5
/// counts as gold.
pub fn multi_label(rows: &[(Vec<f32>, Vec<bool>)], labels: usize) -> MultiLabelReport {
    let (mut tp, mut fp, mut fn_) = (
        vec![0usize; labels],
        vec![0usize; labels],
        vec![0usize; labels],
    );
    let mut exact = 0usize;
    for (gold, pred) in rows {
        let mut all = true;
        for l in 0..labels {
            let g = gold[l] > 0.5;
            match (g, pred[l]) {
                (true, true) => tp[l] += 1,
                (false, true) => fp[l] += 1,
                (true, false) => fn_[l] += 1,
                (false, false) => {}
            }
            all &= g == pred[l];
        }
        exact += all as usize;
    }
    let f1 = |tp: usize, fp: usize, fn_: usize| {
        if tp == 0 {
            0.0
        } else {
            2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
        }
    };
    let sum = |v: &[usize]| v.iter().sum::<usize>();
    MultiLabelReport {
        subset_accuracy: exact as f64 / rows.len().max(1) as f64,
        micro_f1: f1(sum(&tp), sum(&fp), sum(&fn_)),
        macro_f1: (0..labels).map(|l| f1(tp[l], fp[l], fn_[l])).sum::<f64>() / labels.max(1) as f64,
    }
}

/// Ranks of `x` from 1, ties given their average rank (scipy's `rankdata`, method `average`).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    ranks
}

/// Pearson correlation (NaN when either side is constant, as scipy warns and returns).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "pearson: lengths differ");
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    sxy / (sxx * syy).sqrt()
}

/// Spearman rank correlation: Pearson of the average ranks (scipy's `spearmanr`).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&average_ranks(x), &average_ranks(y))
}

/// Area under the ROC curve for binary labels and scores (ties count one half, which is
/// what scikit-learn's trapezoidal `roc_auc_score` gives). `None` when only one class occurs.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Option<f64> {
    assert_eq!(labels.len(), scores.len(), "roc_auc: lengths differ");
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let ranks = average_ranks(scores);
    let rank_sum: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l)
        .map(|(r, _)| r)
        .sum();
    Some((rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64)
}

/// Relevance of each retrieved document, in the system's ranking order (ties keep input order).
pub fn ranked_relevance(scores: &[f64], relevance: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a])); // stable: ties keep input order
    order.into_iter().map(|i| relevance[i]).collect()
}

/// Reciprocal rank of the first relevant (relevance > 0) document within the top `k`
/// (0 when none is); the mean over queries is MRR@k.
pub fn reciprocal_rank(scores: &[f64], relevance: &[f64], k: usize) -> f64 {
    ranked_relevance(scores, relevance)
        .iter()
        .take(k)
        .position(|&r| r > 0.0)
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

/// nDCG@k with linear gains and a log2(rank + 1) discount, as scikit-learn's `ndcg_score`
/// (0 for a query with no relevant document).
pub fn ndcg(scores: &[f64], relevance: &[f64], k: usize) -> f64 {
    ndcg_of_ranking(&ranked_relevance(scores, relevance), relevance, k)
}

/// nDCG@k of a ranking given as the relevance of each retrieved document in rank order,
/// against the ideal ordering of `judged` (every judged relevance of the query, retrieved or
/// not).
pub fn ndcg_of_ranking(ranked: &[f64], judged: &[f64], k: usize) -> f64 {
    let dcg = |rels: &[f64]| {
        rels.iter()
            .take(k)
            .enumerate()
            .map(|(i, r)| r / ((i + 2) as f64).log2())
            .sum::<f64>()
    };
    let mut ideal = judged.to_vec();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let best = dcg(&ideal);
    if best == 0.0 {
        0.0
    } else {
        dcg(ranked) / best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_label_scores_as_scikit_learn() {
        // sklearn: f1_score(average="micro") = 4/6, average="macro" = (1 + 0) / 2 (label 1
        // has tp 0 → 0), accuracy_score (subset) = 0.
        let rows = vec![
            (vec![1.0, 0.0], vec![true, true]),
            (vec![1.0, 1.0], vec![true, false]),
        ];
        let r = multi_label(&rows, 2);
        assert!((r.micro_f1 - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!((r.macro_f1, r.subset_accuracy), (0.5, 0.0));
        assert_eq!(multi_label(&[], 3).subset_accuracy, 0.0);
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(
            average_ranks(&[3.0, 1.0, 3.0, 2.0]),
            vec![3.5, 1.0, 3.5, 2.0]
        );
    }

    #[test]
    fn auc_of_perfect_and_reversed_rankings() {
        let labels = [false, false, true, true];
        assert_eq!(roc_auc(&labels, &[0.1, 0.2, 0.8, 0.9]), Some(1.0));
        assert_eq!(roc_auc(&labels, &[0.9, 0.8, 0.2, 0.1]), Some(0.0));
        assert_eq!(roc_auc(&labels, &[0.5; 4]), Some(0.5));
        assert_eq!(roc_auc(&[true, true], &[0.1, 0.2]), None);
    }

    #[test]
    fn reciprocal_rank_counts_only_the_top_k() {
        assert_eq!(
            reciprocal_rank(&[0.9, 0.8, 0.7], &[0.0, 0.0, 1.0], 10),
            1.0 / 3.0
        );
        assert_eq!(reciprocal_rank(&[0.9, 0.8, 0.7], &[0.0, 0.0, 1.0], 2), 0.0);
    }
}
