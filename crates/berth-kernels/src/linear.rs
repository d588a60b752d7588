//! Linear layer `y = x W^T + b` as one op: the bias is the initial value of the output that
//! the matmul accumulates into (no separate broadcast pass), and `W` stays in the
//! checkpoint's `[O, I]` layout (read transposed through strides).
//!
//! Shapes: `N` rows, `I` input features, `O` output features.
//!
//! Few rows (batch-1 latency) take a dot-product kernel over rows of `W`: the AVX-512 gemm
//! microkernels pack the whole weight matrix per call, which costs more than the product
//! itself when `N` is small.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::{dispatch, same_dtype, slice, with_slice, Strided};
use crate::{sgemm, Float};

/// Rows at or below which the dot-product kernel is used.
const SMALL_N: usize = 32;

/// `x [N, I]`, `w [O, I]`, `b [O]` → `[N, O]`; differentiable in all three.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_with(x, w, b, Products::F32)
}

/// [`linear`] with its forward and backward matrix products in `products` (bf16: f32
/// tensors only, on a CPU with a bf16 product; see [`Products`]).
pub fn linear_with(x: &Tensor, w: &Tensor, b: &Tensor, products: Products) -> Result<Tensor> {
    let (_, i) = x.dims2()?;
    let (o, wi) = w.dims2()?;
    if wi != i || b.dims() != [o] {
        bail!(
            "linear: x {:?}, w {:?}, b {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear(products))
}

/// The number format of a training op's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Products {
    /// f32 operands, f32 accumulation.
    #[default]
    F32,
    /// Both operands rounded to bf16 at each product (forward and backward), f32
    /// accumulation and f32 results (mixed-precision training; AMX or AVX-512).
    /// Everything around the products — bias, activations, LayerNorm, attention, losses,
    /// the gradients passed between ops — stays f32.
    Bf16,
}

struct Linear(Products);

fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst (+)= lhs @ rhs` on the rayon pool (see [`crate::cpu::matmul`]).
unsafe fn gemm<T: Float>(
    dst: Strided<*mut T>,
    accumulate: bool,
    lhs: Strided<*const T>,
    rhs: Strided<*const T>,
) {
    crate::cpu::matmul(dst, accumulate, lhs, rhs, T::one(), threads())
}

/// [`dot_generic`] for f32 compiled for AVX2 + FMA (its lanes vectorise eight wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_generic(a, b)
}

/// f32 dot product with AVX-512 FMAs, two accumulators of 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i + 16)),
            _mm512_loadu_ps(pb.add(i + 16)),
            acc1,
        );
        i += 32;
    }
    if i + 16 <= n {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
        i += 16;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// Dot product with 16 independent accumulators (portable fallback).
#[inline(always)]
pub(crate) fn dot_generic<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..16 {
            acc[j] = acc[j] + x[j] * y[j];
        }
    }
    let mut s = acc.iter().copied().sum::<T>();
    for (x, y) in ra.iter().zip(rb) {
        s = s + *x * *y;
    }
    s
}

/// `slice` as `&[f32]` when `T` is f32.
fn as_f32<T: Float>(s: &[T]) -> Option<&[f32]> {
    (T::DTYPE == candle_core::DType::F32)
        // SAFETY: T is f32.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) })
}

/// Moves an f32 vector into `Vec<T>` when `T` is f32.
fn from_f32<T: Float>(v: Vec<f32>) -> Vec<T> {
    assert_eq!(T::DTYPE, candle_core::DType::F32);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: T is f32, so layout and allocation match.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// An uninitialised f32 buffer the caller fully overwrites.
fn output(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: every caller writes all `len` elements before reading (sgemm with Init::Zero
    // or Init::Bias writes every element of its C).
    unsafe { v.set_len(len) };
    v
}

/// `y [N, O] = x [N, I] w^T + b` with weights already packed (inference: packed once).
pub fn linear_packed_f32(
    x: &[f32],
    n: usize,
    w: &sgemm::PackedB,
    b: &[f32],
    post: Option<crate::Activation>,
) -> Vec<f32> {
    let (o, i) = (w.n(), w.k());
    let mut y = output(n * o);
    sgemm::sgemm_then(n, x, i, 1, w, &mut y, o, sgemm::Init::Bias(b), post);
    y
}

/// [`linear`] with a weight packed once by [`sgemm::PackedB::pack_transposed`] (inference:
/// no gradient), `x [N, I]` f32, and `post` (an activation) fused onto the output.
pub fn linear_prepacked(
    x: &Tensor,
    w: &sgemm::PackedB,
    b: &[f32],
    post: Option<crate::Activation>,
) -> Result<Tensor> {
    let (n, i) = x.dims2()?;
    if i != w.k() || b.len() != w.n() || x.dtype() != candle_core::DType::F32 {
        bail!(
            "linear: input {:?} {:?} does not fit packed weight [{}, {}]",
            x.dims(),
            x.dtype(),
            w.n(),
            w.k()
        );
    }
    let y = with_slice::<f32, _>(x, |xs| linear_packed_f32(xs, n, w, b, post))?;
    Tensor::from_vec(y, (n, w.n()), x.device())
}

/// The f32 slices of a bf16 product's operands, or why it cannot run.
fn bf16_operands<'a, T: Float, const K: usize>(s: [&'a [T]; K]) -> Result<[&'a [f32]; K]> {
    // (Unit tests run the products on a portable loop where the CPU has no bf16 kernel.)
    if !crate::amx::bf16_available() && !cfg!(test) {
        bail!(
            "bf16 matrix products need a CPU with AMX bf16 tiles or AVX-512; this one has neither"
        );
    }
    if T::DTYPE != candle_core::DType::F32 {
        bail!("bf16 matrix products take f32 tensors, not {:?}", T::DTYPE);
    }
    Ok(s.map(|v| as_f32(v).expect("checked f32")))
}

/// [`forward`] with its product in `products`.
pub(crate) fn forward_with<T: Float>(
    x: &[T],
    w: &[T],
    b: &[T],
    products: Products,
) -> Result<Vec<T>> {
    if products == Products::F32 {
        return Ok(forward(x, w, b));
    }
    let [xf, wf, bf] = bf16_operands([x, w, b])?;
    let (o, i) = (b.len(), w.len() / b.len().max(1));
    let n = if i == 0 { 0 } else { x.len() / i };
    use crate::amx::mixed::{matmul, View};
    Ok(from_f32(matmul(
        View::rows(xf, n, i),
        View::rows(wf, o, i),
        Some(bf),
    )))
}

/// [`backward`] with its products in `products`.
pub(crate) fn backward_with<T: Float>(
    x: &[T],
    w: &[T],
    dy: &[T],
    o: usize,
    products: Products,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    if products == Products::F32 {
        return Ok(backward(x, w, dy, o));
    }
    let [xf, wf, dyf] = bf16_operands([x, w, dy])?;
    let i = w.len() / o.max(1);
    let n = dy.len() / o.max(1);
    use crate::amx::mixed::{matmul, View};
    let (xv, wv, dyv) = (
        View::rows(xf, n, i),
        View::rows(wf, o, i),
        View::rows(dyf, n, o),
    );
    // dx [N, I] = dy [N, O] w [O, I]; dw [O, I] = dy^T [O, N] x [N, I].
    let dx = matmul(dyv, wv.t(), None);
    let dw = matmul(dyv.t(), xv.t(), None);
    Ok((from_f32(dx), from_f32(dw), column_sums(dy, o)))
}

pub(crate) fn forward<T: Float>(x: &[T], w: &[T], b: &[T]) -> Vec<T> {
    let (o, i) = (b.len(), w.len() / b.len().max(1));
    let n = if i == 0 { 0 } else { x.len() / i };
    if let (Some(xf), Some(wf), Some(bf)) = (as_f32(x), as_f32(w), as_f32(b)) {
        if sgemm::available() && n > 0 && i > 0 {
            // y [N, O] = x [N, I] w^T + b: `B = w^T`, read with column stride `i`.
            let mut y = output(n * o);
            let init = sgemm::Init::Bias(bf);
            sgemm::sgemm_unpacked(n, xf, i, 1, (wf, 1, i), (i, o), &mut y, o, init);
            return from_f32(y);
        }
    }
    let mut y: Vec<T> = Vec::with_capacity(n * o);
    for _ in 0..n {
        y.extend_from_slice(b);
    }
    if n == 0 || i == 0 {
        return y;
    }
    if n <= SMALL_N {
        // Parallel over blocks of output features; each block reads its rows of W once.
        let block = 64;
        let mut cols: Vec<Vec<T>> = (0..o.div_ceil(block))
            .into_par_iter()
            .map(|blk| {
                let rows = blk * block..((blk + 1) * block).min(o);
                let mut out = Vec::with_capacity(n * rows.len());
                for r in 0..n {
                    let xr = &x[r * i..(r + 1) * i];
                    out.extend(rows.clone().map(|c| T::dot(xr, &w[c * i..(c + 1) * i])));
                }
                out
            })
            .collect();
        for (blk, vals) in cols.iter_mut().enumerate() {
            let start = blk * block;
            let width = vals.len() / n;
            for r in 0..n {
                for c in 0..width {
                    y[r * o + start + c] = y[r * o + start + c] + vals[r * width + c];
                }
            }
        }
        return y;
    }
    // SAFETY: buffers have the sizes the strides describe.
    unsafe {
        // y [N, O] += x [N, I] @ w^T [I, O]
        gemm(
            Strided::rows(y.as_mut_ptr(), n, o, o),
            true,
            Strided::rows(x.as_ptr(), n, i, i),
            Strided::rows(w.as_ptr(), o, i, i).t(),
        )
    };
    y
}

/// Column sums of `dy [N, O]` (the bias gradient): blocks of rows summed in parallel,
/// then the block sums added in order, so every run gives the same bits.
fn column_sums<T: Float>(dy: &[T], o: usize) -> Vec<T> {
    const ROWS: usize = 64;
    let mut db = vec![T::zero(); o];
    if o == 0 {
        return db;
    }
    let partials: Vec<Vec<T>> = dy
        .par_chunks(o * ROWS)
        .map(|block| {
            let mut acc = vec![T::zero(); o];
            for row in block.chunks(o) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a = *a + v);
            }
            acc
        })
        .collect();
    for p in partials {
        db.iter_mut().zip(p).for_each(|(a, v)| *a = *a + v);
    }
    db
}

/// Returns (dx, dw, db) for upstream `dy [N, O]`.
pub(crate) fn backward<T: Float>(x: &[T], w: &[T], dy: &[T], o: usize) -> (Vec<T>, Vec<T>, Vec<T>) {
    let i = w.len() / o;
    let n = dy.len() / o;
    let db = column_sums(dy, o);
    if let (Some(xf), Some(wf), Some(dyf)) = (as_f32(x), as_f32(w), as_f32(dy)) {
        if sgemm::available() && n > 0 && i > 0 {
            // dx [N, I] = dy [N, O] @ w [O, I]
            let mut dxf = output(n * i);
            let init = sgemm::Init::Zero;
            sgemm::sgemm_unpacked(n, dyf, o, 1, (wf, i, 1), (o, i), &mut dxf, i, init);
            // dw [O, I] = dy^T [O, N] @ x [N, I]
            let mut dwf = output(o * i);
            let xp = sgemm::PackedB::pack(xf, i, 1, n, i);
            sgemm::sgemm(o, dyf, 1, o, &xp, &mut dwf, i, sgemm::Init::Zero);
            return (from_f32(dxf), from_f32(dwf), db);
        }
    }
    // Zeroed here, not above: the f32 path writes its outputs whole (no 25 MB memset per
    // feed-forward backward).
    let mut dx = vec![T::zero(); n * i];
    let mut dw = vec![T::zero(); o * i];
    if n > 0 && i > 0 {
        // SAFETY: buffers have the sizes the strides describe.
        unsafe {
            // dx [N, I] = dy [N, O] @ w [O, I]
            gemm(
                Strided::rows(dx.as_mut_ptr(), n, i, i),
                false,
                Strided::rows(dy.as_ptr(), n, o, o),
                Strided::rows(w.as_ptr(), o, i, i),
            );
            // dw [O, I] = dy^T [O, N] @ x [N, I]
            gemm(
                Strided::rows(dw.as_mut_ptr(), o, i, i),
                false,
                Strided::rows(dy.as_ptr(), n, o, o).t(),
                Strided::rows(x.as_ptr(), n, i, i),
            );
        }
    }
    (dx, dw, db)
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "berth-linear"
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
        fn run<T: Float>(s: [(&CpuStorage, &Layout); 3], products: Products) -> Result<CpuStorage> {
            let y = forward_with(
                slice::<T>(s[0].0, s[0].1)?,
                slice(s[1].0, s[1].1)?,
                slice(s[2].0, s[2].1)?,
                products,
            )?;
            Ok(T::to_cpu_storage_owned(y))
        }
        let products = self.0;
        let dtype = same_dtype(self.name(), &[s1.dtype(), s2.dtype(), s3.dtype()])?;
        let out = dispatch!(
            dtype,
            self.name(),
            run([(s1, l1), (s2, l2), (s3, l3)], products)
        )?;
        let n = l1.dims()[0];
        let o = l2.dims()[0];
        Ok((out, Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: Float>(
            x: &Tensor,
            w: &Tensor,
            dy: &Tensor,
            products: Products,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let o = w.dim(0)?;
            let (dx, dw, db) = with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(w, |ws| {
                    with_slice::<T, _>(dy, |dys| backward_with(xs, ws, dys, o, products))
                })
            })????;
            Ok((
                Tensor::from_vec(dx, x.shape(), x.device())?,
                Tensor::from_vec(dw, w.shape(), x.device())?,
                Tensor::from_vec(db, o, x.device())?,
            ))
        }
        let (dx, dw, db) = dispatch!(x.dtype(), self.name(), run(x, w, dy, self.0))?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gradcheck, randn};

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        x.matmul(&w.t()?)?.broadcast_add(b)
    }

    #[test]
    fn matches_composed_reference_small_and_large() -> Result<()> {
        for n in [1, 5, SMALL_N, SMALL_N + 7, 200] {
            let x = candle_core::Var::from_tensor(&randn(&[n, 37], 41)?)?;
            let w = candle_core::Var::from_tensor(&randn(&[70, 37], 42)?)?;
            let b = candle_core::Var::from_tensor(&randn(&[70], 43)?)?;
            let g = randn(&[n, 70], 44)?;
            let ours = linear(&x, &w, &b)?;
            let theirs = reference(&x, &w, &b)?;
            assert_close(&format!("linear n={n} forward"), &ours, &theirs, 1e-12)?;
            let a = (ours * &g)?.sum_all()?.backward()?;
            let c = (theirs * &g)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                assert_close(
                    &format!("linear n={n} d{name}"),
                    a.get(v).unwrap(),
                    c.get(v).unwrap(),
                    1e-11,
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn f32_paths_match_f64() -> Result<()> {
        // f32 takes the AVX-512 dot kernel (small N) or the gemm path; compare both to f64.
        for n in [3, 100] {
            let (x, w, b) = (
                randn(&[n, 40], 48)?,
                randn(&[24, 40], 49)?,
                randn(&[24], 50)?,
            );
            let exact = linear(&x, &w, &b)?;
            let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
            assert_close(
                &format!("f32 linear n={n}"),
                &linear(&f(&x)?, &f(&w)?, &f(&b)?)?,
                &exact,
                1e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn f32_backward_matches_f64() -> Result<()> {
        for n in [3, 100] {
            let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
            let vals = [
                randn(&[n, 70], 51)?,
                randn(&[50, 70], 52)?,
                randn(&[50], 53)?,
            ];
            let g = randn(&[n, 50], 54)?;
            let grads = |ts: &[Tensor], g: &Tensor| -> Result<Vec<Tensor>> {
                let vars: Vec<candle_core::Var> = ts
                    .iter()
                    .map(candle_core::Var::from_tensor)
                    .collect::<Result<_>>()?;
                let y = linear(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                )?;
                let gs = (y * g)?.sum_all()?.backward()?;
                vars.iter()
                    .map(|v| gs.get(v).unwrap().to_dtype(candle_core::DType::F64))
                    .collect()
            };
            let exact = grads(&vals, &g)?;
            let single = grads(&vals.iter().map(f).collect::<Result<Vec<_>>>()?, &f(&g)?)?;
            for ((name, e), s) in ["dx", "dw", "db"].iter().zip(&exact).zip(&single) {
                assert_close(&format!("f32 linear n={n} {name}"), s, e, 1e-4)?;
            }
        }
        Ok(())
    }

    #[test]
    fn finite_difference_gradients() -> Result<()> {
        gradcheck(
            "linear",
            &[randn(&[4, 5], 45)?, randn(&[3, 5], 46)?, randn(&[3], 47)?],
            |v| linear(&v[0], &v[1], &v[2]),
        )
    }
}
