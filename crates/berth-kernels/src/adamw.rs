//! The AdamW update as one pass over memory, written into the parameter's own storage.
//!
//! `torch.optim.AdamW`'s arithmetic in its order, element by element in f32 (no fused
//! multiply-add, so the vectorised loop gives the scalar loop's bits): decay the weight,
//! move the moments, step, and clear the gradient for the next accumulation. One pass
//! reads and writes the weight, gradient and both moments once; the step used to keep a
//! copy of every weight beside the variable and copy it in twice per step.
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

/// The scalars of one AdamW step (all in f32, as the update computes them).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Multiplier of the weight before the step: `1 - lr × weight_decay` (1 without decay).
    pub decay: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε added to the denominator.
    pub eps: f32,
    /// `lr / (1 - β1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - β2^t)`.
    pub bias_correction2_sqrt: f32,
}

/// A chunk of gradient the update reads: cleared as it goes (the optimizer's own
/// accumulator, zeroed for the next accumulation) or left as it is (a backward's gradient
/// tensor the step reads in place).
trait Gradient {
    fn len(&self) -> usize;
    fn get(&self, i: usize) -> f32;
    fn clear(&mut self, i: usize);
}

impl Gradient for &mut [f32] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }
    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        self[i]
    }
    #[inline(always)]
    fn clear(&mut self, i: usize) {
        self[i] = 0.0;
    }
}

/// A gradient read as `values × scale` and left as it is.
struct Scaled<'a>(&'a [f32], f32);

impl Gradient for Scaled<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        self.0[i] * self.1
    }
    #[inline(always)]
    fn clear(&mut self, _: usize) {}
}

/// One element's update (torch's single-tensor AdamW, in its order of operations).
#[inline(always)]
fn update_slices<G: Gradient>(
    p: &mut [f32],
    mut g: G,
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamWStep,
) {
    let (one_b1, one_b2) = (1.0 - s.beta1, 1.0 - s.beta2);
    let n = p.len();
    assert!(g.len() >= n && m.len() >= n && v.len() >= n);
    let (m, v) = (&mut m[..n], &mut v[..n]);
    for i in 0..n {
        let gi = g.get(i);
        let pi = p[i] * s.decay;
        let mi = m[i] + one_b1 * (gi - m[i]);
        let vi = s.beta2 * v[i] + one_b2 * gi * gi;
        let denom = vi.sqrt() / s.bias_correction2_sqrt + s.eps;
        p[i] = pi - s.step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
        g.clear(i);
    }
}

/// [`update_slices`] compiled for AVX-512: the same operations, sixteen lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn update_avx512<G: Gradient>(
    p: &mut [f32],
    g: G,
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamWStep,
) {
    update_slices(p, g, m, v, s)
}

fn update_chunk<G: Gradient>(p: &mut [f32], g: G, m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { update_avx512(p, g, m, v, s) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { update_avx2(p, g, m, v, s) };
    }
    update_slices(p, g, m, v, s)
}

/// [`update_slices`] compiled for AVX2 + FMA (no fused operations: the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_avx2<G: Gradient>(
    p: &mut [f32],
    g: G,
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamWStep,
) {
    update_slices(p, g, m, v, s)
}

/// One AdamW step over slices of equal length, in parallel: the weights `p` in place,
/// the moments `m` and `v`, and the gradient `g`, which is left zeroed.
pub fn adamw_update(p: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    assert_eq!(g.len(), p.len(), "adamw_update: gradient length");
    update_all(p, g.par_chunks_mut(CHUNK), m, v, s);
}

/// [`adamw_update`] from the gradient `g × scale`, which it only reads (a backward's own
/// gradient tensor, not copied into an accumulator and scaled there first): the bits of
/// `adamw_update` of that product for `p`, `m` and `v`; `g` is left as it is.
pub fn adamw_update_from(
    p: &mut [f32],
    g: &[f32],
    scale: f32,
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamWStep,
) {
    assert_eq!(g.len(), p.len(), "adamw_update_from: gradient length");
    let g = g.par_chunks(CHUNK).map(|g| Scaled(g, scale));
    update_all(p, g, m, v, s);
}

/// The update of `p`, `m` and `v` in parallel chunks of [`CHUNK`], `g` giving each chunk's
/// gradient.
fn update_all<G: Gradient + Send>(
    p: &mut [f32],
    g: impl IndexedParallelIterator<Item = G>,
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamWStep,
) {
    assert!(
        m.len() == p.len() && v.len() == p.len(),
        "adamw: moments of different lengths"
    );
    p.par_chunks_mut(CHUNK)
        .zip(g)
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| update_chunk(p, g, m, v, s));
}

/// Sum of squares of one chunk in f64: sixteen running sums (element `i` goes to sum
/// `i % 16`), added pairwise at the end — a fixed order, so the same bits on every run and
/// thread count, and no chain of dependent additions (one sum ran at the adder's latency).
#[inline(always)]
fn squares_chunk(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 16];
    let mut blocks = xs.chunks_exact(16);
    for b in &mut blocks {
        for (a, &x) in acc.iter_mut().zip(b) {
            *a += (x as f64) * (x as f64);
        }
    }
    for (a, &x) in acc.iter_mut().zip(blocks.remainder()) {
        *a += (x as f64) * (x as f64);
    }
    pairwise16(acc)
}

/// The sixteen running sums of [`squares_chunk`] added pairwise.
#[inline(always)]
fn pairwise16(mut acc: [f64; 16]) -> f64 {
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            acc[j] += acc[j + width];
        }
    }
    acc[0]
}

/// [`sum_of_squares`] of `xs` where only the rows `rows` (ascending, `width` elements each,
/// `width` a multiple of 16) can be non-zero, reading only those rows: the same bits, since
/// a zero adds nothing to a running sum and each row's elements meet the same sums
/// (element `i` of a chunk goes to sum `i % 16`) in the same order.
pub fn sum_of_squares_rows(xs: &[f32], width: usize, rows: &[u32]) -> f64 {
    assert!(
        width > 0 && width.is_multiple_of(16) && xs.len().is_multiple_of(width),
        "sum_of_squares_rows: rows of {width} in {} values",
        xs.len()
    );
    assert!(
        rows.windows(2).all(|w| w[0] < w[1]),
        "sum_of_squares_rows: rows not ascending"
    );
    let mut parts = vec![0f64; xs.len().div_ceil(CHUNK)];
    let mut next = rows.iter().peekable();
    for (c, part) in parts.iter_mut().enumerate() {
        let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(xs.len()));
        let mut acc = [0f64; 16];
        let mut any = false;
        while let Some(&&r) = next.peek() {
            let (start, end) = (r as usize * width, (r as usize + 1) * width);
            if start >= hi {
                break;
            }
            for b in xs[start.max(lo)..end.min(hi)].chunks_exact(16) {
                for (a, &x) in acc.iter_mut().zip(b) {
                    *a += (x as f64) * (x as f64);
                }
            }
            any = true;
            if end > hi {
                break; // the row goes on in the next chunk
            }
            next.next();
        }
        if any {
            *part = pairwise16(acc);
        }
    }
    parts.into_iter().sum()
}

/// [`adamw_update`] of the rows (`width` elements each) for which `keep(row)` holds; the
/// other rows of `p`, `g`, `m` and `v` are left as they are.
pub fn adamw_update_rows(
    p: &mut [f32],
    g: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    width: usize,
    keep: &(dyn Fn(usize) -> bool + Sync),
    s: &AdamWStep,
) {
    assert!(
        g.len() == p.len() && m.len() == p.len() && v.len() == p.len(),
        "adamw_update_rows: slices of different lengths"
    );
    assert!(
        width > 0 && p.len().is_multiple_of(width),
        "adamw_update_rows: rows of {width} in {} values",
        p.len()
    );
    let per = (CHUNK / width).max(1);
    let span = per * width;
    p.par_chunks_mut(span)
        .zip(g.par_chunks_mut(span))
        .zip(m.par_chunks_mut(span).zip(v.par_chunks_mut(span)))
        .enumerate()
        .for_each(|(b, ((p, g), (m, v)))| {
            let rows = p
                .chunks_mut(width)
                .zip(g.chunks_mut(width))
                .zip(m.chunks_mut(width).zip(v.chunks_mut(width)));
            for (r, ((p, g), (m, v))) in rows.enumerate() {
                if keep(b * per + r) {
                    update_chunk(p, g, m, v, s);
                }
            }
        });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn squares_avx512(xs: &[f32]) -> f64 {
    squares_chunk(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn squares_avx2(xs: &[f32]) -> f64 {
    squares_chunk(xs)
}

/// The sum of squares of `xs` in f64, in parallel over fixed chunks summed in order:
/// deterministic (the same result on every run, whatever the thread count).
pub fn sum_of_squares(xs: &[f32]) -> f64 {
    let parts: Vec<f64> = xs
        .par_chunks(CHUNK)
        .map(|c| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { squares_avx512(c) };
            }
            #[cfg(target_arch = "x86_64")]
            if crate::cpu::avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { squares_avx2(c) };
            }
            squares_chunk(c)
        })
        .collect();
    parts.into_iter().sum()
}

/// Runs `f` on the f32 values of a CPU tensor, read where they lie when it is contiguous
/// (the reading counterpart of [`with_values_mut`]).
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    crate::cpu::with_slice::<f32, R>(t, f)
}

/// Runs `f` on the f32 values of a contiguous CPU tensor in place (a variable's own
/// storage: every tensor sharing it sees the change).
pub fn with_values_mut(t: &Tensor, f: impl FnOnce(&mut [f32])) -> candle_core::Result<()> {
    struct Op<F>(std::sync::Mutex<Option<F>>);
    impl<F: FnOnce(&mut [f32])> InplaceOp1 for Op<F> {
        fn name(&self) -> &'static str {
            "with-values-mut"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("with_values_mut: the tensor is not contiguous");
            };
            let CpuStorage::F32(values) = storage else {
                candle_core::bail!("with_values_mut: the tensor is not f32");
            };
            let f = self.0.lock().expect("poisoned").take();
            if let Some(f) = f {
                f(&mut values[start..end]);
            }
            Ok(())
        }
    }
    t.inplace_op1(&Op(std::sync::Mutex::new(Some(f))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised path gives the scalar loop's bits (no contraction into FMA), on
    /// lengths that leave remainders.
    #[test]
    fn vector_and_scalar_paths_agree_bitwise() {
        let n = 3 * CHUNK + 37;
        let gen = |k: usize, scale: f32| {
            (0..n)
                .map(|i| (((i * k + 11) % 997) as f32 / 498.5 - 1.0) * scale)
                .collect::<Vec<f32>>()
        };
        let s = AdamWStep {
            decay: 1.0 - 5e-5 * 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step_size: 5e-5 / (1.0 - 0.9f32.powi(3)),
            bias_correction2_sqrt: (1.0 - 0.999f32.powi(3)).sqrt(),
        };
        let (p0, g0, m0) = (gen(7, 0.1), gen(13, 2.0), gen(17, 0.01));
        let v0: Vec<f32> = gen(19, 0.01).iter().map(|x| x * x).collect();
        let (mut p1, mut g1, mut m1, mut v1) = (p0.clone(), g0.clone(), m0.clone(), v0.clone());
        adamw_update(&mut p1, &mut g1, &mut m1, &mut v1, &s);
        // The same step from a gradient it only reads.
        let (mut p3, mut m3, mut v3) = (p0.clone(), m0.clone(), v0.clone());
        adamw_update_from(&mut p3, &g0, 1.0, &mut m3, &mut v3, &s);
        let (mut p2, mut g2, mut m2, mut v2) = (p0.clone(), g0.clone(), m0.clone(), v0.clone());
        // The reference: torch's order written out plainly, one element at a time.
        for i in 0..n {
            let gi = g2[i];
            p2[i] *= s.decay;
            m2[i] += (1.0 - s.beta1) * (gi - m2[i]);
            v2[i] = s.beta2 * v2[i] + (1.0 - s.beta2) * gi * gi;
            let denom = v2[i].sqrt() / s.bias_correction2_sqrt + s.eps;
            p2[i] -= s.step_size * m2[i] / denom;
            g2[i] = 0.0;
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&p1), bits(&p2));
        assert_eq!(bits(&m1), bits(&m2));
        assert_eq!(bits(&v1), bits(&v2));
        assert!(g1.iter().all(|&g| g == 0.0));
        assert_ne!(bits(&p1), bits(&p0), "the step moved nothing");
        assert_eq!(bits(&p3), bits(&p2));
        assert_eq!(bits(&m3), bits(&m2));
        assert_eq!(bits(&v3), bits(&v2));
        // A scaled gradient read in place steps as its scaled copy does.
        let scale = 0.37f32;
        let mut g4: Vec<f32> = g0.iter().map(|g| g * scale).collect();
        let (mut p4, mut m4, mut v4) = (p0.clone(), m0.clone(), v0.clone());
        adamw_update(&mut p4, &mut g4, &mut m4, &mut v4, &s);
        let (mut p5, mut m5, mut v5) = (p0.clone(), m0.clone(), v0.clone());
        adamw_update_from(&mut p5, &g0, scale, &mut m5, &mut v5, &s);
        assert_eq!(bits(&p5), bits(&p4));
        assert_eq!(bits(&m5), bits(&m4));
        assert_eq!(bits(&v5), bits(&v4));
        assert_ne!(bits(&p5), bits(&p1), "the scale changed nothing");
    }

    /// A word table where only some rows have a gradient and only some have moments (rows
    /// across chunk boundaries, the first and the last): the row-wise norm and update give
    /// the dense ones' bits, the update skipping rows with neither.
    #[test]
    fn row_wise_norm_and_update_equal_dense_ones() {
        let (width, vocab) = (384, 700); // 268,800 values: five chunks, rows straddling them
        let n = width * vocab;
        let mut state = 7u64;
        let mut rnd = || crate::testing::lcg(&mut state);
        let fresh: Vec<u32> = vec![0, 3, 170, 171, 341, 342, 500, 682, 683, 699];
        let live: Vec<usize> = vec![1, 3, 170, 400, 683];
        let mut g = vec![0f32; n];
        for &r in &fresh {
            for x in &mut g[r as usize * width..(r as usize + 1) * width] {
                *x = rnd();
            }
        }
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for &r in &live {
            for i in r * width..(r + 1) * width {
                m[i] = rnd() * 0.1;
                v[i] = (rnd() * 0.01).abs();
            }
        }
        let p: Vec<f32> = (0..n).map(|_| rnd()).collect();
        assert_eq!(
            sum_of_squares_rows(&g, width, &fresh).to_bits(),
            sum_of_squares(&g).to_bits()
        );
        assert_eq!(sum_of_squares_rows(&g, width, &[]), 0.0);
        let step = AdamWStep {
            decay: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step_size: 1e-3,
            bias_correction2_sqrt: 0.05,
        };
        let (mut p1, mut g1, mut m1, mut v1) = (p.clone(), g.clone(), m.clone(), v.clone());
        adamw_update(&mut p1, &mut g1, &mut m1, &mut v1, &step);
        let keep = |r: usize| live.contains(&r) || fresh.contains(&(r as u32));
        let (mut p2, mut g2, mut m2, mut v2) = (p.clone(), g.clone(), m, v);
        adamw_update_rows(&mut p2, &mut g2, &mut m2, &mut v2, width, &keep, &step);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&p1), bits(&p2));
        assert_eq!(bits(&g1), bits(&g2));
        assert_eq!(bits(&m1), bits(&m2));
        assert_eq!(bits(&v1), bits(&v2));
        // Skipped rows were really left alone (a row with moments is not skipped).
        assert_ne!(bits(&p1[width..2 * width]), bits(&p[width..2 * width]));
    }

    #[test]
    fn sum_of_squares_matches_a_plain_sum() {
        let xs: Vec<f32> = (0..2 * CHUNK + 21)
            .map(|i| ((i * 31 % 1009) as f32 - 504.0) / 97.0)
            .collect();
        let plain: f64 = xs.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let got = sum_of_squares(&xs);
        assert!((got - plain).abs() <= 1e-12 * plain, "{got} vs {plain}");
        // The vectorised path gives the portable path's bits.
        let portable: f64 = xs.chunks(CHUNK).map(squares_chunk).sum();
        assert_eq!(got.to_bits(), portable.to_bits());
        assert_eq!(sum_of_squares(&[]), 0.0);
    }

    #[test]
    fn values_change_in_place_for_every_sharer() {
        let var = candle_core::Var::new(&[1f32, 2.0, 3.0], &candle_core::Device::Cpu).unwrap();
        let alias = var.as_tensor().clone();
        with_values_mut(var.as_tensor(), |v| v.iter_mut().for_each(|x| *x *= 2.0)).unwrap();
        assert_eq!(alias.to_vec1::<f32>().unwrap(), vec![2.0, 4.0, 6.0]);
        let bf = alias.to_dtype(candle_core::DType::BF16).unwrap();
        let err = with_values_mut(&bf, |_| {}).unwrap_err().to_string();
        assert!(err.contains("not f32"), "{err}");
    }
}
