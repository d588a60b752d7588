//! Dropout whose mask is a pure function of `(seed, element index)`: the backward (and a
//! resumed run) regenerates exactly the forward's mask, and no mask is ever stored.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::cpu::{dispatch, slice, with_slice};
use crate::Float;

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An independent seed for sub-stream `n` of `seed` (e.g. the n-th dropout call of a step).
pub fn substream(seed: u64, n: u64) -> u64 {
    mix(seed ^ mix(n.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// One dropout site: rate, seed, and the global row of the tensor's first row (0 in one
/// process; a data-parallel rank's share of a batch starts further on), so a share draws,
/// row for row, the masks the whole batch draws.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropSite {
    /// Probability of dropping an element.
    pub rate: f32,
    /// The site's stream.
    pub seed: u64,
    /// Global row of the first row (tokens of a packed batch).
    pub row_offset: u64,
}

impl DropSite {
    /// A site of rate `rate` on stream `seed`, rows counted from 0.
    pub fn new(rate: f32, seed: u64) -> Self {
        DropSite {
            rate,
            seed,
            row_offset: 0,
        }
    }

    /// The attention-probability stream of the sequence that starts at packed row `start`,
    /// head `head`.
    pub(crate) fn attention_key(&self, start: usize, head: usize) -> u64 {
        substream(
            self.seed,
            ((start as u64 + self.row_offset) << 16) ^ head as u64,
        )
    }

    /// The element index of row 0 of a tensor whose rows are `width` wide.
    pub(crate) fn base(&self, width: usize) -> u64 {
        self.row_offset * width as u64
    }
}

/// The keep threshold of rate `p` on 16-bit draws.
#[inline]
pub(crate) fn threshold(p: f32) -> u32 {
    (p as f64 * 65536.0).round() as u32
}

/// Whether element `i` of stream `key` is kept at `threshold` (from [`threshold`]): one 64-bit
/// mix gives four 16-bit uniform draws, element `i` uses draw `i % 4` of mix `i / 4`.
/// The definition [`word`] computes in groups (tests compare the two).
#[cfg(test)]
pub(crate) fn keep(key: u64, i: u64, threshold: u32) -> bool {
    let h = mix(key.wrapping_add((i >> 2).wrapping_mul(GOLDEN)));
    ((h >> ((i & 3) * 16)) & 0xffff) as u32 >= threshold
}

/// The increment between the mixes of consecutive groups of four elements.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Kept bits of the 32 elements from `4 * group` (bit `j`: element `4 * group + j`), as
/// [`keep`] decides them.
fn word(key: u64, group: u64, threshold: u32) -> u32 {
    let mut bits = 0;
    for k in 0..8 {
        let h = mix(key.wrapping_add(group.wrapping_add(k).wrapping_mul(GOLDEN)));
        for l in 0..4 {
            if ((h >> (16 * l)) & 0xffff) as u32 >= threshold {
                bits |= 1 << (4 * k + l);
            }
        }
    }
    bits
}

/// [`word`] with the eight mixes in one vector and the 32 draws compared at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw")]
unsafe fn word_avx512(key: u64, group: u64, threshold: u32) -> u32 {
    use std::arch::x86_64::*;
    if threshold > 0xffff {
        return 0;
    }
    let ones = |v: u64| _mm512_set1_epi64(v as i64);
    let g = _mm512_add_epi64(ones(group), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    let mut z = _mm512_add_epi64(ones(key), _mm512_mullo_epi64(g, ones(GOLDEN)));
    z = _mm512_xor_si512(z, _mm512_srli_epi64::<30>(z));
    z = _mm512_mullo_epi64(z, ones(0xbf58_476d_1ce4_e5b9));
    z = _mm512_xor_si512(z, _mm512_srli_epi64::<27>(z));
    z = _mm512_mullo_epi64(z, ones(0x94d0_49bb_1331_11eb));
    z = _mm512_xor_si512(z, _mm512_srli_epi64::<31>(z));
    // Little-endian: 16-bit lane j of the vector is draw j % 4 of mix j / 4, element j.
    _mm512_cmpge_epu16_mask(z, _mm512_set1_epi16(threshold as u16 as i16))
}

/// Whether the vectorised mask runs here.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Calls `f(j, bits, count)` over the elements `base + j`, `j < len`: bit `b < count` of
/// `bits` says whether element `base + j + b` is kept, `bits` coming from `word(group)` (the
/// 32 decisions from element `4 * group`). One mix per four elements, where [`keep`]
/// recomputes each mix four times (the mask was ~10 % of a MiniLM training step).
#[inline(always)]
fn for_each_word(
    base: u64,
    len: usize,
    mut word: impl FnMut(u64) -> u32,
    mut f: impl FnMut(usize, u32, usize),
) {
    let mut j = 0;
    while j < len {
        let i = base + j as u64;
        let off = (i & 3) as usize;
        let count = (32 - off).min(len - j);
        f(j, word(i >> 2) >> off, count);
        j += count;
    }
}

/// Zeroes the dropped elements (`base + j` for `xs[j]`) of stream `key` and multiplies the
/// kept ones by `scale`.
pub(crate) fn mask_in_place<T: Float>(xs: &mut [T], key: u64, base: u64, threshold: u32, scale: T) {
    let len = xs.len();
    for_each_word(
        base,
        len,
        |g| word(key, g, threshold),
        |j, bits, count| {
            for (b, x) in xs[j..j + count].iter_mut().enumerate() {
                *x = if (bits >> b) & 1 == 1 {
                    *x * scale
                } else {
                    T::zero()
                };
            }
        },
    );
}

/// [`mask_in_place`] for f32, 32 elements per mask word with AVX-512 or AVX2 when the CPU
/// has them.
pub(crate) fn mask_in_place_f32(xs: &mut [f32], key: u64, base: u64, threshold: u32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has the features (checked just above).
        return unsafe { mask_in_place_avx512(xs, key, base, threshold, scale) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: as above.
        return unsafe { mask_in_place_avx2(xs, key, base, threshold, scale) };
    }
    mask_in_place(xs, key, base, threshold, scale)
}

/// [`word`] on AVX2: the eight mixes in two vectors of four 64-bit lanes (AVX2 has no
/// 64-bit multiply: each product is assembled from three 32 × 32 → 64-bit ones), the 32
/// draws compared as unsigned 16-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn word_avx2(key: u64, group: u64, threshold: u32) -> u32 {
    use std::arch::x86_64::*;
    if threshold > 0xffff {
        return 0;
    }
    let ones = |v: u64| _mm256_set1_epi64x(v as i64);
    // The low 64 bits of a * b.
    let mul = |a: __m256i, b: u64| {
        let lo = _mm256_mul_epu32(a, ones(b));
        let cross = _mm256_add_epi64(
            _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), ones(b)),
            _mm256_mul_epu32(a, ones(b >> 32)),
        );
        _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(cross))
    };
    let mix4 = |first: u64| {
        let g = |k: u64| group.wrapping_add(first + k).wrapping_mul(GOLDEN) as i64;
        let mut z = _mm256_add_epi64(ones(key), _mm256_setr_epi64x(g(0), g(1), g(2), g(3)));
        z = _mm256_xor_si256(z, _mm256_srli_epi64::<30>(z));
        z = mul(z, 0xbf58_476d_1ce4_e5b9);
        z = _mm256_xor_si256(z, _mm256_srli_epi64::<27>(z));
        z = mul(z, 0x94d0_49bb_1331_11eb);
        z = _mm256_xor_si256(z, _mm256_srli_epi64::<31>(z));
        // Unsigned draw >= threshold; 16-bit lane j is element j of the four mixes.
        let t = _mm256_set1_epi16(threshold as u16 as i16);
        _mm256_cmpeq_epi16(_mm256_max_epu16(z, t), z)
    };
    let (lo, hi) = (mix4(0), mix4(4));
    // Saturating packs interleave the 128-bit halves (lo 0-7, hi 0-7, lo 8-15, hi 8-15);
    // the permute puts the 32 bytes back in element order for the byte mask.
    let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(lo, hi));
    _mm256_movemask_epi8(bytes) as u32
}

/// [`mask_in_place`] for f32 with [`word_avx2`]: eight elements a vector, their kept bits
/// expanded to a lane mask (`bits & lane bit == lane bit`); a short tail is masked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mask_in_place_avx2(xs: &mut [f32], key: u64, base: u64, threshold: u32, scale: f32) {
    use std::arch::x86_64::*;
    let s = _mm256_set1_ps(scale);
    let bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let p = xs.as_mut_ptr();
    let words = |g| word_avx2(key, g, threshold);
    for_each_word(base, xs.len(), words, |j, bits, count| {
        for v in 0..count.div_ceil(8) {
            let at = p.add(j + 8 * v);
            let byte = _mm256_set1_epi32(((bits >> (8 * v)) & 0xff) as i32);
            let kept = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, bit), bit));
            let live = count - 8 * v;
            if live >= 8 {
                let x = _mm256_loadu_ps(at);
                _mm256_storeu_ps(at, _mm256_and_ps(_mm256_mul_ps(x, s), kept));
            } else {
                let m = crate::cpu::lanes8(live);
                let x = _mm256_maskload_ps(at, m);
                _mm256_maskstore_ps(at, m, _mm256_and_ps(_mm256_mul_ps(x, s), kept));
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw")]
unsafe fn mask_in_place_avx512(xs: &mut [f32], key: u64, base: u64, threshold: u32, scale: f32) {
    use std::arch::x86_64::*;
    let s = _mm512_set1_ps(scale);
    let p = xs.as_mut_ptr();
    let words = |g| word_avx512(key, g, threshold);
    for_each_word(base, xs.len(), words, |j, bits, count| {
        let live = if count == 32 {
            u32::MAX
        } else {
            (1u32 << count) - 1
        };
        for half in 0..2 {
            let m = (live >> (16 * half)) as u16;
            if m != 0 {
                let at = p.add(j + 16 * half);
                let x = _mm512_maskz_loadu_ps(m, at);
                let kept = (bits >> (16 * half)) as u16;
                _mm512_mask_storeu_ps(at, m, _mm512_maskz_mul_ps(kept, x, s));
            }
        }
    });
}

/// Inverted dropout: each element zeroed with probability `p`, survivors scaled by
/// `1 / (1 - p)`. The mask depends only on `seed`, so forward and backward agree.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    dropout_at(x, p, seed, 0)
}

/// [`dropout`] of a tensor whose first element is element `base` of the stream (the rest
/// follow in order): a part of a larger tensor gets the larger tensor's mask.
pub fn dropout_at(x: &Tensor, p: f64, seed: u64, base: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    x.contiguous()?.apply_op1(Dropout {
        p: p as f32,
        seed,
        base,
    })
}

struct Dropout {
    p: f32,
    seed: u64,
    base: u64,
}

fn apply<T: Float>(xs: &[T], p: f32, seed: u64, base: u64) -> Vec<T> {
    let mut out = xs.to_vec();
    apply_in_place(&mut out, p, seed, base);
    out
}

/// [`dropout`]'s mask (rate `p` < 1, stream `seed`, `xs[0]` being element `base`) applied
/// to `xs` in place, in parallel.
pub(crate) fn apply_in_place<T: Float>(xs: &mut [T], p: f32, seed: u64, base: u64) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14; // a multiple of 4: chunks never split a mix's draws
    let scale = T::from_f64(1.0 / (1.0 - p as f64));
    let t = threshold(p);
    xs.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, o)| T::mask_in_place(o, seed, base + (c * CHUNK) as u64, t, scale));
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "berth-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(op: &Dropout, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(apply(
                slice::<T>(s, l)?,
                op.p,
                op.seed,
                op.base,
            )))
        }
        Ok((
            dispatch!(s.dtype(), self.name(), run(self, s, l))?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(op: &Dropout, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            let d = with_slice::<T, _>(&dy.contiguous()?, |g| apply(g, op.p, op.seed, op.base))?;
            Tensor::from_vec(d, x.shape(), x.device())
        }
        Ok(Some(dispatch!(x.dtype(), self.name(), run(self, x, dy))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gradcheck, randn};

    #[test]
    fn drops_the_asked_fraction_and_keeps_the_mean() -> Result<()> {
        let x = Tensor::ones(100_000, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let y = dropout(&x, 0.1, 7)?.to_vec1::<f32>()?;
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.1).abs() < 0.005, "dropped {zeros}");
        let mean = y.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        // Same seed, same mask; another seed, another mask.
        assert_eq!(dropout(&x, 0.1, 7)?.to_vec1::<f32>()?, y);
        assert_ne!(dropout(&x, 0.1, 8)?.to_vec1::<f32>()?, y);
        Ok(())
    }

    #[test]
    fn grouped_and_vectorised_masks_equal_per_element_draws() {
        let t = threshold(0.3);
        for (base, len) in [(0u64, 37usize), (1, 9), (6, 1), (130, 300), (3, 0), (2, 64)] {
            let xs: Vec<f32> = (0..len).map(|j| j as f32 + 1.0).collect();
            let want: Vec<f32> = xs
                .iter()
                .enumerate()
                .map(|(j, &x)| {
                    if keep(99, base + j as u64, t) {
                        x * 2.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut generic = xs.clone();
            mask_in_place(&mut generic, 99, base, t, 2.0);
            assert_eq!(generic, want, "scalar words, base {base} len {len}");
            let mut fast = xs.clone();
            mask_in_place_f32(&mut fast, 99, base, t, 2.0);
            assert_eq!(fast, want, "f32 path, base {base} len {len}");
        }
        // A rate of 1 drops everything on both paths.
        let mut all = vec![1f32; 40];
        mask_in_place_f32(&mut all, 5, 0, threshold(1.0), 1.0);
        assert!(all.iter().all(|&v| v == 0.0));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_words_equal_scalar_words() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        // Keys and groups with high bits set exercise the 64-bit products' cross terms;
        // thresholds 0 and 65,536 keep and drop every element.
        for key in [0u64, 99, 0xdead_beef_f00d_cafe, u64::MAX] {
            for group in [0u64, 1, 7, 1 << 40, u64::MAX - 3] {
                for t in [0, 1, threshold(0.1), threshold(0.5), 0xffff, 0x1_0000] {
                    // SAFETY: AVX2 is present (checked above).
                    let fast = unsafe { word_avx2(key, group, t) };
                    assert_eq!(fast, word(key, group, t), "key {key} group {group} t {t}");
                }
            }
        }
    }

    #[test]
    fn gradient_uses_the_forward_mask() -> Result<()> {
        gradcheck("dropout", &[randn(&[6, 7], 3)?], |t| {
            dropout(&t[0], 0.3, 11)
        })
    }
}
