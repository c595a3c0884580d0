//! OLMo-2's instance filter (`data.instance_filter`): a training instance holding a token
//! pattern of period `repetition_min_period..=repetition_max_period` repeated
//! `repetition_max_count` times or more is not trained on (all its targets are masked).
//!
//! Which instances are dropped must match OLMo's, or the same config trains on different
//! data, so [`periodic_runs`] reports exactly the runs OLMo's `find_periodic_sequences`
//! yields, quirks included: it looks at the instance in rows of one period, so a run is only
//! found once two whole rows repeat their predecessors, and is reported when it spans more
//! than two periods.

use anyhow::{bail, Result};
use serde::Deserialize;

/// `data.instance_filter`, with OLMo's defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceFilter {
    #[serde(default = "default_max_period")]
    pub repetition_max_period: usize,
    #[serde(default = "default_min_period")]
    pub repetition_min_period: usize,
    #[serde(default = "default_max_count")]
    pub repetition_max_count: usize,
}

fn default_max_period() -> usize {
    13
}
fn default_min_period() -> usize {
    1
}
fn default_max_count() -> usize {
    32
}

impl InstanceFilter {
    /// Bounds that would make the filter do nothing, or fail, in OLMo are mistakes here.
    pub fn check(&self) -> Result<()> {
        if self.repetition_min_period == 0 {
            bail!("data.instance_filter.repetition_min_period must be at least 1");
        }
        if self.repetition_min_period > self.repetition_max_period {
            bail!(
                "data.instance_filter: repetition_min_period ({}) is above repetition_max_period ({}), so no instance would ever be filtered",
                self.repetition_min_period,
                self.repetition_max_period
            );
        }
        if self.repetition_max_count == 0 {
            bail!("data.instance_filter.repetition_max_count must be at least 1");
        }
        Ok(())
    }

    /// Whether OLMo trains on this instance (its `instance_mask`).
    pub fn keeps(&self, tokens: &[u32]) -> bool {
        !periodic_runs(
            tokens,
            self.repetition_min_period,
            self.repetition_max_period,
        )
        .iter()
        .any(|r| r.times >= self.repetition_max_count)
    }
}

/// A stretch `start..end` of an instance made of one pattern of `period` tokens, repeated
/// `times` whole times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub end: usize,
    pub period: usize,
    pub times: usize,
}

/// Every run OLMo's `find_periodic_sequences(tokens, max_period, min_period)` yields, in its
/// order: by period, then by position.
pub fn periodic_runs(tokens: &[u32], min_period: usize, max_period: usize) -> Vec<Run> {
    let n = tokens.len();
    let mut out = Vec::new();
    // a run shorter than three periods is never reported
    for p in min_period.max(1)..=max_period.min(n / 3) {
        // OLMo pads the instance to whole rows with a value no token has (a whole row of it
        // when `n` is a multiple of `p`), so the last row never repeats its predecessor
        let rows = n / p + 1;
        let same = |i: usize| i >= p && i < n && tokens[i] == tokens[i - p];
        let repeats = |row: usize| (row * p..(row + 1) * p).all(same);
        // the first row has no predecessor to repeat
        let mut row = 1;
        while row < rows {
            if !repeats(row) {
                row += 1;
                continue;
            }
            let first = row;
            while repeats(row + 1) {
                row += 1;
            }
            // the run reaches back over the repeating tail of the row before the first
            // repeating one, and on over the repeating head of the row after the last
            let before = (0..p)
                .rev()
                .take_while(|&c| same((first - 1) * p + c))
                .count();
            let after = (0..p).take_while(|&c| same((row + 1) * p + c)).count();
            let start = (first - 1) * p - before;
            let end = (row + 1) * p + after;
            let times = (end - start) / p;
            if times > 2 {
                out.push(Run {
                    start,
                    end,
                    period: p,
                    times,
                });
            }
            row += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Case {
        min_period: usize,
        max_period: usize,
        tokens: Vec<u32>,
        runs: Vec<[usize; 4]>,
    }

    #[derive(Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
    }

    #[test]
    fn runs_are_the_ones_olmo_finds() {
        // tests/data/olmo_periodic_sequences.json: OLMo's function run with NumPy on random
        // instances with planted repeats, and on edge shapes (see its `generator`)
        let f: Fixture =
            serde_json::from_str(include_str!("../tests/data/olmo_periodic_sequences.json"))
                .unwrap();
        let mut found = 0;
        for c in &f.cases {
            let got: Vec<[usize; 4]> = periodic_runs(&c.tokens, c.min_period, c.max_period)
                .iter()
                .map(|r| [r.start, r.end, r.period, r.times])
                .collect();
            assert_eq!(got, c.runs, "{:?}", c.tokens);
            found += got.len();
        }
        assert!(found > 50);
    }

    #[test]
    fn an_instance_is_dropped_from_the_given_count() {
        let filter = |count| InstanceFilter {
            repetition_max_period: 13,
            repetition_min_period: 1,
            repetition_max_count: count,
        };
        // 20 tokens: two of noise, then "7 8" nine times
        let mut tokens = vec![1, 2];
        tokens.extend([7, 8].repeat(9));
        assert_eq!(
            periodic_runs(&tokens, 2, 2),
            [Run {
                start: 2,
                end: 20,
                period: 2,
                times: 9
            }]
        );
        assert!(!filter(9).keeps(&tokens));
        assert!(filter(10).keeps(&tokens));
        // the period must be in range
        let mut narrow = filter(3);
        narrow.repetition_min_period = 3;
        assert!(!narrow.keeps(&tokens)); // "7 8 7 8" repeats as period 4
        narrow.repetition_max_period = 3;
        assert!(narrow.keeps(&tokens));
    }

    #[test]
    fn bounds_that_filter_nothing_are_refused() {
        let f = |min, max, count| InstanceFilter {
            repetition_max_period: max,
            repetition_min_period: min,
            repetition_max_count: count,
        };
        assert!(f(1, 13, 32).check().is_ok());
        let err = f(5, 4, 32).check().unwrap_err().to_string();
        assert!(err.contains("above repetition_max_period"), "{err}");
        assert!(f(0, 4, 32).check().is_err());
        assert!(f(1, 4, 0).check().is_err());
    }
}
