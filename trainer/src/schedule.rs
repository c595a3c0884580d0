//! Learning-rate schedules with OLMo's formulas (`olmo/optim.py`).
//!
//! `lr(step)` takes the step already incremented, as OLMo sets the LR before `optimizer.step()`
//! with `global_step` counting from 1. Warmup is linear from `warmup_min_lr` (default 0.1 × lr)
//! to lr over `t_warmup` steps; after warmup, cosine and linear decay go to `alpha_f × lr` at
//! `t_max`, inverse-sqrt decays as `lr·sqrt(t_warmup / step)`.

use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    CosineWithWarmup,
    LinearWithWarmup,
    InverseSqrtWithWarmup,
    Constant,
    ConstantWithWarmup,
    /// The larger of `cosine_with_warmup` and `inverse_sqrt_with_warmup` at each step.
    Max,
    /// Cosine decay times a linear decay to 0 (OLMo's `cosine_linear_envelope`, for annealing).
    CosineLinearEnvelope,
}

impl Kind {
    /// OLMo's scheduler names, all of which this has, in OLMo's order.
    pub const BY_NAME: [(&'static str, Kind); 7] = [
        ("cosine_with_warmup", Kind::CosineWithWarmup),
        ("linear_with_warmup", Kind::LinearWithWarmup),
        ("inverse_sqrt_with_warmup", Kind::InverseSqrtWithWarmup),
        ("max_scheduler", Kind::Max),
        ("constant", Kind::Constant),
        ("cosine_linear_envelope", Kind::CosineLinearEnvelope),
        ("constant_with_warmup", Kind::ConstantWithWarmup),
    ];

    pub fn parse(name: &str) -> Option<Kind> {
        Self::BY_NAME
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, k)| k)
    }

    /// The names, for an error that lists them.
    pub fn names() -> Vec<&'static str> {
        Self::BY_NAME.iter().map(|(n, _)| *n).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: Kind,
    pub lr: f64,
    pub t_warmup: u64,
    /// The step at which decay ends (OLMo: `t_max`, or the run's max steps).
    pub t_max: u64,
    pub alpha_f: f64,
    pub warmup_min_lr: Option<f64>,
}

impl Schedule {
    fn warmup(&self, step: u64) -> f64 {
        let min = self.warmup_min_lr.unwrap_or(0.1 * self.lr);
        min + (self.lr - min) * step.min(self.t_warmup) as f64 / self.t_warmup.max(1) as f64
    }

    /// The LR at `step` with OLMo's bolt-on warmup (`BoltOnWarmupScheduler`) from `from` when
    /// fresh AdamW moments joined the run there: linear from 0 to the schedule's value at
    /// `from + t_warmup`, then the schedule.
    pub fn lr_warming_from(&self, step: u64, from: Option<u64>) -> f64 {
        match from {
            Some(from) if step < from => 0.0,
            Some(from) if step < from + self.t_warmup => {
                let end = from + self.t_warmup;
                self.lr(end) * (step - from) as f64 / self.t_warmup as f64
            }
            _ => self.lr(step),
        }
    }

    pub fn lr(&self, step: u64) -> f64 {
        let eta_min = self.lr * self.alpha_f;
        match self.kind {
            Kind::Constant => self.lr,
            Kind::Max => {
                let of = |kind| Schedule { kind, ..*self }.lr(step);
                of(Kind::CosineWithWarmup).max(of(Kind::InverseSqrtWithWarmup))
            }
            Kind::ConstantWithWarmup => {
                if step < self.t_warmup {
                    self.warmup(step)
                } else {
                    self.lr
                }
            }
            Kind::InverseSqrtWithWarmup => {
                if step < self.t_warmup {
                    self.warmup(step)
                } else {
                    self.lr * (self.t_warmup as f64 / (self.t_warmup.max(step)) as f64).sqrt()
                }
            }
            Kind::CosineWithWarmup | Kind::LinearWithWarmup | Kind::CosineLinearEnvelope => {
                if step < self.t_warmup {
                    return self.warmup(step);
                }
                if step >= self.t_max {
                    return eta_min;
                }
                let s = (step - self.t_warmup) as f64;
                let t = (self.t_max - self.t_warmup) as f64;
                let cosine = || (self.lr - eta_min) * (1.0 + (PI * s / t).cos()) / 2.0;
                match self.kind {
                    Kind::CosineWithWarmup => eta_min + cosine(),
                    Kind::CosineLinearEnvelope => eta_min + (1.0 - s / t) * cosine(),
                    _ => self.lr - (self.lr - eta_min) * (s / t),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn olmo_1b(kind: Kind) -> Schedule {
        Schedule {
            kind,
            lr: 4e-4,
            t_warmup: 2000,
            t_max: 739_328,
            alpha_f: 0.1,
            warmup_min_lr: None,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-12)
    }

    #[test]
    fn warmup_starts_at_a_tenth_and_reaches_the_peak() {
        let s = olmo_1b(Kind::CosineWithWarmup);
        assert!(close(s.lr(0), 4e-5));
        assert!(close(s.lr(1000), 4e-5 + (4e-4 - 4e-5) * 0.5));
        assert!(close(s.lr(2000), 4e-4));
        let z = Schedule {
            warmup_min_lr: Some(0.0),
            ..s
        };
        assert!(close(z.lr(500), 1e-4));
    }

    #[test]
    fn a_bolted_on_warmup_rises_from_zero_to_the_schedule() {
        let s = olmo_1b(Kind::CosineWithWarmup);
        assert_eq!(s.lr_warming_from(5000, None), s.lr(5000));
        assert_eq!(s.lr_warming_from(5000, Some(5000)), 0.0);
        // OLMo's first step after the reset is global step from + 1
        assert!(close(
            s.lr_warming_from(5001, Some(5000)),
            s.lr(7000) / 2000.0
        ));
        assert!(close(s.lr_warming_from(6000, Some(5000)), s.lr(7000) / 2.0));
        assert_eq!(s.lr_warming_from(7000, Some(5000)), s.lr(7000));
        assert_eq!(s.lr_warming_from(9000, Some(5000)), s.lr(9000));
        let none = Schedule { t_warmup: 0, ..s };
        assert_eq!(none.lr_warming_from(5001, Some(5000)), none.lr(5001));
    }

    #[test]
    fn cosine_and_linear_decay_to_alpha_f() {
        let c = olmo_1b(Kind::CosineWithWarmup);
        let mid = 2000 + (739_328 - 2000) / 2;
        assert!(close(c.lr(mid), 4e-5 + (4e-4 - 4e-5) * 0.5));
        assert!(close(c.lr(739_328), 4e-5));
        assert!(close(c.lr(1_000_000), 4e-5));
        let l = olmo_1b(Kind::LinearWithWarmup);
        assert!(close(l.lr(mid), 4e-4 - (4e-4 - 4e-5) * 0.5));
        assert!((2000..739_328)
            .step_by(1000)
            .all(|s| l.lr(s) >= l.lr(s + 1000)));
    }

    #[test]
    fn inverse_sqrt_and_constants() {
        let s = Schedule {
            kind: Kind::InverseSqrtWithWarmup,
            lr: 1e-3,
            t_warmup: 100,
            t_max: 0,
            alpha_f: 0.0,
            warmup_min_lr: None,
        };
        assert!(close(s.lr(100), 1e-3));
        assert!(close(s.lr(400), 5e-4));
        let c = Schedule {
            kind: Kind::Constant,
            ..s
        };
        assert_eq!(c.lr(0), 1e-3);
        let cw = Schedule {
            kind: Kind::ConstantWithWarmup,
            ..s
        };
        assert!(close(cw.lr(50), 1e-4 + (1e-3 - 1e-4) * 0.5));
        assert_eq!(cw.lr(10_000), 1e-3);
        assert_eq!(
            Kind::parse("cosine_with_warmup"),
            Some(Kind::CosineWithWarmup)
        );
        assert_eq!(Kind::parse("lionw"), None);
        assert_eq!(Kind::names().len(), 7);
        assert!(Kind::BY_NAME
            .iter()
            .all(|&(n, k)| Kind::parse(n) == Some(k)));
    }

    #[test]
    fn max_and_cosine_linear_envelope_as_olmo() {
        // values from OLMo's MaxScheduler and CosLinearEnvelope formulas, worked by hand
        let m = Schedule {
            kind: Kind::parse("max_scheduler").unwrap(),
            t_max: 10_000,
            ..olmo_1b(Kind::Max)
        };
        let cos = Schedule {
            kind: Kind::CosineWithWarmup,
            ..m
        };
        let isq = Schedule {
            kind: Kind::InverseSqrtWithWarmup,
            ..m
        };
        assert!(close(m.lr(1000), cos.lr(1000)));
        // early the cosine is higher, late (cosine at 4e-5) the inverse sqrt
        assert!(close(m.lr(3000), cos.lr(3000)) && cos.lr(3000) > isq.lr(3000));
        assert!(close(m.lr(10_000), 4e-4 * (0.2f64).sqrt()));
        let e = Schedule {
            kind: Kind::parse("cosine_linear_envelope").unwrap(),
            ..olmo_1b(Kind::CosineLinearEnvelope)
        };
        assert!(close(e.lr(1000), cos.lr(1000)));
        assert!(close(e.lr(2000), 4e-4));
        // halfway: cosine term (4e-4 - 4e-5)/2 times the envelope's 1/2
        let mid = 2000 + (739_328 - 2000) / 2;
        assert!(close(e.lr(mid), 4e-5 + 0.5 * (4e-4 - 4e-5) * 0.5));
        assert!(close(e.lr(739_328), 4e-5));
        assert!(
            (2000..739_328)
                .step_by(1000)
                .all(|s| e.lr(s) >= e.lr(s + 1000)
                    && e.lr(s) <= olmo_1b(Kind::CosineWithWarmup).lr(s))
        );
    }
}
