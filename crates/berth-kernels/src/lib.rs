//! CPU kernels for the berth encoder, each with a forward and a backward.
//!
//! Every op is a candle custom op, so it sits inside candle's autograd: the forward runs
//! our own loop over contiguous buffers, and `bwd` returns the input gradients. candle-nn's
//! fused `layer_norm` / `softmax_last_dim` have no backward (gradients upstream of them are
//! silently dropped), which is why none of them is used here.
//!
//! Ops: [`layer_norm`], [`activation`] (GELU erf / tanh forms, ReLU), [`softmax_last_dim`],
//! and [`varlen_attention`] over a packed batch described by `cu_seqlens`.
//! Each is generic over `f32` (inference, training) and `f64` (gradient checks).
#![deny(missing_docs)]

mod activation;
mod attention;
mod cpu;
mod layer_norm;
mod softmax;
#[cfg(test)]
mod testing;

pub use activation::{activation, Activation};
pub use attention::{reference_attention, varlen_attention};
pub use layer_norm::{layer_norm, reference_layer_norm};
pub use softmax::{reference_softmax, softmax_last_dim};

/// The element types the kernels run on.
pub trait Float:
    candle_core::WithDType + num_traits::Float + std::iter::Sum + Send + Sync + 'static
{
    /// The error function, accurate to the type's precision for GELU.
    fn erf(self) -> Self;
}

impl Float for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
}

impl Float for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
}
