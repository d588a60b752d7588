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
