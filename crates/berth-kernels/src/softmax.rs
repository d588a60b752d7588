//! Softmax over the last dimension, numerically stable (max subtracted).
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{dispatch, slice, with_slice};
use crate::Float;

/// Softmax of `x` over its last dimension; differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// The same softmax composed from plain candle ops (reference for tests).
pub fn reference_softmax(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// In-place softmax of one row.
pub(crate) fn softmax_row<T: Float>(row: &mut [T]) {
    let max = row.iter().copied().fold(T::neg_infinity(), num_traits::Float::max);
    let mut sum = T::zero();
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum = sum + *v;
    }
    let inv = T::one() / sum;
    row.iter_mut().for_each(|v| *v = *v * inv);
}

/// dx = y * (dy - sum(dy * y)) for one row, written into `dx`.
pub(crate) fn softmax_row_backward<T: Float>(y: &[T], dy: &[T], dx: &mut [T]) {
    let dot: T = y.iter().zip(dy).map(|(&a, &b)| a * b).sum();
    for ((d, &a), &b) in dx.iter_mut().zip(y).zip(dy) {
        *d = a * (b - dot);
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "berth-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let d = *l.dims().last().unwrap_or(&1);
            let mut y = slice::<T>(s, l)?.to_vec();
            if d > 0 {
                y.par_chunks_mut(d).for_each(softmax_row);
            }
            Ok(T::to_cpu_storage_owned(y))
        }
        Ok((dispatch!(s.dtype(), self.name(), run(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
            let d = y.dim(D::Minus1)?;
            let dx = with_slice::<T, _>(y, |ys| {
                with_slice::<T, _>(dy, |dys| {
                    let mut dx = vec![T::zero(); ys.len()];
                    dx.par_chunks_mut(d)
                        .zip(ys.par_chunks(d).zip(dys.par_chunks(d)))
                        .for_each(|(dxr, (yr, dyr))| softmax_row_backward(yr, dyr, dxr));
                    dx
                })
            })??;
            Tensor::from_vec(dx, y.shape(), y.device())
        }
        Ok(Some(dispatch!(y.dtype(), self.name(), run(y, dy))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gradcheck, randn};

    #[test]
    fn matches_composed_reference() -> Result<()> {
        let x = candle_core::Var::from_tensor(&(randn(&[6, 9], 5)? * 4.0)?)?;
        let w = randn(&[6, 9], 6)?;
        let ours = softmax_last_dim(&x)?;
        let theirs = reference_softmax(&x)?;
        assert_close("softmax forward", &ours, &theirs, 1e-12)?;
        let a = (ours * &w)?.sum_all()?.backward()?;
        let b = (theirs * &w)?.sum_all()?.backward()?;
        assert_close("softmax dx", a.get(&x).unwrap(), b.get(&x).unwrap(), 1e-12)
    }

    #[test]
    fn finite_difference_gradients() -> Result<()> {
        gradcheck("softmax", &[(randn(&[4, 7], 7)? * 3.0)?], |v| softmax_last_dim(&v[0]))
    }

    #[test]
    fn large_logits_do_not_overflow() -> Result<()> {
        let x = Tensor::new(&[[1000f32, 1001.0, -1000.0]], &candle_core::Device::Cpu)?;
        let y = softmax_last_dim(&x)?.to_vec2::<f32>()?;
        assert!(y[0].iter().all(|v| v.is_finite()));
        assert!((y[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        Ok(())
    }
}
