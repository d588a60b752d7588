//! Element-wise activations as in transformers' `ACT2FN`, each with its exact derivative.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{dispatch, slice, with_slice};
use crate::Float;

/// An activation function, named after the `hidden_act` values of config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: 0.5 x (1 + erf(x / sqrt 2)), PyTorch's exact GELU.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu` / `swish`: x * sigmoid(x).
    Silu,
}

impl Activation {
    /// Maps a config.json `hidden_act` value; `None` for names berth does not implement.
    pub fn from_hidden_act(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" | "gelu_python" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }

    pub(crate) fn value_and_slope<T: Float>(self, x: T) -> (T, T) {
        let half = T::from_f64(0.5);
        let one = T::one();
        match self {
            Self::Gelu => {
                let cdf = half * (one + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
                let pdf = (-(x * x) * half).exp() * T::from_f64(0.398_942_280_401_432_7);
                (x * cdf, cdf + x * pdf)
            }
            Self::GeluTanh => {
                let c = T::from_f64(0.797_884_560_802_865_4); // sqrt(2 / pi)
                let a = T::from_f64(0.044715);
                let t = (c * (x + a * x * x * x)).tanh();
                let slope = half * (one + t)
                    + half * x * (one - t * t) * c * (one + T::from_f64(3.0) * a * x * x);
                (half * x * (one + t), slope)
            }
            Self::Relu => {
                if x > T::zero() {
                    (x, one)
                } else {
                    (T::zero(), T::zero())
                }
            }
            Self::Silu => {
                let s = one / (one + (-x).exp());
                (x * s, s + x * s * (one - s))
            }
        }
    }

    /// The same function composed from plain candle ops (reference for tests).
    pub fn reference(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// erf for f32 as a rational function of x (max abs error 4.2e-7 on [-6, 6], checked
/// against libm below): no branches and no exp, so loops over it vectorise. This is the
/// classic minimax form used by Eigen / TensorFlow; beyond |x| = 4 erf is ±1 in f32.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = ERF_P[0];
    for c in &ERF_P[1..] {
        p = p * x2 + c;
    }
    let mut q = ERF_Q[0];
    for c in &ERF_Q[1..] {
        q = q * x2 + c;
    }
    x * p / q
}

/// [`erf_f32`]'s numerator coefficients in `x²`, highest power first.
const ERF_P: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_6e-3,
    -1.609_603_3e-2,
];

/// [`erf_f32`]'s denominator coefficients in `x²`, highest power first.
const ERF_Q: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_6e-4,
    -1.682_827e-3,
    -7.373_329e-3,
    -1.426_474e-2,
];

/// GELU on 16 lanes for the reduced-precision kernels (bf16, int8), applied to their
/// accumulators before they are stored: [`erf_f32`]'s rational function evaluated with
/// fused multiply-adds and the division as a reciprocal estimate refined by one Newton
/// step. Within a few f32 ulps of [`activate_f32`] (whose output those kernels round to
/// bf16 or quantize next), at about half its operations; inlined, so a register block's
/// vectors interleave.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn gelu_avx512(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = _mm512_set1_ps;
    let x = _mm512_mul_ps(v, c(std::f32::consts::FRAC_1_SQRT_2));
    let x = _mm512_min_ps(c(4.0), _mm512_max_ps(c(-4.0), x));
    let x2 = _mm512_mul_ps(x, x);
    let mut p = c(ERF_P[0]);
    for &k in &ERF_P[1..] {
        p = _mm512_fmadd_ps(p, x2, c(k));
    }
    let mut q = c(ERF_Q[0]);
    for &k in &ERF_Q[1..] {
        q = _mm512_fmadd_ps(q, x2, c(k));
    }
    // 1/q: a 14-bit estimate, then r (2 - q r).
    let r = _mm512_rcp14_ps(q);
    let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, c(2.0)));
    let erf = _mm512_mul_ps(_mm512_mul_ps(x, p), r);
    let half = _mm512_mul_ps(c(0.5), v);
    _mm512_fmadd_ps(half, erf, half)
}

/// `act` on `xs` as the reduced-precision kernels (bf16, int8) apply it to their f32
/// outputs: GELU through [`gelu_avx512`] where the CPU has AVX-512 (the same bits as
/// those kernels' register epilogues), every other case as [`Float::activate`].
pub(crate) fn activate_reduced(act: Activation, xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if act == Activation::Gelu && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { gelu_slice_avx512(xs) };
    }
    f32::activate(act, xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_slice_avx512(xs: &mut [f32]) {
    use std::arch::x86_64::*;
    for chunk in xs.chunks_mut(16) {
        let m = ((1u32 << chunk.len()) - 1) as __mmask16;
        let p = chunk.as_mut_ptr();
        _mm512_mask_storeu_ps(p, m, gelu_avx512(_mm512_maskz_loadu_ps(m, p)));
    }
}

/// f32 forward loops, one per activation so each is a straight vectorisable loop.
#[inline(always)]
pub(crate) fn activate_f32(act: Activation, xs: &mut [f32]) {
    match act {
        Activation::Gelu => xs
            .iter_mut()
            .for_each(|v| *v = 0.5 * *v * (1.0 + erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2))),
        Activation::Relu => xs.iter_mut().for_each(|v| *v = v.max(0.0)),
        _ => xs.iter_mut().for_each(|v| *v = act.value_and_slope(*v).0),
    }
}

/// [`activate_f32`] compiled for AVX-512 (the same source; the compiler vectorises it 16-wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn activate_f32_avx512(act: Activation, xs: &mut [f32]) {
    activate_f32(act, xs)
}

/// [`activate_f32`] compiled for AVX2 + FMA (eight wide), for CPUs without AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn activate_f32_avx2(act: Activation, xs: &mut [f32]) {
    activate_f32(act, xs)
}

/// f32 backward loops: `dy *= act'(x)`. GELU's slope Φ(x) + x φ(x) uses [`erf_f32`] and
/// the polynomial `exp_f32`, so the loop vectorises (libm's scalar `expf` made it ~3 % of a
/// training step); other activations take the exact scalar slope.
#[inline(always)]
pub(crate) fn backward_f32(act: Activation, xs: &[f32], dys: &mut [f32]) {
    match act {
        // An index loop, not `zip().for_each()`: the iterator's `fold` was left out of line
        // and compiled without the caller's target features (4-wide SSE under AVX2).
        Activation::Gelu => {
            let n = dys.len().min(xs.len());
            let (dys, xs) = (&mut dys[..n], &xs[..n]);
            for i in 0..n {
                let x = xs[i];
                let cdf = 0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = crate::softmax::exp_f32(-0.5 * x * x) * 0.398_942_3;
                dys[i] *= cdf + x * pdf
            }
        }
        Activation::Relu => dys
            .iter_mut()
            .zip(xs)
            .for_each(|(g, &x)| *g = if x > 0.0 { *g } else { 0.0 }),
        _ => dys
            .iter_mut()
            .zip(xs)
            .for_each(|(g, &x)| *g *= act.value_and_slope(x).1),
    }
}

/// [`backward_f32`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn backward_f32_avx512(act: Activation, xs: &[f32], dys: &mut [f32]) {
    backward_f32(act, xs, dys)
}

/// [`backward_f32`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn backward_f32_avx2(act: Activation, xs: &[f32], dys: &mut [f32]) {
    backward_f32(act, xs, dys)
}

/// Applies `act` element-wise; differentiable.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ActOp(act))
}

struct ActOp(Activation);

const CHUNK: usize = 4096;

/// `act(x)` into a new buffer, copied and activated chunk by chunk in parallel (the second
/// pass hits L1). The copy is part of the parallel pass, into uninitialised memory: a
/// `to_vec` (or a zero-filled buffer) first was a serial pass over the whole feed-forward
/// activation on the calling thread, with both workers idle.
pub(crate) fn activated<T: Float>(act: Activation, x: &[T]) -> Vec<T> {
    let mut y: Vec<T> = Vec::with_capacity(x.len());
    y.spare_capacity_mut()
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(d, c)| {
            for (d, &v) in d.iter_mut().zip(c) {
                d.write(v);
            }
            // SAFETY: every element of `d` was written just above; `MaybeUninit<T>` has
            // the layout of `T`.
            let d = unsafe { &mut *(d as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
            T::activate(act, d)
        });
    // SAFETY: the chunks cover all `x.len()` elements, each written above.
    unsafe { y.set_len(x.len()) };
    y
}

impl CustomOp1 for ActOp {
    fn name(&self) -> &'static str {
        "berth-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(act: Activation, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(activated(act, slice::<T>(s, l)?)))
        }
        Ok((
            dispatch!(s.dtype(), self.name(), run(self.0, s, l))?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(act: Activation, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            let dx = with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(dy, |dys| {
                    let mut dx = dys.to_vec();
                    dx.par_chunks_mut(CHUNK)
                        .zip(xs.par_chunks(CHUNK))
                        .for_each(|(d, xc)| T::activate_backward(act, xc, d));
                    dx
                })
            })??;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(dispatch!(x.dtype(), self.name(), run(self.0, x, dy))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gradcheck, randn};

    const ALL: [Activation; 4] = [
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Relu,
        Activation::Silu,
    ];

    #[test]
    fn matches_composed_reference() -> Result<()> {
        for act in ALL {
            let x = candle_core::Var::from_tensor(&(randn(&[5, 8], 21)? * 3.0)?)?;
            let w = randn(&[5, 8], 22)?;
            let ours = activation(&x, act)?;
            let theirs = act.reference(&x)?;
            assert_close(&format!("{act:?} forward"), &ours, &theirs, 1e-12)?;
            let a = (ours * &w)?.sum_all()?.backward()?;
            let b = (theirs * &w)?.sum_all()?.backward()?;
            // candle's own gelu_erf derivative is off by ~1e-7 (ours passes the f64
            // finite-difference check below at 1e-6 relative), hence the looser bound.
            assert_close(
                &format!("{act:?} dx"),
                a.get(&x).unwrap(),
                b.get(&x).unwrap(),
                1e-6,
            )?;
        }
        Ok(())
    }

    #[test]
    fn finite_difference_gradients() -> Result<()> {
        for act in ALL {
            // Shift away from 0 so ReLU's kink is not straddled by the finite difference.
            let x = (randn(&[3, 6], 23)? * 2.0)?.affine(1.0, 0.013)?;
            gradcheck(&format!("{act:?}"), &[x], |v| activation(&v[0], act))?;
        }
        Ok(())
    }

    #[test]
    fn fast_f32_erf_and_gelu_match_libm() {
        let mut worst = (0f64, 0f64);
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            worst.0 = worst.0.max((erf_f32(x) as f64 - libm::erf(x as f64)).abs());
            let mut v = [x];
            activate_f32(Activation::Gelu, &mut v);
            let exact = 0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
            worst.1 = worst.1.max((v[0] as f64 - exact).abs());
        }
        println!(
            "f32 erf max abs error {:.2e}, gelu {:.2e}",
            worst.0, worst.1
        );
        assert!(worst.0 < 5e-7 && worst.1 < 2e-6, "{worst:?}");
    }

    /// The reduced-precision kernels' GELU (fused multiply-adds, a refined reciprocal)
    /// against libm, within the bound [`activate_f32`] meets, and its distance to that.
    #[test]
    fn reduced_precision_gelu_matches_libm() {
        let xs: Vec<f32> = (-100_000..=100_000).map(|i| i as f32 * 1e-4).collect();
        let mut ours = xs.clone();
        activate_reduced(Activation::Gelu, &mut ours);
        let mut plain = xs.clone();
        activate_f32(Activation::Gelu, &mut plain);
        let (mut abs, mut apart) = (0f64, 0f64);
        for ((&x, &o), &p) in xs.iter().zip(&ours).zip(&plain) {
            let exact = 0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
            abs = abs.max((o as f64 - exact).abs());
            apart = apart.max((o as f64 - p as f64).abs());
        }
        println!("reduced-precision gelu: max abs error {abs:.2e}, {apart:.2e} from activate_f32");
        assert!(abs < 2e-6, "max abs error {abs}");
    }

    #[test]
    fn f32_backward_matches_exact_slope() {
        for act in ALL {
            let xs: Vec<f32> = (-80_000..=80_000).map(|i| i as f32 * 1e-4).collect();
            let mut dys = vec![1f32; xs.len()];
            f32::activate_backward(act, &xs, &mut dys);
            let worst = xs
                .iter()
                .zip(&dys)
                .filter(|(&x, _)| act != Activation::Relu || x != 0.0)
                .map(|(&x, &g)| (g as f64 - act.value_and_slope(x as f64).1).abs())
                .fold(0f64, f64::max);
            println!("{act:?} f32 slope max abs error {worst:.2e}");
            assert!(worst < 2e-6, "{act:?}: {worst}");
        }
    }

    #[test]
    fn hidden_act_names() {
        assert_eq!(Activation::from_hidden_act("gelu"), Some(Activation::Gelu));
        assert_eq!(
            Activation::from_hidden_act("gelu_new"),
            Some(Activation::GeluTanh)
        );
        assert_eq!(
            Activation::from_hidden_act("gelu_pytorch_tanh"),
            Some(Activation::GeluTanh)
        );
        assert_eq!(Activation::from_hidden_act("relu"), Some(Activation::Relu));
        assert_eq!(Activation::from_hidden_act("mish"), None);
    }
}
