//! The gated feed-forward activation of ModernBERT (GeGLU with GELU): the up-projection's
//! output `x [N, 2I]` is split into an input and a gate half, `y = act(input) · gate`
//! (`[N, I]`), with backward — transformers' `ModernBertMLP`:
//! `input, gate = Wi(h).chunk(2, dim=-1); act(input) * gate`.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{dispatch, slice, with_slice};
use crate::{Activation, Float};

/// `act(x[:, :I]) · x[:, I:]` of `x [N, 2I]`. Differentiable.
pub fn geglu(x: &Tensor, act: Activation) -> Result<Tensor> {
    let (_, w) = x.dims2()?;
    if w == 0 || w % 2 != 0 {
        bail!("geglu: the input is {w} wide, not two equal halves")
    }
    x.contiguous()?.apply_op1(GeGlu(act))
}

struct GeGlu(Activation);

impl CustomOp1 for GeGlu {
    fn name(&self) -> &'static str {
        "berth-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(act: Activation, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let x = slice::<T>(s, l)?;
            let i = l.dims()[1] / 2;
            let mut y = vec![T::zero(); x.len() / 2];
            y.par_chunks_mut(i)
                .zip(x.par_chunks(2 * i))
                .for_each(|(y, x)| {
                    let (input, gate) = x.split_at(i);
                    y.copy_from_slice(input);
                    T::activate(act, y);
                    y.iter_mut().zip(gate).for_each(|(y, &g)| *y = *y * g);
                });
            Ok(T::to_cpu_storage_owned(y))
        }
        let (n, w) = l.shape().dims2()?;
        Ok((
            dispatch!(s.dtype(), self.name(), run(self.0, s, l))?,
            Shape::from((n, w / 2)),
        ))
    }

    /// `d input = dy · gate · act'(input)`, `d gate = dy · act(input)`.
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Float>(act: Activation, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            let i = x.dim(1)? / 2;
            let dx = with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(dy, |g| {
                    let mut dx = vec![T::zero(); xs.len()];
                    dx.par_chunks_mut(2 * i)
                        .zip(xs.par_chunks(2 * i).zip(g.par_chunks(i)))
                        .for_each(|(dx, (x, g))| {
                            let (input, gate) = x.split_at(i);
                            let (d_in, d_gate) = dx.split_at_mut(i);
                            for k in 0..i {
                                let (a, slope) = act.value_and_slope(input[k]);
                                d_in[k] = g[k] * gate[k] * slope;
                                d_gate[k] = g[k] * a;
                            }
                        });
                    dx
                })
            })??;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(dispatch!(x.dtype(), self.name(), run(self.0, x, dy))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gradcheck, matrix, modernbert_kernels, randn};
    use candle_core::Var;

    /// transformers' `ModernBertMLP` gate (scripts/make_modernbert_kernel_reference.py):
    /// output and input gradient.
    #[test]
    fn matches_transformers() -> Result<()> {
        let f = modernbert_kernels();
        let r = &f["geglu"];
        let act = Activation::from_hidden_act(r["activation"].as_str().unwrap()).unwrap();
        let x = Var::from_tensor(&matrix(&r["x"]))?;
        let y = geglu(&x, act)?;
        assert_close("geglu", &y, &matrix(&r["out"]), 1e-6)?;
        let g = (&y * &matrix(&r["dy"]))?.sum_all()?.backward()?;
        assert_close("geglu dx", g.get(&x).unwrap(), &matrix(&r["dx"]), 1e-6)
    }

    /// f64 finite differences for every activation; the composed reference.
    #[test]
    fn gradients_and_the_composed_reference() -> Result<()> {
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Relu,
            Activation::Silu,
        ] {
            let x = (randn(&[5, 12], 7)? * 2.0)?;
            gradcheck(&format!("geglu {act:?}"), std::slice::from_ref(&x), |xs| {
                geglu(&xs[0], act)
            })?;
            let composed = (act.reference(&x.narrow(1, 0, 6)?)? * x.narrow(1, 6, 6)?)?;
            assert_close(&format!("{act:?}"), &geglu(&x, act)?, &composed, 1e-12)?;
        }
        let odd = randn(&[2, 5], 1)?;
        assert!(geglu(&odd, Activation::Gelu)
            .unwrap_err()
            .to_string()
            .contains("two equal halves"));
        Ok(())
    }
}
