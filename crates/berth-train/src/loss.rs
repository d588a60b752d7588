//! Losses as transformers' heads compute them, on logits from the packed forward.
//!
//! Shapes: `R` rows (sequences or tokens), `C` classes.
use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Mean cross-entropy of `logits [R, C]` against class indices (torch's `CrossEntropyLoss`
/// with mean reduction); rows whose label is `None` (transformers' -100) are left out.
/// `None` when every row is ignored.
pub fn cross_entropy(logits: &Tensor, labels: &[Option<u32>]) -> Result<Option<Tensor>> {
    let keep: Vec<u32> = (0..labels.len() as u32)
        .filter(|&i| labels[i as usize].is_some())
        .collect();
    if keep.is_empty() {
        return Ok(None);
    }
    let logits = if keep.len() == labels.len() {
        logits.clone()
    } else {
        logits.index_select(&Tensor::new(keep.as_slice(), &Device::Cpu)?, 0)?
    };
    let targets: Vec<u32> = labels.iter().flatten().copied().collect();
    // One op: log-sum-exp (max taken out) minus the target's logit, per row.
    let per_row = berth_kernels::cross_entropy_rows(&logits, &targets)?;
    Ok(Some(per_row.mean_all()?))
}

/// Mean binary cross-entropy with logits over every element (torch's `BCEWithLogitsLoss`):
/// `max(x, 0) - x y + log(1 + exp(-|x|))`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let x = logits;
    let term = ((x.relu()? - (x * targets)?)? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    Ok(term.mean_all()?)
}

/// Mean squared error (torch's `MSELoss`).
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok((pred - target)?.sqr()?.mean_all()?)
}

/// A `[R, C]` f32 tensor from rows of targets.
pub fn targets(rows: &[Vec<f32>]) -> Result<Tensor> {
    let c = rows.first().map_or(0, |r| r.len());
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), c), &Device::Cpu)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], r: usize, c: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
    }

    #[test]
    fn cross_entropy_matches_the_formula_and_ignores_rows() {
        let l = t(&[2.0, 0.5, -1.0, 0.0, 1.0, 3.0], 2, 3);
        let lse = |r: [f32; 3]| r.iter().map(|x| x.exp()).sum::<f32>().ln();
        let want = ((lse([2.0, 0.5, -1.0]) - 2.0) + (lse([0.0, 1.0, 3.0]) - 1.0)) / 2.0;
        let got = cross_entropy(&l, &[Some(0), Some(1)])
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let one = cross_entropy(&l, &[None, Some(1)])
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((one - (lse([0.0, 1.0, 3.0]) - 1.0)).abs() < 1e-6);
        assert!(cross_entropy(&l, &[None, None]).unwrap().is_none());
    }

    #[test]
    fn bce_matches_the_naive_formula() {
        let x = t(&[0.3, -2.0, 5.0, 0.0], 2, 2);
        let y = t(&[1.0, 0.0, 0.0, 1.0], 2, 2);
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let naive = [(0.3f32, 1.0f32), (-2.0, 0.0), (5.0, 0.0), (0.0, 1.0)]
            .iter()
            .map(|&(x, y)| -(y * sig(x).ln() + (1.0 - y) * (1.0 - sig(x)).ln()))
            .sum::<f32>()
            / 4.0;
        let got = bce_with_logits(&x, &y).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - naive).abs() < 1e-5, "{got} vs {naive}");
    }
}
