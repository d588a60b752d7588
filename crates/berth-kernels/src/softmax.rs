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

/// In-place softmax of one row, dispatched per element type.
#[inline]
pub(crate) fn softmax_row<T: Float>(row: &mut [T]) {
    T::softmax_row(row)
}

/// e^x for f32 without a libm call: 2^n * e^r with r in [-ln2/2, ln2/2] and a degree-6
/// Taylor polynomial (relative error ~2e-7, checked below). Branch-free, so it vectorises.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5 * 2^23 trick: after the add, the low mantissa bits of
    // `t` hold n as a two's-complement integer, so 2^n comes from bit arithmetic alone.
    // (A float-to-int cast would be a saturating conversion, which LLVM scalarises.)
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6; // ln 2 split in two for accuracy
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    p * two_n
}

/// The row body with 16 independent lanes for the max and the sum: float reductions
/// only vectorise when written that way (the compiler may not reassociate them).
#[inline(always)]
fn softmax_row_f32_body(row: &mut [f32]) {
    let max = row_max_f32(row);
    let mut sums = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for j in 0..16 {
            c[j] = exp_f32(c[j] - max);
            sums[j] += c[j];
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// The max of `row`, in 16 lanes so that the loop vectorises (exact in any order).
#[inline(always)]
fn row_max_f32(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            lanes[j] = lanes[j].max(c[j]);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `ln Σ exp(row)` with the max taken out: the sum in 16 lanes with [`exp_f32`], as the
/// softmax sums.
#[inline(always)]
fn log_sum_exp_f32_body(row: &[f32]) -> f32 {
    let max = row_max_f32(row);
    let mut sums = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            sums[j] += exp_f32(c[j] - max);
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for &v in chunks.remainder() {
        sum += exp_f32(v - max);
    }
    sum.ln() + max
}

/// `out = g · exp(row − lse)`: a softmax from its log-sum-exp, scaled.
#[inline(always)]
fn softmax_scaled_f32_body(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    out.iter_mut()
        .zip(row)
        .for_each(|(o, &x)| *o = g * exp_f32(x - lse));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn log_sum_exp_f32_avx512(row: &[f32]) -> f32 {
    log_sum_exp_f32_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn log_sum_exp_f32_avx2(row: &[f32]) -> f32 {
    log_sum_exp_f32_body(row)
}

/// f32 log-sum-exp of one row with [`exp_f32`], AVX-512 (or AVX2) when the CPU has it.
pub(crate) fn log_sum_exp_f32(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { log_sum_exp_f32_avx512(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { log_sum_exp_f32_avx2(row) };
    }
    log_sum_exp_f32_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_scaled_f32_avx512(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    softmax_scaled_f32_body(row, lse, g, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_scaled_f32_avx2(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    softmax_scaled_f32_body(row, lse, g, out)
}

/// f32 `out = g · exp(row − lse)` with [`exp_f32`], AVX-512 (or AVX2) when the CPU has it.
pub(crate) fn softmax_scaled_f32(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { softmax_scaled_f32_avx512(row, lse, g, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { softmax_scaled_f32_avx2(row, lse, g, out) };
    }
    softmax_scaled_f32_body(row, lse, g, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_f32_avx512(row: &mut [f32]) {
    softmax_row_f32_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_f32_avx2(row: &mut [f32]) {
    softmax_row_f32_body(row)
}

/// f32 softmax of one row with [`exp_f32`], AVX-512 (or AVX2) when the CPU has it.
pub(crate) fn softmax_row_f32(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { softmax_row_f32_avx512(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { softmax_row_f32_avx2(row) };
    }
    softmax_row_f32_body(row)
}

/// In-place softmax of one row with the type's own exp (exact path, used for f64).
pub(crate) fn softmax_row_generic<T: Float>(row: &mut [T]) {
    let max = row
        .iter()
        .copied()
        .fold(T::neg_infinity(), num_traits::Float::max);
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
        Ok((
            dispatch!(s.dtype(), self.name(), run(s, l))?,
            l.shape().clone(),
        ))
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
        gradcheck("softmax", &[(randn(&[4, 7], 7)? * 3.0)?], |v| {
            softmax_last_dim(&v[0])
        })
    }

    #[test]
    fn fast_f32_exp_and_softmax() -> Result<()> {
        let mut worst = 0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let exact = (x as f64).exp();
            worst = worst.max((exp_f32(x) as f64 - exact).abs() / exact);
        }
        println!("exp_f32 worst relative error {worst:.2e}");
        assert!(worst < 5e-7, "{worst}");
        // f32 softmax (fast exp) against the f64 exact path.
        let x = (randn(&[5, 33], 8)? * 6.0)?;
        let ours = softmax_last_dim(&x.to_dtype(candle_core::DType::F32)?)?;
        assert_close("f32 softmax vs f64", &ours, &reference_softmax(&x)?, 1e-6)
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
