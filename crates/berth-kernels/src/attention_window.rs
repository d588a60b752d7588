//! Sliding-window (local) self-attention over a packed batch, with backward: token `i`
//! attends to the tokens `j` of its sequence with `|i − j| ≤ half` (ModernBERT's local
//! layers: `half = local_attention / 2`). Cost and memory grow linearly with the length:
//! each (sequence, head) task walks its queries in blocks of [`BLOCK`] rows, scoring a block
//! against the contiguous key range its window spans (at most `BLOCK + 2·half` keys); no
//! `L × L` matrix exists. Each row's softmax runs over exactly its window's columns, so the
//! result equals full attention under the band mask (tested against it).
//!
//! Shapes as [`crate::varlen_attention`]: `qkv [N, 3H]` → `[N, H]`.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::{dispatch, matmul, slice, with_slice, SendPtr, Strided};
use crate::softmax::{softmax_row, softmax_row_backward};
use crate::Float;

/// Query rows per block.
const BLOCK: usize = 64;

/// Self-attention of each packed sequence within a window of `half` tokens on either side;
/// `qkv [N, 3H]` → `[N, H]`, differentiable in `qkv`. `scale` multiplies the scores.
pub fn window_attention(
    qkv: &Tensor,
    cu_seqlens: &[usize],
    num_heads: usize,
    scale: f64,
    half: usize,
) -> Result<Tensor> {
    let (n, w3) = qkv.dims2()?;
    if num_heads == 0 || w3 % 3 != 0 || (w3 / 3) % num_heads != 0 {
        bail!("window_attention: qkv width {w3} is not 3 x heads ({num_heads}) x head dim");
    }
    if cu_seqlens.first() != Some(&0)
        || cu_seqlens.last() != Some(&n)
        || cu_seqlens.windows(2).any(|p| p[1] < p[0])
    {
        bail!("window_attention: cu_seqlens {cu_seqlens:?} do not split {n} tokens");
    }
    qkv.contiguous()?.apply_op1(WindowAttention {
        cu: cu_seqlens.to_vec(),
        heads: num_heads,
        scale,
        half,
    })
}

struct WindowAttention {
    cu: Vec<usize>,
    heads: usize,
    scale: f64,
    half: usize,
}

/// One block of one (sequence, head): query rows `q0..q1` and key rows `k0..k1` of a
/// sequence of `len` tokens, relative to its start.
#[derive(Clone, Copy)]
struct Block {
    q0: usize,
    q1: usize,
    k0: usize,
    k1: usize,
}

impl Block {
    fn all(len: usize, half: usize) -> impl Iterator<Item = Block> {
        (0..len).step_by(BLOCK).map(move |q0| {
            let q1 = (q0 + BLOCK).min(len);
            Block {
                q0,
                q1,
                k0: q0.saturating_sub(half),
                k1: (q1 + half).min(len),
            }
        })
    }

    /// The columns (of `k0..k1`) query `q0 + r` attends to.
    fn columns(&self, r: usize, half: usize) -> std::ops::Range<usize> {
        let i = self.q0 + r;
        i.saturating_sub(half) - self.k0..(i + half + 1).min(self.k1) - self.k0
    }
}

impl WindowAttention {
    /// Every (sequence start, length, head) with tokens, longest first.
    fn tasks(&self) -> Vec<(usize, usize, usize)> {
        let mut t: Vec<_> = self
            .cu
            .windows(2)
            .filter(|p| p[1] > p[0])
            .flat_map(|p| (0..self.heads).map(move |h| (p[0], p[1] - p[0], h)))
            .collect();
        t.sort_by_key(|task| std::cmp::Reverse(task.1));
        t
    }

    /// Fills `p [q1 - q0, k1 - k0]` with the block's probabilities (0 outside each row's
    /// window). `q`, `k`: the head's first query and key of the sequence, row stride `w3`.
    unsafe fn probabilities<T: Float>(
        &self,
        q: *const T,
        k: *const T,
        w3: usize,
        hd: usize,
        b: Block,
        p: &mut [T],
    ) {
        let (qb, kb) = (b.q1 - b.q0, b.k1 - b.k0);
        matmul(
            Strided::rows(p.as_mut_ptr(), qb, kb, kb),
            false,
            Strided::rows(q.add(b.q0 * w3), qb, hd, w3),
            Strided::rows(k.add(b.k0 * w3), kb, hd, w3).t(),
            T::from_f64(self.scale),
            Parallelism::None,
        );
        for (r, row) in p.chunks_mut(kb).enumerate() {
            let c = b.columns(r, self.half);
            row[..c.start].fill(T::zero());
            row[c.end..].fill(T::zero());
            softmax_row(&mut row[c]);
        }
    }

    fn forward<T: Float>(&self, qkv: &[T], w3: usize) -> Vec<T> {
        let h = w3 / 3;
        let hd = h / self.heads;
        let mut out = vec![T::zero(); qkv.len() / 3];
        let (src, dst) = (SendPtr(qkv.as_ptr() as *mut T), SendPtr(out.as_mut_ptr()));
        self.tasks()
            .into_par_iter()
            .for_each_init(Vec::new, |p, (start, len, head)| {
                // SAFETY: each task writes only its sequence's rows × its head's columns of
                // `out`; the views stay inside `qkv` (`[N, 3H]`) and `out` (`[N, H]`).
                unsafe {
                    let base = src.get().add(start * w3 + head * hd) as *const T;
                    let (q, k, v) = (base, base.add(h), base.add(2 * h));
                    let o = dst.get().add(start * h + head * hd);
                    for b in Block::all(len, self.half) {
                        let (qb, kb) = (b.q1 - b.q0, b.k1 - b.k0);
                        p.resize(qb * kb, T::zero());
                        self.probabilities(q, k, w3, hd, b, p);
                        matmul(
                            Strided::rows(o.add(b.q0 * h), qb, hd, h),
                            false,
                            Strided::rows(p.as_ptr(), qb, kb, kb),
                            Strided::rows(v.add(b.k0 * w3), kb, hd, w3),
                            T::one(),
                            Parallelism::None,
                        );
                    }
                }
            });
        out
    }

    fn backward<T: Float>(&self, qkv: &[T], dout: &[T], w3: usize) -> Vec<T> {
        let h = w3 / 3;
        let hd = h / self.heads;
        let mut dqkv = vec![T::zero(); qkv.len()];
        let (src, gsrc) = (
            SendPtr(qkv.as_ptr() as *mut T),
            SendPtr(dout.as_ptr() as *mut T),
        );
        let dst = SendPtr(dqkv.as_mut_ptr());
        let scale = T::from_f64(self.scale);
        self.tasks().into_par_iter().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(p, dp, ds), (start, len, head)| {
                // SAFETY: each task writes only its sequence's rows × its head's columns of
                // dQ, dK, dV in `dqkv`; blocks of one task run in order, so the dK / dV
                // rows that neighbouring blocks share are accumulated by one thread.
                unsafe {
                    let base = start * w3 + head * hd;
                    let qkv = src.get() as *const T;
                    let (q, k, v) = (qkv.add(base), qkv.add(base + h), qkv.add(base + 2 * h));
                    let d = dst.get();
                    let (dq, dk, dv) = (d.add(base), d.add(base + h), d.add(base + 2 * h));
                    let dout = (gsrc.get() as *const T).add(start * h + head * hd);
                    for b in Block::all(len, self.half) {
                        let (qb, kb) = (b.q1 - b.q0, b.k1 - b.k0);
                        p.resize(qb * kb, T::zero());
                        dp.resize(qb * kb, T::zero());
                        ds.resize(qb * kb, T::zero());
                        self.probabilities(q, k, w3, hd, b, p);
                        let d_o = Strided::rows(dout.add(b.q0 * h), qb, hd, h);
                        // dV[keys] += P^T dO
                        matmul(
                            Strided::rows(dv.add(b.k0 * w3), kb, hd, w3),
                            true,
                            Strided::rows(p.as_ptr(), qb, kb, kb).t(),
                            d_o,
                            T::one(),
                            Parallelism::None,
                        );
                        // dP = dO V[keys]^T, then dS = softmax'(dP) over each row's window.
                        matmul(
                            Strided::rows(dp.as_mut_ptr(), qb, kb, kb),
                            false,
                            d_o,
                            Strided::rows(v.add(b.k0 * w3), kb, hd, w3).t(),
                            T::one(),
                            Parallelism::None,
                        );
                        for r in 0..qb {
                            let row = r * kb..(r + 1) * kb;
                            let c = b.columns(r, self.half);
                            let (pr, dpr) = (&p[row.clone()], &dp[row.clone()]);
                            let dsr = &mut ds[row];
                            dsr.fill(T::zero());
                            softmax_row_backward(&pr[c.clone()], &dpr[c.clone()], &mut dsr[c]);
                        }
                        let ds_view = Strided::rows(ds.as_ptr(), qb, kb, kb);
                        // dQ[queries] = scale dS K[keys]; dK[keys] += scale dS^T Q[queries]
                        matmul(
                            Strided::rows(dq.add(b.q0 * w3), qb, hd, w3),
                            false,
                            ds_view,
                            Strided::rows(k.add(b.k0 * w3), kb, hd, w3),
                            scale,
                            Parallelism::None,
                        );
                        matmul(
                            Strided::rows(dk.add(b.k0 * w3), kb, hd, w3),
                            true,
                            ds_view.t(),
                            Strided::rows(q.add(b.q0 * w3), qb, hd, w3),
                            scale,
                            Parallelism::None,
                        );
                    }
                }
            },
        );
        dqkv
    }
}

impl CustomOp1 for WindowAttention {
    fn name(&self) -> &'static str {
        "berth-window-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(op: &WindowAttention, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(
                op.forward(slice::<T>(s, l)?, l.dims()[1]),
            ))
        }
        let (n, w3) = l.shape().dims2()?;
        Ok((
            dispatch!(s.dtype(), self.name(), run(self, s, l))?,
            Shape::from((n, w3 / 3)),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(op: &WindowAttention, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            let w3 = x.dim(1)?;
            let dx =
                with_slice::<T, _>(x, |xs| with_slice::<T, _>(dy, |g| op.backward(xs, g, w3)))??;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(dispatch!(x.dtype(), self.name(), run(self, x, dy))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gradcheck, randn};
    use candle_core::{Device, Var};

    /// Full attention of each sequence under the band mask `|i − j| ≤ half`, from plain
    /// candle ops (−∞ scores outside the band).
    fn banded(qkv: &Tensor, cu: &[usize], nh: usize, scale: f64, half: usize) -> Result<Tensor> {
        let h = qkv.dim(1)? / 3;
        let hd = h / nh;
        let mut outs = Vec::new();
        for w in cu.windows(2).filter(|w| w[1] > w[0]) {
            let l = w[1] - w[0];
            let rows = qkv.narrow(0, w[0], l)?;
            let split = |i: usize| {
                rows.narrow(1, i * h, h)?
                    .reshape((l, nh, hd))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let mask: Vec<f64> = (0..l * l)
                .map(|x| {
                    let (i, j) = (x / l, x % l);
                    if i.abs_diff(j) <= half {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (l, l), &Device::Cpu)?.to_dtype(qkv.dtype())?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let probs = candle_core::Tensor::exp(&scores.broadcast_sub(&scores.max_keepdim(2)?)?)?;
            let probs = probs.broadcast_div(&probs.sum_keepdim(2)?)?;
            outs.push(probs.matmul(&v)?.transpose(0, 1)?.reshape((l, h))?);
        }
        Tensor::cat(&outs, 0)
    }

    /// Sequences shorter and longer than a block and than the window, several blocks.
    #[test]
    fn equals_full_attention_under_the_band_mask() -> Result<()> {
        let cu = [0, 3, 70, 70, 230];
        for half in [0, 1, 5, 64, 300] {
            for dtype in [candle_core::DType::F64, candle_core::DType::F32] {
                let x =
                    Var::from_tensor(&(randn(&[230, 24], half as u64)? * 2.0)?.to_dtype(dtype)?)?;
                let ours = window_attention(&x, &cu, 2, 0.35, half)?;
                let theirs = banded(&x, &cu, 2, 0.35, half)?;
                let tol = if dtype == candle_core::DType::F64 {
                    1e-12
                } else {
                    2e-6
                };
                assert_close(&format!("half {half} {dtype:?}"), &ours, &theirs, tol)?;
                let g = randn(&[230, 8], 5)?.to_dtype(dtype)?;
                let a = (ours * &g)?.sum_all()?.backward()?;
                let b = (theirs * &g)?.sum_all()?.backward()?;
                let (ga, gb) = (a.get(&x).unwrap(), b.get(&x).unwrap());
                assert_close(&format!("half {half} {dtype:?} d qkv"), ga, gb, tol * 10.0)?;
            }
        }
        // A window wider than every sequence is full attention.
        let x = randn(&[40, 24], 9)?;
        let full = crate::varlen_attention(&x, &[0, 15, 40], 2, 0.35)?;
        assert_close(
            "wide",
            &window_attention(&x, &[0, 15, 40], 2, 0.35, 40)?,
            &full,
            1e-12,
        )
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let x = randn(&[75, 12], 11)?;
        gradcheck("window attention", std::slice::from_ref(&x), |xs| {
            window_attention(&xs[0], &[0, 7, 75], 2, 0.5, 3)
        })
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let x = randn(&[6, 24], 3)?;
        let e = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert!(e(window_attention(&x, &[0, 6], 5, 1.0, 2)).contains("heads"));
        assert!(e(window_attention(&x, &[0, 4], 2, 1.0, 2)).contains("cu_seqlens"));
        Ok(())
    }
}
