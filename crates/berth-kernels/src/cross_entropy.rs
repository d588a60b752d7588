//! Cross-entropy of logits against class indices as one op: row `r`'s loss is
//! `lse(x_r) − x_r[t_r]`, its gradient `g_r · (softmax(x_r) − onehot(t_r))`.
//!
//! Composed from candle ops (max, subtract, exp, sum, log, add, gather, subtract) the loss
//! of a masked-LM step — 600 masked positions × a 16,000-word vocabulary — made about ten
//! passes over a 40 MB tensor forward and as many backward, with libm's scalar `expf` and a
//! zero-filled gradient per node: ~5 % of a pretraining step. Here the forward reads each
//! row twice (max, then the sum of exponentials with the vectorised polynomial exp of
//! [`crate::softmax`]) and keeps one log-sum-exp per row; the backward writes the gradient
//! in one pass.
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{dispatch, slice, with_slice};
use crate::Float;

/// Per-row cross-entropy `lse(logits[r]) − logits[r, targets[r]]`, `[R]` from `logits [R, C]`;
/// differentiable in `logits`. A target outside `0..C` or a count other than `R` is an error.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (r, c) = logits.dims2()?;
    if targets.len() != r {
        bail!(
            "cross-entropy: {} targets for {r} rows of logits",
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= c) {
        bail!("cross-entropy: target class {t} outside the {c} classes of the logits");
    }
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: targets.to_vec(),
        lse: Mutex::new(Vec::new()),
    })
}

/// log Σ exp over `row` with its max taken out (the exact exp of the type).
pub(crate) fn log_sum_exp_generic<T: Float>(row: &[T]) -> T {
    let max = row
        .iter()
        .copied()
        .fold(T::neg_infinity(), num_traits::Float::max);
    let sum = row.iter().map(|&x| (x - max).exp()).sum::<T>();
    sum.ln() + max
}

/// `out = g · exp(row − lse)` (the softmax times the row's gradient; the caller subtracts
/// `g` at the target).
pub(crate) fn softmax_scaled_generic<T: Float>(row: &[T], lse: T, g: T, out: &mut [T]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = g * (x - lse).exp();
    }
}

struct CrossEntropy {
    targets: Vec<u32>,
    /// Each row's log-sum-exp, from the forward (as f64: exact for f32 and f64).
    lse: Mutex<Vec<f64>>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "berth-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(op: &CrossEntropy, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let x = slice::<T>(s, l)?;
            let rows = op.targets.len();
            let c = x.len().checked_div(rows).unwrap_or(0);
            let lse: Vec<T> = x.par_chunks(c.max(1)).map(T::log_sum_exp).collect();
            let loss: Vec<T> = lse
                .iter()
                .zip(&op.targets)
                .enumerate()
                .map(|(r, (&m, &t))| m - x[r * c + t as usize])
                .collect();
            *op.lse.lock().expect("cross-entropy state poisoned") =
                lse.iter().map(|v| v.to_f64().unwrap_or(f64::NAN)).collect();
            Ok(T::to_cpu_storage_owned(loss))
        }
        let out = dispatch!(s.dtype(), self.name(), run(self, s, l))?;
        Ok((out, Shape::from(self.targets.len())))
    }

    fn bwd(&self, x: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(op: &CrossEntropy, x: &Tensor, g: &Tensor) -> Result<Tensor> {
            let lse = op.lse.lock().expect("cross-entropy state poisoned").clone();
            let c = x.dim(1)?;
            let dx = with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(g, |gs| {
                    let mut dx = vec![T::zero(); xs.len()];
                    dx.par_chunks_mut(c.max(1))
                        .zip(xs.par_chunks(c.max(1)))
                        .enumerate()
                        .for_each(|(r, (d, row))| {
                            let m = T::from_f64(lse[r]);
                            T::softmax_scaled(row, m, gs[r], d);
                            let t = op.targets[r] as usize;
                            d[t] = d[t] - gs[r];
                        });
                    dx
                })
            })??;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(dispatch!(x.dtype(), self.name(), run(self, x, g))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gradcheck, randn};
    use candle_core::{DType, Device, D};

    /// The composition the op replaces (and transformers' `CrossEntropyLoss` per row).
    fn reference(x: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?;
        let lse = (x
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + max)?;
        let t = Tensor::new(targets, &Device::Cpu)?.unsqueeze(1)?;
        (lse - x.gather(&t, D::Minus1)?)?.squeeze(1)
    }

    #[test]
    fn f64_matches_the_composition_forward_and_backward() -> Result<()> {
        let x = candle_core::Var::from_tensor(&(randn(&[5, 37], 3)? * 4.0)?)?;
        let targets = [0, 36, 5, 5, 17];
        let w = randn(&[5], 4)?;
        let ours = cross_entropy_rows(&x, &targets)?;
        let theirs = reference(&x, &targets)?;
        assert_close("cross-entropy", &ours, &theirs, 1e-12)?;
        let a = (ours * &w)?.sum_all()?.backward()?;
        let b = (theirs * &w)?.sum_all()?.backward()?;
        assert_close(
            "cross-entropy dx",
            a.get(&x).unwrap(),
            b.get(&x).unwrap(),
            1e-12,
        )
    }

    /// f32 (the vectorised exp) against f64, over a vocabulary-sized row count of classes
    /// (chunks of 16 and a remainder) and logits far from zero.
    #[test]
    fn f32_matches_f64() -> Result<()> {
        let x64 = ((randn(&[6, 1003], 5)? * 6.0)? + 40.0)?;
        let targets = [0, 1002, 17, 500, 500, 999];
        let x32 = candle_core::Var::from_tensor(&x64.to_dtype(DType::F32)?)?;
        let v64 = candle_core::Var::from_tensor(&x64)?;
        let w = randn(&[6], 6)?;
        let ours = cross_entropy_rows(&x32, &targets)?;
        let want = cross_entropy_rows(&v64, &targets)?;
        assert_close("f32 loss vs f64", &ours.to_dtype(DType::F64)?, &want, 1e-5)?;
        let a = (ours * w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        let b = (want * &w)?.sum_all()?.backward()?;
        let da = a.get(&x32).unwrap().to_dtype(DType::F64)?;
        assert_close("f32 dx vs f64", &da, b.get(&v64).unwrap(), 1e-6)
    }

    #[test]
    fn finite_difference_gradients() -> Result<()> {
        gradcheck("cross-entropy", &[(randn(&[4, 9], 7)? * 3.0)?], |v| {
            cross_entropy_rows(&v[0], &[3, 0, 8, 3])
        })
    }

    #[test]
    fn large_logits_stay_finite_and_bad_targets_are_errors() -> Result<()> {
        let x = Tensor::new(&[[1000f32, 1001.0, -1000.0]], &Device::Cpu)?;
        let l = cross_entropy_rows(&x, &[2])?.to_vec1::<f32>()?;
        assert!((l[0] - 2001.3133).abs() < 1e-2, "{l:?}");
        let e = cross_entropy_rows(&x, &[3]).unwrap_err().to_string();
        assert!(e.contains("target class 3 outside the 3 classes"), "{e}");
        let e = cross_entropy_rows(&x, &[0, 1]).unwrap_err().to_string();
        assert!(e.contains("2 targets for 1 rows"), "{e}");
        Ok(())
    }
}
