//! f32 matrix product `C = init + A B` for AVX-512 (or AVX2 + FMA: [`kernel_avx2`]), with
//! `B` packed in panels of [`NR`] columns (weights are packed once at load; other operands
//! per call, whole or panel by panel: [`sgemm_unpacked`]).
//!
//! The micro-kernel keeps an `MR × NR` block of `C` in 24 zmm registers: each step of the
//! inner dimension loads three vectors of the `B` panel (prefetched `PF` steps ahead) and
//! broadcasts `MR` values of `A`, for 24 FMAs. Row-major `A` is read in place; `A` with other
//! strides (a transposed operand in the backward) is first packed into `MR`-row micro-panels.
//! Large products split rows across threads in `MC` rows × up to `KC_MAX` steps of the inner
//! dimension, so most products keep each `C` block in registers for their whole depth; small
//! ones (batch-1 inference) split the column panels instead.
//!
//! Shapes: `C [M, N]`, `A [M, K]`, `B [K, N]`.
use rayon::prelude::*;

use std::mem::MaybeUninit;

use crate::cpu::SendPtr;
use crate::{Activation, Float};

/// Columns of `C` per panel: three vectors of 16.
pub const NR: usize = 48;
/// Rows of `C` per micro-kernel call.
pub const MR: usize = 8;
/// Longest inner-dimension block. A micro-kernel call walks a whole block with its `C` tile
/// in registers, so a product of depth ≤ `KC_MAX` loads and stores `C` once; the block's
/// `B` panel (up to 288 KB) streams from L2, prefetched [`PF`] steps ahead, while [`MC`] rows
/// of `A` pass it. The earlier 128-step blocks kept the panel in L1 but re-read and
/// re-wrote `C` `K / 128` times: interleaved in one process, MiniLM's 32 × 128 forward went
/// from 49.9 to 54.0 sequences/s on two threads and a training step from ~1,400 to ~1,500
/// tokens/s.
const KC_MAX: usize = 1536;
/// Rows of `A` per block: the `MC ×` depth-block of `A` (≤ 768 KB) stays in L2 while every
/// column panel of `B` passes it.
const MC: usize = 128;
/// Steps of the inner dimension by which the kernel prefetches its `B` panel into L1. With
/// few rows (batch-1 inference) every panel comes from L3 once and the kernel would wait on
/// it; prefetching 16 steps (3 KB) ahead took 16-row products through MiniLM's weights from
/// 77 to 95 GFLOP/s on one core (117 to 138 on two) and left large products unchanged.
const PF: usize = 16;
/// Panel rows per block when [`PackedB::pack`] transposes a column-strided source: 64 rows
/// of a panel are 12 KB.
const PACK_ROWS: usize = 64;

/// Whether a kernel runs here: AVX-512, or AVX2 + FMA ([`kernel_avx2`]).
pub fn available() -> bool {
    avx512() || crate::cpu::avx2_fma()
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `B [K, N]` in panels of [`NR`] columns, each `K × NR` row-major; columns past `N` are 0.
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Aligned,
}

/// f32 storage aligned to cache lines, so no vector load of a panel row splits a line.
#[derive(Debug, Clone)]
struct Aligned(Vec<Line>);

#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

impl Aligned {
    /// `len` floats (a multiple of 16) in chunks of `chunk` floats (a multiple of 16), each
    /// passed to `fill` with its index, in parallel.
    ///
    /// # Safety
    /// `fill` must write every element of the chunk it is given.
    unsafe fn filled_per_chunk(
        len: usize,
        chunk: usize,
        fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
    ) -> Self {
        assert!(
            len.is_multiple_of(16) && chunk.is_multiple_of(16),
            "Aligned: lengths in whole lines"
        );
        let lines = len / 16;
        let mut data: Vec<MaybeUninit<Line>> = Vec::with_capacity(lines);
        // SAFETY: `MaybeUninit` needs no initialisation.
        unsafe { data.set_len(lines) };
        if lines > 0 {
            data.par_chunks_mut(chunk / 16)
                .enumerate()
                .for_each(|(i, dst)| {
                    // SAFETY: a `Line` is 16 f32s with no padding, so its uninitialised
                    // form is 16 uninitialised f32s.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            dst.as_mut_ptr() as *mut MaybeUninit<f32>,
                            dst.len() * 16,
                        )
                    };
                    fill(i, dst);
                });
        }
        let mut data = std::mem::ManuallyDrop::new(data);
        // SAFETY: `fill` wrote every element (its contract); `MaybeUninit<Line>` has the
        // layout of `Line`, so pointer, length and capacity carry over.
        Aligned(unsafe {
            Vec::from_raw_parts(data.as_mut_ptr() as *mut Line, data.len(), data.capacity())
        })
    }

    fn as_ptr(&self) -> *const f32 {
        self.0.as_ptr() as *const f32
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `Line` is 16 f32s with no padding.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.0.len() * 16) }
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut f32, self.0.len() * 16)
        }
    }
}

impl PackedB {
    /// Packs `B` read as `b[p * rs + j * cs]` for `p < k`, `j < n`.
    pub fn pack(b: &[f32], rs: usize, cs: usize, k: usize, n: usize) -> Self {
        let panels = n.div_ceil(NR);
        if k > 0 && n > 0 {
            assert!(
                (k - 1) * rs + (n - 1) * cs < b.len(),
                "PackedB::pack: view out of bounds"
            );
        }
        // Each panel is written by the thread that packs it, straight into uninitialised
        // memory (a zeroed allocation was a serial pass over the whole buffer on the calling
        // thread: 1.5 % of a fine-tuning step's samples, with both workers waiting); only a
        // last, partial panel is zeroed first, for its padding columns.
        let fill =
            |panel: usize, dst: &mut [MaybeUninit<f32>]| fill_panel(b, rs, cs, n, panel, dst);
        // SAFETY: every path writes every element of its panel: a full row-major panel all
        // `k × NR` by rows; otherwise a partial panel is zeroed first and a full one is
        // covered by the transpose (its tiles, then the columns and steps they left);
        // `packing_places_every_element` reads every element back.
        let data = unsafe { Aligned::filled_per_chunk(panels * k * NR, k * NR, fill) };
        PackedB { k, n, data }
    }

    /// Packs a weight `W [N, K]` (row-major, as checkpoints store linears) as `B = W^T`.
    pub fn pack_transposed(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack(w, 1, k, k, n)
    }

    /// `K`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `N`.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// Panel `panel` of `B` read as `b[p * rs + j * cs]` (`n` columns, `dst.len() / NR` steps)
/// into `dst`, every element written: a full row-major panel by rows; otherwise a partial
/// panel is zeroed first (its padding columns) and a column-strided one transposed.
fn fill_panel(
    b: &[f32],
    rs: usize,
    cs: usize,
    n: usize,
    panel: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    let k = dst.len() / NR;
    let cols = panel * NR..((panel + 1) * NR).min(n);
    if cs == 1 && cols.len() == NR {
        copy_full_rows(b, rs, cols.start, dst);
        return;
    }
    let dst = if cols.len() < NR { zeroed(dst) } else { dst };
    if cs == 1 {
        for (p, row) in dst.chunks_mut(NR).enumerate() {
            let src = &b[p * rs + cols.start..p * rs + cols.end];
            for (d, s) in row.iter_mut().zip(src) {
                d.write(*s);
            }
        }
    } else {
        transpose_into_panel(b, rs, cs, k, cols, dst);
    }
}

/// `dst` with every element set to zero.
fn zeroed(dst: &mut [MaybeUninit<f32>]) -> &mut [MaybeUninit<f32>] {
    for d in dst.iter_mut() {
        d.write(0.0);
    }
    dst
}

/// The rows of a full panel from a row-major source: `dst[p * NR + jj] = b[p * rs + j0 + jj]`.
/// With AVX2, six vector moves per row; a `[f32; NR]` assignment compiled to a `memmove`
/// call per row (2 % of a fine-tuning step's samples).
fn copy_full_rows(b: &[f32], rs: usize, j0: usize, dst: &mut [MaybeUninit<f32>]) {
    let k = dst.len() / NR;
    if k == 0 {
        return;
    }
    assert!(
        (k - 1) * rs + j0 + NR <= b.len(),
        "copy_full_rows: source out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx2_fma() {
        // SAFETY: AVX2 checked; every row read lies inside `b` (asserted) and every row
        // written inside `dst` (`k` rows of `NR`).
        unsafe { copy_full_rows_avx2(b.as_ptr().add(j0), rs, dst.as_mut_ptr() as *mut f32, k) };
        return;
    }
    for (p, row) in dst.chunks_exact_mut(NR).enumerate() {
        for (d, s) in row.iter_mut().zip(&b[p * rs + j0..][..NR]) {
            d.write(*s);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_full_rows_avx2(src: *const f32, rs: usize, dst: *mut f32, k: usize) {
    use std::arch::x86_64::*;
    for p in 0..k {
        let (s, d) = (src.add(p * rs), dst.add(p * NR));
        let v: [__m256; NR / 8] = std::array::from_fn(|i| _mm256_loadu_ps(s.add(8 * i)));
        for (i, v) in v.iter().enumerate() {
            _mm256_storeu_ps(d.add(8 * i), *v);
        }
    }
}

/// One panel of a column-strided source (a transposed weight, packed at every training
/// step): `dst[p * NR + jj] = b[p * rs + j * cs]` for the panel's columns `j` (`jj` from 0).
/// In blocks of [`PACK_ROWS`] panel rows, so the rows being written stay in L1 while each
/// column's run is read in order; with AVX2 and a unit row stride (`W [N, K]` read as
/// `Wᵀ`), 8 × 8 tiles are transposed in registers.
fn transpose_into_panel(
    b: &[f32],
    rs: usize,
    cs: usize,
    k: usize,
    cols: std::ops::Range<usize>,
    dst: &mut [MaybeUninit<f32>],
) {
    for p0 in (0..k).step_by(PACK_ROWS) {
        let steps = p0..(p0 + PACK_ROWS).min(k);
        let (mut p_done, mut jj_done) = (p0, 0);
        #[cfg(target_arch = "x86_64")]
        if rs == 1 && crate::cpu::avx2_fma() {
            let full_p = p0 + (steps.len() / 8) * 8;
            let full_jj = (cols.len() / 8) * 8;
            for jj in (0..full_jj).step_by(8) {
                for p in (p0..full_p).step_by(8) {
                    let j = cols.start + jj;
                    assert!(p + 7 + (j + 7) * cs < b.len() && (p + 7) * NR + jj + 8 <= dst.len());
                    // SAFETY: AVX2 checked above; the 8 × 8 source and destination tiles lie
                    // inside `b` and `dst` (asserted just above).
                    unsafe {
                        transpose8_avx2(
                            b.as_ptr().add(p + j * cs),
                            cs,
                            dst.as_mut_ptr().add(p * NR + jj) as *mut f32,
                        )
                    };
                }
            }
            (p_done, jj_done) = (full_p, full_jj);
        }
        // What the tiles left: the last columns (all steps), the last steps (tiled columns).
        for (jj, j) in cols.clone().enumerate() {
            let from = if jj < jj_done { p_done } else { p0 };
            for p in from..steps.end {
                dst[p * NR + jj].write(b[p * rs + j * cs]);
            }
        }
    }
}

/// `dst[r * NR + c] = src[r + c * stride]` for an 8 × 8 tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8_avx2(src: *const f32, stride: usize, dst: *mut f32) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|c| _mm256_loadu_ps(src.add(c * stride)));
    for (row, v) in crate::cpu::transpose8(r).iter().enumerate() {
        _mm256_storeu_ps(dst.add(row * NR), *v);
    }
}

/// What `C` starts from.
#[derive(Debug, Clone, Copy)]
pub enum Init<'a> {
    /// Zero.
    Zero,
    /// Each row starts as this `[N]` bias.
    Bias(&'a [f32]),
    /// `C`'s current values.
    Accumulate,
}

/// `C [M, N] (row stride ldc) = init + A B`, `A` read as `a[i * a_rs + p * a_cs]`.
///
/// # Panics
/// When no kernel is [`available`], or the views do not fit their buffers.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    init: Init,
) {
    sgemm_then(m, a, a_rs, a_cs, b, c, ldc, init, None)
}

/// [`sgemm`], then `post` applied to each block of `C` while it is still in L1 (a fused
/// bias + GELU for the feed-forward up-projection at inference).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_then(
    m: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    init: Init,
    post: Option<Activation>,
) {
    drive(m, a, a_rs, a_cs, Panels::Packed(b), c, ldc, init, post);
}

/// [`sgemm`] with `B` read as `b[p * rs + j * cs]` (`K × N`), for an operand used once (a
/// weight at a training step). With few rows of `A`, read in place (row-major), and many
/// column panels, each thread claims
/// panels in order, packs one into a buffer of its own and runs every row of `C` past it
/// while it is still in its cache ([`packs_as_it_goes`]); otherwise `B` is packed whole
/// first. Either way the same bits.
///
/// # Panics
/// As [`sgemm`], or when the view of `B` does not fit `b`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_unpacked(
    m: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    (b, rs, cs): (&[f32], usize, usize),
    (k, n): (usize, usize),
    c: &mut [f32],
    ldc: usize,
    init: Init,
) {
    if k > 0 && n > 0 {
        assert!(
            (k - 1) * rs + (n - 1) * cs < b.len(),
            "sgemm_unpacked: view of B out of bounds"
        );
    }
    if a_cs == 1 && packs_as_it_goes(m, n) {
        drive(
            m,
            a,
            a_rs,
            a_cs,
            Panels::Raw { b, rs, cs, k, n },
            c,
            ldc,
            init,
            None,
        );
    } else {
        let packed = PackedB::pack(b, rs, cs, k, n);
        drive(
            m,
            a,
            a_rs,
            a_cs,
            Panels::Packed(&packed),
            c,
            ldc,
            init,
            None,
        );
    }
}

/// Whether [`sgemm_unpacked`] packs panel by panel (row-major `A` only: a strided `A` would
/// be packed again for every panel): for at most [`PACKING_ROWS`] rows and at least four
/// panels per thread, so the threads can balance their shares a panel at a time.
///
/// Packing a weight whole writes it into the packing threads' caches; a product splitting
/// rows then reads every panel back, half of them from the other core's cache, and the
/// packed weight (1.8–2.4 MB for MiniLM's) does not stay in a 1 MB L2. Alternating call by
/// call in one process on a Zen 3 (2 threads, the weight evicted from L2 before each call,
/// `sgemm_peak unpacked`), panel by panel was, for 420 rows through MiniLM's weights:
/// 2–8 % faster for the QKV and intermediate forward products (24 and 32 panels), 3–5 %
/// (one run of five 2 % slower) for the output projection's (8 panels of depth 1,536),
/// and −8 to +6 % (median +4 %) for the input gradients' 384-column products. From 1,024
/// rows on, `A` no longer stays in L2 while a panel passes it.
fn packs_as_it_goes(m: usize, n: usize) -> bool {
    m <= PACKING_ROWS && n.div_ceil(NR) >= 4 * rayon::current_num_threads()
}

/// Rows up to which [`sgemm_unpacked`] may pack panel by panel.
const PACKING_ROWS: usize = 768;

/// Where the kernel's `B` panels come from.
#[derive(Clone, Copy)]
enum Panels<'a> {
    /// Packed whole beforehand.
    Packed(&'a PackedB),
    /// Packed one panel at a time by the thread that uses it ([`sgemm_unpacked`]).
    Raw {
        b: &'a [f32],
        rs: usize,
        cs: usize,
        k: usize,
        n: usize,
    },
}

#[allow(clippy::too_many_arguments)]
fn drive(
    m: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    src: Panels,
    c: &mut [f32],
    ldc: usize,
    init: Init,
    post: Option<Activation>,
) {
    let (n, k) = match src {
        Panels::Packed(b) => (b.n, b.k),
        Panels::Raw { n, k, .. } => (n, k),
    };
    assert!(available(), "sgemm needs AVX-512 or AVX2 + FMA");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "sgemm: C too small"
    );
    if k > 0 {
        assert!(
            (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
            "sgemm: A view out of bounds"
        );
    }
    if let Init::Bias(bias) = init {
        assert_eq!(bias.len(), n, "sgemm: bias length");
    }
    let panels = n.div_ceil(NR);
    let kc = depth_block(k);
    let row_split = m >= 2 * MC;
    let threads = if row_split {
        rayon::current_num_threads()
    } else {
        rayon::current_num_threads().min(panels).max(1)
    };
    // Too little work to split: one thread avoids the hand-off.
    let threads = if 2 * m * n * k < 1 << 20 { 1 } else { threads };
    let cp = SendPtr(c.as_mut_ptr());
    let ap = a.as_ptr() as usize;
    let in_place = a_cs == 1;
    // Panel `j` of `B` starts `(j - first) * k * NR` floats after address `at`.
    let run = |range: std::ops::Range<usize>,
               rows_t: std::ops::Range<usize>,
               (at, first): (usize, usize)| {
        thread_local! {
            static PACKED_A: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        PACKED_A.with_borrow_mut(|packed_a| {
            if !in_place {
                packed_a.resize(MC.div_ceil(MR) * MR * kc, 0.0);
            }
            for i0 in rows_t.clone().step_by(MC) {
                let block_rows = (rows_t.end - i0).min(MC);
                for p0 in (0..k.max(1)).step_by(kc) {
                    let depth = (k - p0).min(kc);
                    let init = if p0 == 0 { init } else { Init::Accumulate };
                    // Row-major A is read in place; other layouts are packed first.
                    // SAFETY: the block lies inside A (checked above).
                    if !in_place {
                        unsafe {
                            pack_a(
                                (ap as *const f32).add(i0 * a_rs + p0 * a_cs),
                                a_rs,
                                a_cs,
                                block_rows,
                                depth,
                                kc,
                                packed_a,
                            )
                        };
                    }
                    for j in range.clone() {
                        let cols = (n - j * NR).min(NR);
                        for i in (0..block_rows).step_by(MR) {
                            let rows = (block_rows - i).min(MR);
                            // SAFETY: row block i0 + i.., panel j and depth p0.. lie inside the
                            // packed A, B and C (checked above); tasks write disjoint row or
                            // column ranges of C.
                            unsafe {
                                let a_block = if in_place {
                                    ARows {
                                        start: (ap as *const f32).add((i0 + i) * a_rs + p0),
                                        row: a_rs,
                                        step: 1,
                                    }
                                } else {
                                    ARows {
                                        start: packed_a.as_ptr().add(i * kc),
                                        row: 1,
                                        step: MR,
                                    }
                                };
                                micro(
                                    rows,
                                    cols,
                                    depth,
                                    a_block,
                                    (at as *const f32).add((j - first) * k * NR + p0 * NR),
                                    cp.get().add((i0 + i) * ldc + j * NR),
                                    ldc,
                                    match init {
                                        Init::Bias(bias) => {
                                            Init::Bias(&bias[j * NR..j * NR + cols])
                                        }
                                        other => other,
                                    },
                                );
                                if let Some(act) = post.filter(|_| p0 + depth >= k) {
                                    for r in 0..rows {
                                        let row = cp.get().add((i0 + i + r) * ldc + j * NR);
                                        f32::activate(
                                            act,
                                            std::slice::from_raw_parts_mut(row, cols),
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        });
    };
    if let Panels::Raw { b, rs, cs, .. } = src {
        thread_local! {
            static PANEL: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let claim = |_| {
            PANEL.with_borrow_mut(|buf| {
                // Grown to the deepest panel yet, never shrunk (so not zeroed again).
                if buf.len() < k * NR / 16 {
                    buf.resize(k * NR / 16, Line([0.0; 16]));
                }
                // SAFETY: a `Line` is 16 f32s with no padding, and the buffer holds at least
                // `k * NR` of them; `fill_panel` only writes.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        buf.as_mut_ptr() as *mut MaybeUninit<f32>,
                        k * NR,
                    )
                };
                loop {
                    let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if j >= panels {
                        break;
                    }
                    fill_panel(b, rs, cs, n, j, dst);
                    run(j..j + 1, 0..m, (buf.as_ptr() as usize, j));
                }
            })
        };
        let threads = rayon::current_num_threads().min(panels).max(1);
        if threads == 1 || 2 * m * n * k < 1 << 20 {
            claim(0);
        } else {
            (0..threads).into_par_iter().for_each(claim);
        }
        return;
    }
    let Panels::Packed(b) = src else {
        unreachable!("raw panels handled above")
    };
    let whole = (b.data.as_ptr() as usize, 0);
    if threads == 1 {
        run(0..panels, 0..m, whole);
    } else if row_split {
        // Row blocks claimed in order as threads free up, not in equal static shares: the
        // two vCPUs here often run at different speeds (one FMA loop per core: 165 and 140
        // GFLOP/s side by side), and a static half left the faster one waiting. Interleaved
        // in one process, MiniLM's forward products went from ~200 to ~220 GFLOP/s. The last
        // blocks are smaller ([`row_tasks`]), so neither thread waits long for the other's
        // last block; and both threads walk the rows in order, so they stream the same
        // panels of `B` at about the same time. On a Zen 3 (2 threads, interleaved in one
        // process, ~15 GFLOP per shape) that took MiniLM's training products 2–12 % faster
        // than rayon's halving of the block range.
        let tasks = row_tasks(m, threads);
        let next = std::sync::atomic::AtomicUsize::new(0);
        (0..threads).into_par_iter().for_each(|_| {
            while let Some(rows) =
                tasks.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                run(0..panels, rows.clone(), whole);
            }
        });
    } else {
        // Few rows (batch-1 inference): static column shares (finer dynamic ones measured
        // no better).
        (0..threads).into_par_iter().for_each(|t| {
            run(
                panels * t / threads..panels * (t + 1) / threads,
                0..m,
                whole,
            )
        });
    }
}

/// Row ranges of the tasks when rows are split, in the order threads claim them: blocks of
/// [`row_chunk`] rows while more than one per thread is left, then the rest in one share
/// per thread, halving (whole micro-panels) down to a single micro-panel.
fn row_tasks(m: usize, threads: usize) -> Vec<std::ops::Range<usize>> {
    let chunk = row_chunk(m, threads);
    let mut tasks = Vec::new();
    let mut start = 0;
    while start < m {
        let left = m - start;
        let rows = if left > threads * chunk {
            chunk
        } else {
            left.div_ceil(threads).next_multiple_of(MR).min(chunk)
        };
        let end = (start + rows).min(m);
        tasks.push(start..end);
        start = end;
    }
    tasks
}

/// Rows per task when rows are split: [`MC`], or fewer (whole micro-panels) so that each
/// thread gets at least four tasks to balance over.
fn row_chunk(m: usize, threads: usize) -> usize {
    let fair = m.div_ceil(4 * threads).next_multiple_of(MR);
    fair.clamp(MR, MC)
}

/// Steps of the inner dimension per block: all of `k` up to [`KC_MAX`], else equal blocks
/// no longer than it (a 4,096-token weight gradient: three of 1,366).
fn depth_block(k: usize) -> usize {
    let blocks = k.div_ceil(KC_MAX).max(1);
    k.div_ceil(blocks).max(1)
}

/// Copies `rows × depth` of `A` into `dst` as micro-panels of [`MR`] rows, each `[depth][MR]`
/// and `kc * MR` floats apart (rows past `rows` are zero), so the kernel broadcasts from consecutive addresses. Only `A`
/// that is not row-major comes here (a transposed operand); row-major `A` is read in place.
///
/// # Safety
/// `a` must cover the view.
unsafe fn pack_a(
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    rows: usize,
    depth: usize,
    kc: usize,
    dst: &mut [f32],
) {
    for (pi, panel) in dst.chunks_mut(MR * kc).take(rows.div_ceil(MR)).enumerate() {
        let r0 = pi * MR;
        let live = (rows - r0).min(MR);
        if live < MR {
            panel[..depth * MR].fill(0.0);
        }
        if a_rs == 1 {
            // A stored transposed (the weight gradient's `dyᵀ`): each step's MR values are
            // adjacent in memory, one short copy per step.
            let dst = panel.as_mut_ptr();
            if live == MR {
                // A constant count: the compiler emits one vector move, not a memcpy call.
                for p in 0..depth {
                    std::ptr::copy_nonoverlapping(a.add(r0 + p * a_cs), dst.add(p * MR), MR);
                }
            } else {
                for p in 0..depth {
                    std::ptr::copy_nonoverlapping(a.add(r0 + p * a_cs), dst.add(p * MR), live);
                }
            }
            continue;
        }
        for r in 0..live {
            let src = a.add((r0 + r) * a_rs);
            for p in 0..depth {
                panel[p * MR + r] = *src.add(p * a_cs);
            }
        }
    }
}

/// Where a micro-kernel reads its rows of `A`: row `r`, step `p` at
/// `start + r * row + p * step` (packed: `row` 1, `step` MR; row-major in place: `row` the
/// row stride, `step` 1).
#[derive(Clone, Copy)]
struct ARows {
    start: *const f32,
    row: usize,
    step: usize,
}

/// Dispatches the row count to a const-generic kernel.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    rows: usize,
    cols: usize,
    k: usize,
    a: ARows,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    if !avx512() {
        // AVX2: at most four rows at a time (two vectors of 16 columns per row).
        let first = rows.min(4);
        macro_rules! go2 {
            ($rows:expr, $a:expr, $c:expr; $($r:literal)*) => {
                match $rows {
                    $($r => kernel_avx2::<$r>(cols, k, $a, b, $c, ldc, init),)*
                    _ => unreachable!(),
                }
            };
        }
        go2!(first, a, c; 1 2 3 4);
        if rows > 4 {
            let rest = ARows {
                start: a.start.add(4 * a.row),
                ..a
            };
            // (A bias is per column: the same start for these rows.)
            go2!(rows - 4, rest, c.add(4 * ldc); 1 2 3 4);
        }
        return;
    }
    macro_rules! go {
        ($($r:literal)*) => {
            match rows {
                $($r => kernel::<$r>(cols, k, a, b, c, ldc, init),)*
                _ => unreachable!(),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8)
}

/// [`kernel`] for AVX2 + FMA: the `NR`-wide panel in slices of 16 columns (two 8-lane
/// vectors), `R ≤ 4` rows, `C` in 2R registers for the whole depth. Each element of `C` is
/// the same chain of fused multiply-adds in the same order as in the AVX-512 kernel, so
/// both give the same bits. Whole vectors of `C` are stored unmasked: AMD cores run a masked
/// `vmaskmovps` store as a slow microcoded sequence, and the one per vector of every block
/// held a 128-deep product on one Zen 3 core to 72 GFLOP/s (83 without; best of 8 interleaved)
/// and MiniLM's training products on two 0–10 %.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2<const R: usize>(
    cols: usize,
    k: usize,
    a: ARows,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    use std::arch::x86_64::*;
    let rows: [usize; R] = std::array::from_fn(|r| r * a.row);
    for c0 in (0..cols).step_by(16) {
        let width = (cols - c0).min(16);
        // Lanes `< live` of vector v (8 lanes each) are columns of C.
        let live = [width.min(8), width.saturating_sub(8)];
        let masks: [__m256i; 2] = live.map(|n| crate::cpu::lanes8(n));
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        match init {
            Init::Zero => {}
            Init::Bias(bias) => {
                let mut row = [_mm256_setzero_ps(); 2];
                for v in 0..2 {
                    if live[v] > 0 {
                        row[v] = _mm256_maskload_ps(bias.as_ptr().add(c0 + 8 * v), masks[v]);
                    }
                }
                acc = [row; R];
            }
            Init::Accumulate => {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    for v in 0..2 {
                        if live[v] > 0 {
                            let at = c.add(r * ldc + c0 + 8 * v);
                            acc_r[v] = _mm256_maskload_ps(at, masks[v]);
                        }
                    }
                }
            }
        }
        let (mut ap, mut bp) = (a.start, b.add(c0));
        for _ in 0..k {
            // The slice's 16 columns of a panel row are one cache line.
            _mm_prefetch::<_MM_HINT_T0>(bp.add(PF * NR) as *const i8);
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for r in 0..R {
                let x = _mm256_set1_ps(*ap.add(rows[r]));
                acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
            }
            bp = bp.add(NR);
            ap = ap.add(a.step);
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for v in 0..2 {
                let at = c.add(r * ldc + c0 + 8 * v);
                if live[v] == 8 {
                    _mm256_storeu_ps(at, acc_r[v]);
                } else if live[v] > 0 {
                    _mm256_maskstore_ps(at, masks[v], acc_r[v]);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2<const R: usize>(
    _: usize,
    _: usize,
    _: ARows,
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: Init,
) {
    unreachable!("sgemm is x86-64 only")
}

/// One `R × NR` block of `C` (only its first `cols` columns are written).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize>(
    cols: usize,
    k: usize,
    a: ARows,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    use std::arch::x86_64::*;
    let masks: [__mmask16; 3] = std::array::from_fn(|v| mask(cols.saturating_sub(v * 16).min(16)));
    let mut acc = [[_mm512_setzero_ps(); 3]; R];
    match init {
        Init::Zero => {}
        Init::Bias(bias) => {
            let row: [__m512; 3] = std::array::from_fn(|v| {
                _mm512_maskz_loadu_ps(masks[v], bias.as_ptr().add((v * 16).min(cols)))
            });
            acc = [row; R];
        }
        Init::Accumulate => {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                    if masks[v] != 0 {
                        *acc_rv = _mm512_maskz_loadu_ps(masks[v], c.add(r * ldc + v * 16));
                    }
                }
            }
        }
    }
    let rows: [usize; R] = std::array::from_fn(|r| r * a.row);
    let (mut ap, mut bp) = (a.start, b);
    for _ in 0..k {
        _mm_prefetch::<_MM_HINT_T0>(bp.add(PF * NR) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(bp.add(PF * NR + 16) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(bp.add(PF * NR + 32) as *const i8);
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        let b2 = _mm512_loadu_ps(bp.add(32));
        for r in 0..R {
            let x = _mm512_set1_ps(*ap.add(rows[r]));
            acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(x, b2, acc[r][2]);
        }
        bp = bp.add(NR);
        ap = ap.add(a.step);
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (v, acc_rv) in acc_r.iter().enumerate() {
            if masks[v] != 0 {
                _mm512_mask_storeu_ps(c.add(r * ldc + v * 16), masks[v], *acc_rv);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize>(
    _: usize,
    _: usize,
    _: ARows,
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: Init,
) {
    unreachable!("sgemm is AVX-512 only")
}

/// The low `n` bits set.
fn mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::lcg;

    /// Split rows go out in order, every row once, in blocks that never grow and end with
    /// at most one micro-panel.
    #[test]
    fn row_tasks_cover_the_rows_in_shrinking_blocks() {
        for threads in 2..=4 {
            for m in [2 * MC, 300, 420, 421, 1000, 4096] {
                let tasks = super::row_tasks(m, threads);
                // Every row once, in order.
                assert_eq!(tasks[0].start, 0);
                assert_eq!(tasks.last().unwrap().end, m);
                assert!(tasks.windows(2).all(|w| w[0].end == w[1].start));
                // Whole micro-panels (the last block may be partial), never growing, at most
                // `MC`, and the last at most one micro-panel.
                let sizes: Vec<usize> = tasks.iter().map(|t| t.len()).collect();
                assert!(sizes[..sizes.len() - 1].iter().all(|s| s % MR == 0));
                assert!(
                    sizes.windows(2).all(|w| w[0] >= w[1]),
                    "{m} {threads}: {sizes:?}"
                );
                assert!(sizes.iter().all(|&s| s <= MC));
                assert!(*sizes.last().unwrap() <= MR, "{m} {threads}: {sizes:?}");
            }
        }
    }

    /// Every packed element is the source element the layout names, padding zero, for
    /// sources read with a unit row stride (a transposed weight: the 8 × 8 tiles), a
    /// unit column stride (row copies) and neither; shapes with and without whole tiles,
    /// panels and `PACK_ROWS` blocks.
    #[test]
    fn packing_places_every_element() {
        let mut s = 5u64;
        for (k, n) in [
            (0, 5),
            (1, 1),
            (7, 9),
            (8, 8),
            (64, 48),
            (65, 50),
            (130, 97),
            (384, 1152),
        ] {
            // Room for the widest view below: (2, 2k + 1) reads up to ~2kn + 2k + n.
            let src: Vec<f32> = (0..3 * k * n + 8).map(|_| lcg(&mut s)).collect();
            // (rs, cs): B[p, j] at src[p * rs + j * cs].
            for (rs, cs) in [(1, k), (n, 1), (n + 1, 0), (2, 2 * k + 1)] {
                let packed = PackedB::pack(&src, rs, cs, k, n);
                for panel in 0..n.div_ceil(NR) {
                    for p in 0..k {
                        for jj in 0..NR {
                            let got = packed.data[panel * k * NR + p * NR + jj];
                            let j = panel * NR + jj;
                            let want = if j < n { src[p * rs + j * cs] } else { 0.0 };
                            assert_eq!(got, want, "k {k} n {n} rs {rs} cs {cs} p {p} j {j}");
                        }
                    }
                }
            }
        }
    }

    fn check(m: usize, n: usize, k: usize, transposed_a: bool) {
        if !available() {
            eprintln!("neither AVX-512 nor AVX2 + FMA: skipping");
            return;
        }
        let mut s = 11u64;
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect(); // [N, K]
        let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
        // A as [M, K] row-major, or stored transposed ([K, M]) and read through strides.
        let (a_buf, a_rs, a_cs) = if transposed_a {
            let mut t = vec![0f32; m * k];
            for i in 0..m {
                for p in 0..k {
                    t[p * m + i] = a[i * k + p];
                }
            }
            (t, 1, m)
        } else {
            (a.clone(), k, 1)
        };
        let packed = PackedB::pack_transposed(&w, n, k);
        let reference = |i: usize, j: usize| -> f64 {
            (0..k)
                .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                .sum()
        };
        for (name, init) in [
            ("zero", Init::Zero),
            ("bias", Init::Bias(&bias)),
            ("accumulate", Init::Accumulate),
        ] {
            let mut c = c0.clone();
            sgemm(m, &a_buf, a_rs, a_cs, &packed, &mut c, n, init);
            let mut worst = 0f64;
            for i in 0..m {
                for j in 0..n {
                    let start = match init {
                        Init::Zero => 0.0,
                        Init::Bias(b) => b[j] as f64,
                        Init::Accumulate => c0[i * n + j] as f64,
                    };
                    worst = worst.max((start + reference(i, j) - c[i * n + j] as f64).abs());
                }
            }
            assert!(
                worst < 1e-5 * (k as f64).sqrt(),
                "{m}x{n}x{k} {name}: {worst}"
            );
        }
    }

    #[test]
    fn sgemm_matches_f64_reference() {
        check(37, 101, 67, false);
        check(8, 48, 16, false);
        check(1, 5, 3, false);
        check(130, 200, 300, true);
        // Rows split across threads in micro-panels (ragged last share), both layouts.
        check(389, 60, 140, false);
        check(389, 60, 140, true);
        // Depths past KC_MAX: several depth blocks accumulate into C.
        check(21, 50, 1600, false);
        check(260, 60, 3100, true);
        assert_eq!(depth_block(384), 384);
        assert_eq!(depth_block(4096), 1366);
    }

    /// `sgemm_unpacked` gives the bits of packing `B` whole and calling `sgemm`, whichever
    /// way it goes: panel by panel (few rows, four panels per thread or more: a ragged last
    /// panel, depth blocks past `KC_MAX`, one thread for a tiny product) or packed whole
    /// (many rows, or few panels); `B` as a transposed weight or row-major, `A` row-major
    /// or transposed (always packed whole).
    #[test]
    fn unpacked_equals_packed_bit_for_bit() {
        if !available() {
            eprintln!("neither AVX-512 nor AVX2 + FMA: skipping");
            return;
        }
        let mut s = 3u64;
        let threads = rayon::current_num_threads();
        let mut ways = [0; 2];
        for (m, n, k) in [
            (37, 4 * threads * NR - 5, 67),
            (420, 4 * threads * NR, 384),
            (300, 4 * threads * NR + 1, 1600),
            (2, 4 * threads * NR + 2, 3),
            (800, 4 * threads * NR, 50),
            (200, 100, 50),
        ] {
            let panel_by_panel = packs_as_it_goes(m, n);
            assert_eq!(
                panel_by_panel,
                m <= PACKING_ROWS && n > (4 * threads - 1) * NR
            );
            ways[panel_by_panel as usize] += 1;
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let b: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
            // B as a weight `[N, K]` read transposed, or as `[K, N]` row-major; A as `[M, K]`
            // or read through the strides of its transpose.
            for (rs, cs) in [(1, k), (n, 1)] {
                for (a_rs, a_cs) in [(k, 1), (1, m)] {
                    for init in [Init::Zero, Init::Bias(&bias), Init::Accumulate] {
                        let mut want = c0.clone();
                        let packed = PackedB::pack(&b, rs, cs, k, n);
                        sgemm(m, &a, a_rs, a_cs, &packed, &mut want, n, init);
                        let mut got = c0.clone();
                        sgemm_unpacked(m, &a, a_rs, a_cs, (&b, rs, cs), (k, n), &mut got, n, init);
                        assert!(
                            want.iter()
                                .zip(&got)
                                .all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{m}x{n}x{k}, B strides ({rs}, {cs}), A strides ({a_rs}, {a_cs})"
                        );
                    }
                }
            }
        }
        assert_eq!(ways, [2, 4], "shapes packed whole, panel by panel");
    }

    #[test]
    fn fused_activation_matches_separate_pass() {
        if !available() {
            return;
        }
        let (m, n, k) = (300, 100, 400); // several row blocks, depth blocks and a ragged panel
        let mut s = 5u64;
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let b = PackedB::pack_transposed(&w, n, k);
        let (mut plain, mut fused) = (vec![0f32; m * n], vec![0f32; m * n]);
        sgemm(m, &a, k, 1, &b, &mut plain, n, Init::Bias(&bias));
        sgemm_then(
            m,
            &a,
            k,
            1,
            &b,
            &mut fused,
            n,
            Init::Bias(&bias),
            Some(Activation::Gelu),
        );
        f32::activate(Activation::Gelu, &mut plain);
        assert_eq!(plain, fused);
    }

    #[test]
    fn pack_row_major_b() {
        // B given directly as [K, N] row-major.
        let (k, n) = (5, 50);
        let b: Vec<f32> = (0..k * n).map(|v| v as f32).collect();
        let p = PackedB::pack(&b, n, 1, k, n);
        assert_eq!(p.data[NR * k + 1], b[48 + 1]); // panel 1, row 0, column 49 = b[0][49]
        assert_eq!(p.data[NR * k + 2], 0.0); // column 50 is padding
        assert_eq!(p.data[3 * NR + 7], b[3 * n + 7]);
    }
}
