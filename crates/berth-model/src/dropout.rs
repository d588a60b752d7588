//! Training-time dropout: a seed and a call counter, so every dropout site of a step draws
//! its own reproducible mask (and a resumed run, given the same seed and step, the same ones).
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Tensor;

use crate::error::Result;

/// Dropout state for one forward pass; `None` where a model method takes
/// `Option<&Dropout>` means eval mode.
///
/// Masks are keyed by position: element `(row, column)` of a site's tensor of token rows
/// draws from the site's stream at `(token_offset + row, column)`, and sequence rows (pooled
/// first tokens) at `sequence_offset + row`, selected token rows (labelled tokens) at
/// `selected_offset + row`. A data-parallel rank's share of a batch,
/// given the tokens and sequences before it, draws the masks the whole batch draws.
///
/// The call counter is atomic only so that a training step can move to a worker thread
/// with its dropout ([`berth_kernels::on_pool`]); the sites of one forward still draw
/// in program order, one thread at a time.
#[derive(Debug)]
pub struct Dropout {
    seed: u64,
    calls: AtomicU64,
    token_offset: u64,
    sequence_offset: u64,
    selected_offset: u64,
}

impl Dropout {
    /// Dropout for one forward pass seeded by `seed` (e.g. derived from run seed and step).
    pub fn new(seed: u64) -> Self {
        Self::at(seed, 0, 0)
    }

    /// [`Dropout::new`] for a batch that starts `token_offset` tokens and `sequence_offset`
    /// sequences into a larger one.
    pub fn at(seed: u64, token_offset: u64, sequence_offset: u64) -> Self {
        Dropout {
            seed,
            calls: AtomicU64::new(0),
            token_offset,
            sequence_offset,
            selected_offset: 0,
        }
    }

    /// This dropout for a batch whose selected rows (the labelled tokens a token classifier
    /// reads) start `n` rows into the larger batch's.
    pub fn with_selected_offset(&self, n: u64) -> Self {
        Dropout {
            seed: self.seed,
            calls: AtomicU64::new(self.calls.load(Ordering::Relaxed)),
            token_offset: self.token_offset,
            sequence_offset: self.sequence_offset,
            selected_offset: n,
        }
    }

    /// This dropout's stream, from its first site, for rows that start `token_offset` tokens
    /// and `sequence_offset` sequences into the larger batch: a share whose sequences are
    /// not contiguous in the batch (a bi-encoder's anchors, then its positives) runs one
    /// forward pass per contiguous run, each drawing the masks of its rows.
    pub fn moved(&self, token_offset: u64, sequence_offset: u64) -> Self {
        Self::at(self.seed, token_offset, sequence_offset)
    }

    /// Another forward pass's dropout (stream `seed`) over the same rows.
    pub fn sibling(&self, seed: u64) -> Self {
        Self::at(seed, self.token_offset, self.sequence_offset)
    }

    /// `x [tokens, width]` with elements dropped at rate `p` (identity when `p` is 0).
    pub fn apply(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        self.apply_rows(x, p, self.token_offset)
    }

    /// [`Self::apply`] for `x [sequences, width]` (one row per sequence).
    pub fn apply_sequences(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        self.apply_rows(x, p, self.sequence_offset)
    }

    /// [`Self::apply`] for `x [selected, width]`: rows picked from the tokens (labelled ones).
    pub fn apply_selected(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        self.apply_rows(x, p, self.selected_offset)
    }

    fn apply_rows(&self, x: &Tensor, p: f64, offset: u64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let width = x.dims().last().copied().unwrap_or(1) as u64;
        let seed = self.next_seed();
        Ok(berth_kernels::dropout_at(x, p, seed, offset * width)?)
    }

    /// A site of the fused encoder layer (rate `p`, the next stream), on token rows.
    pub fn site(&self, p: f64) -> berth_kernels::DropSite {
        berth_kernels::DropSite {
            rate: p as f32,
            seed: self.next_seed(),
            row_offset: self.token_offset,
        }
    }

    /// The row of the batch's first token in the larger batch.
    pub fn token_offset(&self) -> u64 {
        self.token_offset
    }

    /// A fresh seed for the next dropout site.
    pub fn next_seed(&self) -> u64 {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        berth_kernels::seed_stream(self.seed, n)
    }
}
