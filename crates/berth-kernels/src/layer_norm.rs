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

/// Mean and 1/std of one row.
fn row_stats<T: Float>(row: &[T], eps: f64) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = row.iter().copied().sum::<T>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
    (mean, T::one() / (var + T::from_f64(eps)).sqrt())
}

fn forward<T: Float>(x: &[T], g: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = g.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let (mean, rstd) = row_stats(xr, eps);
            for i in 0..d {
                yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
            }
        });
    y
}

/// Returns (dx, dgamma, dbeta).
fn backward<T: Float>(x: &[T], g: &[T], dy: &[T], eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
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
                let (mean, rstd) = row_stats(xr, eps);
                let n = T::from_f64(d as f64);
                let (mut m1, mut m2) = (T::zero(), T::zero());
                for i in 0..d {
                    let xhat = (xr[i] - mean) * rstd;
                    let dxhat = dyr[i] * g[i];
                    m1 = m1 + dxhat;
                    m2 = m2 + dxhat * xhat;
                    dg[i] = dg[i] + dyr[i] * xhat;
                    db[i] = db[i] + dyr[i];
                }
                m1 = m1 / n;
                m2 = m2 / n;
                for i in 0..d {
                    let xhat = (xr[i] - mean) * rstd;
                    dxr[i] = rstd * (dyr[i] * g[i] - m1 - xhat * m2);
                }
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
