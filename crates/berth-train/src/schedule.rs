//! Learning-rate schedules as transformers' `get_scheduler` builds them. The learning rate
//! of optimizer step `k` (0-based) is `base × factor(k)`: with warmup, the first step runs
//! at 0, exactly as the Trainer does.
use serde::{Deserialize, Serialize};

/// Schedule shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ScheduleKind {
    /// Constant after warmup (`constant_with_warmup`; `constant` when warmup is 0).
    Constant,
    /// Linear decay to 0 at the last step (`linear`, the Trainer's default).
    Linear,
    /// Half a cosine down to 0 (`cosine`).
    Cosine,
}

/// A schedule over `total` optimizer steps with `warmup` linear warmup steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Shape.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub base_lr: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Total optimizer steps.
    pub total: u64,
}

impl Schedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        if step < self.warmup {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warmup_then_decay() {
        let s = Schedule {
            kind: ScheduleKind::Linear,
            base_lr: 1.0,
            warmup: 2,
            total: 10,
        };
        let got: Vec<f64> = (0..11).map(|k| s.lr(k)).collect();
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn cosine_and_constant() {
        let c = Schedule {
            kind: ScheduleKind::Cosine,
            base_lr: 2.0,
            warmup: 0,
            total: 4,
        };
        assert!((c.lr(2) - 1.0).abs() < 1e-12 && c.lr(0) == 2.0 && c.lr(4).abs() < 1e-12);
        let k = Schedule {
            kind: ScheduleKind::Constant,
            base_lr: 3.0,
            warmup: 3,
            total: 9,
        };
        assert_eq!((k.lr(0), k.lr(3), k.lr(8)), (0.0, 3.0, 3.0));
    }
}
