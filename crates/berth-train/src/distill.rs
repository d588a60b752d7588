//! Knowledge distillation (Hinton et al. 2015; DistilBERT): a frozen teacher runs forward on
//! the student's packed batch, and the student learns from the teacher's softened
//! distribution beside the hard labels:
//!
//! `loss = α · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 − α) · hard loss`
//!
//! with the KL divergence summed over classes and averaged over rows (torch's
//! `KLDivLoss(reduction="batchmean")` on log-softmax inputs, as DistilBERT computes it); T²
//! keeps the soft term's gradient scale independent of T. The teacher is a frozen network of
//! the run ([`crate::objective::Networks::frozen`]): no gradient, no optimizer state, never
//! saved. Classification (single-label), NER and masked-LM pretraining use it; a run is
//! refused before training when the teacher's vocabulary or labels differ from the student's.
use std::path::PathBuf;

use berth_model::{HeadKind, Model};
use berth_text::TextTokenizer;
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::corpus::tokenizer_fingerprint;
use crate::error::{Result, TrainError};
use crate::objective::Env;

/// The teacher and the weights of the two terms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistillConfig {
    /// The teacher checkpoint (same tokenizer; same labels for classification and NER).
    pub teacher: PathBuf,
    /// Weight of the soft (teacher) term; `1 − alpha` weighs the hard labels.
    pub alpha: f64,
    /// Softmax temperature of both distributions in the soft term.
    pub temperature: f64,
}

impl DistillConfig {
    /// Refuses weights outside their ranges.
    pub fn check(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(TrainError::Config(format!(
                "--distill-alpha {} must be in [0, 1]",
                self.alpha
            )));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(TrainError::Config(format!(
                "--temperature {} must be a positive number",
                self.temperature
            )));
        }
        Ok(())
    }

    /// Loads the teacher (f32, forward only) with its `head`, refusing one whose tokenizer
    /// differs from the run's (the student's, `env`'s).
    pub fn load_teacher(&self, env: &Env, head: HeadKind) -> Result<Model> {
        self.check()?;
        let (dir, student_dir) = (&self.teacher, env.model_dir);
        let (a, b) = (env.tokenizer()?, &TextTokenizer::from_dir(dir)?);
        if tokenizer_fingerprint(a) != tokenizer_fingerprint(b) {
            return Err(TrainError::Config(format!(
                "teacher {}: its vocabulary ({} tokens) differs from the student's ({}, {} tokens); \
                 distillation needs the same tokenizer",
                dir.display(),
                b.vocab_size(),
                student_dir.display(),
                a.vocab_size()
            )));
        }
        let teacher = crate::init::load_frozen(dir, Some(head))?;
        if teacher.config.vocab_size < a.vocab_size() {
            return Err(TrainError::Config(format!(
                "teacher {}: its embeddings cover {} tokens, the tokenizer has {}",
                dir.display(),
                teacher.config.vocab_size,
                a.vocab_size()
            )));
        }
        Ok(teacher)
    }

    /// Refuses a teacher whose labels (`id2label`, in order) are not `labels`.
    pub fn check_labels(&self, teacher: &Model, labels: &[String]) -> Result<()> {
        if teacher.config.id2label != labels {
            return Err(TrainError::Config(format!(
                "teacher {}: its labels {:?} differ from the training labels {:?}",
                self.teacher.display(),
                teacher.config.id2label,
                labels
            )));
        }
        Ok(())
    }

    /// `α · soft + (1 − α) · hard` for student logits `[R, C]` and the teacher's at the same
    /// rows (`hard` is `None` when no row has a label: the soft term alone, at full weight
    /// α).
    pub fn blend(
        &self,
        hard: Option<Tensor>,
        student: &Tensor,
        teacher: &Tensor,
    ) -> Result<Option<Tensor>> {
        if student.dims() != teacher.dims() {
            return Err(TrainError::Config(format!(
                "teacher {}: it gives {:?} outputs where the student gives {:?}",
                self.teacher.display(),
                teacher.dims(),
                student.dims()
            )));
        }
        if student.dim(0)? == 0 {
            return Ok(hard);
        }
        let soft = (soft_loss(student, teacher, self.temperature)? * self.alpha)?;
        Ok(Some(match hard {
            Some(h) => (soft + (h * (1.0 - self.alpha))?)?,
            None => soft,
        }))
    }
}

/// Row-wise log-softmax of `x [R, C]` from differentiable ops (the row max is detached: its
/// gradient cancels exactly).
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `T² · KL(softmax(teacher / T) ‖ softmax(student / T))`, summed over classes and averaged
/// over rows. The teacher's side is a constant (no gradient flows into it).
pub fn soft_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let rows = student.dim(0)? as f64;
    let log_ps = log_softmax(&(student / temperature)?)?;
    let log_pt = log_softmax(&(teacher.detach() / temperature)?)?.detach();
    let kl = (log_pt.exp()? * (log_pt - log_ps)?)?.sum_all()?;
    Ok((kl * (temperature * temperature / rows))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f64], r: usize, c: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
    }

    /// The loss by its definition, in f64.
    fn naive(s: &[f64], tch: &[f64], c: usize, temp: f64) -> f64 {
        let softmax = |x: &[f64]| {
            let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = x.iter().map(|v| ((v - m) / temp).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect::<Vec<_>>()
        };
        let rows = s.len() / c;
        let mut kl = 0.0;
        for r in 0..rows {
            let (ps, pt) = (softmax(&s[r * c..][..c]), softmax(&tch[r * c..][..c]));
            kl += pt
                .iter()
                .zip(&ps)
                .map(|(p, q)| p * (p / q).ln())
                .sum::<f64>();
        }
        temp * temp * kl / rows as f64
    }

    #[test]
    fn soft_loss_is_the_tempered_kl_and_its_gradient_matches_finite_differences() {
        let (s, tch) = (
            vec![0.3, -1.2, 2.0, 0.0, 0.5, 0.5, -3.0, 1.0, 0.2],
            vec![1.0, 0.0, -1.0, 2.0, 2.0, -2.0, 0.0, 0.3, 0.1],
        );
        for temp in [1.0, 2.0, 4.0] {
            let got = soft_loss(&t(&s, 3, 3), &t(&tch, 3, 3), temp)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let want = naive(&s, &tch, 3, temp);
            assert!((got - want).abs() < 1e-12, "T {temp}: {got} vs {want}");
            // Gradient with respect to the student's logits, against central differences.
            let v = Var::from_tensor(&t(&s, 3, 3)).unwrap();
            let g = soft_loss(v.as_tensor(), &t(&tch, 3, 3), temp)
                .unwrap()
                .backward()
                .unwrap();
            let grad = g
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in 0..s.len() {
                let (mut up, mut down) = (s.clone(), s.clone());
                up[i] += 1e-6;
                down[i] -= 1e-6;
                let fd = (naive(&up, &tch, 3, temp) - naive(&down, &tch, 3, temp)) / 2e-6;
                assert!(
                    (grad[i] - fd).abs() < 1e-7,
                    "T {temp} logit {i}: {} vs {fd}",
                    grad[i]
                );
            }
        }
        // Equal distributions: no loss.
        let same = soft_loss(&t(&s, 3, 3), &t(&s, 3, 3), 2.0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(same.abs() < 1e-12);
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        let c = |alpha, temperature| DistillConfig {
            teacher: PathBuf::new(),
            alpha,
            temperature,
        };
        assert!(c(0.5, 2.0).check().is_ok());
        assert!(c(1.5, 2.0).check().is_err());
        assert!(c(0.5, 0.0).check().is_err());
        assert!(c(f64::NAN, 2.0).check().is_err());
    }
}
