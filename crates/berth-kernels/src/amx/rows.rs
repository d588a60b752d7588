//! An encoder layer's row-local tail — attention output projection, residual add and
//! LayerNorm, feed-forward up-projection with its activation, down-projection, residual add
//! and LayerNorm, and the next layer's Q, K, V projection — on bf16 or int8 packed weights,
//! one group of row blocks at a time.
//!
//! Run op by op, every step of the tail writes an `[N, H]` or `[N, F]` f32 array, and the
//! next product reads it back to round it to bf16 (or quantize it) into a fresh
//! zero-filled buffer: for a batch of a few thousand tokens each of those arrays leaves
//! L2. Here a worker takes [`GROUP`] row blocks, converts their rows into its own scratch,
//! and carries them through all three products and both LayerNorms while they are in
//! cache; only the attention context and the residual come in, and only the layer's
//! output and the next layer's Q, K, V go out. Each step is the per-op path's own row function (the same kernels,
//! conversions, activation and add-and-norm rows), so the result is bit-identical to it.
use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

use super::BLOCK;
use crate::cpu::{with_slice, SendPtr};
use crate::Activation;

/// Row blocks one task takes: each packed weight panel serves this many blocks while it
/// is in L1, and the group's `[rows, F]` intermediate (f32 and converted) stays well inside
/// L2.
const GROUP: usize = 2;

/// Runs `run(first_row, rows, blocks)` over groups of up to [`GROUP`] row blocks of an
/// `n`-row product, in parallel: each task computes a whole group's output rows.
fn for_each_row_group(n: usize, run: impl Fn(usize, usize, usize) + Sync) {
    let blocks = n.div_ceil(BLOCK);
    (0..blocks.div_ceil(GROUP)).into_par_iter().for_each(|g| {
        let first = g * GROUP;
        let r0 = first * BLOCK;
        run(r0, (n - r0).min(GROUP * BLOCK), GROUP.min(blocks - first))
    });
}

/// Whether [`layer_tail`] keeps every worker busy for `n` rows: it needs a few groups per
/// worker; shorter batches run op by op, whose products split the columns too. Both give
/// the same bits.
pub fn by_row_groups(n: usize) -> bool {
    n.div_ceil(BLOCK * GROUP) >= 2 * rayon::current_num_threads()
}

/// Grows `buf` to at least `len` values (zeros when new) and gives its first `len`: a
/// worker's scratch, kept between calls.
pub(crate) fn scratch<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    &mut buf[..len]
}

/// A worker's buffers for [`layer_tail`], kept between calls.
#[derive(Default)]
pub struct GroupScratch<R> {
    /// The current product's input rows, converted.
    rows: R,
    /// The feed-forward intermediate `act(h W_up^T + b)`, f32.
    mid: Vec<f32>,
    /// A product's `[rows, H]` output before its add-and-norm.
    t: Vec<f32>,
    /// The attention block's output `h` (LayerNorm'd), the feed-forward residual.
    h: Vec<f32>,
}

/// A packed weight whose product runs one row group at a time: [`super::PackedBf16`] and
/// [`super::int8::PackedI8`].
pub trait GroupProduct: Sync {
    /// A group's input rows in this format.
    type Rows: Default;

    /// Runs `f` on this worker's scratch for this format.
    fn with_scratch<R>(f: impl FnOnce(&mut GroupScratch<Self::Rows>) -> R) -> R;

    /// `I`.
    fn inputs(&self) -> usize;

    /// `O`.
    fn outputs(&self) -> usize;

    /// `act(x W^T + b)` for `rows` rows of `x` (row length `I`), the group's `blocks` row
    /// blocks: the rows converted into `conv` as the per-op path converts them (rows past
    /// `rows` keep whatever the scratch held: the kernels compute them and drop them), then
    /// every column block over the row blocks, row blocks inner so each weight panel serves
    /// them all. Output row `r` goes to `y + r * O`.
    ///
    /// It must not call into rayon: the worker's scratch stays borrowed for the whole group,
    /// and a task stolen meanwhile would find it taken.
    ///
    /// # Safety
    /// A kernel for this format runs on this CPU; `y` holds `rows` rows of `O` that no other
    /// thread writes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn group_product(
        &self,
        x: &[f32],
        rows: usize,
        blocks: usize,
        act: Option<Activation>,
        conv: &mut Self::Rows,
        y: *mut f32,
    );
}

/// A LayerNorm's parameters.
#[derive(Clone, Copy)]
pub struct Norm<'a> {
    /// Scale `[H]`.
    pub gamma: &'a [f32],
    /// Shift `[H]`.
    pub beta: &'a [f32],
    /// Added to the variance.
    pub eps: f32,
}

/// The packed weights of an encoder layer's tail (see the module docs).
pub struct Tail<'a, P> {
    /// Attention output projection `[H, H]`.
    pub attn_out: &'a P,
    /// LayerNorm after the attention block.
    pub attn_ln: Norm<'a>,
    /// Feed-forward up-projection `[F, H]`.
    pub up: &'a P,
    /// The activation after `up`.
    pub act: Activation,
    /// Feed-forward down-projection `[H, F]`.
    pub down: &'a P,
    /// LayerNorm after the feed-forward block.
    pub out_ln: Norm<'a>,
    /// The next layer's fused Q, K, V projection `[3H', H]`, if it is packed alike: its
    /// product runs on each group's output rows while they are in cache.
    pub next_qkv: Option<&'a P>,
}

/// What [`layer_tail`] gives: the layer's output and, with [`Tail::next_qkv`], the next
/// layer's Q, K, V.
pub struct TailOutput<T> {
    /// `[N, H]`.
    pub hidden: T,
    /// `[N, 3H']`.
    pub next_qkv: Option<T>,
}

/// The layer's output `[N, H]` from the attention context `ctx [N, H]` and the layer input
/// `x [N, H]`: `h = LN(ctx W_o^T + b_o + x)`, then `LN(act(h W_up^T + b_up) W_down^T +
/// b_down + h)` (and the next layer's `qkv` of that), a row group at a time (see the
/// module docs), bit-identical to those ops run apart. Panics when the shapes do not chain
/// or no kernel for `P` runs here (callers check).
pub fn layer_tail<P: GroupProduct>(
    ctx: &[f32],
    x: &[f32],
    n: usize,
    w: &Tail<P>,
) -> TailOutput<Vec<f32>> {
    let (h, f) = (w.attn_out.outputs(), w.up.outputs());
    assert!(
        w.attn_out.inputs() == h
            && w.up.inputs() == h
            && w.down.inputs() == f
            && w.down.outputs() == h
            && [w.attn_ln, w.out_ln]
                .iter()
                .all(|l| l.gamma.len() == h && l.beta.len() == h),
        "layer_tail: the weights do not chain"
    );
    assert!(
        w.next_qkv.is_none_or(|q| q.inputs() == h),
        "layer_tail: the next layer's projection does not chain"
    );
    assert!(
        ctx.len() == n * h && x.len() == n * h,
        "layer_tail: input size"
    );
    let mut y = vec![0f32; n * h];
    let out = SendPtr(y.as_mut_ptr());
    let q3 = w.next_qkv.map_or(0, |q| q.outputs());
    let mut qkv: Vec<f32> = Vec::with_capacity(n * q3);
    let qkv_out = SendPtr(qkv.as_mut_ptr());
    for_each_row_group(n, |r0, rows, blocks| {
        P::with_scratch(|s| {
            scratch(&mut s.t, rows * h);
            scratch(&mut s.h, rows * h);
            scratch(&mut s.mid, rows * f);
            let (ctx, x) = (&ctx[r0 * h..][..rows * h], &x[r0 * h..][..rows * h]);
            let norm = |a: &[f32], res: &[f32], ln: Norm, dst: &mut [f32]| {
                for ((a, res), d) in a.chunks(h).zip(res.chunks(h)).zip(dst.chunks_mut(h)) {
                    crate::layer_norm::add_norm_row(a, res, ln.gamma, ln.beta, ln.eps, d);
                }
            };
            let GroupScratch {
                rows: conv,
                mid,
                t,
                h: h1,
            } = s;
            // SAFETY: a kernel for `P` runs here (the caller's check); `t` and `mid` hold
            // the group's rows; rows `r0..r0 + rows` of `y` belong to this group alone.
            unsafe {
                w.attn_out
                    .group_product(ctx, rows, blocks, None, conv, t.as_mut_ptr());
                norm(&t[..rows * h], x, w.attn_ln, &mut h1[..rows * h]);
                let (act, m) = (Some(w.act), mid.as_mut_ptr());
                w.up.group_product(&h1[..rows * h], rows, blocks, act, conv, m);
                let m = &mid[..rows * f];
                w.down
                    .group_product(m, rows, blocks, None, conv, t.as_mut_ptr());
                let dst = std::slice::from_raw_parts_mut(out.get().add(r0 * h), rows * h);
                norm(&t[..rows * h], &h1[..rows * h], w.out_ln, dst);
                if let Some(next) = w.next_qkv {
                    let q = qkv_out.get().add(r0 * q3);
                    next.group_product(dst, rows, blocks, None, conv, q);
                }
            }
        })
    });
    let next_qkv = w.next_qkv.map(|_| {
        // SAFETY: every group wrote its rows' `3H'` values (through the raw pointer).
        unsafe { qkv.set_len(n * q3) };
        qkv
    });
    TailOutput {
        hidden: y,
        next_qkv,
    }
}

/// [`layer_tail`] on tensors: `ctx [N, H]` and `x [N, H]` (f32) give `[N, H]` (and
/// `[N, 3H']`) f32.
pub fn layer_tail_tensors<P: GroupProduct>(
    ctx: &Tensor,
    x: &Tensor,
    w: &Tail<P>,
) -> Result<TailOutput<Tensor>> {
    let (n, h) = ctx.dims2()?;
    if x.dims() != ctx.dims()
        || ctx.dtype() != DType::F32
        || x.dtype() != DType::F32
        || h != w.attn_out.inputs()
    {
        bail!(
            "layer tail: context {:?} {:?} and input {:?} {:?} do not fit hidden size {}",
            ctx.dims(),
            ctx.dtype(),
            x.dims(),
            x.dtype(),
            w.attn_out.inputs()
        );
    }
    let out = with_slice::<f32, _>(ctx, |c| {
        with_slice::<f32, _>(x, |xs| layer_tail(c, xs, n, w))
    })??;
    let q3 = w.next_qkv.map_or(0, |q| q.outputs());
    Ok(TailOutput {
        hidden: Tensor::from_vec(out.hidden, (n, h), ctx.device())?,
        next_qkv: out
            .next_qkv
            .map(|v| Tensor::from_vec(v, (n, q3), ctx.device()))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amx::int8::{linear_i8, PackedI8};
    use crate::amx::{bf16_available, linear_bf16, PackedBf16};
    use crate::testing::lcg;

    /// `layer_tail` against its ops run apart on whole arrays, bit for bit: ragged row
    /// counts (a partial last group and block), widths that need padding, and each call's
    /// worker scratch left holding a larger earlier call's values.
    fn check<P: GroupProduct>(
        pack: impl Fn(&[f32], &[f32], usize, usize) -> P,
        linear: impl Fn(&[f32], usize, &P, Option<Activation>) -> Vec<f32>,
    ) {
        let (h, f) = (40, 70);
        let mut s = 3u64;
        let mut rand = |len: usize, k: f32| (0..len).map(|_| k * lcg(&mut s)).collect::<Vec<_>>();
        let a = pack(&rand(h * h, 0.5), &rand(h, 1.0), h, h);
        let u = pack(&rand(f * h, 0.5), &rand(f, 1.0), f, h);
        let d = pack(&rand(h * f, 0.5), &rand(h, 1.0), h, f);
        let q = pack(&rand(3 * h * h, 0.5), &rand(3 * h, 1.0), 3 * h, h);
        let (g1, b1, g2, b2) = (rand(h, 1.0), rand(h, 1.0), rand(h, 1.0), rand(h, 1.0));
        let norm = |a: &[f32], r: &[f32], g: &[f32], b: &[f32]| {
            let mut y = vec![0f32; a.len()];
            for ((a, r), y) in a.chunks(h).zip(r.chunks(h)).zip(y.chunks_mut(h)) {
                crate::layer_norm::add_norm_row(a, r, g, b, 1e-12, y);
            }
            y
        };
        for n in [300, 1, 37, 64, 129] {
            let (ctx, x) = (rand(n * h, 2.0), rand(n * h, 2.0));
            for act in [Activation::Gelu, Activation::Relu] {
                let h1 = norm(&linear(&ctx, n, &a, None), &x, &g1, &b1);
                let mid = linear(&h1, n, &u, Some(act));
                let apart = norm(&linear(&mid, n, &d, None), &h1, &g2, &b2);
                let next_apart = linear(&apart, n, &q, None);
                let tail = Tail {
                    attn_out: &a,
                    attn_ln: Norm {
                        gamma: &g1,
                        beta: &b1,
                        eps: 1e-12,
                    },
                    up: &u,
                    act,
                    down: &d,
                    out_ln: Norm {
                        gamma: &g2,
                        beta: &b2,
                        eps: 1e-12,
                    },
                    next_qkv: None,
                };
                let out = layer_tail(&ctx, &x, n, &tail);
                assert_eq!(out.hidden, apart, "{n} rows, {act:?}");
                assert!(out.next_qkv.is_none());
                let with_next = Tail {
                    next_qkv: Some(&q),
                    ..tail
                };
                let out = layer_tail(&ctx, &x, n, &with_next);
                assert_eq!(
                    out.hidden, apart,
                    "{n} rows, {act:?}, with the next projection"
                );
                assert_eq!(
                    out.next_qkv,
                    Some(next_apart),
                    "{n} rows, {act:?}: next qkv"
                );
            }
        }
    }

    #[test]
    fn bf16_tail_equals_the_ops_apart() {
        if !bf16_available() {
            eprintln!("no bf16 kernel (AMX or AVX-512) here: skipping");
            return;
        }
        check(PackedBf16::pack, linear_bf16);
    }

    #[test]
    fn int8_tail_equals_the_ops_apart() {
        check(PackedI8::quantize, linear_i8);
    }
}
