//! Dropout whose mask is a pure function of `(seed, element index)`: the backward (and a
//! resumed run) regenerates exactly the forward's mask, and no mask is ever stored.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::cpu::{dispatch, slice, with_slice};
use crate::Float;

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An independent seed for sub-stream `n` of `seed` (e.g. the n-th dropout call of a step).
pub fn substream(seed: u64, n: u64) -> u64 {
    mix(seed ^ mix(n.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The keep threshold of rate `p` on 16-bit draws.
#[inline]
pub(crate) fn threshold(p: f32) -> u32 {
    (p as f64 * 65536.0).round() as u32
}

/// Whether element `i` of stream `key` is kept at `threshold` (from [`threshold`]): one 64-bit
/// mix gives four 16-bit uniform draws, element `i` uses draw `i % 4` of mix `i / 4`.
#[inline]
pub(crate) fn keep(key: u64, i: u64, threshold: u32) -> bool {
    let h = mix(key.wrapping_add((i >> 2).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    ((h >> ((i & 3) * 16)) & 0xffff) as u32 >= threshold
}

/// Inverted dropout: each element zeroed with probability `p`, survivors scaled by
/// `1 / (1 - p)`. The mask depends only on `seed`, so forward and backward agree.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    x.contiguous()?.apply_op1(Dropout { p: p as f32, seed })
}

struct Dropout {
    p: f32,
    seed: u64,
}

fn apply<T: Float>(xs: &[T], p: f32, seed: u64) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14; // a multiple of 4: chunks never split a mix's draws
    let scale = T::from_f64(1.0 / (1.0 - p as f64));
    let t = threshold(p);
    let mut out = vec![T::zero(); xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, x))| {
            let base = (c * CHUNK) as u64;
            for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                if keep(seed, base + j as u64, t) {
                    *o = x * scale;
                }
            }
        });
    out
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "berth-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(op: &Dropout, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(apply(
                slice::<T>(s, l)?,
                op.p,
                op.seed,
            )))
        }
        Ok((
            dispatch!(s.dtype(), self.name(), run(self, s, l))?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(op: &Dropout, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            let d = with_slice::<T, _>(&dy.contiguous()?, |g| apply(g, op.p, op.seed))?;
            Tensor::from_vec(d, x.shape(), x.device())
        }
        Ok(Some(dispatch!(x.dtype(), self.name(), run(self, x, dy))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gradcheck, randn};

    #[test]
    fn drops_the_asked_fraction_and_keeps_the_mean() -> Result<()> {
        let x = Tensor::ones(100_000, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let y = dropout(&x, 0.1, 7)?.to_vec1::<f32>()?;
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.1).abs() < 0.005, "dropped {zeros}");
        let mean = y.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        // Same seed, same mask; another seed, another mask.
        assert_eq!(dropout(&x, 0.1, 7)?.to_vec1::<f32>()?, y);
        assert_ne!(dropout(&x, 0.1, 8)?.to_vec1::<f32>()?, y);
        Ok(())
    }

    #[test]
    fn gradient_uses_the_forward_mask() -> Result<()> {
        gradcheck("dropout", &[randn(&[6, 7], 3)?], |t| {
            dropout(&t[0], 0.3, 11)
        })
    }
}
