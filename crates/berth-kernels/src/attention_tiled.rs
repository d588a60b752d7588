//! f32 self-attention of one (sequence, head) in blocks of query rows, for AVX-512 (and, in
//! [`avx2`], for AVX2 + FMA).
//!
//! The general path ([`super::attention`]) builds the whole `[L, L]` probability matrix of a
//! (sequence, head) with library matmuls, then a separate softmax pass, then `P V`. Here the
//! work is tiled by [`MR`] query rows: for each block, the scores `[MR, L]` are produced by a
//! register-blocked kernel (`MR` rows × 48 keys in 24 accumulators) into a scratch row block
//! that stays in L1, the softmax runs on it in place (FMA-based exp, the `1/sum` folded into
//! the output), and `P V` accumulates `MR` rows × 32 head dimensions in registers while `V`
//! is read in place from the packed `qkv`. The only copy is `Kᵀ` of the (sequence, head),
//! `hd × L` floats, so that each step of the score kernel loads contiguous keys. Memory per
//! worker is `hd·L + MR·L` floats whatever the length: short sequences waste nothing on
//! padding, long ones never materialise `L × L`.
//!
//! Dropout on the probabilities uses the same mask function (sequence start, head, row ·
//! L + column) as the general path, so the backward (which recomputes the probabilities the
//! general way) sees the same mask.
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Query rows per block.
const MR: usize = 8;

/// Scratch memory of one worker, reused across tasks.
#[derive(Default)]
pub(crate) struct Scratch {
    kt: Vec<f32>,
    scores: Vec<f32>,
}

/// Whether [`attend`] runs here for head dimension `hd`: AVX-512 for multiples of 16,
/// else AVX2 + FMA ([`avx2`]) for multiples of 8.
pub(crate) fn supported(hd: usize) -> bool {
    hd > 0 && (avx512(hd) || (hd.is_multiple_of(8) && crate::cpu::avx2_fma()))
}

/// Whether the AVX-512 kernels run for head dimension `hd`.
fn avx512(hd: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        hd.is_multiple_of(16)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = hd;
        false
    }
}

/// One (sequence, head) task of the packed layout: `qkv [N, 3H]` (`w3 = 3H` columns),
/// output `[N, H]`.
#[derive(Clone, Copy)]
pub(crate) struct Task {
    pub start: usize,
    pub len: usize,
    pub head: usize,
    pub hidden: usize,
    pub head_dim: usize,
}

/// Writes the attention output of `task` into its rows × head columns of `out`.
///
/// # Safety
/// [`supported`] must hold for `task.head_dim`; `qkv` must hold rows
/// `start..start + len` of width `3 * hidden`, and `out` the same rows of width `hidden`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn attend(
    qkv: *const f32,
    out: *mut f32,
    t: Task,
    scale: f32,
    dropout: Option<crate::dropout::DropSite>,
    sc: &mut Scratch,
) {
    if avx512(t.head_dim) {
        attend_avx512(qkv, out, t, scale, dropout, sc)
    } else {
        avx2::attend(qkv, out, t, scale, dropout, sc)
    }
}

/// [`attend`] on AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn attend_avx512(
    qkv: *const f32,
    out: *mut f32,
    t: Task,
    scale: f32,
    dropout: Option<crate::dropout::DropSite>,
    sc: &mut Scratch,
) {
    let geo = Geometry::new(&t, 16, scale);
    let (l, lp, hd, h, w3) = (geo.l, geo.lp, geo.hd, geo.h, geo.w3);
    let q = qkv.add(t.qkv_offset());
    let (k, v, o) = (q.add(h), q.add(2 * h), out.add(t.out_offset()));
    // Kᵀ [hd, lp], padded keys zero (their scores are never read).
    transpose_head(k, w3, l, hd, lp, &mut sc.kt);
    sc.scores.resize(MR * lp, 0.0);
    let mask = dropout.map(|d| Mask::new(d, &t));
    for i0 in (0..l).step_by(MR) {
        let rows = (l - i0).min(MR);
        macro_rules! go {
            ($($r:literal)*) => {
                match rows {
                    $($r => block::<$r>(
                        &geo,
                        i0,
                        q.add(i0 * w3),
                        v,
                        o.add(i0 * h),
                        &sc.kt,
                        &mut sc.scores,
                        mask.as_ref(),
                    ),)*
                    _ => unreachable!(),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8)
    }
}

/// `dst [hd, lp]` = the transpose of `l` rows (stride `stride`) of `hd` columns at `src`;
/// columns past `l` zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_head(
    src: *const f32,
    stride: usize,
    l: usize,
    hd: usize,
    lp: usize,
    dst: &mut Vec<f32>,
) {
    dst.resize(hd * lp, 0.0);
    for j0 in (0..l).step_by(16) {
        let keys = (l - j0).min(16);
        for d0 in (0..hd).step_by(16) {
            // 16 rows x 16 dims in, 16 dims x 16 rows out (rows past l stay zero).
            let mut r: [__m512; 16] = std::array::from_fn(|j| {
                if j < keys {
                    _mm512_loadu_ps(src.add((j0 + j) * stride + d0))
                } else {
                    _mm512_setzero_ps()
                }
            });
            transpose16(&mut r);
            for (d, row) in r.iter().enumerate() {
                _mm512_storeu_ps(dst.as_mut_ptr().add((d0 + d) * lp + j0), *row);
            }
        }
    }
}

/// Scratch memory of one backward worker, reused across tasks.
#[derive(Default)]
pub(crate) struct BackScratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    p: Vec<f32>,
    ds: Vec<f32>,
}

/// Writes the gradient of `task`'s attention output (`dout`, rows × head columns of
/// `[N, H]`) with respect to its Q, K and V into the same rows × head columns of `dqkv`
/// (`[N, 3H]`), every element of them. The probabilities are recomputed by the forward's
/// score kernel and kept for the task (`[L, L]`, with `dS` beside them); the four products
/// (`dP = dO Vᵀ`, `dQ = dS K`, `dV = P'ᵀ dO`, `dK = dSᵀ Q`) run on the register-blocked
/// kernels of the forward, the transposed ones reading `P'` and `dS` by columns.
///
/// # Safety
/// As [`attend`], with `dout` and `dqkv` covering the task's rows.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn attend_backward(
    qkv: *const f32,
    dout: *const f32,
    dqkv: *mut f32,
    t: Task,
    scale: f32,
    dropout: Option<crate::dropout::DropSite>,
    sc: &mut BackScratch,
) {
    if avx512(t.head_dim) {
        attend_backward_avx512(qkv, dout, dqkv, t, scale, dropout, sc)
    } else {
        avx2::attend_backward(qkv, dout, dqkv, t, scale, dropout, sc)
    }
}

/// [`attend_backward`] on AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn attend_backward_avx512(
    qkv: *const f32,
    dout: *const f32,
    dqkv: *mut f32,
    t: Task,
    scale: f32,
    dropout: Option<crate::dropout::DropSite>,
    sc: &mut BackScratch,
) {
    let geo = Geometry::new(&t, 16, scale);
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
        macro_rules! go {
            ($($r:literal)*) => {
                match (l - i0).min(MR) {
                    $($r => back_rows::<$r>(&geo, i0, &ptrs, sc, mask.as_ref()),)*
                    _ => unreachable!(),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8)
    }
    // dV = P'ᵀ dO and dK = scale · dSᵀ Q, by key rows.
    for j0 in (0..l).step_by(MR) {
        macro_rules! go {
            ($($r:literal)*) => {
                match (l - j0).min(MR) {
                    $($r => {
                        let pt = Weights { p: sc.p.as_ptr().add(j0), rs: 1, cs: lp };
                        value_rows::<$r>(hd, l, pt, dout, h, dv.add(j0 * w3), w3, &[1.0; $r]);
                        let dst = Weights { p: sc.ds.as_ptr().add(j0), rs: 1, cs: lp };
                        value_rows::<$r>(hd, l, dst, q, w3, dk.add(j0 * w3), w3, &[scale; $r]);
                    })*
                    _ => unreachable!(),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8)
    }
}

/// Where [`back_rows`] reads and writes.
struct BackPointers {
    q: *const f32,
    k: *const f32,
    dout: *const f32,
    dq: *mut f32,
}

/// Query rows `i0..i0 + R` of a backward task: `P` (normalised; `P'` after dropout) into
/// `sc.p`, `dS` into `sc.ds`, and their `dQ` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
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

/// `d ← p ∘ (d − Σ p ∘ d)`: the softmax backward of one row (`p` the probabilities).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax_grad_row(p: &[f32], d: &mut [f32]) {
    let n = p.len();
    let (pp, dp) = (p.as_ptr(), d.as_mut_ptr());
    let tail: __mmask16 = ((1u32 << (n % 16)) - 1) as u16;
    let full = n - n % 16;
    let mut acc = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(pp.add(i)), _mm512_loadu_ps(dp.add(i)), acc);
    }
    if tail != 0 {
        let a = _mm512_maskz_loadu_ps(tail, pp.add(full));
        acc = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(tail, dp.add(full)), acc);
    }
    let dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
    for i in (0..full).step_by(16) {
        let x = _mm512_sub_ps(_mm512_loadu_ps(dp.add(i)), dot);
        _mm512_storeu_ps(dp.add(i), _mm512_mul_ps(_mm512_loadu_ps(pp.add(i)), x));
    }
    if tail != 0 {
        let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, dp.add(full)), dot);
        let y = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, pp.add(full)), x);
        _mm512_mask_storeu_ps(dp.add(full), tail, y);
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn attend_backward(
    _: *const f32,
    _: *const f32,
    _: *mut f32,
    _: Task,
    _: f32,
    _: Option<crate::dropout::DropSite>,
    _: &mut BackScratch,
) {
    unreachable!("tiled attention is x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn attend(
    _: *const f32,
    _: *mut f32,
    _: Task,
    _: f32,
    _: Option<crate::dropout::DropSite>,
    _: &mut Scratch,
) {
    unreachable!("tiled attention is x86-64 only")
}

/// Transposes a 16 × 16 block held as 16 rows: 32-bit, 64-bit, 128-bit and 256-bit
/// interleaves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in (0..16).step_by(2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    let pd = _mm512_castps_pd;
    for i in (0..16).step_by(4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i]), pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i]), pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i + 1]), pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i + 1]), pd(t[i + 3])));
    }
    for h in [0, 8] {
        for i in 0..4 {
            t[h + i] = _mm512_shuffle_f32x4::<0x88>(r[h + i], r[h + i + 4]);
            t[h + i + 4] = _mm512_shuffle_f32x4::<0xdd>(r[h + i], r[h + i + 4]);
        }
    }
    for i in 0..8 {
        r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
        r[i + 8] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[i + 8]);
    }
}

/// Sizes shared by every block of a task.
struct Geometry {
    l: usize,
    lp: usize,
    hd: usize,
    w3: usize,
    h: usize,
    scale: f32,
}

impl Geometry {
    /// The sizes of task `t`, its keys padded to a multiple of `lanes`.
    fn new(t: &Task, lanes: usize, scale: f32) -> Self {
        Geometry {
            l: t.len,
            lp: t.len.div_ceil(lanes) * lanes,
            hd: t.head_dim,
            w3: 3 * t.hidden,
            h: t.hidden,
            scale,
        }
    }
}

impl Task {
    /// Offset of the task's query columns in the packed `qkv` (its keys `hidden`, its
    /// values `2 * hidden` columns further on); the same for the gradient `dqkv`.
    fn qkv_offset(&self) -> usize {
        self.start * 3 * self.hidden + self.head * self.head_dim
    }

    /// Offset of the task's columns in an `[N, H]` output (or the output's gradient).
    fn out_offset(&self) -> usize {
        self.start * self.hidden + self.head * self.head_dim
    }
}

/// The dropout mask of one task.
struct Mask {
    key: u64,
    threshold: u32,
    scale: f32,
}

impl Mask {
    /// The mask of `t` for (rate, seed): the general path's stream for its (start, head).
    fn new(d: crate::dropout::DropSite, t: &Task) -> Self {
        Mask {
            key: d.attention_key(t.start, t.head),
            threshold: crate::dropout::threshold(d.rate),
            scale: (1.0 / (1.0 - d.rate as f64)) as f32,
        }
    }
}

/// Rows `i0..i0 + R` of one task: scores, softmax, `P V`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
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
    // Output [R, hd] = P V.
    let p = Weights {
        p: s.as_ptr(),
        rs: g.lp,
        cs: 1,
    };
    value_rows::<R>(g.hd, g.l, p, v, g.w3, o, g.h, &inv);
}

/// `s[r, 16·V keys] = scale · q_r · Kᵀ` for `R` rows of `q` (row stride `qs`), `kt`
/// `[hd, lp]` and `s` (row stride `lp`) at the first key.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
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
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for d in 0..hd {
        let b: [__m512; V] = std::array::from_fn(|x| _mm512_loadu_ps(kt.add(d * lp + 16 * x)));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*q.add(r * qs + d));
            for x in 0..V {
                acc_r[x] = _mm512_fmadd_ps(a, b[x], acc_r[x]);
            }
        }
    }
    let scale = _mm512_set1_ps(scale);
    for (r, acc_r) in acc.iter().enumerate() {
        for (x, acc_rx) in acc_r.iter().enumerate() {
            _mm512_storeu_ps(s.add(r * lp + 16 * x), _mm512_mul_ps(*acc_rx, scale));
        }
    }
}

/// [`scores`] for rows `R` of `q` over all `lp` keys: 48 at a time, then a 16- or
/// 32-key tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
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
    while c0 + 48 <= lp {
        scores::<R, 3>(hd, lp, q, qs, kt.as_ptr().add(c0), s.add(c0), scale);
        c0 += 48;
    }
    match (lp - c0) / 16 {
        2 => scores::<R, 2>(hd, lp, q, qs, kt.as_ptr().add(c0), s.add(c0), scale),
        1 => scores::<R, 1>(hd, lp, q, qs, kt.as_ptr().add(c0), s.add(c0), scale),
        _ => {}
    }
}

/// The operand `s` of [`values`]: element (r, j) at `p[r * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Weights {
    p: *const f32,
    rs: usize,
    cs: usize,
}

/// `o[r, 16·V dims] = inv[r] · Σ_{j < n} s[r, j] v_j` for `R` rows; `v` (row stride `vs`)
/// and `o` (row stride `os`) at the first dim.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn values<const R: usize, const V: usize>(
    n: usize,
    s: Weights,
    v: *const f32,
    vs: usize,
    o: *mut f32,
    os: usize,
    inv: &[f32; R],
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for j in 0..n {
        let row = v.add(j * vs);
        let b: [__m512; V] = std::array::from_fn(|x| _mm512_loadu_ps(row.add(16 * x)));
        let pj = s.p.add(j * s.cs);
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*pj.add(r * s.rs));
            for x in 0..V {
                acc_r[x] = _mm512_fmadd_ps(a, b[x], acc_r[x]);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        let f = _mm512_set1_ps(inv[r]);
        for (x, acc_rx) in acc_r.iter().enumerate() {
            _mm512_storeu_ps(o.add(r * os + 16 * x), _mm512_mul_ps(*acc_rx, f));
        }
    }
}

/// [`values`] over all `hd` dims, 32 at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
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
    while d0 + 32 <= hd {
        values::<R, 2>(n, s, v.add(d0), vs, o.add(d0), os, inv);
        d0 += 32;
    }
    if d0 < hd {
        values::<R, 1>(n, s, v.add(d0), vs, o.add(d0), os, inv);
    }
}

/// Replaces `row` by `exp(row - max(row))` and returns the sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_shifted(row: &mut [f32]) -> f32 {
    let n = row.len();
    let p = row.as_mut_ptr();
    let tail: __mmask16 = ((1u32 << (n % 16)) - 1) as u16;
    let full = n - n % 16;
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(16) {
        m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
    }
    if tail != 0 {
        m = _mm512_max_ps(
            m,
            _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, p.add(full)),
        );
    }
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    let mut sum = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), m));
        _mm512_storeu_ps(p.add(i), e);
        sum = _mm512_add_ps(sum, e);
    }
    if tail != 0 {
        let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), m));
        _mm512_mask_storeu_ps(p.add(full), tail, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    _mm512_reduce_add_ps(sum)
}

/// e^x on 16 lanes: `x = n ln2 + r`, `|r| ≤ ln2/2`, a degree-6 Taylor polynomial in `r`
/// (relative error ~2e-7, as [`crate::softmax`]'s scalar form), times 2^n by `scalef`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}
