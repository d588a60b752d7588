//! LayerNorm over the last dimension: `y = (x - mean) / sqrt(var + eps) * gamma + beta`.
//!
//! The backward recomputes mean and 1/std from `x` (two cheap passes over a row) instead of
//! keeping them from the forward, so the op stays a plain candle custom op.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{dispatch, same_dtype, slice, with_slice};
use crate::Float;

/// LayerNorm of `x [.., D]` with `gamma [D]`, `beta [D]`; differentiable in all three.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if gamma.dims() != [d] || beta.dims() != [d] {
        candle_core::bail!(
            "layer_norm: x {:?} needs gamma and beta of shape [{d}], got {:?} and {:?}",
            x.dims(),
            gamma.dims(),
            beta.dims()
        );
    }
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, LayerNorm { eps })
}

/// The same LayerNorm composed from plain candle ops: the reference the kernel is tested against.
pub fn reference_layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xhat.broadcast_mul(gamma)?.broadcast_add(beta)
}

struct LayerNorm {
    eps: f64,
}

/// Mean and 1/std of one row, summed in order (f64; f32 overrides it with
/// [`row_stats_f32`] through [`Float::row_stats`]).
pub(crate) fn row_stats_generic<T: Float>(row: &[T], eps: f64) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = row.iter().copied().sum::<T>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
    (mean, T::one() / (var + T::from_f64(eps)).sqrt())
}

pub(crate) fn forward<T: Float>(x: &[T], g: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = g.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let (mean, rstd) = T::row_stats(xr, eps);
            for i in 0..d {
                yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
            }
        });
    y
}

/// Returns (dx, dgamma, dbeta).
pub(crate) fn backward<T: Float>(x: &[T], g: &[T], dy: &[T], eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = g.len();
    let mut dx = vec![T::zero(); x.len()];
    // Per-row dx in parallel; dgamma / dbeta summed per fixed block of rows, and the block
    // sums added in order: the same bits on every run, whatever the thread scheduling.
    const ROWS: usize = 64;
    let partials: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(d * ROWS)
        .zip(x.par_chunks(d * ROWS).zip(dy.par_chunks(d * ROWS)))
        .map(|(dxb, (xb, dyb))| {
            let (mut dg, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
            for (dxr, (xr, dyr)) in dxb.chunks_mut(d).zip(xb.chunks(d).zip(dyb.chunks(d))) {
                T::layer_norm_row_backward(xr, g, dyr, eps, dxr, &mut dg, &mut db);
            }
            (dg, db)
        })
        .collect();
    let (mut dg, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
    for (a, b) in partials {
        dg.iter_mut().zip(a).for_each(|(p, q)| *p = *p + q);
        db.iter_mut().zip(b).for_each(|(p, q)| *p = *p + q);
    }
    (dx, dg, db)
}

/// One row of [`backward`]: `dxr` for the row, and its terms added to `dg` (`dy · x̂`) and
/// `db` (`dy`). The columns' sums and the row's two sums (`Σ dx̂`, `Σ dx̂ · x̂`, in column
/// order) run as separate loops, so the first vectorises; one loop computing all four kept
/// every element scalar (1.7 % of a fine-tuning step's time for the two LayerNorms of six
/// layers). Each value is the same chain of operations as in that one loop: the same bits.
#[inline(always)]
pub(crate) fn row_backward<T: Float>(
    xr: &[T],
    g: &[T],
    dyr: &[T],
    eps: f64,
    dxr: &mut [T],
    dg: &mut [T],
    db: &mut [T],
) {
    let d = g.len();
    let (xr, dyr, dxr, dg, db) = (
        &xr[..d],
        &dyr[..d],
        &mut dxr[..d],
        &mut dg[..d],
        &mut db[..d],
    );
    let (mean, rstd) = T::row_stats(xr, eps);
    let n = T::from_f64(d as f64);
    for i in 0..d {
        let xhat = (xr[i] - mean) * rstd;
        dg[i] = dg[i] + dyr[i] * xhat;
        db[i] = db[i] + dyr[i];
    }
    let (mut m1, mut m2) = (T::zero(), T::zero());
    for i in 0..d {
        let xhat = (xr[i] - mean) * rstd;
        let dxhat = dyr[i] * g[i];
        m1 = m1 + dxhat;
        m2 = m2 + dxhat * xhat;
    }
    m1 = m1 / n;
    m2 = m2 / n;
    for i in 0..d {
        let xhat = (xr[i] - mean) * rstd;
        dxr[i] = rstd * (dyr[i] * g[i] - m1 - xhat * m2);
    }
}

/// [`row_backward`] for f32 compiled for AVX2 + FMA (no contraction into FMAs: the same
/// bits as the plain build).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn row_backward_f32_avx2(
    xr: &[f32],
    g: &[f32],
    dyr: &[f32],
    eps: f64,
    dxr: &mut [f32],
    dg: &mut [f32],
    db: &mut [f32],
) {
    row_backward(xr, g, dyr, eps, dxr, dg, db)
}

/// [`row_backward`] for f32 compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn row_backward_f32_avx512(
    xr: &[f32],
    g: &[f32],
    dyr: &[f32],
    eps: f64,
    dxr: &mut [f32],
    dg: &mut [f32],
    db: &mut [f32],
) {
    row_backward(xr, g, dyr, eps, dxr, dg, db)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "berth-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(eps: f64, s: [(&CpuStorage, &Layout); 3]) -> Result<CpuStorage> {
            let y = forward(
                slice::<T>(s[0].0, s[0].1)?,
                slice(s[1].0, s[1].1)?,
                slice(s[2].0, s[2].1)?,
                eps,
            );
            Ok(T::to_cpu_storage_owned(y))
        }
        let dtype = same_dtype(self.name(), &[s1.dtype(), s2.dtype(), s3.dtype()])?;
        let out = dispatch!(
            dtype,
            self.name(),
            run(self.eps, [(s1, l1), (s2, l2), (s3, l3)])
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: Float>(
            eps: f64,
            x: &Tensor,
            g: &Tensor,
            dy: &Tensor,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let (dx, dg, db) = with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(g, |gs| {
                    with_slice::<T, _>(dy, |dys| backward(xs, gs, dys, eps))
                })
            })???;
            let d = g.dims1()?;
            Ok((
                Tensor::from_vec(dx, x.shape(), x.device())?,
                Tensor::from_vec(dg, d, x.device())?,
                Tensor::from_vec(db, d, x.device())?,
            ))
        }
        let (dx, dg, db) = dispatch!(x.dtype(), self.name(), run(self.eps, x, gamma, dy))?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gradcheck, randn};

    #[test]
    fn fused_add_layer_norm_matches_composed_reference() -> Result<()> {
        for d in [384, 37] {
            let f = |t: Tensor| t.to_dtype(candle_core::DType::F32);
            let x = f((randn(&[9, d], 21)? * 3.0)?)?;
            let r = f((randn(&[9, d], 22)? + 0.5)?)?;
            let g = f((randn(&[d], 23)? + 1.0)?)?;
            let b = f(randn(&[d], 24)?)?;
            let ours = add_layer_norm(&x, &r, &g, &b, 1e-12)?;
            let theirs = reference_layer_norm(&(&x + &r)?, &g, &b, 1e-12)?;
            assert_close("add_layer_norm", &ours, &theirs, 1e-5)?;
            // The same bits as the differentiable op on the summed input.
            let unfused = layer_norm(&(&x + &r)?, &g, &b, 1e-12)?;
            assert_close("add_layer_norm vs layer_norm", &ours, &unfused, 0.0)?;
        }
        Ok(())
    }

    #[test]
    fn matches_composed_reference_forward_and_backward() -> Result<()> {
        let x = candle_core::Var::from_tensor(&randn(&[7, 12], 1)?)?;
        let g = candle_core::Var::from_tensor(&(randn(&[12], 2)? + 1.0)?)?;
        let b = candle_core::Var::from_tensor(&randn(&[12], 3)?)?;
        let w = randn(&[7, 12], 4)?; // a random projection makes the loss non-trivial
        let ours = layer_norm(&x, &g, &b, 1e-5)?;
        let theirs = reference_layer_norm(&x, &g, &b, 1e-5)?;
        assert_close("layer_norm forward", &ours, &theirs, 1e-10)?;
        let go = (ours * &w)?.sum_all()?.backward()?;
        let gt = (theirs * &w)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("gamma", &g), ("beta", &b)] {
            let a = go
                .get(v)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert_close(&format!("layer_norm d{name}"), a, gt.get(v).unwrap(), 1e-10)?;
        }
        Ok(())
    }

    #[test]
    fn finite_difference_gradients() -> Result<()> {
        let x = randn(&[3, 5], 11)?;
        let g = (randn(&[5], 12)? + 1.0)?;
        let b = randn(&[5], 13)?;
        gradcheck("layer_norm", &[x, g, b], |v| {
            layer_norm(&v[0], &v[1], &v[2], 1e-5)
        })
    }
}

/// Inference only (no gradient flows through it): `LayerNorm(x + residual)` for f32
/// `[N, D]` in one pass per row, with AVX-512 row sums where the CPU has them. Training
/// uses `layer_norm(&(x + residual)?, ..)`, which is differentiable.
pub fn add_layer_norm(
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if x.dims() != residual.dims() || gamma.dims() != [d] || beta.dims() != [d] {
        candle_core::bail!(
            "add_layer_norm: x {:?}, residual {:?}, gamma {:?}, beta {:?} do not fit",
            x.dims(),
            residual.dims(),
            gamma.dims(),
            beta.dims()
        );
    }
    let flat = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
    let (g, b) = (flat(gamma)?, flat(beta)?);
    let y = with_slice::<f32, _>(x, |xs| {
        with_slice::<f32, _>(residual, |rs| {
            let mut y = vec![0f32; xs.len()];
            y.par_chunks_mut(d)
                .zip(xs.par_chunks(d).zip(rs.par_chunks(d)))
                .for_each(|(yr, (xr, rr))| add_norm_row(xr, rr, &g, &b, eps as f32, yr));
            y
        })
    })??;
    Tensor::from_vec(y, x.shape(), x.device())
}

pub(crate) fn add_norm_row(x: &[f32], r: &[f32], g: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { add_norm_row_avx512(x, r, g, b, eps, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx2_fma() {
        // SAFETY: the features were just detected.
        return unsafe { add_norm_row_avx2(x, r, g, b, eps, y) };
    }
    add_norm_row_generic(x, r, g, b, eps, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_norm_row_avx2(x: &[f32], r: &[f32], g: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    add_norm_row_generic(x, r, g, b, eps, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_norm_row_avx512(x: &[f32], r: &[f32], g: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    add_norm_row_generic(x, r, g, b, eps, y)
}

/// The add, then exactly [`layer_norm`]'s f32 arithmetic (same sums, same order), so the
/// fused and unfused paths give the same bits.
#[inline(always)]
fn add_norm_row_generic(x: &[f32], r: &[f32], g: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    for ((yv, xv), rv) in y.iter_mut().zip(x).zip(r) {
        *yv = xv + rv;
    }
    let (mean, rstd) = stats_lanes(y, eps);
    for ((yv, gv), bv) in y.iter_mut().zip(g).zip(b) {
        *yv = (*yv - mean) * rstd * gv + bv;
    }
}

/// f32 mean and 1/std of a row with sums in 16 lanes (the loops vectorise; the order is
/// fixed by the code, so every CPU gives the same bits).
pub(crate) fn row_stats_f32(row: &[f32], eps: f64) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { row_stats_avx512(row, eps as f32) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx2_fma() {
        // SAFETY: the features were just detected.
        return unsafe { row_stats_avx2(row, eps as f32) };
    }
    stats_lanes(row, eps as f32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_stats_avx2(row: &[f32], eps: f32) -> (f32, f32) {
    stats_lanes(row, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_stats_avx512(row: &[f32], eps: f32) -> (f32, f32) {
    stats_lanes(row, eps)
}

#[inline(always)]
fn stats_lanes(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = lanes_sum(row, |v| v) / n;
    let var = lanes_sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn lanes_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&t| f(t)).sum();
    for c in chunks {
        for j in 0..16 {
            acc[j] += f(c[j]);
        }
    }
    acc.iter().sum::<f32>() + tail
}
