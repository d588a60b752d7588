//! Building blocks: linear layers and LayerNorm loaded by checkpoint key.
//! Shapes: `N` tokens, `I` input features, `O` output features.
use candle_core::Tensor;

use crate::error::Result;
use crate::weights::Weights;

/// `y = x W^T + b`; `W [O, I]`, `b [O]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[O, I]`.
    pub weight: Tensor,
    /// `[O]`.
    pub bias: Tensor,
}

impl Linear {
    /// Loads `{name}.weight` and `{name}.bias`.
    pub fn load(w: &Weights, name: &str, inp: usize, out: usize) -> Result<Self> {
        Ok(Linear {
            weight: w.get(&format!("{name}.weight"), &[out, inp])?,
            bias: w.get(&format!("{name}.bias"), &[out])?,
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
        })
    }

    /// `x [N, I]` → `[N, O]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(berth_kernels::linear(x, &self.weight, &self.bias)?)
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
