//! Rotary position embeddings (RoFormer; ModernBERT) on the queries and keys of a packed
//! QKV tensor, with backward. Each head's vector is rotated in pairs `(x[i], x[i + d/2])` by
//! the angle `p · θ^(-2i/d)` of the token's position `p` within its sequence — transformers'
//! `apply_rotary_pos_emb` with `rotate_half`:
//!
//! ```text
//! out[i]       = x[i] cos a_i − x[i + d/2] sin a_i
//! out[i + d/2] = x[i + d/2] cos a_i + x[i] sin a_i
//! ```
//!
//! The angles are computed as transformers computes them, in f32 (`inv_freq` as
//! `1 / θ^(2i/d)`, then `p · inv_freq`): at positions in the thousands an f32 angle is off
//! by ~1e-3 radians from the exact one, and parity means the same error.
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{dispatch, slice, with_slice};
use crate::Float;

/// cos / sin of the rotary angles for positions `0..len`, `[len, head_dim / 2]` each.
#[derive(Debug, Clone)]
pub struct RotaryTable {
    half: usize,
    len: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RotaryTable {
    /// The table of heads `head_dim` wide (even), base `theta`, for sequences of up to `len`
    /// tokens.
    pub fn new(head_dim: usize, theta: f64, len: usize) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("rotary embeddings need an even head size, not {head_dim}")
        }
        if !(theta.is_finite() && theta > 0.0) {
            bail!("rotary base {theta} is not a positive number")
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let (mut cos, mut sin) = (
            Vec::with_capacity(len * half),
            Vec::with_capacity(len * half),
        );
        for p in 0..len {
            for &f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(RotaryTable {
            half,
            len,
            cos,
            sin,
        })
    }

    /// Positions covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is covered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Head size.
    pub fn head_dim(&self) -> usize {
        2 * self.half
    }

    /// Rotates (`inverse`: back) one head's vector `x` at position `p`, in place.
    fn rotate<T: Float>(&self, x: &mut [T], p: usize, inverse: bool) {
        let h = self.half;
        let (cos, sin) = (&self.cos[p * h..(p + 1) * h], &self.sin[p * h..(p + 1) * h]);
        let (a, b) = x.split_at_mut(h);
        for i in 0..h {
            let (c, s) = (T::from_f64(cos[i] as f64), T::from_f64(sin[i] as f64));
            let s = if inverse { T::zero() - s } else { s };
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * c - x2 * s;
            b[i] = x2 * c + x1 * s;
        }
    }
}

/// Rotates the query and key heads of `qkv [N, 3H]` (queries, keys, values, each `H` =
/// `num_heads` × head size) by each token's position within its sequence of `cu_seqlens`;
/// values pass through. Differentiable.
pub fn rope_qkv(
    qkv: &Tensor,
    cu_seqlens: &[usize],
    num_heads: usize,
    table: &Arc<RotaryTable>,
) -> Result<Tensor> {
    let (n, w) = qkv.dims2()?;
    let hd = table.head_dim();
    if num_heads == 0 || w != 3 * num_heads * hd {
        bail!("rope: qkv is {w} wide, not 3 × {num_heads} heads × {hd}")
    }
    if cu_seqlens.first() != Some(&0)
        || cu_seqlens.last() != Some(&n)
        || cu_seqlens.windows(2).any(|p| p[1] < p[0])
    {
        bail!("rope: cu_seqlens {cu_seqlens:?} do not split {n} tokens")
    }
    if let Some(longest) = cu_seqlens.windows(2).map(|p| p[1] - p[0]).max() {
        if longest > table.len() {
            bail!(
                "rope: a sequence of {longest} tokens, the table covers {}",
                table.len()
            )
        }
    }
    qkv.contiguous()?.apply_op1(Rope {
        cu: cu_seqlens.to_vec(),
        heads: num_heads,
        table: table.clone(),
    })
}

struct Rope {
    cu: Vec<usize>,
    heads: usize,
    table: Arc<RotaryTable>,
}

impl Rope {
    /// `x` with every token's q and k heads rotated (`inverse`: rotated back, the backward).
    fn apply<T: Float>(&self, x: &[T], inverse: bool) -> Vec<T> {
        let hd = self.table.head_dim();
        let w = 3 * self.heads * hd;
        let mut y = x.to_vec();
        // Position of each token within its sequence.
        let pos: Vec<usize> = self.cu.windows(2).flat_map(|p| 0..p[1] - p[0]).collect();
        y.par_chunks_mut(w)
            .zip(pos.par_iter())
            .for_each(|(row, &p)| {
                for head in row[..2 * self.heads * hd].chunks_mut(hd) {
                    self.table.rotate(head, p, inverse);
                }
            });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "berth-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(op: &Rope, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(op.apply(slice::<T>(s, l)?, false)))
        }
        Ok((
            dispatch!(s.dtype(), self.name(), run(self, s, l))?,
            l.shape().clone(),
        ))
    }

    /// A rotation's transpose is its inverse: the gradient is rotated back.
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(op: &Rope, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            let dx = with_slice::<T, _>(dy, |g| op.apply(g, true))?;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(dispatch!(x.dtype(), self.name(), run(self, x, dy))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gradcheck, matrix, modernbert_kernels as fixture, randn};
    use candle_core::{DType, Device, Var};

    /// transformers' `apply_rotary_pos_emb` (scripts/make_modernbert_kernel_reference.py):
    /// two packed sequences, both of ModernBERT's bases, outputs and input gradients.
    #[test]
    fn matches_transformers() -> Result<()> {
        let f = fixture();
        for key in ["rope_10000", "rope_160000"] {
            let r = &f[key];
            let cu: Vec<usize> = serde_json::from_value(r["cu_seqlens"].clone()).unwrap();
            let heads = r["heads"].as_u64().unwrap() as usize;
            let x = Var::from_tensor(&matrix(&r["qkv"]))?;
            let hd = x.dim(1)? / 3 / heads;
            let table = Arc::new(RotaryTable::new(hd, r["theta"].as_f64().unwrap(), 16)?);
            let y = rope_qkv(&x, &cu, heads, &table)?;
            assert_close(key, &y, &matrix(&r["out"]), 1e-6)?;
            let g = (&y * &matrix(&r["dy"]))?.sum_all()?.backward()?;
            assert_close(key, g.get(&x).unwrap(), &matrix(&r["dqkv"]), 1e-6)?;
        }
        Ok(())
    }

    /// Far into an 8,192-token sequence, where f32 angles are coarse: transformers' rows.
    #[test]
    fn far_positions_match_transformers() -> Result<()> {
        let r = &fixture()["rope_far"];
        let hd = r["head_dim"].as_u64().unwrap() as usize;
        let positions: Vec<usize> = serde_json::from_value(r["positions"].clone()).unwrap();
        let (q, want) = (matrix(&r["q"]), matrix(&r["out"]));
        let n = 8192;
        let mut x = vec![0f32; n * 3 * hd];
        let qv = q.to_vec2::<f32>()?;
        for (k, &p) in positions.iter().enumerate() {
            x[p * 3 * hd..p * 3 * hd + hd].copy_from_slice(&qv[k]);
        }
        let x = Tensor::from_vec(x, (n, 3 * hd), &Device::Cpu)?;
        let table = Arc::new(RotaryTable::new(hd, r["theta"].as_f64().unwrap(), n)?);
        let y = rope_qkv(&x, &[0, n], 1, &table)?.to_vec2::<f32>()?;
        let got: Vec<f32> = positions
            .iter()
            .flat_map(|&p| y[p][..hd].to_vec())
            .collect();
        let got = Tensor::from_vec(got, (positions.len(), hd), &Device::Cpu)?;
        assert_close("far positions", &got, &want, 1e-5)
    }

    /// f64 finite differences; values pass through untouched; a rotation keeps norms.
    #[test]
    fn gradients_and_invariants() -> Result<()> {
        let table = Arc::new(RotaryTable::new(4, 10000.0, 8)?);
        let x = randn(&[7, 24], 3)?;
        let cu = [0, 3, 7];
        gradcheck("rope", std::slice::from_ref(&x), |xs| {
            rope_qkv(&xs[0], &cu, 2, &table)
        })?;
        let y = rope_qkv(&x, &cu, 2, &table)?;
        assert_close("values", &y.narrow(1, 16, 8)?, &x.narrow(1, 16, 8)?, 0.0)?;
        // Position 0 of each sequence is not rotated.
        for start in [0, 3] {
            assert_close("p = 0", &y.get(start)?, &x.get(start)?, 0.0)?;
        }
        let norms = |t: &Tensor| t.reshape((7, 6, 4))?.sqr()?.sum(2);
        // The table is f32 as transformers': cos² + sin² = 1 to f32 rounding.
        assert_close("norms", &norms(&y)?, &norms(&x)?, 1e-6)?;
        assert_eq!(y.dtype(), DType::F64);
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let table = Arc::new(RotaryTable::new(4, 10000.0, 4)?);
        let x = randn(&[6, 24], 3)?;
        let e = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert!(e(rope_qkv(&x, &[0, 6], 3, &table)).contains("wide"));
        assert!(e(rope_qkv(&x, &[0, 5], 2, &table)).contains("cu_seqlens"));
        assert!(e(rope_qkv(&x, &[0, 6], 2, &table)).contains("table covers 4"));
        assert!(RotaryTable::new(5, 10000.0, 4).is_err());
        assert!(RotaryTable::new(4, f64::NAN, 4).is_err());
        Ok(())
    }
}
