//! Access to the contiguous CPU buffers behind candle tensors.
use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};

use crate::Float;

/// The contiguous slice of `storage` described by `layout`.
pub(crate) fn slice<'a, T: Float>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("berth kernel: input must be contiguous (call .contiguous() first)"),
    }
}

/// Runs `f` on the contiguous data of a CPU tensor, without copying when it is contiguous.
pub(crate) fn with_slice<T: Float, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(slice::<T>(cpu, layout)?)),
        _ => bail!("berth kernels run on the CPU only for now"),
    }
}

/// Calls the `f32` or `f64` instantiation of a generic kernel.
macro_rules! dispatch {
    ($dtype:expr, $name:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            other => candle_core::bail!("{}: unsupported dtype {:?} (f32 or f64)", $name, other),
        }
    };
}
pub(crate) use dispatch;

/// Whether the CPU has AVX2 and FMA: the kernels' plain loops (GELU, softmax, LayerNorm,
/// AdamW, ...) then run compiled for them where AVX-512 is absent. The same source at every
/// width gives the same bits (Rust never fuses a multiply and an add by itself).
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An 8-lane mask whose first `n.min(8)` lanes are set: the live columns of a tail for
/// `_mm256_maskload_ps` / `_mm256_maskstore_ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn lanes8(n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), idx)
}

/// Transposes an 8 × 8 block of f32 held as 8 rows (row `i` of the result: lane `i` of
/// every input row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn transpose8(
    r: [std::arch::x86_64::__m256; 8],
) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // Rows 2i and 2i + 1 interleaved: t[2i] from the low pair of each 128-bit half, t[2i + 1]
    // from the high pair.
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xee>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xee>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xee>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xee>(t[5], t[7]),
    ];
    std::array::from_fn(|i| {
        // Rows 0-3 from the low 128-bit halves, rows 4-7 from the high ones.
        if i < 4 {
            _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4])
        } else {
            _mm256_permute2f128_ps::<0x31>(u[i - 4], u[i])
        }
    })
}

/// Checks that all tensors share one dtype, naming the op on failure.
pub(crate) fn same_dtype(op: &str, dtypes: &[DType]) -> Result<DType> {
    let first = dtypes[0];
    if dtypes.iter().any(|d| *d != first) {
        bail!("{op}: inputs have mixed dtypes {dtypes:?}");
    }
    Ok(first)
}

/// A raw pointer that may cross threads: callers guarantee disjoint writes.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// A strided matrix view: `rows × cols` elements at `ptr`, element (r, c) at
/// `ptr + r * row_stride + c * col_stride`. A row-major matrix has column stride 1; its
/// transpose is the same memory with the strides swapped ([`Strided::t`]).
#[derive(Clone, Copy)]
pub(crate) struct Strided<P> {
    pub ptr: P,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<P: Copy> Strided<P> {
    /// Row-major `rows × cols` with `row_stride` elements from one row to the next.
    pub fn rows(ptr: P, rows: usize, cols: usize, row_stride: usize) -> Self {
        Strided {
            ptr,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transposed view of the same memory.
    pub fn t(self) -> Self {
        Strided {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `dst = (accumulate ? dst : 0) + alpha * lhs @ rhs` on strided views (`dst` is
/// `lhs.rows × rhs.cols`, `lhs.cols == rhs.rows`).
///
/// # Safety
/// The pointers must cover the views their sizes and strides describe.
pub(crate) unsafe fn matmul<T: crate::Float>(
    dst: Strided<*mut T>,
    accumulate: bool,
    lhs: Strided<*const T>,
    rhs: Strided<*const T>,
    alpha: T,
    parallelism: gemm::Parallelism,
) {
    debug_assert!(
        dst.rows == lhs.rows && dst.cols == rhs.cols && lhs.cols == rhs.rows,
        "matmul: shapes [{}, {}] = [{}, {}] @ [{}, {}]; this is a bug",
        dst.rows,
        dst.cols,
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    // gemm computes dst = a * dst + b * lhs @ rhs, with (column, row) stride order.
    gemm::gemm(
        dst.rows,
        dst.cols,
        lhs.cols,
        dst.ptr,
        dst.col_stride as isize,
        dst.row_stride as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.ptr,
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        T::one(),
        alpha,
        false,
        false,
        false,
        parallelism,
    )
}

/// Runs `f` on a worker of the current rayon pool when called from outside it, else in
/// place. Every kernel is a parallel region: from a thread outside the pool, each region
/// hands its work to the pool and puts the caller to sleep until it finishes (two wake-ups
/// per region, dozens of regions per forward or training step); on a worker the caller
/// works on its regions itself and only idle peers are woken. The kernels split work by
/// the pool's size, not by the calling thread, so the results are the same bits.
///
/// `f` must not wait for another thread that itself needs this pool (with one worker that
/// wait would never end): a forward or a training step, not a whole command.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("rayon::scope runs its closure before returning")
}
