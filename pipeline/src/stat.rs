//! `dolma stat`: how the values of attributes are distributed over attribute files, to choose
//! a mix's thresholds. For each attribute name, histograms of its spans' scores
//! (`{name}/score`) and lengths (`{name}/length`), printed as tables of 10 bins and written
//! with `bins` bins to `{report}/summaries.jsonl.gz` in dolma's format (`name`, `counts`,
//! `bins`: the distinct values and their counts where there are at most `bins` of them, else
//! `bins` equal-width bins over [min, max] given by their `bins + 1` edges, as NumPy's
//! `histogram` makes them).
//!
//! Unlike dolma's, the histograms are exact and the same whatever the number of processes
//! (dolma's tracker folds values into the nearest of the first 100,000 it saw, in the order
//! processes deliver them), and the count, sum, mean, min and max are each attribute's
//! (dolma's "total count" and "total sum" are over every attribute together). As in dolma, a
//! document with no spans for an attribute counts once as a zero-length span of score 0, and
//! fastText's `__label__` scores above 1 are taken as 1. It reads the files twice: once for
//! the ranges and the distinct values, once to bin the attributes with more of those than
//! `bins`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::config::{one_or_many, opt_string};
use crate::io::{AtomicWriter, Line, LineReader};
use crate::runner::{self, expand_inputs, FileStats, Progress, RunOptions, Task};

fn default_bins() -> usize {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatConfig {
    /// Attribute files (globs, or folders meaning every file under them).
    #[serde(deserialize_with = "one_or_many")]
    pub attributes: Vec<String>,
    /// A folder for `summaries.jsonl.gz`; the tables are printed either way.
    #[serde(default, deserialize_with = "opt_string")]
    pub report: Option<String>,
    #[serde(default = "default_bins")]
    pub bins: usize,
    #[serde(default)]
    pub processes: Option<usize>,
    /// Only attribute names this regular expression finds a match in.
    #[serde(default, deserialize_with = "opt_string")]
    pub regex: Option<String>,
    #[serde(default)]
    pub skip_bad_lines: bool,
    #[serde(default)]
    pub max_line_bytes: Option<usize>,
    #[serde(default = "crate::config::yes")]
    pub progress: bool,
    // Accepted for dolma config compatibility; they change nothing here (the result does
    // not depend on a seed, and nothing is staged).
    #[serde(default)]
    pub seed: Option<u64>,
    /// dolma's switch for a sum/total row: the header line of each table always has them.
    #[serde(default)]
    pub total: bool,
    #[serde(default)]
    pub debug: bool,
    #[serde(default)]
    pub work_dir: Option<serde_json::Value>,
}

/// An attribute's `[start, end, score]` spans (`null` or `[]`: none).
type Spans = Option<Vec<(f64, f64, f64)>>;

/// One line of an attribute file: only `attributes` is read.
#[derive(Deserialize)]
struct AttrLine {
    attributes: HashMap<String, Spans>,
}

/// Counts per bin: `bins` of them for the report, 10 for the table.
type Counts = (Vec<u64>, Vec<u64>);

/// A value's key for exact counting: -0 and 0 are one value.
fn key(v: f64) -> u64 {
    (v + 0.0).to_bits()
}

/// What the first pass learns of one histogram in one file.
#[derive(Debug, Clone)]
struct Ranges {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// Count of each distinct value while there are at most `bins` of them; `None` past that.
    distinct: Option<HashMap<u64, u64>>,
}

impl Ranges {
    fn new() -> Ranges {
        Ranges {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            distinct: Some(HashMap::new()),
        }
    }

    fn add(&mut self, v: f64, cap: usize) {
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if let Some(d) = &mut self.distinct {
            *d.entry(key(v)).or_insert(0) += 1;
            if d.len() > cap {
                self.distinct = None;
            }
        }
    }

    /// Folds in a later file's ranges; sums are folded in file order, so they do not depend on
    /// which thread finished first.
    fn merge(&mut self, o: &Ranges, cap: usize) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        match (&mut self.distinct, &o.distinct) {
            (Some(d), Some(od)) => {
                for (k, c) in od {
                    *d.entry(*k).or_insert(0) += c;
                }
                if d.len() > cap {
                    self.distinct = None;
                }
            }
            _ => self.distinct = None,
        }
    }
}

/// Per histogram name (`{attr}/score`, `{attr}/length`).
type FileRanges = BTreeMap<String, Ranges>;

/// Every value of a file's histograms, as `(name, value)`: each span of each attribute gives
/// its score to `{attr}/score` and its length to `{attr}/length`.
fn for_each_value(
    task: &Task,
    opts: &RunOptions,
    progress: &Progress,
    regex: Option<&regex::Regex>,
    f: &mut dyn FnMut(&str, f64),
) -> Result<FileStats> {
    let mut reader = LineReader::open(&task.input.path, opts.max_line_bytes)?;
    let path = reader.path().to_string();
    let mut stats = FileStats::default();
    let mut last_bytes = 0;
    // each attribute's histogram names, made once (not for every span)
    let mut histograms: HashMap<String, [String; 2]> = HashMap::new();
    loop {
        let (line, n) = match reader.next_line()? {
            None => break,
            Some(Line::Text(t, n)) => (t, n),
            Some(Line::Bad(e)) if opts.skip_bad_lines => {
                stats.bad_lines += 1;
                tracing::warn!("skipping bad line {e}");
                continue;
            }
            Some(Line::Bad(e)) => return Err(e.into()),
        };
        let parsed: AttrLine = match serde_json::from_str(line) {
            Ok(p) => p,
            Err(e) if opts.skip_bad_lines => {
                stats.bad_lines += 1;
                tracing::warn!("skipping bad line {path}:{n}: {e}");
                continue;
            }
            Err(e) => bail!(
                "{path}:{n}: not an attributes line ({e}): one {{\"id\": ..., \"attributes\": {{name: [[start, end, score], ...]}}}} object is expected (--skip-bad-lines skips such lines)"
            ),
        };
        let mut attrs: Vec<(&String, &Spans)> = parsed.attributes.iter().collect();
        attrs.sort_by_key(|(k, _)| *k);
        for (name, spans) in attrs {
            if regex.is_some_and(|r| !r.is_match(name)) {
                continue;
            }
            let zero = [(0.0, 0.0, 0.0)];
            let spans = match spans.as_deref() {
                None | Some([]) => &zero[..],
                Some(s) => s,
            };
            for &(start, end, score) in spans {
                let score = if name.contains("__label__") {
                    score.min(1.0)
                } else {
                    score
                };
                if !score.is_finite() || !start.is_finite() || !end.is_finite() {
                    bail!("{path}:{n}: attribute `{name}` has a span [{start}, {end}, {score}] that is not finite");
                }
                if !histograms.contains_key(name) {
                    let names = [format!("{name}/score"), format!("{name}/length")];
                    histograms.insert(name.clone(), names);
                }
                let [score_name, length_name] = &histograms[name];
                f(score_name, score);
                f(length_name, end - start);
            }
        }
        stats.docs += 1;
        let bytes = reader.bytes_read;
        progress.add(1, bytes - last_bytes);
        stats.text_bytes += bytes - last_bytes;
        last_bytes = bytes;
    }
    Ok(stats)
}

/// NumPy's `histogram` binning of `v` into `n` equal bins over [lo, hi] (the last closed),
/// its edges as `linspace` makes them: the bin a value falls in here is the bin it falls in
/// there, so a report's counts match NumPy's for the same values.
struct Bins {
    lo: f64,
    hi: f64,
    n: usize,
    edges: Vec<f64>,
}

impl Bins {
    fn new(lo: f64, hi: f64, n: usize) -> Bins {
        let (lo, hi) = if lo == hi {
            (lo - 0.5, hi + 0.5)
        } else {
            (lo, hi)
        };
        let step = (hi - lo) / n as f64;
        let mut edges: Vec<f64> = (0..=n).map(|i| i as f64 * step + lo).collect();
        edges[n] = hi;
        Bins { lo, hi, n, edges }
    }

    fn index(&self, v: f64) -> usize {
        let norm = self.n as f64 / (self.hi - self.lo);
        let mut i = (((v - self.lo) * norm) as usize).min(self.n - 1);
        if v < self.edges[i] && i > 0 {
            i -= 1;
        }
        if v >= self.edges[i + 1] && i != self.n - 1 {
            i += 1;
        }
        i
    }
}

/// `math.frexp`: `v = m · 2^e` with 0.5 <= |m| < 1 (and (0, 0) for 0).
fn frexp(v: f64) -> (f64, i32) {
    if v == 0.0 || !v.is_finite() {
        return (v, 0);
    }
    let (v, shift) = if v.abs() < f64::MIN_POSITIVE {
        (v * 2f64.powi(54), -54)
    } else {
        (v, 0)
    };
    let e = ((v.to_bits() >> 52) & 0x7ff) as i32 - 1022;
    (v / 2f64.powi(e), e + shift)
}

/// The edge closing the last of a list of distinct values, as dolma 1.2.1 writes it: the
/// value past the largest at dolma's resolution (five decimal digits of the binary mantissa).
fn upper_edge(max: f64) -> f64 {
    let (m, e) = frexp(max);
    let up = ((m * 1e5).floor() + 1.0) / 1e5 * 2f64.powi(e);
    // (dolma's formula falls below a negative maximum)
    if up > max {
        up
    } else {
        max + max.abs().max(1.0) * 1e-5
    }
}

/// A histogram's summary as dolma 1.2.1 reports it: `bins` are the edges of `counts`' bins
/// (one more): the distinct values closed by [`upper_edge`] where there are at most `n`, else
/// `n` equal-width bins over them.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    counts: Vec<u64>,
    bins: Vec<f64>,
}

impl Summary {
    /// From exact counts of distinct values: the values themselves, or `n` bins over them.
    fn of_distinct(d: &HashMap<u64, u64>, n: usize) -> Summary {
        let mut values: Vec<(f64, u64)> = d.iter().map(|(k, c)| (f64::from_bits(*k), *c)).collect();
        values.sort_by(|a, b| a.0.total_cmp(&b.0));
        if values.len() <= n {
            let mut bins: Vec<f64> = values.iter().map(|v| v.0).collect();
            bins.push(upper_edge(values[values.len() - 1].0));
            return Summary {
                counts: values.iter().map(|v| v.1).collect(),
                bins,
            };
        }
        let b = Bins::new(values[0].0, values[values.len() - 1].0, n);
        let mut counts = vec![0; n];
        for (v, c) in values {
            counts[b.index(v)] += c;
        }
        Summary {
            counts,
            bins: b.edges,
        }
    }
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// dolma's rounding for its tables: the fewest decimals (up to 4) that keep the values apart.
fn rounded(values: &[f64]) -> Vec<String> {
    for d in 0..4 {
        let r: Vec<String> = values.iter().map(|v| format!("{v:.d$}")).collect();
        let mut u = r.clone();
        u.dedup();
        if u.len() == r.len() {
            return r;
        }
    }
    values.iter().map(|v| format!("{v:.4}")).collect()
}

/// A histogram as a table of value (or range), share and count; `listed`: its bins are its
/// distinct values.
fn table(name: &str, r: &Ranges, s: &Summary, listed: bool) -> String {
    let mut out = format!(
        "{name}: count {}, sum {}, mean {}, min {}, max {}\n",
        group_digits(r.count),
        r.sum,
        r.sum / r.count.max(1) as f64,
        r.min,
        r.max
    );
    // distinct values are listed as themselves, bins as ranges
    let rows: Vec<String> = if listed {
        rounded(&s.bins[..s.counts.len()])
    } else {
        let labels = rounded(&s.bins);
        (0..s.counts.len())
            .map(|i| {
                let close = if i + 1 == s.counts.len() { "]" } else { ")" };
                format!("[{}, {}{close}", labels[i], labels[i + 1])
            })
            .collect()
    };
    let width = rows.iter().map(String::len).max().unwrap_or(5).max(5);
    out += &format!("  {:<width$}  {:<8}  count\n", "value", "share");
    let total: u64 = s.counts.iter().sum();
    for (row, c) in rows.iter().zip(&s.counts) {
        let share = *c as f64 / total.max(1) as f64;
        out += &format!("  {row:<width$}  {share:<8.4}  {}\n", group_digits(*c));
    }
    out
}

pub fn run(cfg: StatConfig) -> Result<()> {
    if cfg.bins == 0 {
        bail!("bins must be at least 1");
    }
    let regex = cfg
        .regex
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .context("regex")?;
    if cfg.attributes.is_empty() {
        bail!("no attribute files given (set `attributes`)");
    }
    // every file is read on each pass (a summary is no file's output)
    let tasks: Vec<Task> = expand_inputs(&cfg.attributes)
        .context("attributes")?
        .into_iter()
        .map(|input| Task {
            input,
            outputs: Vec::new(),
        })
        .collect();
    let n_files = tasks.len();
    let opts = RunOptions::new(
        cfg.processes,
        true,
        cfg.skip_bad_lines,
        cfg.max_line_bytes,
        cfg.progress,
    );
    let cap = cfg.bins.max(10);

    // Pass 1: ranges, sums and distinct values, each file's folded in file order.
    let pending: Mutex<(usize, BTreeMap<usize, FileRanges>, FileRanges)> =
        Mutex::new((0, BTreeMap::new(), FileRanges::new()));
    let first = runner::run("stat", tasks.clone(), &opts, |index, task, progress| {
        let mut mine = FileRanges::new();
        let stats = for_each_value(
            task,
            &opts,
            progress,
            regex.as_ref(),
            &mut |k, v| match mine.get_mut(k) {
                Some(r) => r.add(v, cap),
                None => {
                    let mut r = Ranges::new();
                    r.add(v, cap);
                    mine.insert(k.to_string(), r);
                }
            },
        )?;
        let mut p = pending.lock().expect("stat lock");
        p.1.insert(index, mine);
        loop {
            let next = p.0;
            let Some(f) = p.1.remove(&next) else {
                break;
            };
            for (k, r) in f {
                match p.2.get_mut(&k) {
                    Some(t) => t.merge(&r, cap),
                    None => {
                        p.2.insert(k, r);
                    }
                }
            }
            p.0 += 1;
        }
        Ok(stats)
    })?;
    let (_, left, totals) = pending.into_inner().expect("stat lock");
    debug_assert!(left.is_empty());
    if totals.is_empty() {
        bail!(
            "no attribute values in {n_files} files{}",
            match &cfg.regex {
                Some(r) => format!(" whose names match `{r}`"),
                None => String::new(),
            }
        );
    }

    // Pass 2: the histograms with more distinct values than bins, over their whole range.
    let wide: BTreeMap<String, (Bins, Bins)> = totals
        .iter()
        .filter(|(_, r)| r.distinct.is_none())
        .map(|(k, r)| {
            (
                k.clone(),
                (
                    Bins::new(r.min, r.max, cfg.bins),
                    Bins::new(r.min, r.max, 10),
                ),
            )
        })
        .collect();
    let counted: Mutex<BTreeMap<String, Counts>> = Mutex::new(
        wide.keys()
            .map(|k| (k.clone(), (vec![0; cfg.bins], vec![0; 10])))
            .collect(),
    );
    let mut seconds = first.elapsed.as_secs_f64();
    if !wide.is_empty() {
        let second = runner::run("stat (histograms)", tasks, &opts, |_, task, progress| {
            let mut mine: HashMap<&str, Counts> = HashMap::new();
            let stats = for_each_value(task, &opts, progress, regex.as_ref(), &mut |k, v| {
                if let Some((key, (b, b10))) = wide.get_key_value(k) {
                    let e = mine
                        .entry(key.as_str())
                        .or_insert_with(|| (vec![0; b.n], vec![0; 10]));
                    e.0[b.index(v)] += 1;
                    e.1[b10.index(v)] += 1;
                }
            })?;
            let mut all = counted.lock().expect("stat lock");
            for (k, (c, c10)) in mine {
                let t = all.get_mut(k).expect("a wide histogram");
                t.0.iter_mut().zip(c).for_each(|(a, b)| *a += b);
                t.1.iter_mut().zip(c10).for_each(|(a, b)| *a += b);
            }
            Ok(stats)
        })?;
        seconds += second.elapsed.as_secs_f64();
    }
    let counted = counted.into_inner().expect("stat lock");

    let mut out = std::io::stdout().lock();
    let mut report = Vec::new();
    for (name, r) in &totals {
        let (full, short) = match (&r.distinct, wide.get(name), counted.get(name)) {
            (Some(d), _, _) => (
                Summary::of_distinct(d, cfg.bins),
                Summary::of_distinct(d, 10),
            ),
            (None, Some((b, b10)), Some((c, c10))) => (
                Summary {
                    counts: c.clone(),
                    bins: b.edges.clone(),
                },
                Summary {
                    counts: c10.clone(),
                    bins: b10.edges.clone(),
                },
            ),
            _ => unreachable!("every histogram is exact or binned"),
        };
        let listed = r.distinct.as_ref().is_some_and(|d| d.len() <= 10);
        writeln!(out, "{}", table(name, r, &short, listed))?;
        // dolma 1.2.1's fields, and the range
        report.push(serde_json::json!({
            "name": name,
            "counts": full.counts,
            "bins": full.bins,
            "total": r.count,
            "sum": r.sum,
            "min": r.min,
            "max": r.max,
        }));
    }
    if let Some(dir) = &cfg.report {
        let path = Path::new(dir).join("summaries.jsonl.gz");
        let mut w = AtomicWriter::create(&path)?;
        for line in &report {
            serde_json::to_writer(&mut w, line)?;
            w.write_all(b"\n")?;
        }
        w.finish()?;
        eprintln!("stat: wrote {}", path.display());
    }
    let s = &first.stats;
    eprintln!(
        "stat: {n_files} files, {} docs ({} bad lines skipped), {} attributes ({} histograms binned in a second pass) in {seconds:.1}s: {:.0} docs/s, {:.1} MB/s",
        s.docs,
        s.bad_lines,
        totals.len() / 2,
        wide.len(),
        s.docs as f64 / seconds.max(1e-9),
        first.input_bytes as f64 / 1e6 / seconds.max(1e-9),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_numpy_s() {
        // np.histogram(a, bins=4) over [0, 1]: edges 0, .25, .5, .75, 1; 1 falls in the last
        let b = Bins::new(0.0, 1.0, 4);
        assert_eq!(b.edges, [0.0, 0.25, 0.5, 0.75, 1.0]);
        let got: Vec<usize> = [0.0, 0.2499, 0.25, 0.5, 0.7500001, 1.0]
            .iter()
            .map(|&v| b.index(v))
            .collect();
        assert_eq!(got, [0, 0, 1, 2, 3, 3]);
        // one value: NumPy widens the range by half on each side
        let one = Bins::new(3.0, 3.0, 2);
        assert_eq!(one.edges, [2.5, 3.0, 3.5]);
        assert_eq!(one.index(3.0), 1);
        // edge 3 of 10 over [0, 1] is 0.30000000000000004 in floating point, so 0.3 falls
        // below it, in bin 2, as in NumPy (and 0.7 in bin 6)
        let t = Bins::new(0.0, 1.0, 10);
        assert_eq!((t.index(0.3), t.index(0.7)), (2, 6));
    }

    #[test]
    fn few_values_are_listed_and_many_binned() {
        let mut d = HashMap::new();
        for (v, c) in [(0.5, 2u64), (-0.0, 1), (0.0, 1), (1.0, 3)] {
            *d.entry(key(v)).or_insert(0) += c;
        }
        let s = Summary::of_distinct(&d, 10);
        // closed as dolma 1.2.1 closes them: 1.0 is 0.5 · 2^1, the next 5-digit step up
        assert_eq!(
            (s.bins, s.counts),
            (vec![0.0, 0.5, 1.0, 1.00002], vec![2, 2, 3])
        );
        let s = Summary::of_distinct(&d, 2);
        assert_eq!((s.bins, s.counts), (vec![0.0, 0.5, 1.0], vec![2, 5]));
        assert_eq!(frexp(3.0), (0.75, 2));
        assert_eq!(frexp(0.1), (0.8, -3));
        assert_eq!(upper_edge(0.0), 1e-5);
        assert!(upper_edge(-3.0) > -3.0);
    }

    #[test]
    fn tables_round_as_dolma_s() {
        assert_eq!(rounded(&[0.0, 0.5, 1.0]), ["0.0", "0.5", "1.0"]);
        assert_eq!(rounded(&[1.0, 2.0]), ["1", "2"]);
        assert_eq!(rounded(&[0.12341, 0.12342]), ["0.1234", "0.1234"]);
        assert_eq!(group_digits(1234567), "1,234,567");
    }
}
