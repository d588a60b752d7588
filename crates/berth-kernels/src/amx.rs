//! bf16 matrix products on Intel AMX tiles (inference): `y = x W^T + b` with `x` rounded to
//! bf16 per call, `W` packed to bf16 once, f32 accumulation and f32 output. On a CPU without
//! AMX but with AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake) the same packed
//! weights feed `VDPBF16PS` instead ([`Bf16Kernel::Avx512`]): a packed tile row — 16 outputs'
//! `(k, k+1)` pairs — is exactly one 512-bit operand of that instruction.
//!
//! A tile holds 16 rows of 64 bytes. `TDPBF16PS c, a, b` adds to the 16 × 16 f32 tile `c` the
//! product of `a` (16 rows × 32 bf16 of `x`) and `b` (32 × 16 bf16 of `W^T`, stored as 16 rows
//! of 16 pairs: row `r` holds `(W[o][2r], W[o][2r+1])` for the tile's 16 outputs `o`). The
//! kernel keeps a 32 × 32 block of `y` in four tiles, so each pair of loaded `x` tiles and
//! `W` tiles feeds four products.
//!
//! Tiles need the kernel's permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`available`]
//! asks for it once and says whether the CPU and the OS allow AMX. Stable Rust has no AMX
//! intrinsics, so the instructions are written as inline assembly; the compiler never uses
//! tile registers itself, so their contents survive between `asm!` blocks.
use std::sync::OnceLock;

use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

use crate::cpu::{with_slice, SendPtr};
use crate::Activation;

/// Rows and columns of the output block one kernel call computes.
const BLOCK: usize = 32;
/// bf16 values of `x` in one tile row (the inner-product depth of one tile product).
const DEPTH: usize = 32;
/// u16 values in one packed `W` tile (16 rows × 32 bf16).
const TILE: usize = 16 * DEPTH;

/// What the CPU and OS allow of AMX.
#[derive(Debug, Clone, Copy, Default)]
struct Support {
    bf16: bool,
    int8: bool,
}

fn support() -> Support {
    static SUPPORT: OnceLock<Support> = OnceLock::new();
    *SUPPORT.get_or_init(detect)
}

/// Whether this CPU and OS run AMX bf16 tiles (checked, and permission asked, once).
pub fn available() -> bool {
    support().bf16
}

/// The kernels that run bf16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`TDPBF16PS`).
    Amx,
    /// AVX-512 BF16 (`VDPBF16PS`), sixteen outputs per register.
    Avx512,
    /// AVX-512 F FMAs on the bf16 operands widened to f32 (exact: a bf16 value is the top
    /// half of an f32): for CPUs whose `VDPBF16PS` is slower than their f32 FMAs (measured:
    /// Intel Xeon without AMX, a quarter of the FMA instruction rate, half its flops).
    Avx512Fma,
}

impl Bf16Kernel {
    /// The fastest bf16 kernel this CPU runs, if any.
    pub fn best() -> Option<Self> {
        if available() {
            Some(Bf16Kernel::Amx)
        } else if avx512_bf16_available() && dot_outruns_fma() {
            Some(Bf16Kernel::Avx512)
        } else if avx512_fma_available() {
            Some(Bf16Kernel::Avx512Fma)
        } else {
            None
        }
    }

    /// Every bf16 kernel this CPU runs.
    pub fn all() -> Vec<Self> {
        let mut all = Vec::new();
        if avx512_fma_available() {
            all.push(Bf16Kernel::Avx512Fma);
        }
        if avx512_bf16_available() {
            all.push(Bf16Kernel::Avx512);
        }
        if available() {
            all.push(Bf16Kernel::Amx);
        }
        all
    }
}

/// Whether the CPU has AVX-512 BF16 (with the AVX-512 F / BW it builds on).
pub fn avx512_bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512 F and FMA ([`Bf16Kernel::Avx512Fma`]).
fn avx512_fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU's `VDPBF16PS` does more flops per second than its f32 FMAs, by a margin
/// (measured once: a few microseconds of twelve independent chains of each instruction, the
/// best of several tries). Zen 5 gives ~1.9 (two bf16 products per lane at the FMA's rate);
/// an Intel Xeon without AMX gives ~0.5. The margin keeps CPUs near 1 on the FMA kernel
/// every time, so a process's choice (and its output bits) does not flip with the load.
fn dot_outruns_fma() -> bool {
    static FASTER: OnceLock<bool> = OnceLock::new();
    *FASTER.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if !avx512_bf16_available() || !avx512_fma_available() {
                return false;
            }
            let best = |f: &dyn Fn() -> f32| {
                (0..7)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        std::hint::black_box(f());
                        start.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min)
            };
            // SAFETY: both features were checked above.
            let dot = best(&|| unsafe { chains::dot() });
            let fma = best(&|| unsafe { chains::fma() });
            // Each `VDPBF16PS` does 64 flops, each FMA 32, and both loops run as many.
            let ratio = (64.0 / dot) / (32.0 / fma);
            ratio >= 1.3
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The instruction-rate probes of [`dot_outruns_fma`].
#[cfg(target_arch = "x86_64")]
mod chains {
    use std::arch::x86_64::*;

    const STEPS: usize = 2048;

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn dot() -> f32 {
        let mut acc = [_mm512_set1_ps(0.5); 12];
        let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80));
        let y = std::hint::black_box(x);
        for _ in 0..STEPS {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, x, y);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn fma() -> f32 {
        let mut acc = [_mm512_set1_ps(0.5); 12];
        let x = std::hint::black_box(_mm512_set1_ps(1.0));
        for _ in 0..STEPS {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, x);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }
}

/// Whether bf16 products run here at all (AMX tiles or AVX-512).
pub fn bf16_available() -> bool {
    Bf16Kernel::best().is_some()
}

/// Whether this CPU and OS run AMX int8 tiles (`TDPBUSD`; see [`int8`]).
pub fn int8_available() -> bool {
    support().int8
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> Support {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8; AVX512-BF16 for
    // the conversions is CPUID.(7,1):EAX bit 5.
    #[allow(unused_unsafe)]
    let (leaf7, leaf7_1) = unsafe { (__cpuid_count(7, 0), __cpuid_count(7, 1)) };
    #[allow(unused_unsafe)]
    let osxsave = unsafe { __cpuid_count(1, 0) }.ecx & (1 << 27) != 0;
    if leaf7.edx & (1 << 24) == 0
        || !osxsave
        || !std::arch::is_x86_feature_detected!("avx512f")
        || !std::arch::is_x86_feature_detected!("avx512bw")
    {
        return Support::default();
    }
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA) must be enabled by the OS.
    if unsafe { _xgetbv(0) } & (0b11 << 17) != 0b11 << 17 {
        return Support::default();
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain syscall that changes only this process's permitted xsave features.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    Support {
        bf16: ret == 0 && leaf7.edx & (1 << 22) != 0 && leaf7_1.eax & (1 << 5) != 0,
        int8: ret == 0 && leaf7.edx & (1 << 25) != 0,
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> Support {
    Support::default()
}

/// Rounds an f32 to bf16, to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
#[inline(always)]
pub fn from_bf16(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

/// A weight matrix `W [O, I]` and bias `[O]` packed for [`linear_bf16`]: `W` in bf16 tiles,
/// zero-padded to whole tiles; the bias in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBf16 {
    outputs: usize,
    inputs: usize,
    /// `inputs` rounded up to [`DEPTH`].
    depth: usize,
    /// Tiles ordered `[O / 16][I / 32]`, each 16 rows of 16 `(k, k+1)` pairs.
    tiles: Vec<u16>,
    /// `[O rounded up to BLOCK]`.
    bias: Vec<f32>,
}

impl PackedBf16 {
    /// Packs `w [O, I]` (row-major) and `b [O]`.
    pub fn pack(w: &[f32], b: &[f32], outputs: usize, inputs: usize) -> Self {
        assert_eq!(w.len(), outputs * inputs, "PackedBf16::pack: weight size");
        assert_eq!(b.len(), outputs, "PackedBf16::pack: bias size");
        let depth = inputs.div_ceil(DEPTH) * DEPTH;
        let out_pad = outputs.div_ceil(BLOCK) * BLOCK;
        let (ob, kb) = (out_pad / 16, depth / DEPTH);
        let mut tiles = vec![0u16; ob * kb * TILE];
        for o in 0..outputs {
            let (t, col) = (o / 16, o % 16);
            for k in 0..inputs {
                let (blk, within) = (k / DEPTH, k % DEPTH);
                let (row, half) = (within / 2, within % 2);
                tiles[(t * kb + blk) * TILE + row * DEPTH + col * 2 + half] =
                    to_bf16(w[o * inputs + k]);
            }
        }
        let mut bias = vec![0f32; out_pad];
        bias[..outputs].copy_from_slice(b);
        PackedBf16 {
            outputs,
            inputs,
            depth,
            tiles,
            bias,
        }
    }

    /// Packs the tensors `w [O, I]` and `b [O]` (f32 or f64).
    pub fn from_tensors(w: &Tensor, b: &Tensor) -> Result<Self> {
        let (w, b, o, i) = weight_and_bias(w, b, "PackedBf16")?;
        Ok(Self::pack(&w, &b, o, i))
    }

    /// `O`.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `I`.
    pub fn inputs(&self) -> usize {
        self.inputs
    }
}

/// `x [N, I]` rounded to bf16 into rows of `depth` (zero-padded), `N` rounded up to [`BLOCK`].
pub fn pack_rows(x: &[f32], n: usize, inputs: usize, depth: usize) -> Vec<u16> {
    let rows = n.div_ceil(BLOCK) * BLOCK;
    let mut a = vec![0u16; rows * depth];
    a.par_chunks_mut(depth * BLOCK)
        .zip(x.par_chunks(inputs * BLOCK))
        .for_each(|(dst, src)| {
            for (d, s) in dst.chunks_mut(depth).zip(src.chunks(inputs)) {
                convert_row(s, &mut d[..inputs]);
            }
        });
    a
}

fn convert_row(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: the features were just detected.
        return unsafe { convert_row_avx512(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = to_bf16(*s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn convert_row_avx512(src: &[f32], dst: &mut [u16]) {
    // A plain loop the compiler vectorises with the features enabled here.
    for (d, s) in dst.iter_mut().zip(src) {
        let bits = s.to_bits();
        let rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
        *d = if s.is_nan() {
            ((bits >> 16) | 0x40) as u16
        } else {
            rounded as u16
        };
    }
}

/// `y [N, O] = act(x [N, I] W^T + b)` with `x` and `W` in bf16 and f32 accumulation, on the
/// fastest kernel here ([`Bf16Kernel::best`]); the activation runs on each 32 × 32 output
/// block while it is in L1. Panics when no bf16 kernel runs here ([`bf16_available`];
/// callers check first).
pub fn linear_bf16(x: &[f32], n: usize, w: &PackedBf16, act: Option<Activation>) -> Vec<f32> {
    let kernel = Bf16Kernel::best().expect("linear_bf16 needs AMX or AVX-512");
    linear_bf16_on(x, n, w, act, kernel)
}

/// [`linear_bf16`] on `kernel` (which the CPU must run: see [`Bf16Kernel::all`]).
pub fn linear_bf16_on(
    x: &[f32],
    n: usize,
    w: &PackedBf16,
    act: Option<Activation>,
    kernel: Bf16Kernel,
) -> Vec<f32> {
    assert!(
        Bf16Kernel::all().contains(&kernel),
        "the {kernel:?} bf16 kernel is not available on this CPU"
    );
    assert_eq!(x.len(), n * w.inputs, "linear_bf16: input size");
    let a = pack_rows(x, n, w.inputs, w.depth);
    let mut y: Vec<f32> = Vec::with_capacity(n * w.outputs);
    matmul_packed(&a, n, w, act, SendPtr(y.as_mut_ptr()), kernel);
    // SAFETY: every element of `y [N, O]` was written (through the raw pointer).
    unsafe { y.set_len(n * w.outputs) };
    y
}

/// [`linear_bf16`] on a tensor `x [N, I]` (f32), giving `[N, O]` f32.
pub fn linear_packed(x: &Tensor, w: &PackedBf16, act: Option<Activation>) -> Result<Tensor> {
    let (n, i) = x.dims2()?;
    if i != w.inputs || x.dtype() != DType::F32 {
        bail!(
            "bf16 linear: input {:?} {:?} does not fit weight [{}, {}]",
            x.dims(),
            x.dtype(),
            w.outputs,
            w.inputs
        );
    }
    if !bf16_available() {
        bail!("bf16 linear: this CPU has neither AMX bf16 tiles nor AVX-512 BF16");
    }
    let y = with_slice::<f32, _>(x, |xs| linear_bf16(xs, n, w, act))?;
    Tensor::from_vec(y, (n, w.outputs), x.device())
}

thread_local! {
    static SCRATCH: std::cell::RefCell<rows::GroupScratch<Vec<u16>>> = Default::default();
}

impl rows::GroupProduct for PackedBf16 {
    type Rows = Vec<u16>;

    fn with_scratch<R>(f: impl FnOnce(&mut rows::GroupScratch<Vec<u16>>) -> R) -> R {
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
        conv: &mut Vec<u16>,
        y: *mut f32,
    ) {
        let kernel = Bf16Kernel::best().expect("bf16 products need AMX or AVX-512");
        let (inputs, depth) = (self.inputs, self.depth);
        let a = rows::scratch(conv, blocks * BLOCK * depth);
        // `pack_rows`'s rows.
        for (d, s) in a.chunks_mut(depth).zip(x.chunks(inputs)).take(rows) {
            convert_row(s, &mut d[..inputs]);
            d[inputs..].fill(0);
        }
        if kernel == Bf16Kernel::Avx512Fma {
            // The group's rows widened once for all its column blocks.
            return WIDE.with_borrow_mut(|wide| {
                widen(&a[..rows * depth], wide);
                for cb in 0..self.bias.len() / BLOCK {
                    for rb in 0..blocks {
                        let x = wide.as_ptr().add(rb * BLOCK * depth);
                        block_row_wide(x, rows, self, rb, cb..cb + 1, act, SendPtr(y));
                    }
                }
            });
        }
        for cb in 0..self.bias.len() / BLOCK {
            for rb in 0..blocks {
                let y = SendPtr(y);
                match kernel {
                    Bf16Kernel::Amx => block_row(a, rows, self, rb, cb..cb + 1, act, y),
                    Bf16Kernel::Avx512 => block_row_avx512(a, rows, self, rb, cb..cb + 1, act, y),
                    Bf16Kernel::Avx512Fma => unreachable!("widened once above"),
                }
            }
        }
    }
}

/// The products for packed rows `a` (from [`pack_rows`]) into `y [N, O]` on `kernel`.
fn matmul_packed(
    a: &[u16],
    n: usize,
    w: &PackedBf16,
    act: Option<Activation>,
    out: SendPtr<f32>,
    kernel: Bf16Kernel,
) {
    for_each_block(
        n.div_ceil(BLOCK),
        w.bias.len() / BLOCK,
        BLOCK * w.depth * 2,
        |rb, cols| {
            // SAFETY: the kernel runs on this CPU (checked by the caller); blocks write
            // disjoint parts of `y`; every pointer stays inside the padded buffers.
            unsafe {
                match kernel {
                    Bf16Kernel::Amx => block_row(a, n, w, rb, cols, act, out),
                    Bf16Kernel::Avx512 => block_row_avx512(a, n, w, rb, cols, act, out),
                    Bf16Kernel::Avx512Fma => block_row_fma(a, n, w, rb, cols, act, out),
                }
            }
        },
    );
}

/// Runs `run(row_block, column_blocks)` over every block of an output of `row_blocks` ×
/// `col_blocks` blocks, in parallel, each block once. With enough rows each thread takes a
/// contiguous range of row blocks and walks the columns in chunks whose packed weights
/// (`panel_bytes` per column block, ~768 KB a chunk) stay in its L2 while its rows pass
/// them; with few rows (short batches) the columns are split as well.
pub(crate) fn for_each_block(
    row_blocks: usize,
    col_blocks: usize,
    panel_bytes: usize,
    run: impl Fn(usize, std::ops::Range<usize>) + Sync,
) {
    let threads = rayon::current_num_threads();
    if row_blocks >= 2 * threads {
        let chunk = ((768 << 10) / panel_bytes.max(1)).max(1);
        (0..threads).into_par_iter().for_each(|t| {
            let rows = row_blocks * t / threads..row_blocks * (t + 1) / threads;
            for c0 in (0..col_blocks).step_by(chunk) {
                for rb in rows.clone() {
                    run(rb, c0..(c0 + chunk).min(col_blocks));
                }
            }
        });
        return;
    }
    let col_chunks = (2 * threads)
        .div_ceil(row_blocks)
        .clamp(1, col_blocks.max(1));
    let per_chunk = col_blocks.div_ceil(col_chunks);
    (0..row_blocks * col_chunks)
        .into_par_iter()
        .for_each(|task| {
            let (rb, cc) = (task / col_chunks, task % col_chunks);
            run(rb, cc * per_chunk..((cc + 1) * per_chunk).min(col_blocks));
        });
}

/// `w [O, I]` and `b [O]` (f32 or f64) as f32 vectors with `(O, I)`, checked to fit.
pub(crate) fn weight_and_bias(
    w: &Tensor,
    b: &Tensor,
    who: &str,
) -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
    let (o, i) = w.dims2()?;
    if b.dims() != [o] {
        bail!(
            "{who}: weight {:?} and bias {:?} do not fit",
            w.dims(),
            b.dims()
        );
    }
    let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    Ok((flat(w)?, flat(b)?, o, i))
}

/// Tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

macro_rules! tile_load {
    ($t:literal, $ptr:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tileloadd tmm", $t, ", [{p} + {s} * 1]"),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack, readonly),
        )
    };
}

macro_rules! tile_store {
    ($t:literal, $ptr:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tilestored [{p} + {s} * 1], tmm", $t),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack),
        )
    };
}

pub mod int8;
pub(crate) mod mixed;
pub mod rows;

/// Output row block `rb` (32 rows) × column blocks `cols` (32 columns each).
///
/// # Safety
/// AMX must be available; `a` holds `rows_padded × depth` values; `y` holds `n × O`.
#[cfg(target_arch = "x86_64")]
unsafe fn block_row(
    a: &[u16],
    n: usize,
    w: &PackedBf16,
    rb: usize,
    cols: std::ops::Range<usize>,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    let kb = w.depth / DEPTH;
    let a_stride = w.depth * 2;
    let a0 = a.as_ptr().add(rb * BLOCK * w.depth);
    let a1 = a0.add(16 * w.depth);
    let rows = (n - rb * BLOCK).min(BLOCK);
    let o = w.outputs;
    let mut edge = [0f32; BLOCK * BLOCK];
    std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    for cb in cols {
        let c0 = cb * BLOCK;
        // Start from the bias: a stride-0 load repeats one row of 16 values.
        let bias = w.bias.as_ptr().add(c0);
        tile_load!("0", bias, 0usize);
        tile_load!("1", bias.add(16), 0usize);
        tile_load!("2", bias, 0usize);
        tile_load!("3", bias.add(16), 0usize);
        let b0 = w.tiles.as_ptr().add(2 * cb * kb * TILE);
        let b1 = b0.add(kb * TILE);
        for k in 0..kb {
            tile_load!("4", a0.add(k * DEPTH), a_stride);
            tile_load!("5", a1.add(k * DEPTH), a_stride);
            tile_load!("6", b0.add(k * TILE), 64usize);
            tile_load!("7", b1.add(k * TILE), 64usize);
            std::arch::asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem),
            );
        }
        let full = rows == BLOCK && c0 + BLOCK <= o;
        let (dst, stride) = if full {
            (y.get().add(rb * BLOCK * o + c0), o * 4)
        } else {
            (edge.as_mut_ptr(), BLOCK * 4)
        };
        let s = stride / 4;
        tile_store!("0", dst, stride);
        tile_store!("1", dst.add(16), stride);
        tile_store!("2", dst.add(16 * s), stride);
        tile_store!("3", dst.add(16 * s + 16), stride);
        let width = (o - c0).min(BLOCK);
        if !full {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(
                    edge.as_ptr().add(r * BLOCK),
                    y.get().add((rb * BLOCK + r) * o + c0),
                    width,
                );
            }
        }
        if let Some(act) = act {
            for r in 0..rows {
                let row = y.get().add((rb * BLOCK + r) * o + c0);
                crate::activation::activate_reduced(
                    act,
                    std::slice::from_raw_parts_mut(row, width),
                );
            }
        }
    }
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_row(
    _: &[u16],
    _: usize,
    _: &PackedBf16,
    _: usize,
    _: std::ops::Range<usize>,
    _: Option<Activation>,
    _: SendPtr<f32>,
) {
    unreachable!("AMX is x86-64 only")
}

/// Rows of `y` one AVX-512 BF16 register block holds (× 32 columns in two registers each:
/// 16 accumulators, two weight registers and a broadcast of `x`).
const ROWS_AVX: usize = 8;

/// [`block_row`] on AVX-512 BF16: for each 32-column block, groups of [`ROWS_AVX`] rows
/// keep their 8 × 32 outputs in registers (started from the bias) through the whole depth;
/// each packed tile row (16 outputs' `(k, k+1)` pairs) meets the broadcast pair
/// `(x[r][k], x[r][k+1])` of each row in one `VDPBF16PS`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; `a` holds `rows_padded × depth` values; `y`
/// holds `n × O`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn block_row_avx512(
    a: &[u16],
    n: usize,
    w: &PackedBf16,
    rb: usize,
    cols: std::ops::Range<usize>,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    use std::arch::x86_64::*;
    let kb = w.depth / DEPTH;
    let rows = (n - rb * BLOCK).min(BLOCK);
    let o = w.outputs;
    // `x` as (k, k+1) pairs: row r's pair p at `pairs[r * depth / 2 + p]`.
    let pairs = a.as_ptr().add(rb * BLOCK * w.depth) as *const u32;
    let row_pairs = w.depth / 2;
    for cb in cols {
        let c0 = cb * BLOCK;
        let width = (o - c0).min(BLOCK);
        let [m0, m1] = column_masks(width);
        let bias0 = _mm512_loadu_ps(w.bias.as_ptr().add(c0));
        let bias1 = _mm512_loadu_ps(w.bias.as_ptr().add(c0 + 16));
        let b0 = w.tiles.as_ptr().add(2 * cb * kb * TILE);
        let b1 = b0.add(kb * TILE);
        for g in (0..rows).step_by(ROWS_AVX) {
            let mut acc = [[bias0, bias1]; ROWS_AVX];
            let xs = pairs.add(g * row_pairs);
            for k in 0..kb {
                let (t0, t1) = (b0.add(k * TILE), b1.add(k * TILE));
                for p in 0..DEPTH / 2 {
                    let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                        t0.add(p * DEPTH) as *const __m512i
                    ));
                    let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                        t1.add(p * DEPTH) as *const __m512i
                    ));
                    let at = k * (DEPTH / 2) + p;
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                            *xs.add(r * row_pairs + at) as i32,
                        ));
                        acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
                    }
                }
            }
            // GELU on the registers (all rows' chains interleave; the same bits as
            // `activate_reduced`); other activations on the stored rows.
            let gelu = act == Some(Activation::Gelu);
            if gelu {
                for acc in acc.iter_mut() {
                    *acc = acc.map(|v| crate::activation::gelu_avx512(v));
                }
            }
            for (r, acc) in acc.iter().enumerate().take(rows - g) {
                let row = y.get().add((rb * BLOCK + g + r) * o + c0);
                _mm512_mask_storeu_ps(row, m0, acc[0]);
                if m1 != 0 {
                    _mm512_mask_storeu_ps(row.add(16), m1, acc[1]);
                }
                if let Some(act) = act.filter(|_| !gelu) {
                    crate::activation::activate_reduced(
                        act,
                        std::slice::from_raw_parts_mut(row, width),
                    );
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_row_avx512(
    _: &[u16],
    _: usize,
    _: &PackedBf16,
    _: usize,
    _: std::ops::Range<usize>,
    _: Option<Activation>,
    _: SendPtr<f32>,
) {
    unreachable!("AVX-512 BF16 is x86-64 only")
}

/// The store masks of a 32-column block's two 16-lane halves when `width` (≤ 32) columns
/// are live.
fn column_masks(width: usize) -> [u16; 2] {
    [
        ((1u32 << width.min(16)) - 1) as u16,
        ((1u64 << width.saturating_sub(16)) - 1) as u16,
    ]
}

/// Rows of `y` one [`block_row_fma`] register group holds: 12 × 32 outputs in 24
/// accumulators, beside the four widened weight registers.
const ROWS_FMA: usize = 12;

thread_local! {
    /// Rows of `x` widened to f32: a block's in [`block_row_fma`], a row group's in
    /// `PackedBf16::group_product`.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`block_row`] on AVX-512 F FMAs: the block's rows of `x` are widened to f32 once (a bf16
/// value shifted into the top half of an f32 is that value exactly), then
/// [`block_row_wide`] runs on them.
///
/// # Safety
/// The CPU must have AVX-512 F and FMA; `a` holds `rows_padded × depth` values; `y` holds
/// `n × O`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn block_row_fma(
    a: &[u16],
    n: usize,
    w: &PackedBf16,
    rb: usize,
    cols: std::ops::Range<usize>,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    let rows = (n - rb * BLOCK).min(BLOCK);
    WIDE.with_borrow_mut(|wide| {
        widen(&a[rb * BLOCK * w.depth..][..rows * w.depth], wide);
        block_row_wide(wide.as_ptr(), n, w, rb, cols, act, y)
    })
}

/// `dst[..src.len()]` = the bf16 values `src` as f32 (`src.len()` a multiple of 16).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen(src: &[u16], dst: &mut Vec<f32>) {
    use std::arch::x86_64::*;
    debug_assert!(src.len().is_multiple_of(16));
    if dst.len() < src.len() {
        dst.resize(src.len(), 0.0);
    }
    for i in (0..src.len()).step_by(16) {
        let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
        let f = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
        _mm512_storeu_si512(dst.as_mut_ptr().add(i) as *mut __m512i, f);
    }
}

/// The products of [`block_row_fma`] from rows already widened (`x`: the block's first row,
/// rows `depth` apart): for each 32-column block, groups of up to [`ROWS_FMA`] rows keep
/// their outputs in registers (started from the bias) through the whole depth. Each packed
/// tile row (16 outputs' `(k, k+1)` pairs) is split into the `k` weights (shifted up) and
/// the `k + 1` weights (low half cleared) and meets each row's broadcast `x[r][k]` and
/// `x[r][k + 1]` in FMAs. The products of bf16 values are exact in f32, so this differs
/// from `VDPBF16PS` only in the order of the f32 additions.
///
/// # Safety
/// As [`block_row_fma`], with `x` holding the block's rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn block_row_wide(
    x: *const f32,
    n: usize,
    w: &PackedBf16,
    rb: usize,
    cols: std::ops::Range<usize>,
    act: Option<Activation>,
    y: SendPtr<f32>,
) {
    use std::arch::x86_64::*;
    let (kb, depth) = (w.depth / DEPTH, w.depth);
    let rows = (n - rb * BLOCK).min(BLOCK);
    let o = w.outputs;
    let gelu = act == Some(Activation::Gelu);
    for cb in cols {
        let c0 = cb * BLOCK;
        let width = (o - c0).min(BLOCK);
        let [m0, m1] = column_masks(width);
        let panel = FmaPanel {
            b0: w.tiles.as_ptr().add(2 * cb * kb * TILE),
            kb,
            depth,
            bias: [
                _mm512_loadu_ps(w.bias.as_ptr().add(c0)),
                _mm512_loadu_ps(w.bias.as_ptr().add(c0 + 16)),
            ],
        };
        for g in (0..rows).step_by(ROWS_FMA) {
            let x = x.add(g * depth);
            let dst = y.get().add((rb * BLOCK + g) * o + c0);
            macro_rules! go {
                ($($r:literal)*) => {
                    match (rows - g).min(ROWS_FMA) {
                        $($r => fma_rows::<$r>(&panel, x, gelu, dst, o, [m0, m1]),)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(1 2 3 4 5 6 7 8 9 10 11 12);
            if let Some(act) = act.filter(|_| !gelu) {
                for r in 0..(rows - g).min(ROWS_FMA) {
                    crate::activation::activate_reduced(
                        act,
                        std::slice::from_raw_parts_mut(dst.add(r * o), width),
                    );
                }
            }
        }
    }
}

/// One 32-column block of the packed weights, for [`fma_rows`].
#[cfg(target_arch = "x86_64")]
struct FmaPanel {
    /// The block's first 16 columns' tiles (the next 16 follow `kb` tiles later).
    b0: *const u16,
    kb: usize,
    depth: usize,
    bias: [std::arch::x86_64::__m512; 2],
}

/// `R` rows (f32, `p.depth` apart, from `x`) × the panel's 32 columns into `dst` (row
/// stride `o`, column masks `m`), GELU applied on the registers when `gelu`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn fma_rows<const R: usize>(
    p: &FmaPanel,
    x: *const f32,
    gelu: bool,
    dst: *mut f32,
    o: usize,
    m: [u16; 2],
) {
    use std::arch::x86_64::*;
    let mut acc = [p.bias; R];
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let b1 = p.b0.add(p.kb * TILE);
    for kt in 0..p.kb {
        let (t0, t1) = (p.b0.add(kt * TILE), b1.add(kt * TILE));
        for q in 0..DEPTH / 2 {
            let w0 = _mm512_loadu_si512(t0.add(q * DEPTH) as *const __m512i);
            let w1 = _mm512_loadu_si512(t1.add(q * DEPTH) as *const __m512i);
            // Pair (k, k + 1) of each output: k in the low half, k + 1 in the high half.
            let even = [w0, w1].map(|v| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)));
            let odd = [w0, w1].map(|v| _mm512_castsi512_ps(_mm512_and_si512(v, high)));
            let k = kt * DEPTH + 2 * q;
            for (r, acc) in acc.iter_mut().enumerate() {
                let xe = _mm512_set1_ps(*x.add(r * p.depth + k));
                let xo = _mm512_set1_ps(*x.add(r * p.depth + k + 1));
                acc[0] = _mm512_fmadd_ps(xe, even[0], acc[0]);
                acc[1] = _mm512_fmadd_ps(xe, even[1], acc[1]);
                acc[0] = _mm512_fmadd_ps(xo, odd[0], acc[0]);
                acc[1] = _mm512_fmadd_ps(xo, odd[1], acc[1]);
            }
        }
    }
    if gelu {
        for acc in acc.iter_mut() {
            *acc = acc.map(|v| crate::activation::gelu_avx512(v));
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = dst.add(r * o);
        _mm512_mask_storeu_ps(row, m[0], acc[0]);
        if m[1] != 0 {
            _mm512_mask_storeu_ps(row.add(16), m[1], acc[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn widen(_: &[u16], _: &mut Vec<f32>) {
    unreachable!("AVX-512 is x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_row_wide(
    _: *const f32,
    _: usize,
    _: &PackedBf16,
    _: usize,
    _: std::ops::Range<usize>,
    _: Option<Activation>,
    _: SendPtr<f32>,
) {
    unreachable!("AVX-512 is x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_row_fma(
    _: &[u16],
    _: usize,
    _: &PackedBf16,
    _: usize,
    _: std::ops::Range<usize>,
    _: Option<Activation>,
    _: SendPtr<f32>,
) {
    unreachable!("AVX-512 is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::lcg;

    /// The product of the bf16-rounded inputs in f64: the AMX result must match it to f32
    /// accumulation error.
    fn check(n: usize, o: usize, i: usize) {
        let kernels = Bf16Kernel::all();
        if kernels.is_empty() {
            eprintln!("no bf16 kernel (AMX or AVX-512) here: skipping");
            return;
        }
        for kernel in kernels {
            check_on(n, o, i, kernel);
        }
    }

    fn check_on(n: usize, o: usize, i: usize, kernel: Bf16Kernel) {
        let mut s = 7u64;
        let x: Vec<f32> = (0..n * i).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..o * i).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..o).map(|_| lcg(&mut s)).collect();
        let packed = PackedBf16::pack(&w, &b, o, i);
        let y = linear_bf16_on(&x, n, &packed, None, kernel);
        let mut worst = 0f64;
        for r in 0..n {
            for c in 0..o {
                let mut acc = b[c] as f64;
                for k in 0..i {
                    acc += from_bf16(to_bf16(x[r * i + k])) as f64
                        * from_bf16(to_bf16(w[c * i + k])) as f64;
                }
                worst = worst.max((acc - y[r * o + c] as f64).abs());
            }
        }
        println!("{kernel:?} bf16 linear {n}x{i} -> {o}: max abs diff {worst:.2e}");
        assert!(worst < 1e-4 * (i as f64).sqrt(), "max abs diff {worst}");
    }

    #[test]
    fn amx_matches_bf16_reference_whole_tiles() {
        check(64, 96, 64);
    }

    #[test]
    fn amx_matches_bf16_reference_ragged() {
        check(37, 50, 45);
        check(1, 7, 3);
        // Several row groups and column blocks, a partial last group, MiniLM's depth.
        check(70, 100, 384);
    }

    #[test]
    fn fused_activation_matches_separate_pass() {
        if !bf16_available() {
            eprintln!("no bf16 kernel (AMX or AVX-512) here: skipping");
            return;
        }
        let (n, o, i) = (45, 70, 50);
        let mut s = 9u64;
        let x: Vec<f32> = (0..n * i).map(|_| 4.0 * lcg(&mut s)).collect();
        let w: Vec<f32> = (0..o * i).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..o).map(|_| lcg(&mut s)).collect();
        let dev = candle_core::Device::Cpu;
        let packed = PackedBf16::from_tensors(
            &Tensor::from_vec(w, (o, i), &dev).unwrap(),
            &Tensor::from_vec(b, o, &dev).unwrap(),
        )
        .unwrap();
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            let mut separate = linear_bf16(&x, n, &packed, None);
            crate::activation::activate_reduced(act, &mut separate);
            assert_eq!(linear_bf16(&x, n, &packed, Some(act)), separate, "{act:?}");
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between two bf16 values: rounds to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3 * 2^-8 is halfway: rounds up to the even 1 + 2^-6.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }
}
