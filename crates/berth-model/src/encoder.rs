//! Embeddings and the post-LN transformer encoder shared by BERT, RoBERTa and DistilBERT.
//!
//! Shapes: `N` total tokens of the packed batch, `H` hidden, `nh` heads, `hd = H / nh`,
//! `F` feed-forward width, `S` sequences.
use berth_kernels::amx::rows::TailOutput;
use berth_kernels::Activation;
use candle_core::{Device, Tensor};

use crate::batch::Batch;
use crate::config::EncoderConfig;
use crate::error::{ModelError, Result};
use crate::modules::{LayerNorm, Linear};
use crate::names;
use crate::weights::Weights;

/// Word + position (+ token type) embeddings, then LayerNorm.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// `[V, H]`.
    pub word_embeddings: Tensor,
    /// `[P, H]`; absent for ModernBERT (rotary positions inside attention).
    pub position_embeddings: Option<Tensor>,
    /// `[T, H]`; absent for DistilBERT.
    pub token_type_embeddings: Option<Tensor>,
    /// Final LayerNorm.
    pub layer_norm: LayerNorm,
    position_offset: usize,
    /// Training only: where the backward leaves the word table's gradient as the rows a
    /// batch used (see [`crate::Model::set_sparse_word_grads`]); `None`: a dense gradient.
    pub(crate) row_grads: Option<RowGrads>,
}

/// The word table's gradient of each backward pass, as `(token ids, [N, H] gradient rows)`
/// in the order the backward reached the lookups: row `j` belongs to table row `ids[j]`.
pub type RowGrads = std::sync::Arc<std::sync::Mutex<Vec<(Vec<u32>, Tensor)>>>;

/// The word-table lookup of a training forward whose backward hands the output's gradient
/// to a [`RowGrads`] sink instead of scattering it into a dense `[V, H]` tensor (candle's
/// `index_select` backward builds a zeroed table-sized tensor, then a copy of it with the
/// rows added, every step, though a fine-tuning batch touches a few hundred rows).
struct GatherRows {
    ids: Vec<u32>,
    sink: RowGrads,
}

impl candle_core::CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "gather-rows"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (_, h) = layout.shape().dims2()?;
        let (candle_core::CpuStorage::F32(table), Some((start, end))) =
            (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("gather-rows: needs a contiguous f32 table");
        };
        let table = &table[start..end];
        let mut out = Vec::with_capacity(self.ids.len() * h);
        for &id in &self.ids {
            let row = id as usize * h;
            out.extend_from_slice(&table[row..row + h]);
        }
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((self.ids.len(), h)),
        ))
    }

    fn bwd(
        &self,
        _table: &Tensor,
        _rows: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.sink
            .lock()
            .map_err(|_| candle_core::Error::Msg("gather-rows: sink poisoned".into()))?
            .push((self.ids.clone(), grad.clone()));
        Ok(None)
    }
}

fn check_ids(ids: &[u32], limit: usize, what: &str) -> Result<()> {
    match ids.iter().find(|&&i| i as usize >= limit) {
        Some(bad) => Err(ModelError::Input(format!(
            "{what} {bad} is out of range (the model has {limit})"
        ))),
        None => Ok(()),
    }
}

fn ids_tensor(ids: &[u32], limit: usize, what: &str) -> Result<Tensor> {
    check_ids(ids, limit, what)?;
    Ok(Tensor::new(ids, &Device::Cpu)?)
}

impl Embeddings {
    /// Loads the embedding tables under prefix `p`.
    pub fn load(w: &Weights, cfg: &EncoderConfig, p: &str) -> Result<Self> {
        let h = cfg.hidden_size;
        let tt_name = names::token_type_embeddings(p);
        let token_type_embeddings = if cfg.type_vocab_size > 0 {
            Some(w.get(&tt_name, &[cfg.type_vocab_size, h])?)
        } else {
            // The config says no token types: a checkpoint that trained some is a shape
            // error (running without them would silently change every output).
            if w.contains(&tt_name) {
                w.mark_used(&tt_name, &[0, h])?;
            }
            None
        };
        if let Some(m) = &cfg.modern {
            // ModernBERT: the token table and a norm, no positions or token types.
            return Ok(Embeddings {
                word_embeddings: w.get(
                    &format!("{p}embeddings.tok_embeddings.weight"),
                    &[cfg.vocab_size, h],
                )?,
                position_embeddings: None,
                token_type_embeddings: None,
                layer_norm: LayerNorm::load_with_bias(
                    w,
                    &format!("{p}embeddings.norm"),
                    h,
                    cfg.layer_norm_eps,
                    m.norm_bias,
                )?,
                position_offset: 0,
                row_grads: None,
            });
        }
        Ok(Embeddings {
            word_embeddings: w.get(&names::word_embeddings(p), &[cfg.vocab_size, h])?,
            position_embeddings: Some(w.get(
                &names::position_embeddings(p),
                &[cfg.max_position_embeddings, h],
            )?),
            token_type_embeddings,
            layer_norm: LayerNorm::load(w, &names::embeddings_ln(p), h, cfg.layer_norm_eps)?,
            position_offset: cfg.position_offset,
            row_grads: None,
        })
    }

    /// `[N, H]` embeddings of a packed batch.
    pub fn forward(&self, b: &Batch) -> Result<Tensor> {
        self.forward_train(b, None, 0.0)
    }

    /// [`Self::forward`] with dropout `p` on the output when `d` is given (training).
    pub fn forward_train(&self, b: &Batch, d: Option<&crate::Dropout>, p: f64) -> Result<Tensor> {
        let vocab = self.word_embeddings.dim(0)?;
        let mut x = match &self.row_grads {
            Some(sink) => {
                check_ids(&b.input_ids, vocab, "token id")?;
                self.word_embeddings.apply_op1(GatherRows {
                    ids: b.input_ids.clone(),
                    sink: sink.clone(),
                })?
            }
            None => self
                .word_embeddings
                .index_select(&ids_tensor(&b.input_ids, vocab, "token id")?, 0)?,
        };
        if let Some(table) = &self.position_embeddings {
            let positions: Vec<u32> = b
                .position_ids
                .iter()
                .map(|&p| p + self.position_offset as u32)
                .collect();
            let max_pos = table.dim(0)?;
            if let Some(&p) = positions.iter().find(|&&p| p as usize >= max_pos) {
                return Err(ModelError::Input(format!(
                    "sequence of {} tokens exceeds the model's {} positions",
                    p as usize - self.position_offset + 1,
                    max_pos - self.position_offset
                )));
            }
            x = (x + table.index_select(&Tensor::new(positions.as_slice(), &Device::Cpu)?, 0)?)?;
        }
        if let Some(tt) = &self.token_type_embeddings {
            let types = ids_tensor(&b.token_type_ids, tt.dim(0)?, "token type id")?;
            x = (x + tt.index_select(&types, 0)?)?;
        }
        // Without a token-type table (DistilBERT) segment ids are ignored, as transformers'
        // tokenizers for those models never pass them.
        let x = self.layer_norm.forward(&x)?;
        match d {
            Some(d) => d.apply(&x, p),
            None => Ok(x),
        }
    }
}

/// One encoder layer: attention → add & norm → feed-forward → add & norm.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Q, K, V projections fused: `[3H, H]`.
    pub qkv: Linear,
    /// Attention output projection `[H, H]`.
    pub attn_out: Linear,
    /// LayerNorm after attention.
    pub attn_ln: LayerNorm,
    /// Feed-forward up-projection `[F, H]`.
    pub inter: Linear,
    /// Feed-forward down-projection `[H, F]`.
    pub out: Linear,
    /// LayerNorm after the feed-forward block.
    pub out_ln: LayerNorm,
    num_heads: usize,
    activation: Activation,
    dropout: crate::DropoutRates,
    /// DistilBERT has no dropout on the attention output.
    attention_output_dropout: bool,
}

impl Layer {
    /// Loads layer `i` under prefix `p`.
    pub fn load(w: &Weights, cfg: &EncoderConfig, p: &str, i: usize) -> Result<Self> {
        let k = names::layer(cfg.arch, p, i);
        let (h, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Layer {
            qkv: Linear::load_fused(w, &[&k.query, &k.key, &k.value], h, h)?,
            attn_out: Linear::load(w, &k.attn_out, h, h)?,
            attn_ln: LayerNorm::load(w, &k.attn_ln, h, eps)?,
            inter: Linear::load(w, &k.inter, h, f)?,
            out: Linear::load(w, &k.out, f, h)?,
            out_ln: LayerNorm::load(w, &k.out_ln, h, eps)?,
            num_heads: cfg.num_heads,
            activation: cfg.activation,
            dropout: cfg.dropout,
            attention_output_dropout: cfg.arch != crate::Arch::DistilBert,
        })
    }

    /// The four linear layers (QKV, attention output, intermediate, output).
    pub fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.qkv,
            &mut self.attn_out,
            &mut self.inter,
            &mut self.out,
        ]
    }

    /// Whether [`Self::forward_fused`] can run this layer (unpacked f32 / f64 weights).
    pub fn fusable(&self) -> bool {
        [&self.qkv, &self.attn_out, &self.inter, &self.out]
            .iter()
            .all(|l| l.packed.is_none())
            && matches!(
                self.qkv.weight.dtype(),
                candle_core::DType::F32 | candle_core::DType::F64
            )
    }

    /// [`Self::forward_train`] as one fused op: the same result, with the weights'
    /// gradients left in `sink` by the backward. Dropout seeds are drawn in the same order.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        cu_seqlens: &[usize],
        d: Option<&crate::Dropout>,
        sink: &berth_kernels::GradSink,
    ) -> Result<Tensor> {
        let (w, drop) = self.fused_parts(d);
        Ok(berth_kernels::encoder_layer_train(
            x, &w, cu_seqlens, drop, sink,
        )?)
    }

    /// [`Self::forward_fused`] computing only output `rows` (`[rows.len(), H]`): for the
    /// last layer under a loss that reads few positions.
    pub fn forward_fused_rows(
        &self,
        x: &Tensor,
        cu_seqlens: &[usize],
        d: Option<&crate::Dropout>,
        sink: &berth_kernels::GradSink,
        rows: &[usize],
    ) -> Result<Tensor> {
        let (w, drop) = self.fused_parts(d);
        Ok(berth_kernels::encoder_layer_train_rows(
            x, &w, cu_seqlens, drop, sink, rows,
        )?)
    }

    /// The fused op's weight tensors, in [`berth_kernels::LayerWeights::tensors`] order.
    pub fn fused_weights(&self) -> Vec<Tensor> {
        let (w, _) = self.fused_parts(None);
        w.tensors().into_iter().cloned().collect()
    }

    /// The fused op's weights, and its dropout sites seeded in the per-op path's order.
    fn fused_parts(
        &self,
        d: Option<&crate::Dropout>,
    ) -> (berth_kernels::LayerWeights, berth_kernels::LayerDropout) {
        let drop = match d {
            None => berth_kernels::LayerDropout::default(),
            Some(d) => {
                let site = |p: f64| (p > 0.0).then(|| d.site(p));
                berth_kernels::LayerDropout {
                    attention: site(self.dropout.attention),
                    attn_out: if self.attention_output_dropout {
                        site(self.dropout.hidden)
                    } else {
                        None
                    },
                    ffn_out: site(self.dropout.hidden),
                }
            }
        };
        let pair = |l: &Linear| (l.weight.clone(), l.bias.clone());
        let w = berth_kernels::LayerWeights {
            qkv: pair(&self.qkv),
            attn_out: pair(&self.attn_out),
            attn_ln: (self.attn_ln.weight.clone(), self.attn_ln.bias.clone()),
            attn_ln_eps: self.attn_ln.eps,
            inter: pair(&self.inter),
            out: pair(&self.out),
            out_ln: (self.out_ln.weight.clone(), self.out_ln.bias.clone()),
            out_ln_eps: self.out_ln.eps,
            num_heads: self.num_heads,
            activation: self.activation,
            products: self.qkv.products,
        };
        (w, drop)
    }

    /// Everything after the attention (output projection, add & norm, feed-forward, add &
    /// norm, and `next`'s Q, K, V projection when it is packed alike) in one pass by row
    /// groups, when this layer's weights are packed for bf16 or int8 inference and the
    /// batch is long enough to share by rows ([`berth_kernels::amx::rows::layer_tail`]:
    /// the same bits as the ops apart); `None` otherwise.
    fn packed_tail(
        &self,
        ctx: &Tensor,
        x: &Tensor,
        next: Option<&Layer>,
    ) -> Result<Option<TailOutput<Tensor>>> {
        use crate::modules::Packed;
        use berth_kernels::amx::rows::{self, GroupProduct, Norm, Tail};
        if ctx.dtype() != candle_core::DType::F32 || !rows::by_row_groups(ctx.dim(0)?) {
            return Ok(None);
        }
        let flat = |t: &Tensor| t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>();
        let (g1, b1) = (flat(&self.attn_ln.weight)?, flat(&self.attn_ln.bias)?);
        let (g2, b2) = (flat(&self.out_ln.weight)?, flat(&self.out_ln.bias)?);
        fn run<P: GroupProduct>(
            layer: &Layer,
            ctx: &Tensor,
            x: &Tensor,
            [a, u, d]: [&P; 3],
            next_qkv: Option<&P>,
            [g1, b1, g2, b2]: [&[f32]; 4],
        ) -> Result<TailOutput<Tensor>> {
            let tail = Tail {
                attn_out: a,
                attn_ln: Norm {
                    gamma: g1,
                    beta: b1,
                    eps: layer.attn_ln.eps as f32,
                },
                up: u,
                act: layer.activation,
                down: d,
                out_ln: Norm {
                    gamma: g2,
                    beta: b2,
                    eps: layer.out_ln.eps as f32,
                },
                next_qkv,
            };
            Ok(rows::layer_tail_tensors(ctx, x, &tail)?)
        }
        let norms = [&g1[..], &b1, &g2, &b2];
        let packed = [&self.attn_out, &self.inter, &self.out].map(|l| l.packed.as_deref());
        let next = next.and_then(|l| l.qkv.packed.as_deref());
        Ok(Some(match packed {
            [Some(Packed::Bf16(a)), Some(Packed::Bf16(u)), Some(Packed::Bf16(d))] => {
                let next = match next {
                    Some(Packed::Bf16(q)) => Some(q),
                    _ => None,
                };
                run(self, ctx, x, [a, u, d], next, norms)?
            }
            [Some(Packed::Int8(a)), Some(Packed::Int8(u)), Some(Packed::Int8(d))] => {
                let next = match next {
                    Some(Packed::Int8(q)) => Some(q),
                    _ => None,
                };
                run(self, ctx, x, [a, u, d], next, norms)?
            }
            _ => return Ok(None),
        }))
    }

    /// `x [N, H]` → `[N, H]`; tokens attend only within their sequence of `cu_seqlens`.
    pub fn forward(&self, x: &Tensor, cu_seqlens: &[usize]) -> Result<Tensor> {
        self.forward_train(x, cu_seqlens, None)
    }

    /// [`Self::forward`] with dropout when `d` is given (training): on the attention
    /// probabilities, and on the attention output (not in DistilBERT) and feed-forward
    /// output before their residual adds, as transformers places it.
    pub fn forward_train(
        &self,
        x: &Tensor,
        cu_seqlens: &[usize],
        d: Option<&crate::Dropout>,
    ) -> Result<Tensor> {
        Ok(self.forward_chained(x, cu_seqlens, d, None, None)?.0)
    }

    /// [`Self::forward_train`] starting from this layer's Q, K, V projection `qkv` when the
    /// previous layer computed it; with `next` (the following layer), also `next`'s
    /// projection when this layer's row-group tail computed it ([`Self::packed_tail`]).
    pub fn forward_chained(
        &self,
        x: &Tensor,
        cu_seqlens: &[usize],
        d: Option<&crate::Dropout>,
        qkv: Option<Tensor>,
        next: Option<&Layer>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let qkv = match qkv {
            Some(qkv) => qkv,
            None => self.qkv.forward(x)?, // [N, 3H]
        };
        let hd = x.dim(1)? / self.num_heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let drop = |t: Tensor, p: f64| match d {
            Some(d) => d.apply(&t, p),
            None => Ok(t),
        };
        let ctx = match d {
            Some(d) if self.dropout.attention > 0.0 => berth_kernels::varlen_attention_dropout(
                &qkv,
                cu_seqlens,
                self.num_heads,
                scale,
                self.dropout.attention,
                d.next_seed(),
                d.token_offset(),
            )?,
            _ => berth_kernels::varlen_attention(&qkv, cu_seqlens, self.num_heads, scale)?,
        };
        if d.is_none() {
            if let Some(out) = self.packed_tail(&ctx, x, next)? {
                return Ok((out.hidden, out.next_qkv));
            }
        }
        let attn = self.attn_out.forward(&ctx)?;
        let attn = if self.attention_output_dropout {
            drop(attn, self.dropout.hidden)?
        } else {
            attn
        };
        // Weights packed for inference (never during training): the residual add and the
        // LayerNorm run as one fused pass without a gradient.
        let fused = d.is_none() && self.out.packed.is_some();
        let add_norm = |ln: &LayerNorm, y: Tensor, res: &Tensor| -> Result<Tensor> {
            if fused && y.dtype() == candle_core::DType::F32 {
                Ok(berth_kernels::add_layer_norm(
                    &y, res, &ln.weight, &ln.bias, ln.eps,
                )?)
            } else {
                ln.forward(&(y + res)?)
            }
        };
        let x = add_norm(&self.attn_ln, attn, x)?;
        let f = self.inter.forward_then(&x, Some(self.activation))?; // [N, F]
        let f = drop(self.out.forward(&f)?, self.dropout.hidden)?;
        Ok((add_norm(&self.out_ln, f, &x)?, None))
    }
}
