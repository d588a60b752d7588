//! A packed batch: the concatenation of its sequences, with no padding.

use crate::error::{ModelError, Result};

/// Sequences concatenated along the token axis. `N` total tokens, `S` sequences.
/// Position ids start at 0 for each sequence; architectures that offset them (RoBERTa)
/// add their offset inside the embeddings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Token ids `[N]`.
    pub input_ids: Vec<u32>,
    /// Segment ids `[N]` (0 for single sentences).
    pub token_type_ids: Vec<u32>,
    /// Position of each token within its sequence `[N]`.
    pub position_ids: Vec<u32>,
    /// Sequence `s` owns tokens `cu_seqlens[s]..cu_seqlens[s+1]`; `[S + 1]`.
    pub cu_seqlens: Vec<usize>,
    /// Length of the longest sequence.
    pub max_len: usize,
}

impl Batch {
    /// Packs `(input_ids, token_type_ids)` pairs; an empty type-id slice means all zeros.
    pub fn from_sequences<'a>(
        seqs: impl IntoIterator<Item = (&'a [u32], &'a [u32])>,
    ) -> Result<Self> {
        let mut b = Batch {
            cu_seqlens: vec![0],
            ..Default::default()
        };
        for (i, (ids, types)) in seqs.into_iter().enumerate() {
            if ids.is_empty() {
                return Err(ModelError::Input(format!("sequence {i} is empty")));
            }
            if !types.is_empty() && types.len() != ids.len() {
                return Err(ModelError::Input(format!(
                    "sequence {i}: {} token type ids for {} tokens",
                    types.len(),
                    ids.len()
                )));
            }
            b.input_ids.extend_from_slice(ids);
            if types.is_empty() {
                b.token_type_ids.extend(std::iter::repeat_n(0, ids.len()));
            } else {
                b.token_type_ids.extend_from_slice(types);
            }
            b.position_ids.extend(0..ids.len() as u32);
            b.cu_seqlens.push(b.input_ids.len());
            b.max_len = b.max_len.max(ids.len());
        }
        Ok(b)
    }

    /// Number of sequences `S`.
    pub fn num_sequences(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    /// Number of tokens `N`.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// Token range of sequence `s`.
    pub fn range(&self, s: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[s]..self.cu_seqlens[s + 1]
    }

    /// Appends `other`'s sequences after this batch's: the packing of both lists of
    /// sequences together (a server merges the batches of several requests this way; each
    /// batch's hidden states are then a contiguous block of rows).
    pub fn append(&mut self, other: &Batch) {
        if self.cu_seqlens.is_empty() {
            self.cu_seqlens.push(0);
        }
        let base = self.input_ids.len();
        self.input_ids.extend_from_slice(&other.input_ids);
        self.token_type_ids.extend_from_slice(&other.token_type_ids);
        self.position_ids.extend_from_slice(&other.position_ids);
        self.cu_seqlens
            .extend(other.cu_seqlens.iter().skip(1).map(|&c| base + c));
        self.max_len = self.max_len.max(other.max_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appending_equals_packing_together() {
        let (a, b, c) = (&[5u32, 6, 7][..], &[8u32, 9][..], &[4u32][..]);
        let mut merged = Batch::default();
        merged.append(&Batch::from_sequences([(a, &[][..])]).unwrap());
        merged.append(&Batch::from_sequences([(b, &[0, 1][..]), (c, &[][..])]).unwrap());
        let together = Batch::from_sequences([(a, &[][..]), (b, &[0, 1][..]), (c, &[][..])]);
        assert_eq!(merged, together.unwrap());
    }

    #[test]
    fn packs_sequences_with_positions_and_offsets() {
        let b = Batch::from_sequences([(&[5u32, 6, 7][..], &[][..]), (&[8, 9][..], &[0, 1][..])])
            .unwrap();
        assert_eq!(b.input_ids, [5, 6, 7, 8, 9]);
        assert_eq!(b.token_type_ids, [0, 0, 0, 0, 1]);
        assert_eq!(b.position_ids, [0, 1, 2, 0, 1]);
        assert_eq!(b.cu_seqlens, [0, 3, 5]);
        assert_eq!((b.max_len, b.num_sequences(), b.range(1)), (3, 2, 3..5));
    }

    #[test]
    fn rejects_empty_and_mismatched() {
        assert!(Batch::from_sequences([(&[][..], &[][..])]).is_err());
        assert!(Batch::from_sequences([(&[1u32, 2][..], &[0][..])]).is_err());
    }
}
