//! Variable-length multi-head self-attention over a packed batch.
//!
//! Shapes: `N` total tokens, `H` hidden, `nh` heads, `hd = H / nh`, `S` sequences.
//! Input `qkv [N, 3H]` is the output of one fused QKV projection (columns: all of Q, then K,
//! then V; head `h` uses columns `h*hd..(h+1)*hd` of each). Sequence `s` owns rows
//! `cu_seqlens[s]..cu_seqlens[s+1]`, and tokens attend only within their sequence: no
//! padding is materialised and no mask is needed. Output `[N, H]`.
//!
//! Each (sequence, head) pair is one task on the rayon pool; its score matrix `[L, L]` is
//! the only scratch memory. The matmuls read Q, K, V in place through strides (no transposes
//! or copies). The backward recomputes the probabilities rather than storing them.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::dropout::DropSite;
use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::{dispatch, slice, with_slice, SendPtr, Strided};
use crate::softmax::{softmax_row, softmax_row_backward};
use crate::Float;

/// Self-attention of each packed sequence; `qkv [N, 3H]` → `[N, H]`, differentiable in `qkv`.
/// `scale` multiplies the scores before the softmax (usually `1/sqrt(hd)`).
pub fn varlen_attention(
    qkv: &Tensor,
    cu_seqlens: &[usize],
    num_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (n, three_h) = qkv.dims2()?;
    if three_h % 3 != 0 || (three_h / 3) % num_heads != 0 {
        bail!("varlen_attention: qkv width {three_h} is not 3 x heads ({num_heads}) x head dim");
    }
    check_cu_seqlens(cu_seqlens, n)?;
    qkv.contiguous()?.apply_op1(VarlenAttention {
        cu_seqlens: cu_seqlens.to_vec(),
        num_heads,
        scale,
        dropout: None,
    })
}

/// [`varlen_attention`] with dropout on the attention probabilities (as BERT trains):
/// each probability is zeroed with probability `p` and the rest scaled by `1 / (1 - p)`.
/// The mask is a function of `seed` and the (sequence start, head, row, column), so the
/// backward regenerates it instead of storing `[L, L]` masks.
pub fn varlen_attention_dropout(
    qkv: &Tensor,
    cu_seqlens: &[usize],
    num_heads: usize,
    scale: f64,
    p: f64,
    seed: u64,
    row_offset: u64,
) -> Result<Tensor> {
    if p <= 0.0 {
        return varlen_attention(qkv, cu_seqlens, num_heads, scale);
    }
    let (n, _) = qkv.dims2()?;
    check_cu_seqlens(cu_seqlens, n)?;
    qkv.contiguous()?.apply_op1(VarlenAttention {
        cu_seqlens: cu_seqlens.to_vec(),
        num_heads,
        scale,
        dropout: Some(DropSite {
            rate: p as f32,
            seed,
            row_offset,
        }),
    })
}

/// `(3H, H, hd)` of a packed `qkv` of `len` elements over `cu` with `nh` heads.
fn widths(len: usize, cu: &[usize], nh: usize) -> (usize, usize, usize) {
    let n = *cu.last().unwrap_or(&0);
    let w3 = if n == 0 { 0 } else { len / n };
    (w3, w3 / 3, w3 / 3 / nh.max(1))
}

/// Applies the dropout mask of one (sequence, head) to `p [L, L]` in place.
fn drop_probabilities<T: Float>(p: &mut [T], dropout: Option<DropSite>, start: usize, head: usize) {
    if let Some(d) = dropout {
        let key = d.attention_key(start, head);
        let scale = T::from_f64(1.0 / (1.0 - d.rate as f64));
        let t = crate::dropout::threshold(d.rate);
        T::mask_in_place(p, key, 0, t, scale);
    }
}

fn check_cu_seqlens(cu: &[usize], n: usize) -> Result<()> {
    if cu.first() != Some(&0) || cu.last() != Some(&n) || cu.windows(2).any(|w| w[0] > w[1]) {
        bail!("varlen_attention: cu_seqlens {cu:?} must rise from 0 to the token count {n}");
    }
    Ok(())
}

/// The same attention composed from plain candle ops, one sequence at a time (test reference).
pub fn reference_attention(
    qkv: &Tensor,
    cu_seqlens: &[usize],
    num_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let h = qkv.dim(1)? / 3;
    let hd = h / num_heads;
    let mut outs = Vec::new();
    for w in cu_seqlens.windows(2) {
        let l = w[1] - w[0];
        let rows = qkv.narrow(0, w[0], l)?;
        // [L, H] -> [nh, L, hd]
        let split = |i: usize| {
            rows.narrow(1, i * h, h)?
                .reshape((l, num_heads, hd))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let probs = crate::reference_softmax(&scores)?;
        // [nh, L, hd] -> [L, H]
        outs.push(probs.matmul(&v)?.transpose(0, 1)?.reshape((l, h))?);
    }
    Tensor::cat(&outs, 0)
}

struct VarlenAttention {
    cu_seqlens: Vec<usize>,
    num_heads: usize,
    scale: f64,
    /// Attention-probability dropout: rate and seed.
    dropout: Option<DropSite>,
}

/// One (sequence, head) unit of work: first row, length, head index.
fn tasks(cu: &[usize], nh: usize) -> Vec<(usize, usize, usize)> {
    let mut t = Vec::with_capacity((cu.len() - 1) * nh);
    for w in cu.windows(2) {
        for h in 0..nh {
            if w[1] > w[0] {
                t.push((w[0], w[1] - w[0], h));
            }
        }
    }
    // Longest first, so the pool is not left waiting on one long sequence at the end.
    t.sort_by(|a, b| b.1.cmp(&a.1));
    t
}

/// `dst = alpha * lhs @ rhs`, single-threaded: the (sequence, head) tasks are the
/// parallelism.
unsafe fn matmul<T: Float>(
    dst: Strided<*mut T>,
    lhs: Strided<*const T>,
    rhs: Strided<*const T>,
    alpha: T,
) {
    crate::cpu::matmul(dst, false, lhs, rhs, alpha, Parallelism::None)
}

/// Fills `p [L, L]` with softmax(scale * Q K^T) for one (sequence, head).
unsafe fn probabilities<T: Float>(
    qkv: *const T,
    w3: usize,
    h: usize,
    hd: usize,
    start: usize,
    l: usize,
    head: usize,
    scale: T,
    p: &mut [T],
) {
    let q = qkv.add(start * w3 + head * hd);
    let k = qkv.add(start * w3 + h + head * hd);
    // K^T: K [L, hd] (row stride 3H) viewed transposed.
    matmul(
        Strided::rows(p.as_mut_ptr(), l, l, l),
        Strided::rows(q, l, hd, w3),
        Strided::rows(k, l, hd, w3).t(),
        scale,
    );
    p.chunks_mut(l).for_each(softmax_row);
}

/// Runs `f` on every (sequence, head) task of the tiled kernels, each with its worker's
/// scratch, and returns the output buffer of `len` elements they fill.
///
/// # Safety
/// The tasks together must write every element of the output once.
unsafe fn tiled_tasks<T: Float, S: Default>(
    len: usize,
    cu: &[usize],
    nh: usize,
    h: usize,
    hd: usize,
    f: impl Fn(&mut S, crate::attention_tiled::Task, *mut T) + Sync + Send,
) -> Vec<T> {
    let mut out = Vec::<T>::with_capacity(len);
    let dst = SendPtr(out.as_mut_ptr());
    tasks(cu, nh)
        .into_par_iter()
        .for_each_init(S::default, |sc, (start, len, head)| {
            let task = crate::attention_tiled::Task {
                start,
                len,
                head,
                hidden: h,
                head_dim: hd,
            };
            f(sc, task, dst.get())
        });
    // SAFETY: the caller's tasks cover every element once.
    out.set_len(len);
    out
}

pub(crate) fn forward<T: Float>(
    qkv: &[T],
    cu: &[usize],
    nh: usize,
    scale: f64,
    dropout: Option<DropSite>,
) -> Vec<T> {
    let (w3, h, hd) = widths(qkv.len(), cu, nh);
    let src = SendPtr(qkv.as_ptr() as *mut T);
    if T::attends_tiled(hd) {
        // SAFETY: the tiled kernel runs here (checked); each task writes its rows x head
        // columns of `out` (`[N, H]`), inside it (cu_seqlens checked against N by the caller).
        return unsafe {
            tiled_tasks(qkv.len() / 3, cu, nh, h, hd, |sc, task, dst| {
                T::attend_tiled(src.get(), dst, task, scale, dropout, sc)
            })
        };
    }
    let mut out = vec![T::zero(); qkv.len() / 3];
    let dst = SendPtr(out.as_mut_ptr());
    tasks(cu, nh)
        .into_par_iter()
        .for_each_init(Vec::new, |p, (start, l, head)| {
            p.resize(l * l, T::zero());
            // SAFETY: each task writes only its own rows x head columns of `out`.
            unsafe {
                let (qkv, out) = (src.get() as *const T, dst.get());
                probabilities(qkv, w3, h, hd, start, l, head, T::from_f64(scale), p);
                drop_probabilities(p, dropout, start, head);
                let v = qkv.add(start * w3 + 2 * h + head * hd);
                let o = out.add(start * h + head * hd);
                matmul(
                    Strided::rows(o, l, hd, h),
                    Strided::rows(p.as_ptr(), l, l, l),
                    Strided::rows(v, l, hd, w3),
                    T::one(),
                );
            }
        });
    out
}

pub(crate) fn backward<T: Float>(
    qkv: &[T],
    dout: &[T],
    cu: &[usize],
    nh: usize,
    scale: f64,
    dropout: Option<DropSite>,
) -> Vec<T> {
    let (w3, h, hd) = widths(qkv.len(), cu, nh);
    let src = SendPtr(qkv.as_ptr() as *mut T);
    let gsrc = SendPtr(dout.as_ptr() as *mut T);
    if T::attends_tiled(hd) {
        // SAFETY: the tiled kernel runs here (checked); each task writes its rows x head
        // columns of dQ, dK and dV in `dqkv` (`[N, 3H]`), inside it and `dout`.
        return unsafe {
            tiled_tasks(qkv.len(), cu, nh, h, hd, |sc, task, dst| {
                T::attend_tiled_backward(src.get(), gsrc.get(), dst, task, scale, dropout, sc)
            })
        };
    }
    let mut dqkv = vec![T::zero(); qkv.len()];
    let dst = SendPtr(dqkv.as_mut_ptr());
    let scale = T::from_f64(scale);
    tasks(cu, nh).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        |(p, dp, ds, pd), (start, l, head)| {
            p.resize(l * l, T::zero());
            dp.resize(l * l, T::zero());
            ds.resize(l * l, T::zero());
            // SAFETY: each task writes only its own rows x head columns of dq, dk, dv.
            unsafe {
                let (qkv, dqkv, dout) = (src.get() as *const T, dst.get(), gsrc.get() as *const T);
                probabilities(qkv, w3, h, hd, start, l, head, scale, p);
                // With dropout, dV uses the dropped probabilities P', and dP' is masked back.
                let p_used: *const T = if dropout.is_some() {
                    pd.clear();
                    pd.extend_from_slice(p);
                    drop_probabilities(pd, dropout, start, head);
                    pd.as_ptr()
                } else {
                    p.as_ptr()
                };
                let base = start * w3 + head * hd;
                let (q, k, v) = (qkv.add(base), qkv.add(base + h), qkv.add(base + 2 * h));
                let (dq, dk, dv) = (dqkv.add(base), dqkv.add(base + h), dqkv.add(base + 2 * h));
                let dout = dout.add(start * h + head * hd);
                // dV = P^T dO
                matmul(
                    Strided::rows(dv, l, hd, w3),
                    Strided::rows(p_used, l, l, l).t(),
                    Strided::rows(dout, l, hd, h),
                    T::one(),
                );
                // dP = dO V^T
                matmul(
                    Strided::rows(dp.as_mut_ptr(), l, l, l),
                    Strided::rows(dout, l, hd, h),
                    Strided::rows(v, l, hd, w3).t(),
                    T::one(),
                );
                drop_probabilities(dp, dropout, start, head);
                // dS = scale * softmax'(dP)
                for r in 0..l {
                    let row = r * l..(r + 1) * l;
                    softmax_row_backward(&p[row.clone()], &dp[row.clone()], &mut ds[row]);
                }
                // dQ = dS K * scale ; dK = dS^T Q * scale
                let ds_view = Strided::rows(ds.as_ptr(), l, l, l);
                matmul(
                    Strided::rows(dq, l, hd, w3),
                    ds_view,
                    Strided::rows(k, l, hd, w3),
                    scale,
                );
                matmul(
                    Strided::rows(dk, l, hd, w3),
                    ds_view.t(),
                    Strided::rows(q, l, hd, w3),
                    scale,
                );
            }
        },
    );
    dqkv
}

/// The sequence (start, length) holding each of `rows`, grouped: one entry per sequence
/// with its rows (in the order given).
fn rows_by_sequence(cu: &[usize], rows: &[usize]) -> Vec<(usize, usize, Vec<usize>)> {
    let mut groups: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for (k, &i) in rows.iter().enumerate() {
        // The last sequence starting at or before row i (empty sequences skipped).
        let s = cu.partition_point(|&c| c <= i) - 1;
        let (start, len) = (cu[s], cu[s + 1] - cu[s]);
        match groups.iter_mut().find(|g| g.0 == start) {
            Some(g) => g.2.push(k),
            None => groups.push((start, len, vec![k])),
        }
    }
    groups
}

/// One query row's probabilities over its sequence's keys for one head, `p [L]`, and the
/// dropout multipliers `m [L]` (0 or 1/(1-rate); all 1 without dropout) — the same mask as
/// the whole-sequence paths.
#[allow(clippy::too_many_arguments)]
fn row_probabilities<T: Float>(
    qkv: &[T],
    w3: usize,
    hd: usize,
    (start, len, head): (usize, usize, usize),
    i: usize,
    scale: T,
    dropout: Option<DropSite>,
    p: &mut Vec<T>,
    m: &mut Vec<T>,
) {
    let h = w3 / 3;
    let q = &qkv[i * w3 + head * hd..][..hd];
    p.clear();
    p.extend((start..start + len).map(|j| scale * T::dot(q, &qkv[j * w3 + h + head * hd..][..hd])));
    softmax_row(p);
    m.clear();
    m.resize(len, T::one());
    if let Some(d) = dropout {
        let key = d.attention_key(start, head);
        let t = crate::dropout::threshold(d.rate);
        let s = T::from_f64(1.0 / (1.0 - d.rate as f64));
        T::mask_in_place(m, key, ((i - start) * len) as u64, t, s);
    }
}

/// Attention output for query `rows` only: `[rows.len(), H]`, row `k` the output of token
/// `rows[k]` (keys and values: its whole sequence). For a loss that reads few positions
/// (first tokens, masked tokens) in the last layer.
pub(crate) fn forward_rows<T: Float>(
    qkv: &[T],
    cu: &[usize],
    rows: &[usize],
    nh: usize,
    scale: f64,
    dropout: Option<DropSite>,
) -> Vec<T> {
    let (w3, h, hd) = widths(qkv.len(), cu, nh);
    let scale = T::from_f64(scale);
    let mut out = vec![T::zero(); rows.len() * h];
    out.par_chunks_mut(h).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(p, pd), (k, o)| {
            let i = rows[k];
            let s = cu.partition_point(|&c| c <= i) - 1;
            let g = (cu[s], cu[s + 1] - cu[s]);
            for head in 0..nh {
                row_probabilities(qkv, w3, hd, (g.0, g.1, head), i, scale, dropout, p, pd);
                let o = &mut o[head * hd..(head + 1) * hd];
                for (j, (&pj, &mj)) in p.iter().zip(pd.iter()).enumerate() {
                    let v = &qkv[(g.0 + j) * w3 + 2 * h + head * hd..][..hd];
                    let pj = pj * mj;
                    o.iter_mut().zip(v).for_each(|(o, &v)| *o = *o + pj * v);
                }
            }
        },
    );
    out
}

/// The backward of [`forward_rows`]: `dqkv [N, 3H]` from `dout [rows.len(), H]` (dQ zero
/// outside `rows`; dK, dV over the rows' sequences).
pub(crate) fn backward_rows<T: Float>(
    qkv: &[T],
    dout: &[T],
    cu: &[usize],
    rows: &[usize],
    nh: usize,
    scale: f64,
    dropout: Option<DropSite>,
) -> Vec<T> {
    let (w3, h, hd) = widths(qkv.len(), cu, nh);
    let scale = T::from_f64(scale);
    let mut dqkv = vec![T::zero(); qkv.len()];
    let dst = SendPtr(dqkv.as_mut_ptr());
    let groups = rows_by_sequence(cu, rows);
    let tasks: Vec<(usize, usize)> = (0..groups.len())
        .flat_map(|g| (0..nh).map(move |head| (g, head)))
        .collect();
    tasks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(p, pd, ds), (g, head)| {
            let (start, len, ref ks) = groups[g];
            for &k in ks {
                let i = rows[k];
                row_probabilities(qkv, w3, hd, (start, len, head), i, scale, dropout, p, pd);
                let dor = &dout[k * h + head * hd..][..hd];
                let qi = &qkv[i * w3 + head * hd..][..hd];
                // dP of the dropped probabilities, masked back to dP of P.
                ds.clear();
                ds.extend((0..len).map(|j| {
                    let v = &qkv[(start + j) * w3 + 2 * h + head * hd..][..hd];
                    T::dot(dor, v) * pd[j]
                }));
                let dot = p.iter().zip(ds.iter()).map(|(&a, &b)| a * b).sum::<T>();
                ds.iter_mut()
                    .zip(p.iter())
                    .for_each(|(d, &pj)| *d = pj * (*d - dot));
                // SAFETY: this task alone writes the head columns of its sequence's rows
                // (dQ of its selected rows, dK and dV of all its rows); the dQ, dK and dV
                // column ranges of a row are disjoint.
                unsafe {
                    let base = dst.get();
                    let dq = std::slice::from_raw_parts_mut(base.add(i * w3 + head * hd), hd);
                    for j in 0..len {
                        let r = (start + j) * w3 + head * hd;
                        let kj = &qkv[r + h..][..hd];
                        let (sj, pj) = (ds[j] * scale, p[j] * pd[j]);
                        dq.iter_mut().zip(kj).for_each(|(a, &b)| *a = *a + sj * b);
                        let dk = std::slice::from_raw_parts_mut(base.add(r + h), hd);
                        dk.iter_mut().zip(qi).for_each(|(a, &b)| *a = *a + sj * b);
                        let dv = std::slice::from_raw_parts_mut(base.add(r + 2 * h), hd);
                        dv.iter_mut().zip(dor).for_each(|(a, &b)| *a = *a + pj * b);
                    }
                }
            }
        },
    );
    dqkv
}

impl CustomOp1 for VarlenAttention {
    fn name(&self) -> &'static str {
        "berth-varlen-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(op: &VarlenAttention, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let out = forward(
                slice::<T>(s, l)?,
                &op.cu_seqlens,
                op.num_heads,
                op.scale,
                op.dropout,
            );
            Ok(T::to_cpu_storage_owned(out))
        }
        let (n, w3) = l.shape().dims2()?;
        Ok((
            dispatch!(s.dtype(), self.name(), run(self, s, l))?,
            Shape::from((n, w3 / 3)),
        ))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(op: &VarlenAttention, qkv: &Tensor, dout: &Tensor) -> Result<Tensor> {
            let d = with_slice::<T, _>(qkv, |q| {
                with_slice::<T, _>(dout, |g| {
                    backward(q, g, &op.cu_seqlens, op.num_heads, op.scale, op.dropout)
                })
            })??;
            Tensor::from_vec(d, qkv.shape(), qkv.device())
        }
        Ok(Some(dispatch!(
            qkv.dtype(),
            self.name(),
            run(self, qkv, dout)
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gradcheck, randn};

    #[test]
    fn matches_composed_reference_forward_and_backward() -> Result<()> {
        let cu = [0, 5, 6, 13];
        let qkv = candle_core::Var::from_tensor(&(randn(&[13, 24], 31)? * 2.0)?)?;
        let w = randn(&[13, 8], 32)?;
        let ours = varlen_attention(&qkv, &cu, 2, 0.5)?;
        let theirs = reference_attention(&qkv, &cu, 2, 0.5)?;
        assert_close("attention forward", &ours, &theirs, 1e-12)?;
        let a = (ours * &w)?.sum_all()?.backward()?;
        let b = (theirs * &w)?.sum_all()?.backward()?;
        assert_close(
            "attention dqkv",
            a.get(&qkv).unwrap(),
            b.get(&qkv).unwrap(),
            1e-12,
        )
    }

    #[test]
    fn f32_path_matches_f64() -> Result<()> {
        // f32 runs the AVX-512 build of the task when the CPU has it.
        let cu = [0, 1, 17, 50];
        let qkv = (randn(&[50, 108], 36)? * 2.0)?;
        let exact = reference_attention(&qkv, &cu, 3, 0.3)?;
        let ours = varlen_attention(&qkv.to_dtype(candle_core::DType::F32)?, &cu, 3, 0.3)?;
        assert_close("f32 attention vs f64 reference", &ours, &exact, 1e-5)
    }

    #[test]
    fn tiled_f32_matches_f64_reference() -> Result<()> {
        // Head dims 32 and 64 take the tiled kernel on AVX-512, 8 and 40 its AVX2 form
        // (AVX2 CPUs: all four); lengths around the 4- and 8-row blocks and the 8 / 16 /
        // 24 / 48-key tiles, up to a long sequence.
        for (hd, seed) in [(32, 40), (64, 41), (8, 42), (40, 43)] {
            println!("head dim {hd}: tiled kernel {}", f32::attends_tiled(hd));
            let lens = [1usize, 7, 8, 9, 16, 17, 48, 50, 63, 130, 300];
            let mut cu = vec![0];
            for l in lens {
                cu.push(cu.last().unwrap() + l);
            }
            let n = *cu.last().unwrap();
            let qkv = (randn(&[n, 3 * 2 * hd], seed)? * 3.0)?;
            let exact = reference_attention(&qkv, &cu, 2, 0.2)?;
            let ours = varlen_attention(&qkv.to_dtype(candle_core::DType::F32)?, &cu, 2, 0.2)?;
            assert_close("tiled f32 attention vs f64 reference", &ours, &exact, 1e-5)?;
        }
        Ok(())
    }

    #[test]
    fn tiled_f32_backward_matches_f64() -> Result<()> {
        // dQKV of the tiled backward (f32, AVX-512 or AVX2) against the general path in
        // f64, with and without dropout (the same mask), head dims as in the forward test,
        // lengths around every row block and key tile.
        for (hd, seed) in [(32, 50), (64, 51), (8, 52), (40, 53)] {
            println!("head dim {hd}: tiled kernel {}", f32::attends_tiled(hd));
            let lens = [1usize, 7, 8, 9, 16, 17, 48, 50, 63, 130];
            let mut cu = vec![0];
            for l in lens {
                cu.push(cu.last().unwrap() + l);
            }
            let n = *cu.last().unwrap();
            let qkv = (randn(&[n, 3 * 2 * hd], seed)? * 2.0)?;
            let w = randn(&[n, 2 * hd], seed + 10)?;
            for dropout in [0.0, 0.2] {
                let grad = |x: &Tensor| -> Result<Tensor> {
                    let v = candle_core::Var::from_tensor(x)?;
                    let y = varlen_attention_dropout(&v, &cu, 2, 0.2, dropout, 3, 0)?;
                    let g = (y * w.to_dtype(x.dtype())?)?.sum_all()?.backward()?;
                    Ok(g.get(&v).unwrap().clone())
                };
                let exact = grad(&qkv)?;
                let ours = grad(&qkv.to_dtype(candle_core::DType::F32)?)?;
                let size = exact.abs()?.max_all()?.to_scalar::<f64>()?;
                assert_close(
                    &format!("tiled f32 backward hd {hd} dropout {dropout} (max |g| {size:.2})"),
                    &ours,
                    &exact,
                    2e-5 * size.max(1.0),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn tiled_dropout_uses_the_general_mask() -> Result<()> {
        // f64 runs the general path: the same seed must drop the same probabilities.
        let cu = [0, 5, 40, 57];
        let qkv = randn(&[57, 3 * 2 * 32], 42)?;
        let general = varlen_attention_dropout(&qkv, &cu, 2, 0.3, 0.25, 9, 0)?;
        let f32 = qkv.to_dtype(candle_core::DType::F32)?;
        let tiled = varlen_attention_dropout(&f32, &cu, 2, 0.3, 0.25, 9, 0)?;
        assert_close(
            "tiled vs general attention with dropout",
            &tiled,
            &general,
            2e-6,
        )
    }

    #[test]
    fn finite_difference_gradients() -> Result<()> {
        let cu = [0, 3, 7];
        gradcheck("varlen attention", &[(randn(&[7, 12], 33)? * 2.0)?], |v| {
            varlen_attention(&v[0], &cu, 2, 0.7)
        })
    }

    #[test]
    fn dropout_gradients_use_the_forward_mask() -> Result<()> {
        let cu = [0, 3, 7];
        gradcheck(
            "varlen attention with dropout",
            &[(randn(&[7, 12], 36)? * 2.0)?],
            |v| varlen_attention_dropout(&v[0], &cu, 2, 0.7, 0.3, 5, 0),
        )
    }

    #[test]
    fn dropout_matches_dropping_the_reference_probabilities() -> Result<()> {
        // Rate 0 is the plain op; a nonzero rate changes the output and is reproducible.
        let cu = [0, 4, 9];
        let qkv = randn(&[9, 12], 37)?;
        let plain = varlen_attention(&qkv, &cu, 2, 0.5)?;
        assert_close(
            "rate 0",
            &varlen_attention_dropout(&qkv, &cu, 2, 0.5, 0.0, 1, 0)?,
            &plain,
            0.0,
        )?;
        let a = varlen_attention_dropout(&qkv, &cu, 2, 0.5, 0.5, 1, 0)?;
        assert_close(
            "same seed",
            &varlen_attention_dropout(&qkv, &cu, 2, 0.5, 0.5, 1, 0)?,
            &a,
            0.0,
        )?;
        let diff = (a - plain)?.abs()?.sum_all()?.to_scalar::<f64>()?;
        assert!(diff > 0.1, "dropout changed nothing");
        Ok(())
    }

    #[test]
    fn tokens_do_not_attend_across_sequences() -> Result<()> {
        // Changing sequence 1 must leave sequence 0's output untouched.
        let cu = [0, 4, 9];
        let a = randn(&[9, 12], 34)?;
        let mut data = a.flatten_all()?.to_vec1::<f64>()?;
        data[4 * 12..].iter_mut().for_each(|v| *v += 1.0);
        let b = Tensor::from_vec(data, (9, 12), a.device())?;
        let oa = varlen_attention(&a, &cu, 2, 0.5)?.narrow(0, 0, 4)?;
        let ob = varlen_attention(&b, &cu, 2, 0.5)?.narrow(0, 0, 4)?;
        assert_close("sequence 0 output", &oa, &ob, 0.0)
    }

    /// A sequence's output and gradient do not depend, to the bit, on the sequences packed
    /// beside it or where it starts (what a data-parallel rank's share relies on), on the
    /// path f32 takes here (tiled or general), head dims 16 and 32; with dropout, a share
    /// that starts at global row `s` (`row_offset`) draws the mask it draws in the whole batch.
    #[test]
    fn a_sequence_computes_the_same_bits_in_any_batch() -> Result<()> {
        for hd in [16, 32] {
            let w3 = 3 * 2 * hd;
            let a = randn(&[11, w3], 60)?.to_dtype(candle_core::DType::F32)?;
            let b = randn(&[7, w3], 61)?.to_dtype(candle_core::DType::F32)?;
            let wb = randn(&[7, 2 * hd], 62)?.to_dtype(candle_core::DType::F32)?;
            // b's output and dqkv in a batch of `parts` (b at `at`), rows counted from `offset`.
            let run = |parts: &[&Tensor], at: usize, p: f64, offset: u64| {
                let mut cu = vec![0];
                for part in parts {
                    cu.push(cu.last().unwrap() + part.dim(0)?);
                }
                let v = candle_core::Var::from_tensor(&Tensor::cat(parts, 0)?)?;
                let y = varlen_attention_dropout(&v, &cu, 2, 0.3, p, 5, offset)?;
                let yb = y.narrow(0, cu[at], 7)?;
                let g = (&yb * &wb)?.sum_all()?.backward()?;
                Result::Ok((yb, g.get(&v).unwrap().narrow(0, cu[at], 7)?))
            };
            let alone = run(&[&b], 0, 0.0, 0)?;
            for (parts, at) in [(vec![&a, &b], 1), (vec![&b, &a], 0)] {
                let (y, g) = run(&parts, at, 0.0, 0)?;
                assert_close("output beside another sequence", &y, &alone.0, 0.0)?;
                assert_close("dqkv beside another sequence", &g, &alone.1, 0.0)?;
            }
            // Dropout: b after a in one batch, and b alone as the share from row 11.
            let (y, g) = run(&[&a, &b], 1, 0.2, 0)?;
            let share = run(&[&b], 0, 0.2, 11)?;
            assert_close("dropout output of a share", &share.0, &y, 0.0)?;
            assert_close("dropout dqkv of a share", &share.1, &g, 0.0)?;
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_cu_seqlens() {
        let qkv = randn(&[5, 12], 35).unwrap();
        assert!(varlen_attention(&qkv, &[0, 3], 2, 1.0).is_err());
        assert!(varlen_attention(&qkv, &[0, 4, 3, 5], 2, 1.0).is_err());
        assert!(varlen_attention(&qkv, &[0, 5], 5, 1.0).is_err());
    }
}
