//! Training-time dropout: a seed and a call counter, so every dropout site of a step draws
//! its own reproducible mask (and a resumed run, given the same seed and step, the same ones).
use std::cell::Cell;

use candle_core::Tensor;

use crate::error::Result;

/// Dropout state for one forward pass; `None` where a model method takes
/// `Option<&Dropout>` means eval mode.
#[derive(Debug)]
pub struct Dropout {
    seed: u64,
    calls: Cell<u64>,
}

impl Dropout {
    /// Dropout for one forward pass seeded by `seed` (e.g. derived from run seed and step).
    pub fn new(seed: u64) -> Self {
        Dropout {
            seed,
            calls: Cell::new(0),
        }
    }

    /// `x` with elements dropped at rate `p` (identity when `p` is 0).
    pub fn apply(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        Ok(berth_kernels::dropout(x, p, self.next_seed())?)
    }

    /// A fresh seed for the next dropout site.
    pub fn next_seed(&self) -> u64 {
        let n = self.calls.get();
        self.calls.set(n + 1);
        berth_kernels::seed_stream(self.seed, n)
    }
}
