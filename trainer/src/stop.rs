//! Stopping a run early and cleanly, with a checkpoint: `stop_after` (steps of this run),
//! `time_limit` (seconds, as OLMo's, for a scheduler's wall-clock limit), OLMo's
//! `early_stopping_factor` (a loss spike; every rank has the same all-reduced loss), and
//! SIGTERM or SIGINT (a scheduler's notice before it kills a job, or Ctrl-C). The run finishes the step in
//! flight, saves and exits; a rerun of the same command continues. A second signal stops at
//! once. With several ranks the decision rides on the loss all-reduce each step, so every rank
//! stops after the same step.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // The second one: the default action, now.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    // write(2) is async-signal-safe, eprintln! is not.
    let msg = b"\nolmo-train: signal received: stopping after this step with a checkpoint (send it again to stop now)\n";
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// Routes SIGTERM and SIGINT to a stop after the current step.
pub fn catch_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // Safety: the handler only touches an atomic and calls async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// The signal received so far (SIGTERM or SIGINT), for waits outside the training loop and
/// evaluations, which give up for it.
pub fn signalled() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// Why a run stops before its last step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    TimeLimit(f64),
    Signal(i32),
    /// `early_stopping_factor`: the step's train loss rose above `factor` times the run's
    /// lowest.
    LossIncrease {
        loss: f64,
        lowest: f64,
        factor: f64,
    },
}

impl Reason {
    /// Slots summed across ranks: time limit hit, SIGTERM, SIGINT.
    pub fn votes(time_limit: Option<f64>, started: Instant) -> [f64; 3] {
        let late = time_limit.is_some_and(|t| started.elapsed() >= Duration::from_secs_f64(t));
        let sig = SIGNAL.load(Ordering::SeqCst);
        [
            late as u8 as f64,
            (sig == libc::SIGTERM) as u8 as f64,
            (sig == libc::SIGINT) as u8 as f64,
        ]
    }

    /// The decision from the summed votes (a signal outranks the clock).
    pub fn decide(votes: [f64; 3], time_limit: Option<f64>) -> Option<Reason> {
        if votes[1] > 0.0 {
            Some(Reason::Signal(libc::SIGTERM))
        } else if votes[2] > 0.0 {
            Some(Reason::Signal(libc::SIGINT))
        } else if votes[0] > 0.0 {
            Some(Reason::TimeLimit(time_limit.unwrap_or(0.0)))
        } else {
            None
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Reason::TimeLimit(t) => format!("time_limit ({t} s) reached"),
            Reason::Signal(s) => format!("stopped by {}", signal_name(*s)),
            Reason::LossIncrease {
                loss,
                lowest,
                factor,
            } => format!(
                "train loss {loss:.4} is above early_stopping_factor ({factor}) times the run's lowest, {lowest:.4}"
            ),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

/// The error a run stopped by a signal ends with, after its checkpoint: the process exits
/// with 128 + the signal, as a shell reports a process the signal killed, so a job script does
/// not take the run for finished.
#[derive(Debug)]
pub struct Stopped {
    pub signal: i32,
    pub step: u64,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} after step {}: rerun the same command to continue",
            Reason::Signal(self.signal).describe(),
            self.step
        )
    }
}

impl std::error::Error for Stopped {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_rank_s_signal_or_clock_stops_every_rank() {
        assert_eq!(Reason::decide([0.0; 3], None), None);
        assert_eq!(
            Reason::decide([1.0, 0.0, 0.0], Some(60.0)),
            Some(Reason::TimeLimit(60.0))
        );
        assert_eq!(
            Reason::decide([2.0, 0.0, 1.0], Some(60.0)),
            Some(Reason::Signal(libc::SIGINT))
        );
        assert_eq!(
            Reason::decide([0.0, 1.0, 1.0], None),
            Some(Reason::Signal(libc::SIGTERM))
        );
        let long_ago = Instant::now() - Duration::from_secs(2);
        assert_eq!(Reason::votes(Some(1.0), long_ago)[0], 1.0);
        assert_eq!(Reason::votes(Some(100.0), long_ago)[0], 0.0);
        assert_eq!(Reason::votes(None, long_ago)[0], 0.0);
    }
}
