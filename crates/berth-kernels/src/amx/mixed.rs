//! bf16 matrix products for mixed-precision training: both operands rounded to bf16 at
//! each call (the weights change every step, so nothing is packed once), f32 accumulation,
//! f32 output — the products PyTorch's bf16 autocast runs, without its rounding of the
//! outputs. The backward's products read their operands transposed (`dx = dy W`,
//! `dw = dy^T x`), so the packers take strided views and transpose while they round.
//!
//! Packed layouts are those of [`PackedBf16`] and [`pack_rows`], so the products run on
//! the inference kernels (AMX tiles, AVX-512 BF16 or AVX-512 F FMAs).
use rayon::prelude::*;

use super::{matmul_packed, Bf16Kernel, PackedBf16, BLOCK, DEPTH, TILE};
use crate::cpu::SendPtr;

/// A read-only f32 matrix: element `(r, c)` at `data[r * rs + c * cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.rs + c * self.cs]
    }
}

/// `v` rounded to bf16 (to nearest even; NaN stays NaN), in the low 16 bits. Branch-free,
/// so loops over it vectorise; equal to [`super::to_bf16`].
#[inline(always)]
fn bf16_bits(v: f32) -> u32 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    if v.is_nan() {
        (bits >> 16) | 0x40
    } else {
        rounded
    }
}

/// The `(lo, hi)` bf16 pair as one u32, `lo` in the low half (the packed layouts' order).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// Pairs `(lo[i], hi[i])` (`hi` zero without one) rounded to bf16, into `out[i]`.
fn strip_pairs(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { strip_pairs_avx512(lo, hi, out) };
    }
    strip_pairs_plain(lo, hi, out)
}

#[inline(always)]
fn strip_pairs_plain(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    match hi {
        Some(hi) => {
            for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
                *o = pair(l, h);
            }
        }
        None => {
            for (o, &l) in out.iter_mut().zip(lo) {
                *o = bf16_bits(l);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn strip_pairs_avx512(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    // The plain loop, vectorised by the compiler with the features enabled here.
    strip_pairs_plain(lo, hi, out)
}

/// Rows `r0..r0 + count` of `v` as bf16 pairs of adjacent columns: `put(p, r - r0, pair)`
/// for column pair `p` (columns `2p`, `2p + 1`; an odd last column pairs with zero). The
/// rounding runs vectorised over a line at a time — pair `p` of every row where `v`'s rows
/// are contiguous (a transposed matrix), else every pair of one row — and `put` only
/// places the results.
fn pairs_of(v: View, r0: usize, count: usize, mut put: impl FnMut(usize, usize, u32)) {
    let (k, pairs) = (v.cols, v.cols.div_ceil(2));
    if count == 0 {
        return; // a padding block past the last row
    }
    if v.rs == 1 {
        // Rows contiguous: columns `2p`, `2p + 1` are two strips.
        let mut line = vec![0u32; count];
        for p in 0..pairs {
            let lo = &v.data[2 * p * v.cs + r0..][..count];
            let hi = (2 * p + 1 < k).then(|| &v.data[(2 * p + 1) * v.cs + r0..][..count]);
            strip_pairs(lo, hi, &mut line);
            line.iter().enumerate().for_each(|(r, &x)| put(p, r, x));
        }
    } else {
        // A row's values rounded in place order are its pairs (low half first); an odd
        // last value keeps the zero above it.
        let mut line = vec![0u16; 2 * pairs];
        let mut gathered = Vec::new();
        for r in 0..count {
            let src = if v.cs == 1 {
                &v.data[(r0 + r) * v.rs..][..k]
            } else {
                gathered.clear();
                gathered.extend((0..k).map(|c| v.at(r0 + r, c)));
                &gathered[..]
            };
            super::convert_row(src, &mut line[..k]);
            for (p, two) in line.chunks_exact(2).enumerate() {
                put(p, r, two[0] as u32 | (two[1] as u32) << 16);
            }
        }
    }
}

/// `b` as the weight operand: `[outputs, depth]` (`b.rows` outputs, `b.cols` deep) in
/// [`PackedBf16`] tiles, with `bias` (zeros without one) as the accumulators' start.
pub(crate) fn pack_weight(b: View, bias: Option<&[f32]>) -> PackedBf16 {
    let (outputs, inputs) = (b.rows, b.cols);
    let depth = inputs.div_ceil(DEPTH) * DEPTH;
    let out_pad = outputs.div_ceil(BLOCK) * BLOCK;
    let kb = depth / DEPTH;
    let mut tiles = vec![0u16; out_pad / 16 * kb * TILE];
    if kb > 0 {
        // Per group of 16 outputs the tiles are [depth / 2 pairs][16 outputs] u32s.
        tiles
            .par_chunks_mut(kb * TILE)
            .enumerate()
            .for_each(|(t, dst)| {
                // SAFETY: u16 pairs viewed as u32 (the Vec's allocation is 2-aligned only, so
                // unaligned-safe reads / writes go through `write_unaligned`).
                let dst = dst.as_mut_ptr() as *mut u32;
                let o0 = t * 16;
                let count = outputs.saturating_sub(o0).min(16);
                // Pair p of output o0 + col at u32 p * 16 + col (inside this group's tiles).
                let put = |p: usize, col: usize, v: u32| unsafe {
                    dst.add(p * 16 + col).write_unaligned(v)
                };
                pairs_of(b, o0, count, put);
            });
    }
    let mut padded = vec![0f32; out_pad];
    if let Some(bias) = bias {
        padded[..outputs].copy_from_slice(bias);
    }
    PackedBf16 {
        outputs,
        inputs,
        depth,
        tiles,
        bias: padded,
    }
}

/// `a [n, k]` rounded to bf16 as [`super::pack_rows`] lays it out: rows of `depth`
/// (zero-padded), `n` rounded up to [`BLOCK`].
fn pack_input(a: View, depth: usize) -> Vec<u16> {
    let (n, k) = (a.rows, a.cols);
    if a.cs == 1 && a.rs == k {
        return super::pack_rows(a.data, n, k, depth);
    }
    let rows = n.div_ceil(BLOCK) * BLOCK;
    let mut out = vec![0u16; rows * depth];
    if depth == 0 {
        return out;
    }
    out.par_chunks_mut(depth * BLOCK)
        .enumerate()
        .for_each(|(blk, dst)| {
            let r0 = blk * BLOCK;
            let count = n.saturating_sub(r0).min(BLOCK);
            let dst = dst.as_mut_ptr() as *mut u32;
            let row_pairs = depth / 2;
            // SAFETY: inside this block's rows (count ≤ BLOCK) and depth (pairs ≤ depth / 2).
            let put = |p: usize, r: usize, v: u32| unsafe {
                dst.add(r * row_pairs + p).write_unaligned(v)
            };
            pairs_of(a, r0, count, put);
        });
    out
}

/// `y [n, o] = a [n, k] b^T + bias` with `b` given as `[o, k]`: both rounded to bf16, f32
/// accumulation, on the fastest bf16 kernel here. Panics when the CPU has none
/// ([`super::bf16_available`]; callers check first) or the shapes disagree.
pub(crate) fn matmul(a: View, b: View, bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(a.cols, b.cols, "bf16 matmul: depths differ");
    let kernel = Bf16Kernel::best();
    #[cfg(not(test))]
    let kernel = Some(kernel.expect("bf16 matmul needs AMX or AVX-512"));
    let (n, o) = (a.rows, b.rows);
    let w = pack_weight(b, bias);
    let packed = pack_input(a, w.depth);
    let mut y: Vec<f32> = Vec::with_capacity(n * o);
    if n > 0 && o > 0 {
        match kernel {
            Some(kernel) => matmul_packed(&packed, n, &w, None, SendPtr(y.as_mut_ptr()), kernel),
            // Unit tests on a CPU without a bf16 product: the same packed operands through
            // a plain loop, so the packing and the products' orientation are checked
            // everywhere.
            None => portable(&packed, n, &w, y.spare_capacity_mut()),
        }
    }
    // SAFETY: `matmul_packed` wrote every element of `y [n, o]` (nothing to write when
    // either is 0).
    unsafe { y.set_len(n * o) };
    y
}

/// `y = a W^T + b` from the packed operands, one f32 product at a time: what unit tests
/// run on a CPU without a bf16 kernel (builds outside tests never reach it).
fn portable(a: &[u16], n: usize, w: &PackedBf16, y: &mut [std::mem::MaybeUninit<f32>]) {
    use super::from_bf16;
    let kb = w.depth / DEPTH;
    for r in 0..n {
        for o in 0..w.outputs {
            // Group o / 16's tiles hold pair p of output o at u16 p * 32 + (o % 16) * 2.
            let tiles = &w.tiles[(o / 16) * kb * TILE + (o % 16) * 2..];
            let x = &a[r * w.depth..][..w.depth];
            let mut acc = w.bias[o];
            for p in 0..w.depth / 2 {
                acc += from_bf16(x[2 * p]) * from_bf16(tiles[p * 32])
                    + from_bf16(x[2 * p + 1]) * from_bf16(tiles[p * 32 + 1]);
            }
            y[r * w.outputs + o].write(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amx::{from_bf16, to_bf16};
    use crate::testing::lcg;

    fn round(v: f32) -> f64 {
        from_bf16(to_bf16(v)) as f64
    }

    /// Every view orientation against the f64 product of the bf16-rounded operands.
    #[test]
    fn strided_products_match_the_rounded_reference() {
        // Without a bf16 kernel here the products run on the test-only portable loop.
        println!("bf16 kernel: {:?}", crate::amx::Bf16Kernel::best());
        for &(n, o, k) in &[(37, 50, 45), (70, 100, 384), (1, 3, 1), (33, 17, 64)] {
            let mut s = 11u64;
            let a: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let b: Vec<f32> = (0..o * k).map(|_| lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..o).map(|_| lcg(&mut s)).collect();
            // The same matrices stored transposed.
            let at: Vec<f32> = (0..k * n).map(|j| a[(j % n) * k + j / n]).collect();
            let bt: Vec<f32> = (0..k * o).map(|j| b[(j % o) * k + j / o]).collect();
            let views_a = [View::rows(&a, n, k), View::rows(&at, k, n).t()];
            let views_b = [View::rows(&b, o, k), View::rows(&bt, k, o).t()];
            for va in views_a {
                for vb in views_b {
                    for bias in [None, Some(&bias[..])] {
                        let y = matmul(va, vb, bias);
                        let mut worst = 0f64;
                        for r in 0..n {
                            for c in 0..o {
                                let mut acc = bias.map_or(0.0, |b| b[c] as f64);
                                for j in 0..k {
                                    acc += round(a[r * k + j]) * round(b[c * k + j]);
                                }
                                worst = worst.max((acc - y[r * o + c] as f64).abs());
                            }
                        }
                        assert!(
                            worst < 1e-4 * (k as f64).sqrt(),
                            "{n}x{k} -> {o}, a rs {} b rs {}: max abs diff {worst}",
                            va.rs,
                            vb.rs
                        );
                    }
                }
            }
        }
    }

    /// The packers lay out exactly what the inference packers do (which the AMX and
    /// AVX-512 BF16 kernels are tested on), from row-major and from transposed storage.
    #[test]
    fn packed_layouts_equal_the_inference_packers() {
        let (n, o, k) = (45, 50, 71);
        let mut s = 3u64;
        let w: Vec<f32> = (0..o * k).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..o).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let wt: Vec<f32> = (0..k * o).map(|j| w[(j % o) * k + j / o]).collect();
        let xt: Vec<f32> = (0..k * n).map(|j| x[(j % n) * k + j / n]).collect();
        let want = PackedBf16::pack(&w, &b, o, k);
        assert_eq!(pack_weight(View::rows(&w, o, k), Some(&b)), want);
        assert_eq!(pack_weight(View::rows(&wt, k, o).t(), Some(&b)), want);
        let rows = super::super::pack_rows(&x, n, k, want.depth);
        assert_eq!(pack_input(View::rows(&xt, k, n).t(), want.depth), rows);
    }

    #[test]
    fn branch_free_rounding_equals_to_bf16() {
        let mut s = 5u64;
        let specials = [
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
        ];
        let values = (0..10_000).map(|_| lcg(&mut s) * 1e3).chain(specials);
        for v in values {
            assert_eq!(bf16_bits(v), to_bf16(v) as u32, "{v}");
        }
    }
}
