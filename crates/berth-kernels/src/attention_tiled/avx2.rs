//! The tiled attention of [`super`] for CPUs with AVX2 + FMA but no AVX-512: the same
//! blocks, the same single copy (`Kᵀ`, and `Vᵀ` in the backward), the same dropout stream,
//! on 8-lane vectors in 16 registers — blocks of [`MR`] query rows, the score kernel `MR`
//! rows × 24 keys and the value kernel `MR` rows × 24 head dimensions in 12 accumulators.
//! Keys are padded to a multiple of 8 (`lp`). Without it such CPUs ran the general path:
//! library matmuls on `[L, L]` matrices, a separate softmax, and zero-filled buffers per
//! (sequence, head).
use std::arch::x86_64::*;

use super::{BackPointers, BackScratch, Geometry, Mask, Scratch, Task, Weights};
use crate::cpu::lanes8;

/// Query rows per block.
const MR: usize = 4;

/// Writes the attention output of `task` into its rows × head columns of `out`.
///
/// # Safety
/// AVX2 and FMA must be present and `task.head_dim` a multiple of 8; `qkv` must hold rows
/// `start..start + len` of width `3 * hidden`, and `out` the same rows of width `hidden`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend(
    qkv: *const f32,
    out: *mut f32,
    t: Task,
    scale: f32,
    dropout: Option<crate::dropout::DropSite>,
    sc: &mut Scratch,
) {
    let geo = Geometry::new(&t, 8, scale);
    let (l, lp, hd, h, w3) = (geo.l, geo.lp, geo.hd, geo.h, geo.w3);
    let q = qkv.add(t.qkv_offset());
    let (k, v, o) = (q.add(h), q.add(2 * h), out.add(t.out_offset()));
    transpose_head(k, w3, l, hd, lp, &mut sc.kt);
    sc.scores.resize(MR * lp, 0.0);
    let mask = dropout.map(|d| Mask::new(d, &t));
    for i0 in (0..l).step_by(MR) {
        let (q, o) = (q.add(i0 * w3), o.add(i0 * h));
        let (kt, s) = (&sc.kt, &mut sc.scores);
        match (l - i0).min(MR) {
            1 => block::<1>(&geo, i0, q, v, o, kt, s, mask.as_ref()),
            2 => block::<2>(&geo, i0, q, v, o, kt, s, mask.as_ref()),
            3 => block::<3>(&geo, i0, q, v, o, kt, s, mask.as_ref()),
            _ => block::<4>(&geo, i0, q, v, o, kt, s, mask.as_ref()),
        }
    }
}

/// The gradient of `task`'s attention output with respect to its Q, K and V, as
/// [`super::attend_backward`] computes it.
///
/// # Safety
/// As [`attend`], with `dout` and `dqkv` covering the task's rows.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend_backward(
    qkv: *const f32,
    dout: *const f32,
    dqkv: *mut f32,
    t: Task,
    scale: f32,
    dropout: Option<crate::dropout::DropSite>,
    sc: &mut BackScratch,
) {
    let geo = Geometry::new(&t, 8, scale);
    let (l, lp, hd, h, w3) = (geo.l, geo.lp, geo.hd, geo.h, geo.w3);
    let base = t.qkv_offset();
    let (q, k, v) = (qkv.add(base), qkv.add(base + h), qkv.add(base + 2 * h));
    let (dq, dk, dv) = (dqkv.add(base), dqkv.add(base + h), dqkv.add(base + 2 * h));
    let dout = dout.add(t.out_offset());
    transpose_head(k, w3, l, hd, lp, &mut sc.kt);
    transpose_head(v, w3, l, hd, lp, &mut sc.vt);
    sc.p.resize(l * lp, 0.0);
    sc.ds.resize(l * lp, 0.0);
    let mask = dropout.map(|d| Mask::new(d, &t));
    let ptrs = BackPointers { q, k, dout, dq };
    for i0 in (0..l).step_by(MR) {
        match (l - i0).min(MR) {
            1 => back_rows::<1>(&geo, i0, &ptrs, sc, mask.as_ref()),
            2 => back_rows::<2>(&geo, i0, &ptrs, sc, mask.as_ref()),
            3 => back_rows::<3>(&geo, i0, &ptrs, sc, mask.as_ref()),
            _ => back_rows::<4>(&geo, i0, &ptrs, sc, mask.as_ref()),
        }
    }
    // dV = P'ᵀ dO and dK = scale · dSᵀ Q, by key rows.
    for j0 in (0..l).step_by(MR) {
        let pt = Weights {
            p: sc.p.as_ptr().add(j0),
            rs: 1,
            cs: lp,
        };
        let dst = Weights {
            p: sc.ds.as_ptr().add(j0),
            rs: 1,
            cs: lp,
        };
        let (dv, dk) = (dv.add(j0 * w3), dk.add(j0 * w3));
        macro_rules! go {
            ($r:literal) => {{
                value_rows::<$r>(hd, l, pt, dout, h, dv, w3, &[1.0; $r]);
                value_rows::<$r>(hd, l, dst, q, w3, dk, w3, &[scale; $r]);
            }};
        }
        match (l - j0).min(MR) {
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            _ => go!(4),
        }
    }
}

/// Query rows `i0..i0 + R` of a backward task: `P` (normalised; `P'` after dropout) into
/// `sc.p`, `dS` into `sc.ds`, and their `dQ` rows.
#[target_feature(enable = "avx2,fma")]
unsafe fn back_rows<const R: usize>(
    g: &Geometry,
    i0: usize,
    b: &BackPointers,
    sc: &mut BackScratch,
    mask: Option<&Mask>,
) {
    let p = sc.p.as_mut_ptr().add(i0 * g.lp);
    let ds = sc.ds.as_mut_ptr().add(i0 * g.lp);
    score_rows::<R>(g.hd, g.lp, b.q.add(i0 * g.w3), g.w3, &sc.kt, p, g.scale);
    // dP = dO Vᵀ, into the dS rows.
    score_rows::<R>(g.hd, g.lp, b.dout.add(i0 * g.h), g.h, &sc.vt, ds, 1.0);
    for r in 0..R {
        let prow = std::slice::from_raw_parts_mut(p.add(r * g.lp), g.l);
        let drow = std::slice::from_raw_parts_mut(ds.add(r * g.lp), g.l);
        let inv = 1.0 / exp_shifted(prow);
        prow.iter_mut().for_each(|x| *x *= inv);
        let base = ((i0 + r) * g.l) as u64;
        if let Some(d) = mask {
            // dP of the dropped probabilities back to dP of P.
            crate::dropout::mask_in_place_f32(drow, d.key, base, d.threshold, d.scale);
        }
        softmax_grad_row(prow, drow);
        if let Some(d) = mask {
            // dV needs the probabilities the forward used: P' = drop(P).
            crate::dropout::mask_in_place_f32(prow, d.key, base, d.threshold, d.scale);
        }
    }
    let dsw = Weights {
        p: ds,
        rs: g.lp,
        cs: 1,
    };
    value_rows::<R>(
        g.hd,
        g.l,
        dsw,
        b.k,
        g.w3,
        b.dq.add(i0 * g.w3),
        g.w3,
        &[g.scale; R],
    );
}

/// Rows `i0..i0 + R` of one forward task: scores, softmax, `P V`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const R: usize>(
    g: &Geometry,
    i0: usize,
    q: *const f32,
    v: *const f32,
    o: *mut f32,
    kt: &[f32],
    s: &mut [f32],
    mask: Option<&Mask>,
) {
    score_rows::<R>(g.hd, g.lp, q, g.w3, kt, s.as_mut_ptr(), g.scale);
    // Softmax of each row over its l keys, left unnormalised; 1/sum goes into the output.
    let mut inv = [0f32; R];
    for (r, inv_r) in inv.iter_mut().enumerate() {
        let row = &mut s[r * g.lp..r * g.lp + g.l];
        *inv_r = 1.0 / exp_shifted(row);
        if let Some(d) = mask {
            let base = ((i0 + r) * g.l) as u64;
            crate::dropout::mask_in_place_f32(row, d.key, base, d.threshold, 1.0);
            *inv_r *= d.scale;
        }
    }
    let p = Weights {
        p: s.as_ptr(),
        rs: g.lp,
        cs: 1,
    };
    value_rows::<R>(g.hd, g.l, p, v, g.w3, o, g.h, &inv);
}

/// `dst [hd, lp]` = the transpose of `l` rows (stride `stride`) of `hd` columns at `src`;
/// columns past `l` zero. `hd` a multiple of 8.
#[target_feature(enable = "avx2")]
unsafe fn transpose_head(
    src: *const f32,
    stride: usize,
    l: usize,
    hd: usize,
    lp: usize,
    dst: &mut Vec<f32>,
) {
    dst.resize(hd * lp, 0.0);
    for j0 in (0..l).step_by(8) {
        let keys = (l - j0).min(8);
        for d0 in (0..hd).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|j| {
                if j < keys {
                    _mm256_loadu_ps(src.add((j0 + j) * stride + d0))
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (d, row) in crate::cpu::transpose8(r).iter().enumerate() {
                _mm256_storeu_ps(dst.as_mut_ptr().add((d0 + d) * lp + j0), *row);
            }
        }
    }
}

/// `s[r, 8·V keys] = scale · q_r · Kᵀ` for `R` rows of `q` (row stride `qs`), `kt`
/// `[hd, lp]` and `s` (row stride `lp`) at the first key.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores<const R: usize, const V: usize>(
    hd: usize,
    lp: usize,
    q: *const f32,
    qs: usize,
    kt: *const f32,
    s: *mut f32,
    scale: f32,
) {
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    for d in 0..hd {
        let b: [__m256; V] = std::array::from_fn(|x| _mm256_loadu_ps(kt.add(d * lp + 8 * x)));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let a = _mm256_set1_ps(*q.add(r * qs + d));
            for x in 0..V {
                acc_r[x] = _mm256_fmadd_ps(a, b[x], acc_r[x]);
            }
        }
    }
    let scale = _mm256_set1_ps(scale);
    for (r, acc_r) in acc.iter().enumerate() {
        for (x, acc_rx) in acc_r.iter().enumerate() {
            _mm256_storeu_ps(s.add(r * lp + 8 * x), _mm256_mul_ps(*acc_rx, scale));
        }
    }
}

/// [`scores`] for rows `R` of `q` over all `lp` keys: 24 at a time, then 8 or 16.
#[target_feature(enable = "avx2,fma")]
unsafe fn score_rows<const R: usize>(
    hd: usize,
    lp: usize,
    q: *const f32,
    qs: usize,
    kt: &[f32],
    s: *mut f32,
    scale: f32,
) {
    let mut c0 = 0;
    while c0 + 24 <= lp {
        scores::<R, 3>(hd, lp, q, qs, kt.as_ptr().add(c0), s.add(c0), scale);
        c0 += 24;
    }
    match (lp - c0) / 8 {
        2 => scores::<R, 2>(hd, lp, q, qs, kt.as_ptr().add(c0), s.add(c0), scale),
        1 => scores::<R, 1>(hd, lp, q, qs, kt.as_ptr().add(c0), s.add(c0), scale),
        _ => {}
    }
}

/// `o[r, 8·V dims] = inv[r] · Σ_{j < n} s[r, j] v_j` for `R` rows; `v` (row stride `vs`)
/// and `o` (row stride `os`) at the first dim.
#[target_feature(enable = "avx2,fma")]
unsafe fn values<const R: usize, const V: usize>(
    n: usize,
    s: Weights,
    v: *const f32,
    vs: usize,
    o: *mut f32,
    os: usize,
    inv: &[f32; R],
) {
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    for j in 0..n {
        let row = v.add(j * vs);
        let b: [__m256; V] = std::array::from_fn(|x| _mm256_loadu_ps(row.add(8 * x)));
        let pj = s.p.add(j * s.cs);
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let a = _mm256_set1_ps(*pj.add(r * s.rs));
            for x in 0..V {
                acc_r[x] = _mm256_fmadd_ps(a, b[x], acc_r[x]);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        let f = _mm256_set1_ps(inv[r]);
        for (x, acc_rx) in acc_r.iter().enumerate() {
            _mm256_storeu_ps(o.add(r * os + 8 * x), _mm256_mul_ps(*acc_rx, f));
        }
    }
}

/// [`values`] over all `hd` dims: 24 at a time, then 8 or 16.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn value_rows<const R: usize>(
    hd: usize,
    n: usize,
    s: Weights,
    v: *const f32,
    vs: usize,
    o: *mut f32,
    os: usize,
    inv: &[f32; R],
) {
    let mut d0 = 0;
    while d0 + 24 <= hd {
        values::<R, 3>(n, s, v.add(d0), vs, o.add(d0), os, inv);
        d0 += 24;
    }
    match (hd - d0) / 8 {
        2 => values::<R, 2>(n, s, v.add(d0), vs, o.add(d0), os, inv),
        1 => values::<R, 1>(n, s, v.add(d0), vs, o.add(d0), os, inv),
        _ => {}
    }
}

/// Replaces `row` by `exp(row - max(row))` and returns the sum.
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted(row: &mut [f32]) -> f32 {
    let n = row.len();
    let p = row.as_mut_ptr();
    let full = n - n % 8;
    let tail = lanes8(n % 8);
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut m = ninf;
    for i in (0..full).step_by(8) {
        m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
    }
    if full < n {
        let x = _mm256_maskload_ps(p.add(full), tail);
        m = _mm256_max_ps(m, _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(tail)));
    }
    let m = _mm256_set1_ps(hmax(m));
    let mut sum = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
        _mm256_storeu_ps(p.add(i), e);
        sum = _mm256_add_ps(sum, e);
    }
    if full < n {
        let e = exp256(_mm256_sub_ps(_mm256_maskload_ps(p.add(full), tail), m));
        _mm256_maskstore_ps(p.add(full), tail, e);
        sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(tail)));
    }
    hsum(sum)
}

/// `d ← p ∘ (d − Σ p ∘ d)`: the softmax backward of one row (`p` the probabilities).
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_grad_row(p: &[f32], d: &mut [f32]) {
    let n = p.len();
    let (pp, dp) = (p.as_ptr(), d.as_mut_ptr());
    let full = n - n % 8;
    let tail = lanes8(n % 8);
    let mut acc = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(pp.add(i)), _mm256_loadu_ps(dp.add(i)), acc);
    }
    if full < n {
        let a = _mm256_maskload_ps(pp.add(full), tail);
        acc = _mm256_fmadd_ps(a, _mm256_maskload_ps(dp.add(full), tail), acc);
    }
    let dot = _mm256_set1_ps(hsum(acc));
    for i in (0..full).step_by(8) {
        let x = _mm256_sub_ps(_mm256_loadu_ps(dp.add(i)), dot);
        _mm256_storeu_ps(dp.add(i), _mm256_mul_ps(_mm256_loadu_ps(pp.add(i)), x));
    }
    if full < n {
        let x = _mm256_sub_ps(_mm256_maskload_ps(dp.add(full), tail), dot);
        let y = _mm256_mul_ps(_mm256_maskload_ps(pp.add(full), tail), x);
        _mm256_maskstore_ps(dp.add(full), tail, y);
    }
}

/// The sum of 8 lanes: halves, then pairs, then the last two.
#[target_feature(enable = "avx2")]
unsafe fn hsum(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps::<1>(x, x)))
}

/// The max of 8 lanes.
#[target_feature(enable = "avx2")]
unsafe fn hmax(v: __m256) -> f32 {
    let x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps::<1>(x, x)))
}

/// e^x on 8 lanes for `x ≤ 0` (scores less their max): the polynomial of [`super::exp512`]
/// (`x = n ln2 + r`, degree 6 in `r`), times 2^n built in the exponent bits (`n ≥ −126`
/// after the clamp at −87, so 2^n is a normal float and the product rounds once, as
/// `scalef` does).
#[target_feature(enable = "avx2,fma")]
unsafe fn exp256(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
}
