//! The parallel file runner every stage uses: glob expansion, `--shard I/N`, skip-if-done
//! resume, a progress bar, and a summary.
//!
//! Work is split by input file. Each file's outputs are a pure function of that file (and the
//! config), written atomically, so a killed run rerun with the same command redoes only the
//! files without finished outputs and ends with the same bytes, whatever the thread count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One input file matched by a pattern, with the pattern's directory prefix (the part before
/// the first wildcard), used to mirror paths into outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub path: PathBuf,
    /// Index of the `documents` pattern that matched.
    pub pattern: usize,
    /// Path relative to the pattern's prefix.
    pub relative: PathBuf,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The directory part of a pattern before its first wildcard.
pub fn glob_prefix(pattern: &str) -> PathBuf {
    if !has_glob(pattern) {
        let p = Path::new(pattern);
        return if p.is_dir() {
            p.to_path_buf()
        } else {
            p.parent().map(Path::to_path_buf).unwrap_or_default()
        };
    }
    let first = pattern.find(['*', '?', '[']).expect("has glob");
    match pattern[..first].rfind('/') {
        Some(i) => PathBuf::from(&pattern[..i.max(1)]),
        None => PathBuf::new(),
    }
}

/// Expands `documents` patterns (`**` allowed; a directory means every file under it) into a
/// sorted, de-duplicated list. A pattern that matches nothing is an error.
pub fn expand_inputs(patterns: &[String]) -> Result<Vec<Input>> {
    if patterns.is_empty() {
        bail!("no input documents given (set `documents`)");
    }
    let mut out: Vec<Input> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (pi, pattern) in patterns.iter().enumerate() {
        if pattern.starts_with("s3://") || pattern.starts_with("gs://") {
            bail!(
                "{pattern}: remote paths are not supported in this build; copy the files locally"
            );
        }
        let prefix = glob_prefix(pattern);
        let effective = if !has_glob(pattern) && Path::new(pattern).is_dir() {
            format!("{}/**/*", pattern.trim_end_matches('/'))
        } else {
            pattern.clone()
        };
        let mut matched: Vec<PathBuf> = glob::glob(&effective)
            .map_err(|e| anyhow!("invalid pattern `{pattern}`: {e}"))?
            .filter_map(|r| r.ok())
            .filter(|p| p.is_file())
            .filter(|p| !p.to_string_lossy().ends_with(".tmp"))
            .collect();
        matched.sort();
        if matched.is_empty() {
            bail!("pattern `{pattern}` matched no files");
        }
        for path in matched {
            if !seen.insert(path.clone()) {
                continue;
            }
            let relative = path
                .strip_prefix(&prefix)
                .map(Path::to_path_buf)
                .unwrap_or_else(|_| path.file_name().map(PathBuf::from).unwrap_or_default());
            out.push(Input {
                path,
                pattern: pi,
                relative,
            });
        }
    }
    Ok(out)
}

/// `I/N`: this worker's share of the inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn parse(s: &str) -> Result<Shard> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("--shard must look like I/N (e.g. 0/8), got `{s}`"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| anyhow!("--shard `{s}`: bad index"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| anyhow!("--shard `{s}`: bad count"))?;
        if count == 0 || index >= count {
            bail!("--shard `{s}`: need 0 <= I < N");
        }
        Ok(Shard { index, count })
    }

    /// From Slurm job-array variables, when the config does not set a shard.
    pub fn from_slurm() -> Result<Option<Shard>> {
        let (Ok(id), Ok(count)) = (
            std::env::var("SLURM_ARRAY_TASK_ID"),
            std::env::var("SLURM_ARRAY_TASK_COUNT"),
        ) else {
            return Ok(None);
        };
        let id: usize = id.parse().context("SLURM_ARRAY_TASK_ID is not a number")?;
        let count: usize = count
            .parse()
            .context("SLURM_ARRAY_TASK_COUNT is not a number")?;
        let min: usize = std::env::var("SLURM_ARRAY_TASK_MIN")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        Shard::parse(&format!("{}/{count}", id.saturating_sub(min))).map(Some)
    }

    /// Round-robin over the sorted input list: balanced, and each file in exactly one shard.
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, x)| x)
            .collect()
    }
}

/// Options shared by every stage's runner.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub processes: usize,
    pub ignore_existing: bool,
    pub skip_bad_lines: bool,
    pub max_line_bytes: usize,
    pub show_progress: bool,
}

impl RunOptions {
    /// From the fields every stage's config has; `processes` defaults to all cores.
    pub fn new(
        processes: Option<usize>,
        ignore_existing: bool,
        skip_bad_lines: bool,
        max_line_bytes: Option<usize>,
        show_progress: bool,
    ) -> RunOptions {
        RunOptions {
            processes: processes
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            ignore_existing,
            skip_bad_lines,
            max_line_bytes: max_line_bytes.unwrap_or(crate::io::DEFAULT_MAX_LINE_BYTES),
            show_progress,
        }
    }
}

/// Counters a file's processing reports.
#[derive(Debug, Default, Clone)]
pub struct FileStats {
    pub docs: u64,
    pub bad_lines: u64,
    pub text_bytes: u64,
    /// Stage-specific counts (e.g. duplicate paragraphs), summed over files.
    pub counters: BTreeMap<&'static str, u64>,
}

impl FileStats {
    pub fn count(&mut self, name: &'static str, n: u64) {
        *self.counters.entry(name).or_insert(0) += n;
    }

    fn merge(&mut self, other: FileStats) {
        self.docs += other.docs;
        self.bad_lines += other.bad_lines;
        self.text_bytes += other.text_bytes;
        for (k, v) in other.counters {
            self.count(k, v);
        }
    }
}

/// Lets tasks taken in order run a section strictly in task order (the rest in parallel):
/// `wait_turn(i)` blocks until every task before `i` called `done`. Used where shared state
/// must evolve as in a single-threaded run, e.g. the dedupe Bloom filter.
pub struct Sequencer {
    next: Mutex<usize>,
    cv: Condvar,
}

impl Default for Sequencer {
    fn default() -> Self {
        Sequencer {
            next: Mutex::new(0),
            cv: Condvar::new(),
        }
    }
}

impl Sequencer {
    pub fn wait_turn(&self, i: usize) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        while *next < i {
            next = self.cv.wait(next).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Marks task `i` as past its ordered section; call exactly once per task, errors included.
    pub fn done(&self, i: usize) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        if *next == i {
            *next += 1;
        }
        self.cv.notify_all();
    }
}

/// Live counters, shared with the per-file functions for the progress bar.
#[derive(Default)]
pub struct Progress {
    pub docs: AtomicU64,
    pub bytes: AtomicU64,
}

impl Progress {
    pub fn add(&self, docs: u64, bytes: u64) {
        self.docs.fetch_add(docs, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

pub struct Summary {
    pub files_done: usize,
    pub files_skipped: usize,
    pub stats: FileStats,
    pub elapsed: Duration,
    pub input_bytes: u64,
}

impl Summary {
    pub fn docs_per_sec(&self) -> f64 {
        self.stats.docs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn mb_per_sec(&self) -> f64 {
        self.stats.text_bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A unit of work: one input, and the outputs whose existence means it is done.
#[derive(Clone)]
pub struct Task {
    pub input: Input,
    pub outputs: Vec<PathBuf>,
}

/// Runs `work(index, task)` over the tasks on `processes` threads. Threads take tasks in list
/// order (so a [`Sequencer`] never waits on a task nobody started). Errors in one file do not
/// stop the others; all are reported and the run fails at the end.
pub fn run<F>(stage: &str, tasks: Vec<Task>, opts: &RunOptions, work: F) -> Result<Summary>
where
    F: Fn(usize, &Task, &Progress) -> Result<FileStats> + Sync,
{
    let start = Instant::now();
    let total = tasks.len();
    // Work functions get each task's index in `tasks`, also when earlier ones are skipped.
    type Indexed = Vec<(usize, Task)>;
    let (todo, done): (Indexed, Indexed) = tasks.into_iter().enumerate().partition(|(_, t)| {
        opts.ignore_existing || t.outputs.is_empty() || !t.outputs.iter().all(|o| o.exists())
    });
    // Partial files left by a crash beside finished outputs are garbage: remove them.
    for o in done.iter().flat_map(|(_, t)| &t.outputs) {
        let tmp = crate::io::tmp_path(o);
        if tmp.exists() {
            std::fs::remove_file(&tmp)
                .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
        }
    }
    if !done.is_empty() {
        tracing::info!("{stage}: {} of {total} files already have outputs; skipping them (use --ignore-existing to redo)", done.len());
    }
    let input_bytes: u64 = todo
        .iter()
        .map(|(_, t)| std::fs::metadata(&t.input.path).map_or(0, |m| m.len()))
        .sum();

    let bar = ProgressBar::new(todo.len() as u64);
    if opts.show_progress {
        bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} files {msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(stage.to_string());
    let progress = Progress::default();
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let totals: Mutex<FileStats> = Mutex::new(FileStats::default());

    let next_task = AtomicUsize::new(0);
    let ticker_stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Refresh docs/s and MB/s while long files are in flight.
        scope.spawn(|| {
            while !ticker_stop.load(Ordering::Relaxed) {
                let secs = start.elapsed().as_secs_f64().max(1e-9);
                let docs = progress.docs.load(Ordering::Relaxed);
                let mb = progress.bytes.load(Ordering::Relaxed) as f64 / 1e6;
                bar.set_message(format!(
                    "{docs} docs, {:.0} docs/s, {:.1} MB/s",
                    docs as f64 / secs,
                    mb / secs
                ));
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let workers: Vec<_> = (0..opts.processes.max(1).min(todo.len().max(1)))
            .map(|_| {
                scope.spawn(|| loop {
                    let i = next_task.fetch_add(1, Ordering::Relaxed);
                    let Some((index, task)) = todo.get(i) else {
                        break;
                    };
                    match work(*index, task, &progress) {
                        Ok(s) => totals.lock().expect("totals lock").merge(s),
                        Err(e) => {
                            let msg = format!("{}: {e:#}", task.input.path.display());
                            bar.suspend(|| tracing::error!("{msg}"));
                            errors.lock().expect("errors lock").push(msg);
                        }
                    }
                    bar.inc(1);
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        ticker_stop.store(true, Ordering::Relaxed);
    });
    bar.finish_and_clear();

    let errors = errors.into_inner().expect("errors lock");
    let stats = totals.into_inner().expect("totals lock");
    let summary = Summary {
        files_done: todo.len() - errors.len(),
        files_skipped: done.len(),
        stats,
        elapsed: start.elapsed(),
        input_bytes,
    };
    if !errors.is_empty() {
        bail!(
            "{stage}: {} of {} files failed (finished files are kept; rerun the same command to resume):\n  {}",
            errors.len(),
            todo.len(),
            errors.join("\n  ")
        );
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_every_file_exactly_once() {
        let files: Vec<usize> = (0..103).collect();
        for n in [1, 2, 3, 7, 200] {
            let mut all: Vec<usize> = (0..n)
                .flat_map(|i| Shard { index: i, count: n }.select(files.clone()))
                .collect();
            all.sort();
            assert_eq!(all, files, "N={n}");
        }
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("x").is_err());
        assert_eq!(Shard::parse("1/4").unwrap(), Shard { index: 1, count: 4 });
    }

    #[test]
    fn glob_prefixes() {
        assert_eq!(
            glob_prefix("a/documents/*.gz"),
            PathBuf::from("a/documents")
        );
        assert_eq!(
            glob_prefix("a/documents/**/x-*.gz"),
            PathBuf::from("a/documents")
        );
        assert_eq!(glob_prefix("*.gz"), PathBuf::new());
    }

    #[test]
    fn expansion_sorts_and_rejects_empty_patterns() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("documents/sub");
        std::fs::create_dir_all(&d).unwrap();
        for n in ["b.json.gz", "a.json.gz", "c.json.gz.tmp"] {
            std::fs::write(d.join(n), b"").unwrap();
        }
        let pat = format!("{}/documents/**/*.gz", dir.path().display());
        let got = expand_inputs(&[pat]).unwrap();
        let rel: Vec<_> = got.iter().map(|i| i.relative.clone()).collect();
        assert_eq!(
            rel,
            vec![
                PathBuf::from("sub/a.json.gz"),
                PathBuf::from("sub/b.json.gz")
            ]
        );
        let err = expand_inputs(&[format!("{}/nothing/*.gz", dir.path().display())]).unwrap_err();
        assert!(err.to_string().contains("matched no files"));
    }
}
