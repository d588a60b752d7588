//! Building blocks: linear layers and LayerNorm loaded by checkpoint key.
//! Shapes: `N` tokens, `I` input features, `O` output features.
use std::sync::Arc;

use berth_kernels::amx::PackedBf16;
use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// The number format of the encoder's matrix products at inference. Everything else
/// (embeddings, LayerNorm, softmax, activations, heads) stays f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Weights and activations rounded to bf16 for the linear layers, f32 accumulation
    /// (Intel AMX tiles).
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(ModelError::Input(format!(
                "unknown dtype {other:?} (expected f32 or bf16)"
            ))),
        }
    }
}

/// `y = x W^T + b`; `W [O, I]`, `b [O]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[O, I]`.
    pub weight: Tensor,
    /// `[O]`.
    pub bias: Tensor,
    /// The weight packed for bf16 products, when inference runs in bf16. Training never
    /// sets it: the packed copy does not follow updates to `weight`.
    pub packed: Option<Arc<PackedBf16>>,
}

impl Linear {
    /// Loads `{name}.weight` and `{name}.bias`.
    pub fn load(w: &Weights, name: &str, inp: usize, out: usize) -> Result<Self> {
        Ok(Linear {
            weight: w.get(&format!("{name}.weight"), &[out, inp])?,
            bias: w.get(&format!("{name}.bias"), &[out])?,
            packed: None,
        })
    }

    /// Several linears with the same input, fused along outputs into one matmul.
    pub fn load_fused(w: &Weights, names: &[&str], inp: usize, out: usize) -> Result<Self> {
        let key = |suffix: &str| {
            names
                .iter()
                .map(|n| format!("{n}.{suffix}"))
                .collect::<Vec<_>>()
        };
        Ok(Linear {
            weight: w.get_fused(&key("weight"), &[out, inp])?,
            bias: w.get_fused(&key("bias"), &[out])?,
            packed: None,
        })
    }

    /// Sets the number format of [`Self::forward`] (packing the weight for bf16).
    pub fn set_precision(&mut self, p: Precision) -> Result<()> {
        self.packed = match p {
            Precision::F32 => None,
            Precision::Bf16 => {
                if !berth_kernels::amx::available() {
                    return Err(ModelError::Input(
                        "--dtype bf16 needs a CPU with AMX bf16 tiles (and Linux 5.16+); \
                         this machine has none: use --dtype f32"
                            .into(),
                    ));
                }
                Some(Arc::new(PackedBf16::from_tensors(
                    &self.weight,
                    &self.bias,
                )?))
            }
        };
        Ok(())
    }

    /// `x [N, I]` → `[N, O]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.packed {
            Some(p) if x.dtype() == DType::F32 => Ok(berth_kernels::amx::linear_packed(x, p)?),
            _ => Ok(berth_kernels::linear(x, &self.weight, &self.bias)?),
        }
    }
}

/// LayerNorm with learned scale and shift over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale `[H]`.
    pub weight: Tensor,
    /// Shift `[H]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `{name}.weight` and `{name}.bias`.
    pub fn load(w: &Weights, name: &str, h: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(&format!("{name}.weight"), &[h])?,
            bias: w.get(&format!("{name}.bias"), &[h])?,
            eps,
        })
    }

    /// `x [N, H]` → `[N, H]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(berth_kernels::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}
