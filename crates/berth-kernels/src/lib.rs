//! CPU kernels for the berth encoder, each with a forward and a backward.
//!
//! Every op is a candle custom op, so it sits inside candle's autograd: the forward runs
//! our own loop over contiguous buffers, and `bwd` returns the input gradients. candle-nn's
//! fused `layer_norm` / `softmax_last_dim` have no backward (gradients upstream of them are
//! silently dropped), which is why none of them is used here.
//!
//! Ops: [`linear`] (bias fused), [`layer_norm`], [`activation`] (GELU erf / tanh forms, ReLU), [`softmax_last_dim`],
//! and [`varlen_attention`] over a packed batch described by `cu_seqlens`; for training,
//! [`encoder_layer_train`] runs a whole encoder layer from those kernels as one op.
//! Each is generic over `f32` (inference, training) and `f64` (gradient checks).
#![deny(missing_docs)]

mod activation;
mod adamw;
pub mod amx;
mod attention;
mod attention_tiled;
mod attention_window;
mod cpu;
mod cross_entropy;
mod dropout;
mod encoder_layer;
mod geglu;
mod layer_norm;
mod linear;
mod rope;
pub mod sgemm;
mod softmax;
#[cfg(test)]
mod testing;

pub use activation::{activation, Activation};
pub use adamw::{
    adamw_update, adamw_update_from, adamw_update_rows, sum_of_squares, sum_of_squares_rows,
    with_values, with_values_mut, AdamWStep,
};
pub use attention::{reference_attention, varlen_attention, varlen_attention_dropout};
pub use attention_window::window_attention;
pub use cpu::on_pool;
pub use cross_entropy::cross_entropy_rows;
pub use dropout::{dropout, dropout_at, substream as seed_stream, DropSite};
pub use encoder_layer::{
    encoder_layer_train, encoder_layer_train_rows, GradListener, GradSink, LayerDropout,
    LayerWeights,
};
pub use geglu::geglu;
pub use layer_norm::{add_layer_norm, layer_norm, reference_layer_norm};
pub use linear::{linear, linear_prepacked, linear_with, Products};
pub use rope::{rope_qkv, RotaryTable};
pub use softmax::{reference_softmax, softmax_last_dim};

/// The element types the kernels run on.
pub(crate) trait Float:
    candle_core::WithDType + num_traits::Float + std::iter::Sum + Send + Sync + 'static
{
    /// The error function, accurate to the type's precision for GELU.
    fn erf(self) -> Self;

    /// Applies `act` in place. The default is the exact scalar path; f32 overrides it
    /// with branch-free loops the compiler vectorises.
    fn activate(act: Activation, xs: &mut [Self]) {
        xs.iter_mut().for_each(|v| *v = act.value_and_slope(*v).0);
    }

    /// `dys *= act'(xs)` element-wise (f32: vectorised GELU slope, AVX-512 when available).
    fn activate_backward(act: Activation, xs: &[Self], dys: &mut [Self]) {
        dys.iter_mut()
            .zip(xs)
            .for_each(|(g, &x)| *g = *g * act.value_and_slope(x).1);
    }

    /// Dot product of equal-length slices. f32 uses AVX-512 when the CPU has it (the crate
    /// is built for baseline x86-64, so plain loops get SSE2 at best).
    fn dot(a: &[Self], b: &[Self]) -> Self {
        linear::dot_generic(a, b)
    }

    /// In-place softmax of one row (f32: a vectorised exp, AVX-512 when available).
    fn softmax_row(row: &mut [Self]) {
        softmax::softmax_row_generic(row)
    }

    /// `ln Σ exp(row)`, stable (f32: a vectorised exp, AVX-512 when available).
    fn log_sum_exp(row: &[Self]) -> Self {
        cross_entropy::log_sum_exp_generic(row)
    }

    /// `out = g · exp(row − lse)` (f32: a vectorised exp, AVX-512 when available).
    fn softmax_scaled(row: &[Self], lse: Self, g: Self, out: &mut [Self]) {
        cross_entropy::softmax_scaled_generic(row, lse, g, out)
    }

    /// LayerNorm statistics of one row: mean and 1/sqrt(var + eps) (f32: sums in 16
    /// lanes, vectorised).
    fn row_stats(row: &[Self], eps: f64) -> (Self, Self) {
        layer_norm::row_stats_generic(row, eps)
    }

    /// One row of the LayerNorm backward ([`layer_norm::row_backward`]; f32: compiled for
    /// AVX-512 or AVX2 when available).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_row_backward(
        xr: &[Self],
        g: &[Self],
        dyr: &[Self],
        eps: f64,
        dxr: &mut [Self],
        dg: &mut [Self],
        db: &mut [Self],
    ) {
        layer_norm::row_backward(xr, g, dyr, eps, dxr, dg, db)
    }

    /// Dropout's mask for elements `base..` of stream `key` applied in place: dropped
    /// elements zeroed, kept ones times `scale` (f32: AVX-512 when available).
    fn mask_in_place(xs: &mut [Self], key: u64, base: u64, threshold: u32, scale: Self) {
        dropout::mask_in_place(xs, key, base, threshold, scale)
    }

    /// Whether [`Float::attend_tiled`] runs here for head dimension `hd`.
    fn attends_tiled(_hd: usize) -> bool {
        false
    }

    /// One (sequence, head) of attention by the tiled kernel (f32 with AVX-512 or AVX2).
    ///
    /// # Safety
    /// [`Float::attends_tiled`] must hold, and the buffers must cover the task's rows.
    unsafe fn attend_tiled(
        _qkv: *const Self,
        _out: *mut Self,
        _task: attention_tiled::Task,
        _scale: f64,
        _dropout: Option<dropout::DropSite>,
        _scratch: &mut attention_tiled::Scratch,
    ) {
        unreachable!("no tiled attention for this type")
    }

    /// The backward of one (sequence, head) by the tiled kernels (f32 with AVX-512 or AVX2).
    ///
    /// # Safety
    /// As [`Float::attend_tiled`], with `dout` and `dqkv` covering the task's rows.
    unsafe fn attend_tiled_backward(
        _qkv: *const Self,
        _dout: *const Self,
        _dqkv: *mut Self,
        _task: attention_tiled::Task,
        _scale: f64,
        _dropout: Option<dropout::DropSite>,
        _scratch: &mut attention_tiled::BackScratch,
    ) {
        unreachable!("no tiled attention for this type")
    }
}

impl Float for f32 {
    fn erf(self) -> Self {
        activation::erf_f32(self)
    }

    fn activate(act: Activation, xs: &mut [Self]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { activation::activate_f32_avx512(act, xs) };
        }
        #[cfg(target_arch = "x86_64")]
        if cpu::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { activation::activate_f32_avx2(act, xs) };
        }
        activation::activate_f32(act, xs)
    }

    fn activate_backward(act: Activation, xs: &[Self], dys: &mut [Self]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { activation::backward_f32_avx512(act, xs, dys) };
        }
        #[cfg(target_arch = "x86_64")]
        if cpu::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { activation::backward_f32_avx2(act, xs, dys) };
        }
        activation::backward_f32(act, xs, dys)
    }

    fn dot(a: &[Self], b: &[Self]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { linear::dot_avx512(a, b) };
        }
        #[cfg(target_arch = "x86_64")]
        if cpu::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { linear::dot_avx2(a, b) };
        }
        linear::dot_generic(a, b)
    }

    fn softmax_row(row: &mut [Self]) {
        softmax::softmax_row_f32(row)
    }

    fn log_sum_exp(row: &[Self]) -> Self {
        softmax::log_sum_exp_f32(row)
    }

    fn softmax_scaled(row: &[Self], lse: Self, g: Self, out: &mut [Self]) {
        softmax::softmax_scaled_f32(row, lse, g, out)
    }

    fn row_stats(row: &[Self], eps: f64) -> (Self, Self) {
        layer_norm::row_stats_f32(row, eps)
    }

    fn layer_norm_row_backward(
        xr: &[Self],
        g: &[Self],
        dyr: &[Self],
        eps: f64,
        dxr: &mut [Self],
        dg: &mut [Self],
        db: &mut [Self],
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { layer_norm::row_backward_f32_avx512(xr, g, dyr, eps, dxr, dg, db) };
        }
        #[cfg(target_arch = "x86_64")]
        if cpu::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { layer_norm::row_backward_f32_avx2(xr, g, dyr, eps, dxr, dg, db) };
        }
        layer_norm::row_backward(xr, g, dyr, eps, dxr, dg, db)
    }

    fn mask_in_place(xs: &mut [Self], key: u64, base: u64, threshold: u32, scale: Self) {
        dropout::mask_in_place_f32(xs, key, base, threshold, scale)
    }

    fn attends_tiled(hd: usize) -> bool {
        attention_tiled::supported(hd)
    }

    unsafe fn attend_tiled(
        qkv: *const Self,
        out: *mut Self,
        task: attention_tiled::Task,
        scale: f64,
        dropout: Option<dropout::DropSite>,
        scratch: &mut attention_tiled::Scratch,
    ) {
        attention_tiled::attend(qkv, out, task, scale as f32, dropout, scratch)
    }

    unsafe fn attend_tiled_backward(
        qkv: *const Self,
        dout: *const Self,
        dqkv: *mut Self,
        task: attention_tiled::Task,
        scale: f64,
        dropout: Option<dropout::DropSite>,
        scratch: &mut attention_tiled::BackScratch,
    ) {
        attention_tiled::attend_backward(qkv, dout, dqkv, task, scale as f32, dropout, scratch)
    }
}

impl Float for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
}
