//! Masked-language-model inputs, as BERT / RoBERTa pretrain: a fraction of each sequence's
//! tokens is chosen (never special tokens), and of those 80 % become the mask token, 10 % a
//! random token and 10 % stay; the loss is taken at the chosen positions only.
//!
//! Token-level choice follows transformers' `DataCollatorForLanguageModeling` (each candidate
//! chosen independently with probability `rate`); whole-word masking follows
//! `DataCollatorForWholeWordMask` (words taken in random order until `round(rate × tokens)`
//! tokens are chosen, a word never split), with words from the tokenizer's word ids, so it
//! works for WordPiece, BPE and Unigram alike. Masking is dynamic: a new draw every time a
//! sequence is seen, from a generator the caller seeds.
use rand::seq::SliceRandom;
use rand::Rng;

/// How tokens are masked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskingConfig {
    /// Fraction of (non-special) tokens chosen for prediction (BERT 0.15; Cramming / MosaicBERT 0.3).
    pub rate: f64,
    /// Choose whole words.
    pub whole_word: bool,
    /// The mask token's id.
    pub mask_id: u32,
    /// Random replacements are drawn from `0..vocab_size`.
    pub vocab_size: u32,
}

/// One masked sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masked {
    /// The input ids after masking.
    pub ids: Vec<u32>,
    /// Chosen positions, ascending.
    pub positions: Vec<u32>,
    /// The original id at each chosen position (the prediction target).
    pub labels: Vec<u32>,
}

/// Masks one sequence. `special` marks tokens that are never chosen; `word_ids` (same
/// length) groups tokens into words for whole-word masking (`None` for special tokens).
pub fn mask_sequence(
    ids: &[u32],
    special: &[bool],
    word_ids: &[Option<u32>],
    cfg: &MaskingConfig,
    rng: &mut impl Rng,
) -> Masked {
    assert_eq!(
        ids.len(),
        special.len(),
        "mask_sequence: ids and special differ in length"
    );
    let mut chosen = vec![false; ids.len()];
    if cfg.whole_word {
        assert_eq!(
            ids.len(),
            word_ids.len(),
            "mask_sequence: ids and word ids differ in length"
        );
        // Words as runs of candidate tokens sharing a word id.
        let mut words: Vec<Vec<usize>> = Vec::new();
        for i in (0..ids.len()).filter(|&i| !special[i]) {
            match words.last_mut() {
                Some(w)
                    if word_ids[i].is_some()
                        && word_ids[*w.last().expect("non-empty")] == word_ids[i]
                        && *w.last().expect("non-empty") + 1 == i =>
                {
                    w.push(i)
                }
                _ => words.push(vec![i]),
            }
        }
        let candidates: usize = words.iter().map(Vec::len).sum();
        let target =
            ((candidates as f64 * cfg.rate).round() as usize).max(usize::from(candidates > 0));
        words.shuffle(rng);
        let mut taken = 0;
        for w in &words {
            if taken >= target {
                break;
            }
            if taken + w.len() > target {
                continue;
            }
            taken += w.len();
            w.iter().for_each(|&i| chosen[i] = true);
        }
    } else {
        for (i, c) in chosen.iter_mut().enumerate() {
            *c = !special[i] && rng.random::<f64>() < cfg.rate;
        }
    }
    let mut out = Masked {
        ids: ids.to_vec(),
        positions: Vec::new(),
        labels: Vec::new(),
    };
    for i in (0..ids.len()).filter(|&i| chosen[i]) {
        out.positions.push(i as u32);
        out.labels.push(ids[i]);
        let r: f64 = rng.random();
        if r < 0.8 {
            out.ids[i] = cfg.mask_id;
        } else if r < 0.9 {
            out.ids[i] = rng.random_range(0..cfg.vocab_size);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A sequence of `words` words of 1-3 tokens each, between [CLS] (0) and [SEP] (1).
    fn sequence(words: usize, rng: &mut impl Rng) -> (Vec<u32>, Vec<bool>, Vec<Option<u32>>) {
        let (mut ids, mut special, mut wid) = (vec![0], vec![true], vec![None]);
        for w in 0..words {
            for _ in 0..rng.random_range(1..=3) {
                ids.push(rng.random_range(10..1000));
                special.push(false);
                wid.push(Some(w as u32));
            }
        }
        ids.push(1);
        special.push(true);
        wid.push(None);
        (ids, special, wid)
    }

    fn stats(whole_word: bool, rate: f64) {
        let cfg = MaskingConfig {
            rate,
            whole_word,
            mask_id: 5,
            vocab_size: 1000,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut candidates, mut chosen, mut masked, mut random, mut kept) = (0, 0, 0, 0, 0);
        for _ in 0..4000 {
            let (ids, special, wid) = sequence(rng.random_range(5..60), &mut rng);
            let m = mask_sequence(&ids, &special, &wid, &cfg, &mut rng);
            candidates += special.iter().filter(|s| !**s).count();
            chosen += m.positions.len();
            for (&p, &label) in m.positions.iter().zip(&m.labels) {
                let p = p as usize;
                assert!(!special[p], "special token chosen");
                assert_eq!(label, ids[p]);
                match m.ids[p] {
                    5 => masked += 1,
                    v if v == ids[p] => kept += 1,
                    _ => random += 1,
                }
            }
            // Positions not chosen are untouched.
            for i in 0..ids.len() {
                if !m.positions.contains(&(i as u32)) {
                    assert_eq!(m.ids[i], ids[i]);
                }
            }
            if whole_word {
                // A word is chosen whole or not at all.
                for w in wid.iter().flatten() {
                    let members: Vec<usize> =
                        (0..ids.len()).filter(|&i| wid[i] == Some(*w)).collect();
                    let picked = members
                        .iter()
                        .filter(|&&i| m.positions.contains(&(i as u32)))
                        .count();
                    assert!(picked == 0 || picked == members.len(), "word {w} split");
                }
            }
        }
        let frac = chosen as f64 / candidates as f64;
        let (fm, fr, fk) = (
            masked as f64 / chosen as f64,
            random as f64 / chosen as f64,
            kept as f64 / chosen as f64,
        );
        println!(
            "whole_word={whole_word} rate {rate}: chose {frac:.4} of {candidates} candidates; mask {fm:.4} random {fr:.4} kept {fk:.4}"
        );
        // Whole words overshoot or undershoot the target by less than a word per sequence.
        let tol = if whole_word { 0.01 } else { 0.004 };
        assert!((frac - rate).abs() < tol, "chose {frac}");
        assert!((fm - 0.8).abs() < 0.01, "mask {fm}");
        // A random draw may hit the original token (1 in 990 here): it counts as kept.
        assert!((fr - 0.1).abs() < 0.01, "random {fr}");
        assert!((fk - 0.1).abs() < 0.01, "kept {fk}");
    }

    #[test]
    fn token_masking_statistics() {
        stats(false, 0.15);
        stats(false, 0.3);
    }

    #[test]
    fn whole_word_masking_statistics() {
        stats(true, 0.15);
        stats(true, 0.3);
    }

    #[test]
    fn the_same_seed_masks_the_same_way_and_another_differs() {
        let cfg = MaskingConfig {
            rate: 0.15,
            whole_word: false,
            mask_id: 5,
            vocab_size: 1000,
        };
        let mut g = rand::rngs::StdRng::seed_from_u64(1);
        let (ids, special, wid) = sequence(200, &mut g);
        let run = |seed| {
            mask_sequence(
                &ids,
                &special,
                &wid,
                &cfg,
                &mut rand::rngs::StdRng::seed_from_u64(seed),
            )
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
