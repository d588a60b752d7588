//! Building blocks: linear layers and LayerNorm loaded by checkpoint key.
//! Shapes: `N` tokens, `I` input features, `O` output features.
use std::sync::Arc;

use berth_kernels::amx::int8::PackedI8;
use berth_kernels::amx::PackedBf16;
use berth_kernels::sgemm::PackedB;
use berth_kernels::Activation;
use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::weights::{Int8Weight, Weights};

/// The number format of the encoder's matrix products at inference. Everything else
/// (embeddings, LayerNorm, softmax, activations, heads) stays f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Weights and activations rounded to bf16 for the linear layers, f32 accumulation
    /// (Intel AMX tiles, AVX-512 BF16 or AVX-512 F FMAs; refused on other CPUs).
    Bf16,
    /// Weights quantized to int8 per output channel once, activations to uint8 per token
    /// at each product, i32 accumulation (AMX int8 tiles, AVX-512 VNNI or AVX2; the same
    /// integers on each, a slow portable loop elsewhere).
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "int8" | "i8" => Ok(Precision::Int8),
            other => Err(ModelError::Input(format!(
                "unknown dtype {other:?} (expected f32, bf16 or int8)"
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
    /// The weight packed once for inference ([`Self::set_precision`]). Training never sets
    /// it: the packed copy does not follow updates to `weight`.
    pub packed: Option<Arc<Packed>>,
    /// The weight as a quantized checkpoint stores it (`berth quantize --dtype int8`):
    /// int8 packing uses these values and scales as they are instead of quantizing again.
    pub int8: Option<Arc<Int8Weight>>,
    /// The checkpoint keys `weight` came from (several when fused), in row order.
    pub weight_keys: Vec<String>,
    /// The number format of the unpacked (training) path's products, forward and
    /// backward ([`crate::Model::set_train_products`]).
    pub products: berth_kernels::Products,
}

/// A linear layer's weight prepared for inference products.
#[derive(Debug)]
pub enum Packed {
    /// f32 panels for the AVX-512 kernel, and the bias.
    F32(PackedB, Vec<f32>),
    /// bf16 AMX tiles (the bias inside).
    Bf16(PackedBf16),
    /// int8 per-channel quantized tiles (scales and bias inside).
    Int8(PackedI8),
}

impl Linear {
    /// Loads `{name}.weight` and `{name}.bias`.
    pub fn load(w: &Weights, name: &str, inp: usize, out: usize) -> Result<Self> {
        Ok(Linear {
            weight: w.get(&format!("{name}.weight"), &[out, inp])?,
            bias: w.get(&format!("{name}.bias"), &[out])?,
            packed: None,
            int8: w.int8(&[format!("{name}.weight")]),
            weight_keys: vec![format!("{name}.weight")],
            products: Default::default(),
        })
    }

    /// [`Self::load`], or without a bias (`{name}.bias` absent: a zero bias).
    pub fn load_with_bias(
        w: &Weights,
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<Self> {
        if bias {
            return Self::load(w, name, inp, out);
        }
        let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
        Ok(Linear {
            bias: Tensor::zeros(out, weight.dtype(), weight.device())?,
            weight,
            packed: None,
            int8: w.int8(&[format!("{name}.weight")]),
            weight_keys: vec![format!("{name}.weight")],
            products: Default::default(),
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
            int8: w.int8(&key("weight")),
            weight_keys: key("weight"),
            products: Default::default(),
        })
    }

    /// Sets the number format of [`Self::forward`] and packs the weight for it (inference).
    pub fn set_precision(&mut self, p: Precision) -> Result<()> {
        self.packed = match p {
            Precision::F32 if !berth_kernels::sgemm::available() => None,
            Precision::F32 => {
                let (o, i) = self.weight.dims2()?;
                let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                Some(Arc::new(Packed::F32(
                    PackedB::pack_transposed(&flat(&self.weight)?, o, i),
                    flat(&self.bias)?,
                )))
            }
            Precision::Bf16 => {
                if !berth_kernels::amx::bf16_available() {
                    return Err(ModelError::Input(
                        "--dtype bf16 needs a CPU with AMX bf16 tiles (and Linux 5.16+) or \
                         AVX-512; this machine has neither: use --dtype f32"
                            .into(),
                    ));
                }
                Some(Arc::new(Packed::Bf16(PackedBf16::from_tensors(
                    &self.weight,
                    &self.bias,
                )?)))
            }
            Precision::Int8 => Some(Arc::new(Packed::Int8(match &self.int8 {
                Some(q) => {
                    let bias = self.bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    PackedI8::from_quantized(&q.q, &q.scale, &bias, q.outputs, q.inputs)
                }
                None => PackedI8::from_tensors(&self.weight, &self.bias)?,
            }))),
        };
        Ok(())
    }

    /// `x [N, I]` → `[N, O]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, None)
    }

    /// `act(x W^T + b)`: fused into the product's output when the weight is packed for
    /// f32 inference, else a separate pass.
    pub fn forward_then(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        match (self.packed.as_deref(), x.dtype()) {
            (Some(Packed::F32(w, b)), DType::F32) => {
                return Ok(berth_kernels::linear_prepacked(x, w, b, act)?)
            }
            (Some(Packed::Int8(w)), DType::F32) => {
                return Ok(berth_kernels::amx::int8::linear_packed(x, w, act)?)
            }
            (Some(Packed::Bf16(w)), DType::F32) => {
                return Ok(berth_kernels::amx::linear_packed(x, w, act)?)
            }
            _ => {}
        }
        let y = self.forward_unfused(x)?;
        match act {
            Some(a) => Ok(berth_kernels::activation(&y, a)?),
            None => Ok(y),
        }
    }

    fn forward_unfused(&self, x: &Tensor) -> Result<Tensor> {
        match self.packed.as_deref() {
            Some(Packed::Bf16(p)) if x.dtype() == DType::F32 => {
                Ok(berth_kernels::amx::linear_packed(x, p, None)?)
            }
            Some(Packed::F32(w, b)) if x.dtype() == DType::F32 => {
                Ok(berth_kernels::linear_prepacked(x, w, b, None)?)
            }
            Some(Packed::Int8(w)) if x.dtype() == DType::F32 => {
                Ok(berth_kernels::amx::int8::linear_packed(x, w, None)?)
            }
            _ => Ok(berth_kernels::linear_with(
                x,
                &self.weight,
                &self.bias,
                self.products,
            )?),
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

    /// [`Self::load`], or without a bias (a zero shift).
    pub fn load_with_bias(w: &Weights, name: &str, h: usize, eps: f64, bias: bool) -> Result<Self> {
        if bias {
            return Self::load(w, name, h, eps);
        }
        let weight = w.get(&format!("{name}.weight"), &[h])?;
        Ok(LayerNorm {
            bias: Tensor::zeros(h, weight.dtype(), weight.device())?,
            weight,
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
