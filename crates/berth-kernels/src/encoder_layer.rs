//! One post-LayerNorm encoder layer (BERT, RoBERTa, DistilBERT, ELECTRA) as a single
//! differentiable op for training:
//!
//! ```text
//! qkv = x Wqkv^T + bqkv                  ctx = attention(qkv)        (probability dropout)
//! h1  = LN1(drop(ctx Wo^T + bo) + x)     f   = act(h1 Wi^T + bi)
//! y   = LN2(drop(f Wout^T + bout) + h1)
//! ```
//!
//! Built from the same kernels as the per-op path (so the results are the same bits), but
//! candle's autograd sees one node per layer instead of a dozen. Per node, candle's
//! backward allocates a zero-filled gradient and adds the incoming one into it; over a
//! MiniLM layer at 4,096 tokens that is ~126 MB zeroed and added, ~9 % of a training step.
//! Here the activations the backward needs are kept by the op, intermediate gradients are
//! plain buffers updated in place, and the weight gradients go to a [`GradSink`] (the
//! weights are not candle arguments of the op: a custom op takes at most three), from which
//! the caller moves them into candle's `GradStore` after `backward()`.
use std::any::Any;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu::{dispatch, slice, with_slice};
use crate::dropout::DropSite;
use crate::{attention, dropout, layer_norm, linear, Activation, Float};

/// Gradients computed for tensors that are not candle arguments of the op that computed
/// them (a fused layer's weights), held until [`GradSink::drain_into`] adds them to a
/// `GradStore` — or, while a listener is set ([`GradSink::set_listener`]), handed to it as
/// each layer's backward finishes (data-parallel training sums them over the ranks while
/// the backward goes on). Clones share one store and one listener.
#[derive(Clone, Default)]
pub struct GradSink {
    pending: Arc<Mutex<Vec<(Tensor, Tensor)>>>,
    listener: Arc<Mutex<Option<GradListener>>>,
}

/// Receives one fused layer's weight gradients, `(weight, gradient)` pairs, as soon as the
/// layer's backward has computed them.
pub type GradListener = Arc<dyn Fn(Vec<(Tensor, Tensor)>) + Send + Sync>;

impl std::fmt::Debug for GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.pending.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "GradSink({n} pending)")
    }
}

impl GradSink {
    /// One layer's gradients: to the listener if one is set, else held.
    fn deliver(&self, grads: Vec<(Tensor, Tensor)>) -> Result<()> {
        let listener = self.listener.lock().expect("grad sink poisoned").clone();
        if let Some(listen) = listener {
            listen(grads);
            return Ok(());
        }
        let mut v = self.pending.lock().expect("grad sink poisoned");
        for (var, grad) in grads {
            match v.iter_mut().find(|(t, _)| t.id() == var.id()) {
                // The same weights used twice in one graph (a bi-encoder's two towers).
                Some((_, g)) => *g = (&*g + &grad)?,
                None => v.push((var, grad)),
            }
        }
        Ok(())
    }

    /// Hands every later layer's gradients to `listener` instead of holding them (`None`:
    /// hold them again).
    pub fn set_listener(&self, listener: Option<GradListener>) {
        *self.listener.lock().expect("grad sink poisoned") = listener;
    }

    /// Moves the pending gradients into `grads`, adding to any gradient already there.
    /// Call it after every `backward()` of a graph that ran a fused layer.
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock().expect("grad sink poisoned"));
        for (var, g) in pending {
            let g = match grads.remove(&var) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(&var, g);
        }
        Ok(())
    }

    /// Drops pending gradients (a backward whose gradients are not wanted).
    pub fn clear(&self) {
        self.pending.lock().expect("grad sink poisoned").clear();
    }
}

/// The weights and settings of one encoder layer. Weight tensors are `[out, in]` as in
/// the checkpoint; LayerNorms are (gamma, beta).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// Fused Q, K, V projection: `[3H, H]`, `[3H]`.
    pub qkv: (Tensor, Tensor),
    /// Attention output projection: `[H, H]`, `[H]`.
    pub attn_out: (Tensor, Tensor),
    /// LayerNorm after attention.
    pub attn_ln: (Tensor, Tensor),
    /// Its epsilon.
    pub attn_ln_eps: f64,
    /// Feed-forward up-projection: `[F, H]`, `[F]`.
    pub inter: (Tensor, Tensor),
    /// Feed-forward down-projection: `[H, F]`, `[H]`.
    pub out: (Tensor, Tensor),
    /// LayerNorm after the feed-forward block.
    pub out_ln: (Tensor, Tensor),
    /// Its epsilon.
    pub out_ln_eps: f64,
    /// Attention heads.
    pub num_heads: usize,
    /// Feed-forward activation.
    pub activation: Activation,
    /// The number format of the four linear layers' products, forward and backward.
    pub products: crate::Products,
}

impl LayerWeights {
    /// The twelve weight tensors, in the order the backward hands out their gradients.
    pub fn tensors(&self) -> [&Tensor; 12] {
        [
            &self.qkv.0,
            &self.qkv.1,
            &self.attn_out.0,
            &self.attn_out.1,
            &self.attn_ln.0,
            &self.attn_ln.1,
            &self.inter.0,
            &self.inter.1,
            &self.out.0,
            &self.out.1,
            &self.out_ln.0,
            &self.out_ln.1,
        ]
    }
}

/// Dropout of one layer's forward: a [`DropSite`] per site, `None` where off.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerDropout {
    /// On the attention probabilities.
    pub attention: Option<DropSite>,
    /// On the attention output projection, before the residual add.
    pub attn_out: Option<DropSite>,
    /// On the feed-forward output, before the residual add.
    pub ffn_out: Option<DropSite>,
}

/// One encoder layer, `x [N, H]` → `[N, H]`, tokens attending within their sequence of
/// `cu_seqlens`. Differentiable in `x` through candle; the weights' gradients are
/// deposited in `sink` by the backward (see [`GradSink`]). The weights must be
/// contiguous f32 or f64 tensors of `x`'s dtype.
pub fn encoder_layer_train(
    x: &Tensor,
    w: &LayerWeights,
    cu_seqlens: &[usize],
    drop: LayerDropout,
    sink: &GradSink,
) -> Result<Tensor> {
    apply(x, w, cu_seqlens, drop, sink, None)
}

/// Checks the layer's inputs and runs the op (every token, or output `rows` only).
fn apply(
    x: &Tensor,
    w: &LayerWeights,
    cu_seqlens: &[usize],
    drop: LayerDropout,
    sink: &GradSink,
    rows: Option<&[usize]>,
) -> Result<Tensor> {
    let (n, h) = x.dims2()?;
    if let Some(&bad) = rows.unwrap_or(&[]).iter().find(|&&r| r >= n) {
        bail!("encoder layer: output row {bad} is outside the {n} tokens");
    }
    let f = w.inter.0.dim(0)?;
    let expect: [&[usize]; 12] = [
        &[3 * h, h],
        &[3 * h],
        &[h, h],
        &[h],
        &[h],
        &[h],
        &[f, h],
        &[f],
        &[h, f],
        &[h],
        &[h],
        &[h],
    ];
    for (t, shape) in w.tensors().into_iter().zip(expect) {
        if t.dims() != shape || t.dtype() != x.dtype() || !t.is_contiguous() {
            bail!(
                "encoder layer: weight {:?} {:?} does not fit hidden {h}, intermediate {f}, {:?}",
                t.dims(),
                t.dtype(),
                x.dtype()
            );
        }
    }
    if w.num_heads == 0 || h % w.num_heads != 0 {
        bail!(
            "encoder layer: hidden {h} is not a multiple of {} heads",
            w.num_heads
        );
    }
    if cu_seqlens.first() != Some(&0)
        || cu_seqlens.last() != Some(&n)
        || cu_seqlens.windows(2).any(|p| p[0] > p[1])
    {
        bail!("encoder layer: cu_seqlens {cu_seqlens:?} must rise from 0 to the token count {n}");
    }
    x.contiguous()?.apply_op1(EncoderLayer {
        w: w.clone(),
        cu: cu_seqlens.to_vec(),
        rows: rows.map(<[usize]>::to_vec),
        drop,
        sink: sink.clone(),
        saved: Mutex::new(None),
    })
}

/// [`encoder_layer_train`] for a loss that reads only output `rows` (the first tokens
/// for classification, the masked tokens for masked-LM): `[rows.len(), H]`, row `k` the
/// layer's output at token `rows[k]`. Keys and values are computed for every token; the
/// queries, attention output, feed-forward block and LayerNorms only for `rows`. Dropout
/// masks are those of the full layer at the same positions, so the result equals rows
/// of [`encoder_layer_train`]'s output.
pub fn encoder_layer_train_rows(
    x: &Tensor,
    w: &LayerWeights,
    cu_seqlens: &[usize],
    drop: LayerDropout,
    sink: &GradSink,
    rows: &[usize],
) -> Result<Tensor> {
    apply(x, w, cu_seqlens, drop, sink, Some(rows))
}

struct EncoderLayer {
    w: LayerWeights,
    cu: Vec<usize>,
    /// Output rows only (see [`encoder_layer_train_rows`]); `None`: every token.
    rows: Option<Vec<usize>>,
    drop: LayerDropout,
    sink: GradSink,
    /// The forward's activations for the backward: a `Saved<T>`.
    saved: Mutex<Option<Box<dyn Any + Send>>>,
}

/// What the backward needs from the forward (the input `x` and output `y` candle keeps).
struct Saved<T> {
    qkv: Vec<T>,
    ctx: Vec<T>,
    /// LN1's input: `drop(attention output) + x`.
    ln1_in: Vec<T>,
    /// LN1's output.
    h1: Vec<T>,
    /// Feed-forward pre-activation and activation.
    f_pre: Vec<T>,
    f_act: Vec<T>,
    /// LN2's input: `drop(feed-forward output) + h1`.
    ln2_in: Vec<T>,
}

/// Runs `f` on the weights' contiguous slices (in [`LayerWeights::tensors`] order), their
/// storage read-locked for the call.
fn with_weights<T: Float, R>(w: &LayerWeights, f: impl FnOnce(&[&[T]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = w.tensors().iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(cpu) => slice::<T>(cpu, l),
            _ => bail!("berth kernels run on the CPU only for now"),
        })
        .collect::<Result<Vec<&[T]>>>()?;
    f(&slices)
}

/// `a += b` element-wise, in parallel.
fn add_assign<T: Float>(a: &mut [T], b: &[T]) {
    const CHUNK: usize = 1 << 14;
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, &b)| *a = *a + b));
}

/// Dropout in place (identity when off; all zeros at rate 1). With `rows`, `xs [rows, h]`
/// holds copies of those rows of an `[N, h]` tensor and gets the whole tensor's mask at
/// their positions.
fn drop_rows<T: Float>(xs: &mut [T], d: Option<DropSite>, rows: Option<&[usize]>, h: usize) {
    // A multiple of 4 elements per block whatever `h` (a block never splits the mask's
    // groups of four draws).
    const ROWS: usize = 16;
    if d.is_some_and(|d| d.rate > 0.0) {
        let keep = keep::<T>(d);
        xs.par_chunks_mut(ROWS * h)
            .enumerate()
            .for_each(|(c, xb)| mask_block(xb, c * ROWS, h, d, rows, keep));
    }
}

/// Dropout's keep threshold and scale at site `d` (any values when off).
fn keep<T: Float>(d: Option<DropSite>) -> (u32, T) {
    match d {
        Some(d) => (
            dropout::threshold(d.rate),
            T::from_f64(1.0 / (1.0 - d.rate as f64)),
        ),
        None => (0, T::one()),
    }
}

/// [`drop_rows`] on the block of rows `first..` of `y [R, h]` (`(threshold, scale)` from
/// [`keep`]): each element's mask drawn at its place in the whole `[N, h]` tensor, row
/// `first + k`, or with `mask_rows` (`y` holds copies of those rows) row
/// `mask_rows[first + k]`.
fn mask_block<T: Float>(
    yb: &mut [T],
    first: usize,
    h: usize,
    d: Option<DropSite>,
    mask_rows: Option<&[usize]>,
    (t, scale): (u32, T),
) {
    match (d, mask_rows) {
        (Some(d), _) if d.rate >= 1.0 => yb.iter_mut().for_each(|v| *v = T::zero()),
        (Some(d), None) if d.rate > 0.0 => {
            T::mask_in_place(yb, d.seed, d.base(h) + (first * h) as u64, t, scale)
        }
        (Some(d), Some(rows)) if d.rate > 0.0 => {
            for (k, yr) in yb.chunks_mut(h).enumerate() {
                let at = d.base(h) + (rows[first + k] * h) as u64;
                T::mask_in_place(yr, d.seed, at, t, scale);
            }
        }
        _ => {}
    }
}

/// `y = drop(y) + residual` in place, then `LayerNorm(y)` into a new buffer, in one
/// parallel pass over blocks of rows (three passes before, each over the whole tensor:
/// [`drop_rows`], the residual add and [`layer_norm::forward`]), the blocks masked as
/// [`drop_rows`] masks them ([`mask_block`]). Each element gets the same
/// mask, add and normalisation as in the separate passes: the same bits. `y [R, h]`: with
/// `mask_rows`, row `k` of `y` draws the mask of row `mask_rows[k]` of the whole tensor;
/// with `res_rows`, its residual is row `res_rows[k]` of `res` (else row `k`).
fn drop_add_norm<T: Float>(
    y: &mut [T],
    res: &[T],
    d: Option<DropSite>,
    mask_rows: Option<&[usize]>,
    res_rows: Option<&[usize]>,
    (g, b, eps): (&[T], &[T], f64),
) -> Vec<T> {
    // A multiple of 4 elements per block whatever `h` (a block never splits the mask's
    // groups of four draws).
    const ROWS: usize = 16;
    let h = g.len();
    let mut out: Vec<T> = Vec::with_capacity(y.len());
    let keep = keep::<T>(d);
    out.spare_capacity_mut()[..y.len()]
        .par_chunks_mut(ROWS * h)
        .zip(y.par_chunks_mut(ROWS * h))
        .enumerate()
        .for_each(|(c, (o, yb))| {
            let first = c * ROWS;
            mask_block(yb, first, h, d, mask_rows, keep);
            for (k, (yr, or)) in yb.chunks_mut(h).zip(o.chunks_mut(h)).enumerate() {
                let r = res_rows.map_or(first + k, |rows| rows[first + k]);
                yr.iter_mut()
                    .zip(&res[r * h..(r + 1) * h])
                    .for_each(|(a, &v)| *a = *a + v);
                let (mean, rstd) = T::row_stats(yr, eps);
                for i in 0..h {
                    or[i].write((yr[i] - mean) * rstd * g[i] + b[i]);
                }
            }
        });
    // SAFETY: the blocks cover all `y.len()` elements of `out`, each written above.
    unsafe { out.set_len(y.len()) };
    out
}

/// `x[rows[k]] += a[k]` for rows of width `h` (`x += a` when `rows` is `None`).
fn scatter_add<T: Float>(x: &mut [T], a: &[T], rows: Option<&[usize]>, h: usize) {
    match rows {
        None => add_assign(x, a),
        Some(rows) => {
            for (k, &r) in rows.iter().enumerate() {
                x[r * h..(r + 1) * h]
                    .iter_mut()
                    .zip(&a[k * h..(k + 1) * h])
                    .for_each(|(x, &b)| *x = *x + b);
            }
        }
    }
}

impl EncoderLayer {
    fn scale(&self, h: usize) -> f64 {
        1.0 / ((h / self.w.num_heads) as f64).sqrt()
    }

    fn forward<T: Float>(&self, x: &[T]) -> Result<Vec<T>> {
        let (y, saved) = with_weights::<T, _>(&self.w, |ws| {
            let &[wqkv, bqkv, wo, bo, g1, b1, wi, bi, wout, bout, g2, b2] = ws else {
                unreachable!("twelve weights")
            };
            let h = g1.len();
            let rows = self.rows.as_deref();
            let p = self.w.products;
            let qkv = linear::forward_with(x, wqkv, bqkv, p)?;
            let (nh, scale) = (self.w.num_heads, self.scale(h));
            let ctx = match rows {
                None => attention::forward(&qkv, &self.cu, nh, scale, self.drop.attention),
                Some(r) => {
                    attention::forward_rows(&qkv, &self.cu, r, nh, scale, self.drop.attention)
                }
            };
            let mut ln1_in = linear::forward_with(&ctx, wo, bo, p)?;
            let ln1 = (g1, b1, self.w.attn_ln_eps);
            let h1 = drop_add_norm(&mut ln1_in, x, self.drop.attn_out, rows, rows, ln1);
            let f_pre = linear::forward_with(&h1, wi, bi, p)?;
            let f_act = crate::activation::activated(self.w.activation, &f_pre);
            let mut ln2_in = linear::forward_with(&f_act, wout, bout, p)?;
            let ln2 = (g2, b2, self.w.out_ln_eps);
            let y = drop_add_norm(&mut ln2_in, &h1, self.drop.ffn_out, rows, None, ln2);
            let saved = Saved {
                qkv,
                ctx,
                ln1_in,
                h1,
                f_pre,
                f_act,
                ln2_in,
            };
            Ok((y, saved))
        })?;
        *self.saved.lock().expect("saved poisoned") = Some(Box::new(saved));
        Ok(y)
    }

    /// Returns `dx` and deposits the weights' gradients.
    fn backward<T: Float>(&self, x: &[T], dy: &[T]) -> Result<Vec<T>> {
        let saved = self.saved.lock().expect("saved poisoned").take();
        let Some(s) = saved.and_then(|b| b.downcast::<Saved<T>>().ok()) else {
            bail!("encoder layer: backward without its forward's activations (run twice?)")
        };
        let (dx, grads) = with_weights::<T, _>(&self.w, |ws| {
            let &[wqkv, _, wo, _, g1, _, wi, _, wout, _, g2, _] = ws else {
                unreachable!("twelve weights")
            };
            let (h, f) = (g1.len(), wi.len() / g1.len());
            let rows = self.rows.as_deref();
            let p = self.w.products;
            // y = LN2(ln2_in), ln2_in = drop(f_act Wout^T + bout) + h1
            let (d_ln2, dg2, db2) = layer_norm::backward(&s.ln2_in, g2, dy, self.w.out_ln_eps);
            let mut d_o = d_ln2.clone();
            drop_rows(&mut d_o, self.drop.ffn_out, rows, h);
            let (mut d_f, dwout, dbout) = linear::backward_with(&s.f_act, wout, &d_o, h, p)?;
            drop(d_o);
            d_f.par_chunks_mut(4096)
                .zip(s.f_pre.par_chunks(4096))
                .for_each(|(d, xc)| T::activate_backward(self.w.activation, xc, d));
            let (mut d_h1, dwi, dbi) = linear::backward_with(&s.h1, wi, &d_f, f, p)?;
            drop(d_f);
            add_assign(&mut d_h1, &d_ln2);
            drop(d_ln2);
            // h1 = LN1(ln1_in), ln1_in = drop(ctx Wo^T + bo) + x
            let (d_ln1, dg1, db1) = layer_norm::backward(&s.ln1_in, g1, &d_h1, self.w.attn_ln_eps);
            drop(d_h1);
            let mut d_a = d_ln1.clone();
            drop_rows(&mut d_a, self.drop.attn_out, rows, h);
            let (d_ctx, dwo, dbo) = linear::backward_with(&s.ctx, wo, &d_a, h, p)?;
            drop(d_a);
            let (nh, scale, d_attn) = (self.w.num_heads, self.scale(h), self.drop.attention);
            let d_qkv = match rows {
                None => attention::backward(&s.qkv, &d_ctx, &self.cu, nh, scale, d_attn),
                Some(r) => attention::backward_rows(&s.qkv, &d_ctx, &self.cu, r, nh, scale, d_attn),
            };
            drop(d_ctx);
            let (mut dx, dwqkv, dbqkv) = linear::backward_with(x, wqkv, &d_qkv, 3 * h, p)?;
            scatter_add(&mut dx, &d_ln1, rows, h);
            let grads = [
                dwqkv, dbqkv, dwo, dbo, dg1, db1, dwi, dbi, dwout, dbout, dg2, db2,
            ];
            Ok((dx, grads))
        })?;
        let grads = self
            .w
            .tensors()
            .into_iter()
            .zip(grads)
            .map(|(t, g)| Ok((t.clone(), Tensor::from_vec(g, t.shape(), t.device())?)))
            .collect::<Result<Vec<_>>>()?;
        self.sink.deliver(grads)?;
        Ok(dx)
    }
}

impl CustomOp1 for EncoderLayer {
    fn name(&self) -> &'static str {
        "berth-encoder-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(op: &EncoderLayer, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(op.forward(slice::<T>(s, l)?)?))
        }
        let (n, h) = l.shape().dims2()?;
        let rows = self.rows.as_ref().map_or(n, |r| r.len());
        Ok((
            dispatch!(s.dtype(), self.name(), run(self, s, l))?,
            Shape::from((rows, h)),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(op: &EncoderLayer, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            let dx = with_slice::<T, _>(x, |xs| with_slice::<T, _>(dy, |g| op.backward(xs, g)))???;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(dispatch!(x.dtype(), self.name(), run(self, x, dy))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::randn;
    use candle_core::Var;

    /// The same layer composed from the per-op kernels inside candle's autograd.
    fn composed(x: &Tensor, w: &LayerWeights, cu: &[usize], d: LayerDropout) -> Result<Tensor> {
        let h = x.dim(1)?;
        let scale = 1.0 / ((h / w.num_heads) as f64).sqrt();
        let drop = |t: Tensor, d: Option<DropSite>| match d {
            Some(d) => crate::dropout::dropout_at(&t, d.rate as f64, d.seed, d.base(h)),
            None => Ok(t),
        };
        let lin = |x: &Tensor, (w_, b): &(Tensor, Tensor)| crate::linear_with(x, w_, b, w.products);
        let qkv = lin(x, &w.qkv)?;
        let ctx = match d.attention {
            Some(d) => crate::varlen_attention_dropout(
                &qkv,
                cu,
                w.num_heads,
                scale,
                d.rate as f64,
                d.seed,
                d.row_offset,
            )?,
            None => crate::varlen_attention(&qkv, cu, w.num_heads, scale)?,
        };
        let a = drop(lin(&ctx, &w.attn_out)?, d.attn_out)?;
        let h1 = crate::layer_norm(&(a + x)?, &w.attn_ln.0, &w.attn_ln.1, w.attn_ln_eps)?;
        let f = crate::activation(&lin(&h1, &w.inter)?, w.activation)?;
        let o = drop(lin(&f, &w.out)?, d.ffn_out)?;
        crate::layer_norm(&(o + &h1)?, &w.out_ln.0, &w.out_ln.1, w.out_ln_eps)
    }

    fn weights(
        h: usize,
        f: usize,
        heads: usize,
        dtype: candle_core::DType,
    ) -> Result<LayerWeights> {
        let mut seed = 100;
        let mut t = |shape: &[usize], scale: f64| -> Result<Tensor> {
            seed += 1;
            let v = (randn(shape, seed)? * scale)?.to_dtype(dtype)?;
            Ok(Var::from_tensor(&v)?.as_tensor().clone())
        };
        let ln = |t: Tensor| -> Result<Tensor> { t + 1.0 };
        Ok(LayerWeights {
            qkv: (t(&[3 * h, h], 0.2)?, t(&[3 * h], 0.1)?),
            attn_out: (t(&[h, h], 0.2)?, t(&[h], 0.1)?),
            attn_ln: (
                Var::from_tensor(&ln(t(&[h], 0.1)?)?)?.as_tensor().clone(),
                t(&[h], 0.1)?,
            ),
            attn_ln_eps: 1e-12,
            inter: (t(&[f, h], 0.2)?, t(&[f], 0.1)?),
            out: (t(&[h, f], 0.2)?, t(&[h], 0.1)?),
            out_ln: (
                Var::from_tensor(&ln(t(&[h], 0.1)?)?)?.as_tensor().clone(),
                t(&[h], 0.1)?,
            ),
            out_ln_eps: 1e-5,
            num_heads: heads,
            activation: Activation::Gelu,
            products: crate::Products::F32,
        })
    }

    /// Loss `sum(y * g)` and the gradients of `x` and every weight, by the fused op and by
    /// the composed ops.
    fn both(
        dtype: candle_core::DType,
        h: usize,
        heads: usize,
        cu: &[usize],
        d: LayerDropout,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        both_with(dtype, h, heads, cu, d, crate::Products::F32)
    }

    fn both_with(
        dtype: candle_core::DType,
        h: usize,
        heads: usize,
        cu: &[usize],
        d: LayerDropout,
        products: crate::Products,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let n = *cu.last().unwrap();
        let mut w = weights(h, 2 * h + 8, heads, dtype)?;
        w.products = products;
        let x = Var::from_tensor(&randn(&[n, h], 7)?.to_dtype(dtype)?)?;
        let g = randn(&[n, h], 8)?.to_dtype(dtype)?;
        let sink = GradSink::default();
        let fused = encoder_layer_train(&x, &w, cu, d, &sink)?;
        let mut gf = (&fused * &g)?.sum_all()?.backward()?;
        sink.drain_into(&mut gf)?;
        let reference = composed(&x, &w, cu, d)?;
        let gr = (&reference * &g)?.sum_all()?.backward()?;
        let mut out = vec![(fused, reference)];
        for t in std::iter::once(x.as_tensor()).chain(w.tensors()) {
            out.push((
                gf.get(t).expect("fused gradient").clone(),
                gr.get(t).expect("composed gradient").clone(),
            ));
        }
        Ok(out)
    }

    #[test]
    fn f32_equals_the_composed_ops_bit_for_bit() -> Result<()> {
        let drops = [
            LayerDropout::default(),
            LayerDropout {
                attention: Some(DropSite::new(0.1, 11)),
                attn_out: Some(DropSite::new(0.1, 12)),
                ffn_out: Some(DropSite::new(0.2, 13)),
            },
        ];
        // hd 32: the tiled attention kernel where the CPU has it; uneven sequences.
        for d in drops {
            for (i, (a, b)) in both(candle_core::DType::F32, 64, 2, &[0, 5, 40, 41, 77], d)?
                .into_iter()
                .enumerate()
            {
                let (a, b) = (
                    a.flatten_all()?.to_vec1::<f32>()?,
                    b.flatten_all()?.to_vec1::<f32>()?,
                );
                assert_eq!(
                    a, b,
                    "tensor {i} (0: output, 1: dx, then weights) with {d:?}"
                );
            }
        }
        Ok(())
    }

    /// bf16 products: the fused layer equals the per-op path with the same products bit
    /// for bit, and every output and gradient is near the f32 layer's but, where a product
    /// feeds it, not equal to it (the products really ran in bf16).
    #[test]
    fn bf16_products_equal_the_composed_ops_and_stay_near_f32() -> Result<()> {
        // (Where the CPU has no bf16 kernel, unit tests run the products on a portable loop.)
        let d = LayerDropout {
            attention: Some(DropSite::new(0.1, 11)),
            attn_out: None,
            ffn_out: Some(DropSite::new(0.2, 13)),
        };
        let (dt, cu) = (candle_core::DType::F32, [0, 5, 40, 41, 77]);
        let bf16 = both_with(dt, 64, 2, &cu, d, crate::Products::Bf16)?;
        let f32s = both_with(dt, 64, 2, &cu, d, crate::Products::F32)?;
        for (i, ((a, b), (f, _))) in bf16.iter().zip(&f32s).enumerate() {
            let v = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(v(a)?, v(b)?, "tensor {i}: fused vs composed");
            let diff = (a - f)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            let size = f.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            let rel = diff / size;
            println!("tensor {i}: relative distance to f32 {rel:.2e}");
            // The last LayerNorm's shift gets the upstream gradient's column sums, which no
            // product touches.
            let floor = if i == 13 { 0.0 } else { 1e-5 };
            assert!(
                rel < 2e-2 && rel >= floor,
                "tensor {i}: relative distance to f32 {rel}"
            );
        }
        Ok(())
    }

    /// The fused layer with bf16 products against transformers' BertLayer under PyTorch's
    /// CPU bf16 autocast on the same weights, input and upstream gradient
    /// (fixtures/train/bf16-layer.json from scripts/make_bf16_layer_reference.py). With f32
    /// products berth equals PyTorch's f32 layer; with bf16 products every output and
    /// gradient is as near autocast's as autocast is to f32 (within 1.5× that distance),
    /// and no farther from f32 than autocast's.
    #[test]
    fn bf16_products_match_pytorch_autocast() -> Result<()> {
        use serde_json::Value;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/train/bf16-layer.json"
        );
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON");
        let tensor = |v: &Value| -> Result<Tensor> {
            if v[0].is_array() {
                Ok(crate::testing::matrix(v))
            } else {
                let xs: Vec<f32> = serde_json::from_value(v.clone()).expect("numbers");
                Tensor::new(xs, &candle_core::Device::Cpu)
            }
        };
        let names = [
            "qkv.weight",
            "qkv.bias",
            "attn_out.weight",
            "attn_out.bias",
            "attn_ln.weight",
            "attn_ln.bias",
            "inter.weight",
            "inter.bias",
            "out.weight",
            "out.bias",
            "out_ln.weight",
            "out_ln.bias",
        ];
        let var = |name: &str| -> Result<Tensor> {
            Ok(Var::from_tensor(&tensor(&v["weights"][name])?)?
                .as_tensor()
                .clone())
        };
        let pair = |a: &str, b: &str| -> Result<(Tensor, Tensor)> { Ok((var(a)?, var(b)?)) };
        let eps = v["layer_norm_eps"].as_f64().unwrap();
        let mut w = LayerWeights {
            qkv: pair(names[0], names[1])?,
            attn_out: pair(names[2], names[3])?,
            attn_ln: pair(names[4], names[5])?,
            attn_ln_eps: eps,
            inter: pair(names[6], names[7])?,
            out: pair(names[8], names[9])?,
            out_ln: pair(names[10], names[11])?,
            out_ln_eps: eps,
            num_heads: v["heads"].as_u64().unwrap() as usize,
            activation: Activation::Gelu,
            products: crate::Products::F32,
        };
        let cu: Vec<usize> = serde_json::from_value(v["cu_seqlens"].clone()).unwrap();
        let x = Var::from_tensor(&tensor(&v["x"])?)?;
        let g = tensor(&v["g"])?;
        let mut run = |products| -> Result<Vec<Tensor>> {
            w.products = products;
            let sink = GradSink::default();
            let y = encoder_layer_train(&x, &w, &cu, LayerDropout::default(), &sink)?;
            let mut grads = (&y * &g)?.sum_all()?.backward()?;
            sink.drain_into(&mut grads)?;
            let mut out = vec![y, grads.get(&x).unwrap().clone()];
            out.extend(w.tensors().map(|t| grads.get(t).unwrap().clone()));
            Ok(out)
        };
        let (ours_f32, ours_bf16) = (run(crate::Products::F32)?, run(crate::Products::Bf16)?);
        let keys = ["y".to_string(), "dx".to_string()]
            .into_iter()
            .chain(names.iter().map(|n| format!("grad.{n}")));
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let d = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            Ok(d / b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-30))
        };
        for ((key, f), b) in keys.zip(&ours_f32).zip(&ours_bf16) {
            let shaped = |t: Tensor| t.reshape(f.shape());
            let torch_f32 = shaped(tensor(&v["f32"][&key])?)?;
            let autocast = shaped(tensor(&v["autocast"][&key])?)?;
            let same = rel(f, &torch_f32)?;
            let (to_autocast, own, theirs) = (
                rel(b, &autocast)?,
                rel(b, &torch_f32)?,
                rel(&autocast, &torch_f32)?,
            );
            println!(
                "{key}: f32 vs PyTorch {same:.1e}; bf16 vs autocast {to_autocast:.2e}, \
                 bf16 vs f32: berth {own:.2e}, autocast {theirs:.2e}"
            );
            assert!(
                same < 1e-5,
                "{key}: f32 layer differs from PyTorch's: {same}"
            );
            assert!(
                to_autocast <= 1.5 * theirs + 1e-6,
                "{key}: bf16 vs autocast {to_autocast} (autocast vs f32 {theirs})"
            );
            assert!(
                own <= theirs + 1e-6,
                "{key}: bf16 vs f32 {own}, autocast's {theirs}"
            );
        }
        Ok(())
    }

    #[test]
    fn f64_matches_the_composed_ops() -> Result<()> {
        let d = LayerDropout {
            attention: Some(DropSite::new(0.3, 1)),
            attn_out: None,
            ffn_out: Some(DropSite::new(0.5, 2)),
        };
        for (i, (a, b)) in both(candle_core::DType::F64, 12, 3, &[0, 3, 9], d)?
            .into_iter()
            .enumerate()
        {
            let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            let size = b.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff <= 1e-12 * size.max(1.0), "tensor {i}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn weights_used_twice_sum_their_gradients() -> Result<()> {
        let w = weights(16, 40, 2, candle_core::DType::F64)?;
        let x = Var::from_tensor(&randn(&[6, 16], 3)?.to_dtype(candle_core::DType::F64)?)?;
        let sink = GradSink::default();
        let cu = [0, 6];
        let a = encoder_layer_train(&x, &w, &cu, LayerDropout::default(), &sink)?;
        let b = encoder_layer_train(&(&*x * 2.0)?, &w, &cu, LayerDropout::default(), &sink)?;
        let mut g = (a.sum_all()? + b.sum_all()?)?.backward()?;
        sink.drain_into(&mut g)?;
        let ra = composed(&x, &w, &cu, LayerDropout::default())?;
        let rb = composed(&(&*x * 2.0)?, &w, &cu, LayerDropout::default())?;
        let r = (ra.sum_all()? + rb.sum_all()?)?.backward()?;
        for t in w.tensors() {
            let diff = (g.get(t).unwrap() - r.get(t).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(diff < 1e-10, "{diff}");
        }
        Ok(())
    }

    /// With a listener set, each layer's twelve gradients go to it as that layer's
    /// backward finishes — the last layer's first — and equal what the sink would hold.
    #[test]
    fn a_listener_gets_each_layers_gradients_as_its_backward_ends() -> Result<()> {
        let dtype = candle_core::DType::F64;
        let (w1, w2) = (weights(16, 40, 2, dtype)?, weights(16, 40, 2, dtype)?);
        let x = randn(&[6, 16], 3)?.to_dtype(dtype)?;
        let cu = [0, 6];
        let run = |sink: &GradSink| -> Result<GradStore> {
            let x = Var::from_tensor(&x)?;
            let h = encoder_layer_train(&x, &w1, &cu, LayerDropout::default(), sink)?;
            let y = encoder_layer_train(&h, &w2, &cu, LayerDropout::default(), sink)?;
            let mut g = (&y * &y)?.sum_all()?.backward()?;
            sink.drain_into(&mut g)?;
            Ok(g)
        };
        let held = run(&GradSink::default())?;
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink = GradSink::default();
        let to = heard.clone();
        sink.set_listener(Some(Arc::new(move |pairs| to.lock().unwrap().push(pairs))));
        let listened = run(&sink)?;
        let heard = std::mem::take(&mut *heard.lock().unwrap());
        assert_eq!(heard.len(), 2, "one delivery per layer");
        for (layer, w) in heard.iter().zip([&w2, &w1]) {
            assert_eq!(layer.len(), 12);
            for ((var, grad), t) in layer.iter().zip(w.tensors()) {
                assert_eq!(var.id(), t.id());
                assert!(listened.get(t).is_none(), "not also in the GradStore");
                let want = held.get(t).unwrap();
                let diff = (grad - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(diff == 0.0, "{diff}");
            }
        }
        sink.set_listener(None);
        let again = run(&sink)?;
        assert!(w1.tensors().iter().all(|t| again.get(t).is_some()));
        Ok(())
    }

    #[test]
    fn a_share_with_its_row_offset_draws_the_whole_batchs_masks() -> Result<()> {
        // A data-parallel rank runs the sequences after row 40 alone: with row_offset 40 its
        // outputs and input gradient equal those rows of the whole batch's (every dropout
        // site on, f32 tiled attention where the CPU has it, and f64); the rows variant too.
        let site = |rate, seed, at| {
            Some(DropSite {
                rate,
                seed,
                row_offset: at,
            })
        };
        let drop_at = |at| LayerDropout {
            attention: site(0.2, 31, at),
            attn_out: site(0.1, 32, at),
            ffn_out: site(0.3, 33, at),
        };
        let (cu, tail) = ([0usize, 5, 40, 41, 77], [0usize, 1, 37]);
        for (dtype, tol) in [
            (candle_core::DType::F64, 1e-12),
            (candle_core::DType::F32, 1e-5),
        ] {
            let h = 64;
            let w = weights(h, 2 * h + 8, 2, dtype)?;
            let x = Var::from_tensor(&randn(&[77, h], 9)?.to_dtype(dtype)?)?;
            let g = randn(&[77, h], 10)?.to_dtype(dtype)?;
            let sink = GradSink::default();
            let whole = encoder_layer_train(&x, &w, &cu, drop_at(0), &sink)?;
            let dx_whole = (&whole * &g)?.sum_all()?.backward()?;
            let part_x = Var::from_tensor(&x.narrow(0, 40, 37)?)?;
            let part_g = g.narrow(0, 40, 37)?;
            let part = encoder_layer_train(&part_x, &w, &tail, drop_at(40), &sink)?;
            let dx_part = (&part * &part_g)?.sum_all()?.backward()?;
            let rows: Vec<usize> = vec![0, 1, 20, 36];
            let picked = encoder_layer_train_rows(&part_x, &w, &tail, drop_at(40), &sink, &rows)?;
            let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
                let diff = (a - b)?
                    .abs()?
                    .max_all()?
                    .to_dtype(candle_core::DType::F64)?;
                let diff = diff.to_scalar::<f64>()?;
                assert!(diff <= tol, "{what} ({dtype:?}): {diff}");
                Ok(())
            };
            close(&whole.narrow(0, 40, 37)?, &part, "outputs")?;
            close(
                &dx_whole.get(&x).unwrap().narrow(0, 40, 37)?,
                dx_part.get(&part_x).unwrap(),
                "input gradients",
            )?;
            let idx = Tensor::new(&[40u32, 41, 60, 76], x.device())?;
            close(&whole.index_select(&idx, 0)?, &picked, "rows variant")?;
            // Without the offset the share draws other masks.
            let unkeyed = encoder_layer_train(&part_x, &w, &tail, drop_at(0), &sink)?;
            let diff = (&whole.narrow(0, 40, 37)? - &unkeyed)?.abs()?.max_all()?;
            let diff = diff.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            assert!(diff > 1e-3, "offset 0 drew the same masks ({dtype:?})");
        }
        Ok(())
    }

    #[test]
    fn output_rows_equal_rows_of_the_full_layer() -> Result<()> {
        // Loss on some rows only: the rows variant against the same rows of the full op,
        // outputs and every gradient, with dropout at every site (the same masks).
        let d = LayerDropout {
            attention: Some(DropSite::new(0.2, 21)),
            attn_out: Some(DropSite::new(0.1, 22)),
            ffn_out: Some(DropSite::new(0.3, 23)),
        };
        let cu = [0, 5, 5, 40, 41, 77];
        let rows = [0usize, 40, 5, 41, 76, 6];
        for (dtype, heads, tol) in [
            (candle_core::DType::F64, 2, 1e-12),
            (candle_core::DType::F32, 2, 2e-5),
        ] {
            let h = 64;
            let w = weights(h, 2 * h + 8, heads, dtype)?;
            let x = Var::from_tensor(&randn(&[77, h], 7)?.to_dtype(dtype)?)?;
            let g = randn(&[rows.len(), h], 8)?.to_dtype(dtype)?;
            let idx = Tensor::new(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                x.device(),
            )?;
            let sink = GradSink::default();
            let full = encoder_layer_train(&x, &w, &cu, d, &sink)?.index_select(&idx, 0)?;
            let mut gf = (&full * &g)?.sum_all()?.backward()?;
            sink.drain_into(&mut gf)?;
            let part = encoder_layer_train_rows(&x, &w, &cu, d, &sink, &rows)?;
            let mut gp = (&part * &g)?.sum_all()?.backward()?;
            sink.drain_into(&mut gp)?;
            assert_eq!(part.dims(), [rows.len(), h]);
            let mut pairs = vec![(part, full)];
            for t in std::iter::once(x.as_tensor()).chain(w.tensors()) {
                pairs.push((gp.get(t).unwrap().clone(), gf.get(t).unwrap().clone()));
            }
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                let a = a.to_dtype(candle_core::DType::F64)?;
                let b = b.to_dtype(candle_core::DType::F64)?;
                let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                let size = b.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(size > 0.0, "{dtype:?} tensor {i} is zero");
                assert!(
                    diff <= tol * size.max(1.0),
                    "{dtype:?} tensor {i}: {diff} (size {size})"
                );
            }
        }
        let w = weights(16, 40, 2, candle_core::DType::F32)?;
        let x = randn(&[6, 16], 3)?.to_dtype(candle_core::DType::F32)?;
        let sink = GradSink::default();
        let e = encoder_layer_train_rows(&x, &w, &[0, 6], d, &sink, &[6]);
        assert!(e.unwrap_err().to_string().contains("outside"));
        Ok(())
    }

    #[test]
    fn wrong_shapes_are_errors() -> Result<()> {
        let w = weights(16, 40, 2, candle_core::DType::F32)?;
        let x = randn(&[6, 8], 3)?.to_dtype(candle_core::DType::F32)?;
        let e = encoder_layer_train(
            &x,
            &w,
            &[0, 6],
            LayerDropout::default(),
            &GradSink::default(),
        );
        assert!(e.unwrap_err().to_string().contains("does not fit"));
        let x = randn(&[6, 16], 3)?.to_dtype(candle_core::DType::F32)?;
        let e = encoder_layer_train(
            &x,
            &w,
            &[0, 5],
            LayerDropout::default(),
            &GradSink::default(),
        );
        assert!(e.unwrap_err().to_string().contains("cu_seqlens"));
        Ok(())
    }
}
