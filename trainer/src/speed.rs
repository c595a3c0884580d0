//! Throughput as OLMo's `SpeedMonitor` measures it: over a window of the last `window_size`
//! batches, per device, leaving out the run's first batch (kernel compilation, block-size
//! timing, allocator and GEMM-heuristic warm-up) and starting over after an eval or a
//! checkpoint save, so neither counts as training time.

use std::collections::VecDeque;
use std::time::Instant;

pub struct SpeedMonitor {
    window: usize,
    /// Start times of the recorded batches, oldest first, with this device's tokens in each.
    starts: VecDeque<(Instant, u64)>,
}

/// What the window measured: this device's rates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speed {
    pub tokens_per_second: f64,
    pub batches_per_second: f64,
}

impl SpeedMonitor {
    /// A window of `window` batches (at least 1).
    pub fn new(window: usize) -> SpeedMonitor {
        SpeedMonitor {
            window: window.max(1),
            starts: VecDeque::new(),
        }
    }

    /// A batch of `device_tokens` on this device starts `at`; `record` false leaves it out (the
    /// run's first batch).
    pub fn batch_start(&mut self, at: Instant, device_tokens: u64, record: bool) {
        if !record {
            return;
        }
        if self.starts.len() == self.window {
            self.starts.pop_front();
        }
        self.starts.push_back((at, device_tokens));
    }

    /// Forgets the window, so time spent outside training (an eval, a save) is not counted.
    pub fn reset(&mut self) {
        self.starts.clear();
    }

    /// The rates from the oldest recorded batch's start to `now` (after the newest batch
    /// ended); `None` while nothing is recorded.
    pub fn check(&self, now: Instant) -> Option<Speed> {
        let &(first, _) = self.starts.front()?;
        let secs = now.saturating_duration_since(first).as_secs_f64().max(1e-9);
        let tokens: u64 = self.starts.iter().map(|&(_, t)| t).sum();
        Some(Speed {
            tokens_per_second: tokens as f64 / secs,
            batches_per_second: self.starts.len() as f64 / secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_first_batch_is_left_out_and_the_window_slides() {
        let t0 = Instant::now();
        let mut m = SpeedMonitor::new(2);
        // a slow first batch (0..1000 ms), then batches of 100 ms with 50 tokens each
        m.batch_start(at(t0, 0), 50, false);
        assert_eq!(m.check(at(t0, 1000)), None);
        m.batch_start(at(t0, 1000), 50, true);
        let s = m.check(at(t0, 1100)).unwrap();
        assert!((s.tokens_per_second - 500.0).abs() < 1e-6, "{s:?}");
        assert!((s.batches_per_second - 10.0).abs() < 1e-9, "{s:?}");
        m.batch_start(at(t0, 1100), 50, true);
        // the third batch takes 300 ms: the window holds batches 2 and 3 (400 ms, 100 tokens)
        m.batch_start(at(t0, 1200), 50, true);
        let s = m.check(at(t0, 1500)).unwrap();
        assert!((s.tokens_per_second - 250.0).abs() < 1e-6, "{s:?}");
        assert!((s.batches_per_second - 5.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn a_reset_drops_the_time_before_it() {
        let t0 = Instant::now();
        let mut m = SpeedMonitor::new(100);
        m.batch_start(at(t0, 0), 10, true);
        assert!(m.check(at(t0, 100)).is_some());
        // an eval from 100 to 5000 ms, then one batch of 200 ms
        m.reset();
        assert_eq!(m.check(at(t0, 5000)), None);
        m.batch_start(at(t0, 5000), 10, true);
        let s = m.check(at(t0, 5200)).unwrap();
        assert!((s.tokens_per_second - 50.0).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn a_zero_window_holds_one_batch() {
        let t0 = Instant::now();
        let mut m = SpeedMonitor::new(0);
        m.batch_start(at(t0, 0), 10, true);
        m.batch_start(at(t0, 1000), 10, true);
        let s = m.check(at(t0, 1100)).unwrap();
        assert!((s.tokens_per_second - 100.0).abs() < 1e-6, "{s:?}");
    }
}
