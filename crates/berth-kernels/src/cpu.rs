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

/// `dst[m, n] = (accumulate ? dst : 0) + alpha * lhs[m, k] @ rhs[k, n]` on strided
/// row-major views; strides are (row stride, column stride) in elements.
///
/// # Safety
/// The pointers must cover the views the sizes and strides describe.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: crate::Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_s: (usize, usize),
    accumulate: bool,
    lhs: *const T,
    lhs_s: (usize, usize),
    rhs: *const T,
    rhs_s: (usize, usize),
    alpha: T,
    parallelism: gemm::Parallelism,
) {
    // gemm computes dst = a * dst + b * lhs @ rhs, with (column, row) stride order.
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_s.1 as isize,
        dst_s.0 as isize,
        accumulate,
        lhs,
        lhs_s.1 as isize,
        lhs_s.0 as isize,
        rhs,
        rhs_s.1 as isize,
        rhs_s.0 as isize,
        T::one(),
        alpha,
        false,
        false,
        false,
        parallelism,
    )
}
