//! ModernBERT's encoder layers (transformers' `ModernBertEncoderLayer`), packed and
//! padding-free like the rest of berth:
//!
//! ```text
//! x   = x + Wo(attention(rope(Wqkv(attn_norm(x)))))     (layer 0: no attn_norm)
//! x   = x + Wo_mlp(act(a) · g),  [a, g] = Wi(mlp_norm(x))
//! out = final_norm(x)
//! ```
//!
//! Attention is global every `global_attn_every_n_layers` layers (rotary base
//! `global_rope_theta`) and within `local_attention / 2` tokens on either side otherwise
//! (base `local_rope_theta`), computed by [`berth_kernels::window_attention`] in time and
//! memory linear in the length. The embeddings (token table + norm, no positions) are
//! [`crate::Embeddings`]; the masked-LM head is [`crate::heads::MaskedLmHead`].
//!
//! Shapes: `N` tokens of the packed batch, `H` hidden, `I` feed-forward width.
use std::sync::Arc;

use berth_kernels::{Activation, RotaryTable};
use candle_core::Tensor;

use crate::batch::Batch;
use crate::config::{EncoderConfig, ModernSettings};
use crate::dropout::Dropout;
use crate::error::{ModelError, Result};
use crate::modules::{LayerNorm, Linear, Precision};
use crate::weights::Weights;

/// One pre-norm layer.
#[derive(Debug, Clone)]
pub struct ModernLayer {
    /// LayerNorm before attention (`None` in layer 0, whose input is already normed).
    pub attn_norm: Option<LayerNorm>,
    /// Q, K, V projection `[3H, H]`.
    pub wqkv: Linear,
    /// Attention output projection `[H, H]`.
    pub wo: Linear,
    /// LayerNorm before the feed-forward block.
    pub mlp_norm: LayerNorm,
    /// Up-projection to the input and gate halves `[2I, H]`.
    pub wi: Linear,
    /// Down-projection `[H, I]`.
    pub mlp_wo: Linear,
    /// Global attention (else the sliding window).
    pub global: bool,
}

/// The layers, the final norm and the rotary tables of a ModernBERT encoder.
#[derive(Debug, Clone)]
pub struct ModernStack {
    /// Encoder layers.
    pub layers: Vec<ModernLayer>,
    /// LayerNorm after the last layer.
    pub final_norm: LayerNorm,
    global_rope: Arc<RotaryTable>,
    local_rope: Arc<RotaryTable>,
    half_window: usize,
    num_heads: usize,
    activation: Activation,
    mlp_dropout: f64,
}

impl ModernStack {
    /// Loads the layers and final norm under prefix `p` (`"model."`, or `""` for a bare
    /// `ModernBertModel`).
    pub fn load(w: &Weights, cfg: &EncoderConfig, m: &ModernSettings, p: &str) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let norm = |name: &str| LayerNorm::load_with_bias(w, name, h, eps, m.norm_bias);
        let layers = (0..cfg.num_layers)
            .map(|k| {
                let l = format!("{p}layers.{k}");
                Ok(ModernLayer {
                    attn_norm: if k == 0 {
                        None
                    } else {
                        Some(norm(&format!("{l}.attn_norm"))?)
                    },
                    wqkv: Linear::load_with_bias(
                        w,
                        &format!("{l}.attn.Wqkv"),
                        h,
                        3 * h,
                        m.attention_bias,
                    )?,
                    wo: Linear::load_with_bias(w, &format!("{l}.attn.Wo"), h, h, m.attention_bias)?,
                    mlp_norm: norm(&format!("{l}.mlp_norm"))?,
                    wi: Linear::load_with_bias(w, &format!("{l}.mlp.Wi"), h, 2 * i, m.mlp_bias)?,
                    mlp_wo: Linear::load_with_bias(w, &format!("{l}.mlp.Wo"), i, h, m.mlp_bias)?,
                    global: m.global[k],
                })
            })
            .collect::<Result<_>>()?;
        let hd = h / cfg.num_heads;
        let table = |theta: f64| -> Result<Arc<RotaryTable>> {
            RotaryTable::new(hd, theta, cfg.max_position_embeddings)
                .map(Arc::new)
                .map_err(|e| ModelError::Config {
                    path: cfg.path.clone(),
                    message: e.to_string(),
                })
        };
        Ok(ModernStack {
            layers,
            final_norm: norm(&format!("{p}final_norm"))?,
            global_rope: table(m.global_rope_theta)?,
            local_rope: table(m.local_rope_theta)?,
            half_window: m.half_window,
            num_heads: cfg.num_heads,
            activation: cfg.activation,
            mlp_dropout: cfg.dropout.hidden,
        })
    }

    /// The normed embeddings `x [N, H]` through every layer and the final norm.
    pub fn forward(&self, x: Tensor, batch: &Batch) -> Result<Tensor> {
        self.forward_train(x, batch, None)
    }

    /// [`Self::forward`] with transformers' training dropout when `d` is given: `mlp_dropout`
    /// on the gated feed-forward activations before `Wo`. Attention dropout (on the
    /// probabilities and after `Wo`) is refused by the caller when its rate is not zero.
    /// Under autograd every op records its backward (the kernels' custom ops).
    pub fn forward_train(&self, x: Tensor, batch: &Batch, d: Option<&Dropout>) -> Result<Tensor> {
        let cu = &batch.cu_seqlens;
        if let Some(longest) = cu.windows(2).map(|p| p[1] - p[0]).max() {
            if longest > self.global_rope.len() {
                return Err(ModelError::Input(format!(
                    "sequence of {longest} tokens exceeds the model's {} positions",
                    self.global_rope.len()
                )));
            }
        }
        let h = x.dim(1)?;
        let scale = 1.0 / ((h / self.num_heads) as f64).sqrt();
        let mut x = x;
        for l in &self.layers {
            let normed = match &l.attn_norm {
                Some(n) => n.forward(&x)?,
                None => x.clone(),
            };
            let table = if l.global {
                &self.global_rope
            } else {
                &self.local_rope
            };
            let qkv =
                berth_kernels::rope_qkv(&l.wqkv.forward(&normed)?, cu, self.num_heads, table)?;
            let ctx = if l.global {
                berth_kernels::varlen_attention(&qkv, cu, self.num_heads, scale)?
            } else {
                berth_kernels::window_attention(&qkv, cu, self.num_heads, scale, self.half_window)?
            };
            x = (x + l.wo.forward(&ctx)?)?;
            let up = l.wi.forward(&l.mlp_norm.forward(&x)?)?;
            let gated = berth_kernels::geglu(&up, self.activation)?;
            let gated = match d {
                Some(d) => d.apply(&gated, self.mlp_dropout)?,
                None => gated,
            };
            x = (x + l.mlp_wo.forward(&gated)?)?;
        }
        self.final_norm.forward(&x)
    }

    /// Parameters of the layers and the final norm (biases only where `m` has them).
    pub fn num_parameters(&self, m: &ModernSettings) -> usize {
        let lin = |l: &Linear, bias: bool| {
            l.weight.elem_count() + if bias { l.bias.elem_count() } else { 0 }
        };
        let norm = |n: &LayerNorm| {
            n.weight.elem_count() + if m.norm_bias { n.bias.elem_count() } else { 0 }
        };
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.as_ref().map_or(0, norm)
                    + lin(&l.wqkv, m.attention_bias)
                    + lin(&l.wo, m.attention_bias)
                    + norm(&l.mlp_norm)
                    + lin(&l.wi, m.mlp_bias)
                    + lin(&l.mlp_wo, m.mlp_bias)
            })
            .sum();
        layers + norm(&self.final_norm)
    }

    /// Packs the layers' linear products for `p` (inference).
    pub fn set_precision(&mut self, p: Precision) -> Result<()> {
        for l in &mut self.layers {
            for lin in [&mut l.wqkv, &mut l.wo, &mut l.wi, &mut l.mlp_wo] {
                lin.set_precision(p)?;
            }
        }
        Ok(())
    }

    /// The linear layers [`Self::set_precision`] packs, in order.
    pub fn packed_linears(&self) -> Vec<&Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.wqkv, &l.wo, &l.wi, &l.mlp_wo])
            .collect()
    }
}
