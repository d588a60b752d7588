//! int8 matrix products for inference: `y = act(x W^T + b)` with `W` quantized once per
//! output channel (symmetric, int8) and `x` quantized per call and per token (row) to
//! asymmetric uint8; integer products accumulate exactly in i32 and are scaled back to f32.
//!
//! With `x[r, k] ≈ sx[r] (qx[r, k] - zx[r])` and `W[c, k] ≈ sw[c] qw[c, k]`:
//!
//! `y[r, c] = sx[r] sw[c] (Σ_k qx[r, k] qw[c, k] - zx[r] Σ_k qw[c, k]) + b[c]`
//!
//! The integer sum is what Intel AMX `TDPBUSD` (unsigned × signed bytes, four per i32 lane)
//! computes; `Σ_k qw[c, k]` is stored with the packed weight. Asymmetric activations keep
//! the full 256 levels for one-sided inputs such as GELU outputs; per-token scales keep a
//! single large token from flattening the others (ONNX Runtime's default dynamic
//! quantization uses one scale per tensor).
//!
//! Tiles: `A` (16 rows × 64 uint8 of `x`), `B` (16 rows of 16 × 4 int8: row `r` holds
//! `W[o][4r..4r + 4]` for the tile's 16 outputs `o`), `C` 16 × 16 i32. The kernel keeps a
//! 32 × 32 block of `C` in four tiles as the bf16 kernel does. Without AMX int8, AVX-512 VNNI
//! (`VPDPBUSD`, the same unsigned × signed four-byte dot product per i32 lane) reads the same
//! packed tiles — one tile row is one 512-bit vector of 16 outputs × 4 inputs; with AVX2 only,
//! `VPMADDWD` on both operands widened to i16 does (exact pair sums); without that either, a
//! portable loop does. All compute exactly the same integer sums.
use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

use super::{int8_available, CONFIG};
use crate::cpu::{with_slice, SendPtr};
use crate::Activation;

/// Rows and columns of the output block one kernel call computes.
const BLOCK: usize = 32;
/// uint8 values of `x` in one tile row (the inner-product depth of one tile product).
const DEPTH: usize = 64;
/// Bytes in one packed `W` tile (16 rows × 64 int8).
const TILE: usize = 16 * DEPTH;

/// A weight `W [O, I]` quantized per output channel and packed in AMX int8 tiles, with its
/// scales, channel sums and f32 bias.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedI8 {
    outputs: usize,
    inputs: usize,
    /// `inputs` rounded up to [`DEPTH`].
    depth: usize,
    /// Tiles ordered `[O / 16][I / 64]`, zero-padded.
    tiles: Vec<i8>,
    /// `sw [O rounded up to BLOCK]`: `W[c, :] ≈ sw[c] qw[c, :]`.
    scale: Vec<f32>,
    /// `Σ_k qw[c, k]` (padded like `scale`).
    sums: Vec<i32>,
    /// `b` (padded like `scale`).
    bias: Vec<f32>,
}

/// Symmetric int8 quantization of one weight row: `(scale, values in [-127, 127])`.
/// The scheme [`PackedI8::quantize`] applies per output channel (and `berth quantize`
/// stores, so a quantized checkpoint packs to the same tiles).
pub fn quantize_channel(w: &[f32]) -> (f32, Vec<i8>) {
    let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    let inv = 1.0 / scale;
    let q = w
        .iter()
        .map(|v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8)
        .collect();
    (scale, q)
}

impl PackedI8 {
    /// Quantizes and packs `w [O, I]` (row-major) and `b [O]`.
    pub fn quantize(w: &[f32], b: &[f32], outputs: usize, inputs: usize) -> Self {
        assert_eq!(w.len(), outputs * inputs, "PackedI8::quantize: weight size");
        let mut q = Vec::with_capacity(w.len());
        let mut scale = Vec::with_capacity(outputs);
        for row in w.chunks(inputs.max(1)).take(outputs) {
            let (s, v) = quantize_channel(row);
            scale.push(s);
            q.extend(v);
        }
        Self::from_quantized(&q, &scale, b, outputs, inputs)
    }

    /// Packs a weight already quantized per output channel: `W[c, :] ≈ scale[c] q[c, :]`
    /// (`q [O, I]` row-major, as [`quantize_channel`] makes it), with the bias `b [O]`.
    pub fn from_quantized(
        q: &[i8],
        scale: &[f32],
        b: &[f32],
        outputs: usize,
        inputs: usize,
    ) -> Self {
        assert_eq!(
            q.len(),
            outputs * inputs,
            "PackedI8::from_quantized: weight size"
        );
        assert_eq!(scale.len(), outputs, "PackedI8::from_quantized: scale size");
        assert_eq!(b.len(), outputs, "PackedI8::from_quantized: bias size");
        let depth = inputs.div_ceil(DEPTH) * DEPTH;
        let out_pad = outputs.div_ceil(BLOCK) * BLOCK;
        let kb = depth / DEPTH;
        let mut tiles = vec![0i8; out_pad / 16 * kb * TILE];
        let mut scales = vec![1f32; out_pad];
        let mut sums = vec![0i32; out_pad];
        for o in 0..outputs {
            let row = &q[o * inputs..(o + 1) * inputs];
            scales[o] = scale[o];
            sums[o] = row.iter().map(|&v| v as i32).sum();
            let (t, col) = (o / 16, o % 16);
            for (k, &v) in row.iter().enumerate() {
                let (blk, within) = (k / DEPTH, k % DEPTH);
                tiles[(t * kb + blk) * TILE + within / 4 * DEPTH + col * 4 + within % 4] = v;
            }
        }
        let mut bias = vec![0f32; out_pad];
        bias[..outputs].copy_from_slice(b);
        PackedI8 {
            outputs,
            inputs,
            depth,
            tiles,
            scale: scales,
            sums,
            bias,
        }
    }

    /// Quantizes the tensors `w [O, I]` and `b [O]` (f32 or f64).
    pub fn from_tensors(w: &Tensor, b: &Tensor) -> Result<Self> {
        let (w, b, o, i) = super::weight_and_bias(w, b, "PackedI8")?;
        Ok(Self::quantize(&w, &b, o, i))
    }

    /// `O`.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `I`.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// The quantized weight `qw[c, k]` read back from the tiles.
    pub fn value(&self, c: usize, k: usize) -> i8 {
        let kb = self.depth / DEPTH;
        let (blk, within) = (k / DEPTH, k % DEPTH);
        self.tiles[(c / 16 * kb + blk) * TILE + within / 4 * DEPTH + c % 16 * 4 + within % 4]
    }

    /// The per-channel scale `sw[c]`.
    pub fn scale(&self, c: usize) -> f32 {
        self.scale[c]
    }
}

/// `x [N, I]` quantized per row to uint8, rows of `depth` (zero-padded), `N` rounded up
/// to [`BLOCK`]: `x[r, k] ≈ scale[r] (data[r, k] - zero[r])`.
#[derive(Debug, Clone, Default)]
pub struct QuantRows {
    /// `[N rounded up to BLOCK, depth]`.
    pub data: Vec<u8>,
    /// `[N]`.
    pub scale: Vec<f32>,
    /// `[N]`, in `[0, 255]`.
    pub zero: Vec<i32>,
    /// Row length in `data`.
    pub depth: usize,
}

/// Quantizes each row of `x [N, I]` over its own range (which always includes 0, so zero
/// padding and exact zeros stay exact).
pub fn quantize_rows(x: &[f32], n: usize, inputs: usize, depth: usize) -> QuantRows {
    assert_eq!(x.len(), n * inputs, "quantize_rows: input size");
    let rows = n.div_ceil(BLOCK) * BLOCK;
    let mut data = vec![0u8; rows * depth];
    let mut scale = vec![1f32; n];
    let mut zero = vec![0i32; n];
    data[..n * depth]
        .par_chunks_mut(depth * BLOCK)
        .zip(x.par_chunks(inputs * BLOCK))
        .zip(scale.par_chunks_mut(BLOCK).zip(zero.par_chunks_mut(BLOCK)))
        .for_each(|((dst, src), (sc, zp))| {
            for (((d, s), sc), zp) in dst
                .chunks_mut(depth)
                .zip(src.chunks(inputs))
                .zip(sc)
                .zip(zp)
            {
                (*sc, *zp) = quantize_row(s, &mut d[..inputs]);
            }
        });
    QuantRows {
        data,
        scale,
        zero,
        depth,
    }
}

fn quantize_row(src: &[f32], dst: &mut [u8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { quantize_row_avx512(src, dst) };
    }
    quantize_row_generic(src, dst)
}

/// The scale and zero point of a row whose range (with 0) is `[lo, hi]`.
#[inline(always)]
fn row_params(lo: f32, hi: f32) -> Option<(f32, f32, f32)> {
    if hi <= lo || !(hi - lo).is_finite() {
        return None;
    }
    let scale = (hi - lo) / 255.0;
    let inv = 1.0 / scale;
    Some((scale, inv, (-lo * inv).round_ties_even().clamp(0.0, 255.0)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_row_avx512(src: &[f32], dst: &mut [u8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let n = src.len();
    let p = src.as_ptr();
    let mask = |i: usize| -> __mmask16 {
        if n - i >= 16 {
            0xFFFF
        } else {
            ((1u32 << (n - i)) - 1) as __mmask16
        }
    };
    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for i in (0..n).step_by(16) {
        let v = _mm512_maskz_loadu_ps(mask(i), p.add(i));
        lo = _mm512_min_ps(lo, v);
        hi = _mm512_max_ps(hi, v);
    }
    let Some((scale, inv, zero)) = row_params(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi))
    else {
        dst.fill(0);
        return (1.0, 0);
    };
    let (vinv, vzero, floor) = (
        _mm512_set1_ps(inv),
        _mm512_set1_ps(zero),
        _mm512_setzero_si512(),
    );
    for i in (0..n).step_by(16) {
        let m = mask(i);
        let v = _mm512_maskz_loadu_ps(m, p.add(i));
        // Round to nearest even (the default MXCSR mode), clamp below at 0 and store with
        // unsigned saturation at 255.
        let q = _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_fmadd_ps(v, vinv, vzero)), floor);
        _mm512_mask_cvtusepi32_storeu_epi8(dst.as_mut_ptr().add(i) as *mut i8, m, q);
    }
    (scale, zero as i32)
}

fn quantize_row_generic(src: &[f32], dst: &mut [u8]) -> (f32, i32) {
    let (lo, hi) = src
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let Some((scale, inv, zero)) = row_params(lo, hi) else {
        dst.fill(0);
        return (1.0, 0);
    };
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.mul_add(inv, zero).round_ties_even().clamp(0.0, 255.0) as u8;
    }
    (scale, zero as i32)
}

/// Which integer kernel computes an int8 product (all give the same sums).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8Kernel {
    /// AMX int8 tiles (`TDPBUSD`).
    Amx,
    /// AVX-512 VNNI (`VPDPBUSD`) on the same packed tiles.
    Vnni,
    /// AVX2 on the same packed tiles, both operands widened to i16 (`VPMADDWD`: exact
    /// products and pair sums, so the same sums as the others).
    Avx2,
    /// Plain loops.
    Portable,
}

impl I8Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        if int8_available() {
            I8Kernel::Amx
        } else if vnni_available() {
            I8Kernel::Vnni
        } else if crate::cpu::avx2_fma() {
            I8Kernel::Avx2
        } else {
            I8Kernel::Portable
        }
    }

    /// Every kernel this CPU runs.
    pub fn available() -> Vec<Self> {
        let mut all = vec![I8Kernel::Portable];
        if crate::cpu::avx2_fma() {
            all.push(I8Kernel::Avx2);
        }
        if vnni_available() {
            all.push(I8Kernel::Vnni);
        }
        if int8_available() {
            all.push(I8Kernel::Amx);
        }
        all
    }
}

/// Whether the CPU has AVX-512 VNNI (with the AVX-512 F / BW it builds on).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `act(x W^T + b)` for `x [N, I]` (row-major f32), giving `[N, O]`, on the fastest
/// kernel this CPU runs ([`I8Kernel::best`]; all give the same result).
pub fn linear_i8(x: &[f32], n: usize, w: &PackedI8, act: Option<Activation>) -> Vec<f32> {
    let q = quantize_rows(x, n, w.inputs, w.depth);
    linear_quantized(&q, n, w, act, I8Kernel::best())
}

/// The product of rows already quantized ([`quantize_rows`] with `w`'s depth) on `kernel`
/// (which the CPU must run: see [`I8Kernel::available`]).
pub fn linear_quantized(
    q: &QuantRows,
    n: usize,
    w: &PackedI8,
    act: Option<Activation>,
    kernel: I8Kernel,
) -> Vec<f32> {
    assert!(
        I8Kernel::available().contains(&kernel),
        "the {kernel:?} int8 kernel is not available on this CPU"
    );
    assert_eq!(q.depth, w.depth, "linear_quantized: depth");
    assert!(q.scale.len() == n, "linear_quantized: rows");
    let mut y: Vec<f32> = Vec::with_capacity(n * w.outputs);
    let out = SendPtr(y.as_mut_ptr());
    super::for_each_block(
        n.div_ceil(BLOCK),
        w.bias.len() / BLOCK,
        BLOCK * w.depth,
        // SAFETY: the kernel's instructions are available (asserted); blocks write
        // disjoint parts of `y`; pointers stay inside the padded buffers.
        |rb, cols| unsafe { block_row(kernel, q, n, w, rb, cols, act, SendPtr(out.get())) },
    );
    // SAFETY: every element of `y [N, O]` was written (by one block's epilogue, through the
    // raw pointer into the reserved capacity).
    unsafe { y.set_len(n * w.outputs) };
    y
}

/// Output row block `rb` × column blocks `cols` on `kernel`.
///
/// # Safety
/// The CPU runs `kernel`; `q` holds row block `rb` (padded) with `w`'s depth; `y` holds
/// `n × O` and no other thread writes these blocks.
#[allow(clippy::too_many_arguments)]
unsafe fn block_row(
    kernel: I8Kernel,
    q: &QuantRows,
    n: usize,
    w: &PackedI8,
    rb: usize,
    cols: std::ops::Range<usize>,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    match kernel {
        I8Kernel::Amx => block_row_amx(q, n, w, rb, cols, act, y),
        I8Kernel::Vnni => block_row_vnni(q, n, w, rb, cols, act, y),
        I8Kernel::Avx2 => block_row_avx2(q, n, w, rb, cols, act, y),
        I8Kernel::Portable => block_row_portable(q, n, w, rb, cols, act, y),
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<super::rows::GroupScratch<QuantRows>> =
        Default::default();
}

impl super::rows::GroupProduct for PackedI8 {
    type Rows = QuantRows;

    fn with_scratch<R>(f: impl FnOnce(&mut super::rows::GroupScratch<QuantRows>) -> R) -> R {
        SCRATCH.with_borrow_mut(f)
    }

    fn inputs(&self) -> usize {
        self.inputs
    }

    fn outputs(&self) -> usize {
        self.outputs
    }

    unsafe fn group_product(
        &self,
        x: &[f32],
        rows: usize,
        blocks: usize,
        act: Option<Activation>,
        q: &mut QuantRows,
        y: *mut f32,
    ) {
        let (inputs, depth) = (self.inputs, self.depth);
        q.depth = depth;
        super::rows::scratch(&mut q.data, blocks * BLOCK * depth);
        q.scale.resize(rows, 1.0);
        q.zero.resize(rows, 0);
        // `quantize_rows`'s rows.
        for (((d, s), sc), zp) in q
            .data
            .chunks_mut(depth)
            .zip(x.chunks(inputs))
            .zip(&mut q.scale)
            .zip(&mut q.zero)
        {
            (*sc, *zp) = quantize_row(s, &mut d[..inputs]);
            d[inputs..].fill(0);
        }
        let kernel = I8Kernel::best();
        for cb in 0..self.bias.len() / BLOCK {
            for rb in 0..blocks {
                block_row(kernel, q, rows, self, rb, cb..cb + 1, act, SendPtr(y));
            }
        }
    }
}

/// [`linear_i8`] on a tensor `x [N, I]` (f32), giving `[N, O]` f32.
pub fn linear_packed(x: &Tensor, w: &PackedI8, act: Option<Activation>) -> Result<Tensor> {
    let (n, i) = x.dims2()?;
    if i != w.inputs || x.dtype() != DType::F32 {
        bail!(
            "int8 linear: input {:?} {:?} does not fit weight [{}, {}]",
            x.dims(),
            x.dtype(),
            w.outputs,
            w.inputs
        );
    }
    let y = with_slice::<f32, _>(x, |xs| linear_i8(xs, n, w, act))?;
    Tensor::from_vec(y, (n, w.outputs), x.device())
}

/// Scales the i32 block `acc [BLOCK, BLOCK]` (rows of row block `rb`, columns from `c0`)
/// back to f32 into `y`, adding the bias and applying `act`.
///
/// # Safety
/// `y` holds `n × O` values and no other thread writes this block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn epilogue(
    acc: &[i32; BLOCK * BLOCK],
    q: &QuantRows,
    n: usize,
    w: &PackedI8,
    rb: usize,
    c0: usize,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return epilogue_avx512(acc, q, n, w, rb, c0, act, y);
    }
    let rows = (n - rb * BLOCK).min(BLOCK);
    let width = (w.outputs - c0).min(BLOCK);
    let (sw, sums, bias) = (
        &w.scale[c0..c0 + width],
        &w.sums[c0..c0 + width],
        &w.bias[c0..c0 + width],
    );
    let mut buf = [0f32; BLOCK];
    for r in 0..rows {
        let row = rb * BLOCK + r;
        let (sx, zx) = (q.scale[row], q.zero[row]);
        let a = &acc[r * BLOCK..r * BLOCK + width];
        let dst = &mut buf[..width];
        for c in 0..width {
            dst[c] = (a[c] - zx * sums[c]) as f32 * (sx * sw[c]) + bias[c];
        }
        if let Some(act) = act {
            crate::activation::activate_reduced(act, dst);
        }
        // `y` is not initialised yet: written through the raw pointer only.
        std::ptr::copy_nonoverlapping(dst.as_ptr(), y.get().add(row * w.outputs + c0), width);
    }
}

/// [`epilogue`] in 16-lane registers: the same operations per element (an i32 multiply
/// and subtraction, the conversion, two f32 multiplies and an add), so the same bits, with
/// GELU applied before the (masked) store and no staging row to copy.
///
/// # Safety
/// AVX-512 F must be available; as [`epilogue`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn epilogue_avx512(
    acc: &[i32; BLOCK * BLOCK],
    q: &QuantRows,
    n: usize,
    w: &PackedI8,
    rb: usize,
    c0: usize,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    use std::arch::x86_64::*;
    let ep = RowEpilogue::new(w, c0, act);
    for r in 0..(n - rb * BLOCK).min(BLOCK) {
        let a = [0, 1]
            .map(|h| _mm512_loadu_si512(acc.as_ptr().add(r * BLOCK + 16 * h) as *const __m512i));
        ep.row(a, q, rb * BLOCK + r, y);
    }
}

/// One column block's epilogue constants in registers, applied a row of 2 × 16 i32 sums
/// at a time ([`epilogue_avx512`], and [`block_row_vnni`] straight from its accumulators).
/// Only for functions compiled with AVX-512 F (its methods are inlined into them).
#[cfg(target_arch = "x86_64")]
struct RowEpilogue {
    sw: [std::arch::x86_64::__m512; 2],
    bias: [std::arch::x86_64::__m512; 2],
    sums: [std::arch::x86_64::__m512i; 2],
    masks: [std::arch::x86_64::__mmask16; 2],
    width: usize,
    outputs: usize,
    c0: usize,
    act: Option<Activation>,
}

#[cfg(target_arch = "x86_64")]
impl RowEpilogue {
    /// The constants of the column block starting at `c0`.
    ///
    /// # Safety
    /// AVX-512 F must be available; `c0` starts a column block of `w`.
    #[inline(always)]
    unsafe fn new(w: &PackedI8, c0: usize, act: Option<Activation>) -> Self {
        use std::arch::x86_64::*;
        let width = (w.outputs - c0).min(BLOCK);
        // The padded per-channel vectors hold whole blocks.
        let load = |v: &[f32], h: usize| _mm512_loadu_ps(v.as_ptr().add(c0 + 16 * h));
        let sums = |h: usize| _mm512_loadu_si512(w.sums.as_ptr().add(c0 + 16 * h) as *const _);
        RowEpilogue {
            sw: [load(&w.scale, 0), load(&w.scale, 1)],
            bias: [load(&w.bias, 0), load(&w.bias, 1)],
            sums: [sums(0), sums(1)],
            masks: super::column_masks(width),
            width,
            outputs: w.outputs,
            c0,
            act,
        }
    }

    /// Scales the sums `a` of output row `row` (its two 16-column halves) into `y`.
    ///
    /// # Safety
    /// AVX-512 F must be available; `row < N` of `y [N, O]`, which no other thread writes
    /// at this block.
    #[inline(always)]
    unsafe fn row(
        &self,
        a: [std::arch::x86_64::__m512i; 2],
        q: &QuantRows,
        row: usize,
        y: SendPtr<f32>,
    ) {
        use std::arch::x86_64::*;
        let (sx, zx) = (_mm512_set1_ps(q.scale[row]), _mm512_set1_epi32(q.zero[row]));
        let dst = y.get().add(row * self.outputs + self.c0);
        let gelu = self.act == Some(Activation::Gelu);
        for (h, a) in a.into_iter().enumerate() {
            if self.masks[h] == 0 {
                continue;
            }
            let centred = _mm512_sub_epi32(a, _mm512_mullo_epi32(zx, self.sums[h]));
            let v = _mm512_mul_ps(_mm512_cvtepi32_ps(centred), _mm512_mul_ps(sx, self.sw[h]));
            let mut v = _mm512_add_ps(v, self.bias[h]);
            if gelu {
                v = crate::activation::gelu_avx512(v);
            }
            _mm512_mask_storeu_ps(dst.add(16 * h), self.masks[h], v);
        }
        if let Some(act) = self.act.filter(|_| !gelu) {
            crate::activation::activate_reduced(
                act,
                std::slice::from_raw_parts_mut(dst, self.width),
            );
        }
    }
}

/// Output row block `rb` × column blocks `cols` on AMX int8 tiles.
///
/// # Safety
/// AMX int8 must be available; `q` and `w` have the same depth; `y` holds `n × O`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_row_amx(
    q: &QuantRows,
    n: usize,
    w: &PackedI8,
    rb: usize,
    cols: std::ops::Range<usize>,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    let kb = w.depth / DEPTH;
    let a0 = q.data.as_ptr().add(rb * BLOCK * w.depth);
    let a1 = a0.add(16 * w.depth);
    let mut acc = [0i32; BLOCK * BLOCK];
    std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    for cb in cols {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let b0 = w.tiles.as_ptr().add(2 * cb * kb * TILE);
        let b1 = b0.add(kb * TILE);
        for k in 0..kb {
            tile_load!("4", a0.add(k * DEPTH), w.depth);
            tile_load!("5", a1.add(k * DEPTH), w.depth);
            tile_load!("6", b0.add(k * TILE), 64usize);
            tile_load!("7", b1.add(k * TILE), 64usize);
            std::arch::asm!(
                "tdpbusd tmm0, tmm4, tmm6",
                "tdpbusd tmm1, tmm4, tmm7",
                "tdpbusd tmm2, tmm5, tmm6",
                "tdpbusd tmm3, tmm5, tmm7",
                options(nostack, nomem),
            );
        }
        let p = acc.as_mut_ptr();
        let stride = BLOCK * 4;
        tile_store!("0", p, stride);
        tile_store!("1", p.add(16), stride);
        tile_store!("2", p.add(16 * BLOCK), stride);
        tile_store!("3", p.add(16 * BLOCK + 16), stride);
        epilogue(&acc, q, n, w, rb, cb * BLOCK, act, y);
    }
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_row_amx(
    _: &QuantRows,
    _: usize,
    _: &PackedI8,
    _: usize,
    _: std::ops::Range<usize>,
    _: Option<Activation>,
    _: SendPtr<f32>,
) {
    unreachable!("AMX is x86-64 only")
}

/// Rows of `x` one VNNI pass keeps in registers (× 2 vectors of 16 outputs).
const VNNI_ROWS: usize = 8;

/// [`block_row_amx`]'s integer sums with AVX-512 VNNI: for each 4-input group, the tile row
/// of 16 outputs × 4 int8 weights is one vector, each row's 4 uint8 inputs are broadcast to
/// every lane, and `VPDPBUSD` adds the 16 four-term dot products; 8 rows × 32 outputs of
/// accumulators stay in registers over the whole depth and go through the epilogue from
/// there. Passes of rows past `N` (the padding of a short last block) are skipped.
///
/// # Safety
/// AVX-512 F / BW / VNNI must be available; `q` and `w` have the same depth; `y` holds
/// `n × O`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_row_vnni(
    q: &QuantRows,
    n: usize,
    w: &PackedI8,
    rb: usize,
    cols: std::ops::Range<usize>,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    use std::arch::x86_64::*;
    let kb = w.depth / DEPTH;
    let rows = (n - rb * BLOCK).min(BLOCK);
    for cb in cols {
        let b0 = w.tiles.as_ptr().add(2 * cb * kb * TILE);
        let b1 = b0.add(kb * TILE);
        let ep = RowEpilogue::new(w, cb * BLOCK, act);
        for r0 in (0..rows).step_by(VNNI_ROWS) {
            let a = q.data.as_ptr().add((rb * BLOCK + r0) * w.depth);
            let mut c0 = [_mm512_setzero_si512(); VNNI_ROWS];
            let mut c1 = [_mm512_setzero_si512(); VNNI_ROWS];
            for k in 0..kb {
                for quad in 0..DEPTH / 4 {
                    let off = k * TILE + quad * DEPTH;
                    let w0 = _mm512_loadu_si512(b0.add(off) as *const __m512i);
                    let w1 = _mm512_loadu_si512(b1.add(off) as *const __m512i);
                    let col = k * DEPTH + quad * 4;
                    for r in 0..VNNI_ROWS {
                        let x4 = (a.add(r * w.depth + col) as *const i32).read_unaligned();
                        let x = _mm512_set1_epi32(x4);
                        c0[r] = _mm512_dpbusd_epi32(c0[r], x, w0);
                        c1[r] = _mm512_dpbusd_epi32(c1[r], x, w1);
                    }
                }
            }
            for r in 0..(rows - r0).min(VNNI_ROWS) {
                ep.row([c0[r], c1[r]], q, rb * BLOCK + r0 + r, y);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_row_vnni(
    _: &QuantRows,
    _: usize,
    _: &PackedI8,
    _: usize,
    _: std::ops::Range<usize>,
    _: Option<Activation>,
    _: SendPtr<f32>,
) {
    unreachable!("VNNI is x86-64 only")
}

/// Rows of `x` per AVX2 register block (four accumulators of 8 lanes per row).
const AVX2_ROWS: usize = 3;

/// Output row block `rb` × column blocks `cols` with AVX2: both operands widened to i16 (the
/// block's 32 rows of `x` once per call, each column block's two tiles once per block), then
/// per tile row `VPMADDWD` of a row's 4 values of `x` (repeated across the vector) with 4
/// outputs × 4 weights gives per output two exact i32 pair sums, added up over the depth
/// and then to each other — the integer sums of the other kernels.
///
/// # Safety
/// AVX2 must be available; `q` and `w` have the same depth; `y` holds `n × O`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_row_avx2(
    q: &QuantRows,
    n: usize,
    w: &PackedI8,
    rb: usize,
    cols: std::ops::Range<usize>,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    let kb = w.depth / DEPTH;
    let x16: Vec<i16> = q.data[rb * BLOCK * w.depth..][..BLOCK * w.depth]
        .iter()
        .map(|&v| v as i16)
        .collect();
    let mut w16 = vec![0i16; 2 * kb * TILE];
    let mut acc = [0i32; BLOCK * BLOCK];
    for cb in cols {
        let tiles = &w.tiles[2 * cb * kb * TILE..][..2 * kb * TILE];
        w16.iter_mut().zip(tiles).for_each(|(d, &v)| *d = v as i16);
        for half in 0..2 {
            let t = w16.as_ptr().add(half * kb * TILE);
            let mut r0 = 0;
            while r0 < BLOCK {
                let rows = (BLOCK - r0).min(AVX2_ROWS);
                let x = x16.as_ptr().add(r0 * w.depth);
                let dst = acc.as_mut_ptr().add(r0 * BLOCK + 16 * half);
                match rows {
                    3 => rows_avx2::<3>(x, w.depth, t, kb, dst),
                    2 => rows_avx2::<2>(x, w.depth, t, kb, dst),
                    _ => rows_avx2::<1>(x, w.depth, t, kb, dst),
                }
                r0 += rows;
            }
        }
        epilogue(&acc, q, n, w, rb, cb * BLOCK, act, y);
    }
}

/// `R` rows of widened `x` (row stride `depth`) against one widened column tile group `t`
/// (`kb` tiles of 16 rows × 16 outputs × 4): the 16 outputs' sums into `dst` (row stride
/// [`BLOCK`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows_avx2<const R: usize>(
    x: *const i16,
    depth: usize,
    t: *const i16,
    kb: usize,
    dst: *mut i32,
) {
    use std::arch::x86_64::*;
    // c[r][v]: outputs 4v..4v + 4 of the tile, two partial sums each.
    let mut c = [[_mm256_setzero_si256(); 4]; R];
    for k in 0..kb {
        for quad in 0..DEPTH / 4 {
            let row = t.add(k * TILE + quad * DEPTH);
            let col = k * DEPTH + quad * 4;
            for (r, c) in c.iter_mut().enumerate() {
                // The row's 4 values of x, repeated in each 64-bit lane.
                let xr =
                    _mm256_set1_epi64x((x.add(r * depth + col) as *const i64).read_unaligned());
                for (v, c) in c.iter_mut().enumerate() {
                    let wv = _mm256_loadu_si256(row.add(16 * v) as *const __m256i);
                    *c = _mm256_add_epi32(*c, _mm256_madd_epi16(xr, wv));
                }
            }
        }
    }
    for (r, c) in c.iter().enumerate() {
        let mut lanes = [0i32; 32];
        for (v, c) in c.iter().enumerate() {
            _mm256_storeu_si256(lanes.as_mut_ptr().add(8 * v) as *mut __m256i, *c);
        }
        for o in 0..16 {
            *dst.add(r * BLOCK + o) = lanes[2 * o] + lanes[2 * o + 1];
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_row_avx2(
    _: &QuantRows,
    _: usize,
    _: &PackedI8,
    _: usize,
    _: std::ops::Range<usize>,
    _: Option<Activation>,
    _: SendPtr<f32>,
) {
    unreachable!("AVX2 is x86-64 only")
}

/// [`block_row_amx`]'s integer sums by plain loops over the same packed buffers.
///
/// # Safety
/// `q` and `w` have the same depth; `y` holds `n × O`.
unsafe fn block_row_portable(
    q: &QuantRows,
    n: usize,
    w: &PackedI8,
    rb: usize,
    cols: std::ops::Range<usize>,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    let kb = w.depth / DEPTH;
    let mut acc = [0i32; BLOCK * BLOCK];
    for cb in cols {
        acc.fill(0);
        for half in 0..2 {
            let t = 2 * cb + half;
            for k in 0..kb {
                let tile = &w.tiles[(t * kb + k) * TILE..(t * kb + k + 1) * TILE];
                for r in 0..BLOCK {
                    let a = &q.data[(rb * BLOCK + r) * w.depth + k * DEPTH..][..DEPTH];
                    for (quad, wrow) in a.chunks(4).zip(tile.chunks(DEPTH)) {
                        for c in 0..16 {
                            let s: i32 = quad
                                .iter()
                                .zip(&wrow[c * 4..c * 4 + 4])
                                .map(|(&x, &v)| x as i32 * v as i32)
                                .sum();
                            acc[r * BLOCK + half * 16 + c] += s;
                        }
                    }
                }
            }
        }
        epilogue(&acc, q, n, w, rb, cb * BLOCK, act, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::lcg;

    fn data(n: usize, o: usize, i: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut s = 11u64;
        let x = (0..n * i).map(|_| lcg(&mut s) + 0.2).collect();
        let w = (0..o * i).map(|_| lcg(&mut s) * 0.1).collect();
        let b = (0..o).map(|_| lcg(&mut s)).collect();
        (x, w, b)
    }

    /// Both kernels against the f64 product of the dequantized operands, which they must
    /// reproduce up to f32 rounding of the final scaling; and the dequantized operands
    /// against the originals (half a quantization step).
    fn check(n: usize, o: usize, i: usize, act: Option<Activation>) {
        let (x, w, b) = data(n, o, i);
        let packed = PackedI8::quantize(&w, &b, o, i);
        let q = quantize_rows(&x, n, i, packed.depth);
        for r in 0..n {
            for k in 0..i {
                let back = q.scale[r] * (q.data[r * q.depth + k] as i32 - q.zero[r]) as f32;
                assert!((back - x[r * i + k]).abs() <= 0.5001 * q.scale[r]);
            }
        }
        for c in 0..o {
            for k in 0..i {
                let back = packed.scale(c) * packed.value(c, k) as f32;
                assert!((back - w[c * i + k]).abs() <= 0.5001 * packed.scale(c));
            }
        }
        let kernels = I8Kernel::available();
        eprintln!("int8 kernels on this CPU: {kernels:?}");
        let portable = linear_quantized(&q, n, &packed, act, I8Kernel::Portable);
        for kernel in kernels {
            let y = linear_quantized(&q, n, &packed, act, kernel);
            // The same integer sums and the same epilogue: bit-identical results.
            assert_eq!(y, portable, "{kernel:?} differs from the portable kernel");
            let mut worst = 0f64;
            for r in 0..n {
                for c in 0..o {
                    let mut acc = 0f64;
                    for k in 0..i {
                        let xv = q.data[r * q.depth + k] as f64 - q.zero[r] as f64;
                        acc += xv * packed.value(c, k) as f64;
                    }
                    let mut v =
                        (acc * q.scale[r] as f64 * packed.scale(c) as f64 + b[c] as f64) as f32;
                    if let Some(a) = act {
                        crate::activation::activate_reduced(a, std::slice::from_mut(&mut v));
                    }
                    worst = worst.max((v as f64 - y[r * o + c] as f64).abs());
                }
            }
            println!("int8 linear {n}x{i} -> {o} ({kernel:?}): max abs diff {worst:.2e}");
            assert!(worst < 1e-5, "{kernel:?}: max abs diff {worst}");
        }
    }

    #[test]
    fn int8_matches_dequantized_reference_whole_tiles() {
        check(64, 96, 128, None);
    }

    #[test]
    fn int8_matches_dequantized_reference_ragged_and_fused() {
        check(37, 50, 45, Some(Activation::Gelu));
        check(1, 7, 3, None);
        check(70, 33, 130, Some(Activation::Relu));
    }

    /// The quantized product stays close to the f32 product it replaces.
    #[test]
    fn int8_is_close_to_f32() {
        let (n, o, i) = (48, 64, 384);
        let (x, w, b) = data(n, o, i);
        let y = linear_i8(&x, n, &PackedI8::quantize(&w, &b, o, i), None);
        let (mut err, mut norm) = (0f64, 0f64);
        for r in 0..n {
            for c in 0..o {
                let exact: f64 = b[c] as f64
                    + (0..i)
                        .map(|k| x[r * i + k] as f64 * w[c * i + k] as f64)
                        .sum::<f64>();
                err += (exact - y[r * o + c] as f64).powi(2);
                norm += exact * exact;
            }
        }
        let rel = (err / norm).sqrt();
        println!("int8 vs f32 relative error {rel:.2e}");
        assert!(rel < 1e-2, "relative error {rel}");
    }

    #[test]
    fn constant_and_zero_rows_quantize_exactly() {
        let x = [0.0f32, 0.0, 0.0, 2.0, 2.0, 2.0, -1.0, 0.5, 0.25];
        let q = quantize_rows(&x, 3, 3, DEPTH);
        for r in 0..3 {
            for k in 0..3 {
                let back = q.scale[r] * (q.data[r * DEPTH + k] as i32 - q.zero[r]) as f32;
                assert!(
                    (back - x[r * 3 + k]).abs() <= 0.5 * q.scale[r] + 1e-7,
                    "{r} {k}"
                );
            }
        }
        assert_eq!(q.data[0..3], [0, 0, 0]);
        // A row of equal positive values keeps them at the top of the range.
        assert_eq!(q.data[DEPTH..DEPTH + 3], [255, 255, 255]);
    }
}
