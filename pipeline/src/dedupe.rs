//! `dolma dedupe`: Bloom-filter deduplication by document key, paragraph, or paragraph n-grams.
//!
//! Config fields are dolma 1.2.1's (`dedupe.{name, documents, paragraphs, skip_empty,
//! min_length, min_words, num_partitions, partition_index}`, `bloom_filter.*`). Output is one
//! attribute file per input (`/documents/` -> `/attributes/<name>/`), one line per document:
//! `{"id", "attributes": {<attribute_name>: [[start, end, score], ...]}}`.
//!
//! Which copy is kept: files are read, parsed and hashed in parallel, but the Bloom filter is
//! consulted in input order (file order, then line order), so the first copy is kept and the
//! output bytes are the same whatever the thread count. With `dedupe.ordered: false` files also
//! query the filter concurrently (faster when the filter is the bottleneck); then exactly one
//! copy of every duplicate group is kept (the filter's test-and-set is atomic), but which one
//! depends on timing. False positives can mark a unique paragraph as a duplicate in both modes.
//!
//! Fixed dolma bugs: `min_words` no longer switches deduplication off, `min_length` compares
//! the paragraph's own length, offsets are code points on any text, a path without a
//! `documents` directory is an error, and a rerun with an existing filter file resumes instead
//! of marking everything as a duplicate (the filter records the inputs it holds).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use unicode_segmentation::UnicodeSegmentation;

use crate::bloom::{self, BloomFilter, KeyHash};
use crate::config::{one_or_many, opt_string};
use crate::io::{open_documents, AtomicWriter, Line};
use crate::runner::{self, expand_inputs, FileStats, Progress, RunOptions, Sequencer, Task};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeRunConfig {
    #[serde(deserialize_with = "one_or_many")]
    pub documents: Vec<String>,
    pub dedupe: DedupeConfig,
    pub bloom_filter: BloomConfig,
    #[serde(default)]
    pub processes: Option<usize>,
    #[serde(default)]
    pub skip_bad_lines: bool,
    #[serde(default)]
    pub max_line_bytes: Option<usize>,
    #[serde(default = "crate::config::yes")]
    pub progress: bool,
    #[serde(default)]
    pub dryrun: bool,
    #[serde(default, deserialize_with = "opt_string")]
    pub shard: Option<String>,
    // Accepted for dolma config compatibility; they change nothing here.
    #[serde(default)]
    pub work_dir: Option<Value>,
    #[serde(default)]
    pub compression: Option<Value>,
    #[serde(default)]
    pub is_s3_volume: Option<bool>,
    #[serde(default)]
    pub mounted: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    #[serde(default, deserialize_with = "opt_string")]
    pub name: Option<String>,
    #[serde(default)]
    pub documents: Option<DocumentDedupe>,
    #[serde(default)]
    pub paragraphs: Option<ParagraphDedupe>,
    #[serde(default)]
    pub skip_empty: Option<bool>,
    #[serde(default)]
    pub min_length: Option<usize>,
    #[serde(default)]
    pub min_words: Option<usize>,
    #[serde(default)]
    pub num_partitions: Option<u64>,
    #[serde(default)]
    pub partition_index: Option<u64>,
    #[serde(default)]
    pub document_dir: Option<String>,
    /// Query the filter in input order (deterministic, first copy kept). Default true.
    #[serde(default)]
    pub ordered: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentDedupe {
    pub attribute_name: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParagraphDedupe {
    pub attribute_name: String,
    #[serde(default)]
    pub paragraph_separator: Option<String>,
    #[serde(default)]
    pub by_ngram: Option<NgramDedupe>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NgramDedupe {
    pub ngram_length: usize,
    #[serde(default = "one")]
    pub stride: usize,
    #[serde(default = "one_f32", alias = "threshold")]
    pub overlap_threshold: f32,
    #[serde(default)]
    pub skip_short_paragraphs: Option<bool>,
}

fn one() -> usize {
    1
}
fn one_f32() -> f32 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BloomConfig {
    pub file: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub size_in_bytes: Option<u64>,
    #[serde(default)]
    pub estimated_doc_count: Option<u64>,
    #[serde(default)]
    pub desired_false_positive_rate: Option<f64>,
    /// dolma 1.2.1 fields, accepted: the filter is always saved unless read-only.
    #[serde(default)]
    pub save_to_disk: Option<bool>,
    #[serde(default)]
    pub sysram_limit: Option<f64>,
}

/// A JSONPath of the simple form dolma keys use: `$.a.b`, `$['a']`, `$.a[0]`.
#[derive(Debug, Clone, PartialEq)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

pub fn parse_key_path(path: &str) -> Result<Vec<PathStep>> {
    let bad = |why: &str| {
        anyhow!("dedupe.documents.key `{path}`: {why} (use a simple path like `$.text` or `$.metadata.url`)")
    };
    let rest = path
        .strip_prefix('$')
        .ok_or_else(|| bad("must start with `$`"))?;
    let mut steps = Vec::new();
    let mut chars = rest.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '.' => {
                let start = i + 1;
                let mut end = rest.len();
                while let Some(&(j, d)) = chars.peek() {
                    if d == '.' || d == '[' {
                        end = j;
                        break;
                    }
                    chars.next();
                }
                let name = &rest[start..end];
                if name.is_empty() || name.contains(['*', '?', '@', '(', ')']) {
                    return Err(bad("only plain field names are supported"));
                }
                steps.push(PathStep::Key(name.to_string()));
            }
            '[' => {
                let close = rest[i..].find(']').ok_or_else(|| bad("unclosed `[`"))? + i;
                let inner = rest[i + 1..close].trim();
                if let Some(q) = inner.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
                    steps.push(PathStep::Key(q.to_string()));
                } else if let Some(q) = inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                    steps.push(PathStep::Key(q.to_string()));
                } else if let Ok(n) = inner.parse::<usize>() {
                    steps.push(PathStep::Index(n));
                } else {
                    return Err(bad(
                        "filters and wildcards are not supported in a dedupe key",
                    ));
                }
                while chars.peek().is_some_and(|&(j, _)| j <= close) {
                    chars.next();
                }
            }
            _ => return Err(bad("unexpected character")),
        }
    }
    if steps.is_empty() {
        return Err(bad("the key must select a field"));
    }
    Ok(steps)
}

fn select<'a>(doc: &'a Value, steps: &[PathStep]) -> Option<&'a Value> {
    steps.iter().try_fold(doc, |v, s| match s {
        PathStep::Key(k) => v.get(k),
        PathStep::Index(i) => v.get(*i),
    })
}

/// Non-whitespace UAX #29 word segments, as dolma's `tokenize`.
fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split_word_bounds()
        .filter(|w| w.chars().any(|c| !c.is_whitespace()))
}

enum Mode {
    Documents {
        steps: Vec<PathStep>,
        attribute: String,
        key: String,
    },
    Paragraphs {
        separator: String,
        attribute: String,
        ngram: Option<NgramDedupe>,
    },
}

struct Settings {
    mode: Mode,
    skip_empty: bool,
    min_length: usize,
    min_words: usize,
    partitions: u64,
    partition: u64,
}

impl Settings {
    fn in_partition(&self, h: KeyHash) -> bool {
        h.h1 % self.partitions == self.partition
    }
}

/// Keys of one document, hashed, in the order the filter must see them; `decide` turns the
/// filter's answers into spans.
struct DocKeys {
    hashes: Vec<KeyHash>,
    plan: DocPlan,
}

enum DocPlan {
    /// Doc mode: `None` = skipped (empty spans), `Some(end)` = one key for the whole document.
    Document(Option<usize>),
    /// Paragraph mode: one entry per paragraph considered.
    Paragraphs(Vec<ParaPlan>),
}

struct ParaPlan {
    start: usize,
    end: usize,
    /// Number of hashes of this paragraph in `hashes` (0: not in this partition).
    n: usize,
    /// n-gram mode and too short: whole-paragraph key, scored 1/0 against the threshold.
    whole_scored: bool,
    ngram_mode: bool,
}

/// The fields dedupe reads when the key is the text (or in paragraph mode): parsing only these,
/// borrowed, is much faster than building a full JSON tree of every document.
#[derive(Deserialize)]
struct TextDoc<'a> {
    #[serde(borrow)]
    id: &'a serde_json::value::RawValue,
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
}

/// `key`: the dedupe key in document mode (already selected), unused in paragraph mode.
fn plan_document(settings: &Settings, key: Option<&str>, text: &str) -> Result<DocKeys> {
    let mut hashes = Vec::new();
    let plan = match &settings.mode {
        Mode::Documents { .. } => {
            let k = key.unwrap_or(text);
            let skip = (settings.min_words > 0 && words(k).count() < settings.min_words)
                || k.len() < settings.min_length
                || (settings.skip_empty && k.trim().is_empty());
            if skip {
                DocPlan::Document(None)
            } else {
                let h = KeyHash::of(k.as_bytes());
                if settings.in_partition(h) {
                    hashes.push(h);
                    DocPlan::Document(Some(text.chars().count()))
                } else {
                    DocPlan::Document(None)
                }
            }
        }
        Mode::Paragraphs {
            separator, ngram, ..
        } => {
            let sep_chars = separator.chars().count();
            // A one-byte separator (the usual "\n") splits with memchr instead of a substring search.
            let pieces: Vec<&str> = match separator.as_bytes() {
                [b] if b.is_ascii() => text.split(*b as char).collect(),
                _ => text.split(separator.as_str()).collect(),
            };
            let mut paras = Vec::new();
            let mut offset = 0usize;
            if !text.is_empty() {
                for (i, p) in pieces.iter().enumerate() {
                    let start = offset;
                    offset += p.chars().count();
                    if i + 1 < pieces.len() {
                        offset += sep_chars;
                    }
                    let end = offset;
                    if p.chars().count() < settings.min_length
                        || (settings.min_words > 0 && words(p).count() < settings.min_words)
                        || (settings.skip_empty && p.trim().is_empty())
                    {
                        continue;
                    }
                    let before = hashes.len();
                    let mut whole_scored = false;
                    match ngram.as_ref().filter(|g| g.ngram_length > 0) {
                        None => {
                            let h = KeyHash::of(p.as_bytes());
                            if settings.in_partition(h) {
                                hashes.push(h);
                            }
                        }
                        Some(g) => {
                            let toks: Vec<&str> = words(p).collect();
                            let mut count = 0;
                            let mut last_start = 0usize;
                            let mut key = Vec::new();
                            for (ngram_start, window) in toks.windows(g.ngram_length).enumerate() {
                                // dolma's stride rule, kept as is (its `last == 0` test means the
                                // first two windows are always taken).
                                if last_start == 0 || ngram_start - last_start >= g.stride {
                                    last_start = ngram_start;
                                    count += 1;
                                    key.clear();
                                    for (j, w) in window.iter().enumerate() {
                                        if j > 0 {
                                            key.push(0x1f);
                                        }
                                        key.extend_from_slice(w.as_bytes());
                                    }
                                    let h = KeyHash::of(&key);
                                    if settings.in_partition(h) {
                                        hashes.push(h);
                                    }
                                }
                            }
                            if count < 2 && !g.skip_short_paragraphs.unwrap_or(false) {
                                hashes.truncate(before);
                                hashes.push(KeyHash::of(p.as_bytes()));
                                whole_scored = true;
                            } else if count < 2 {
                                hashes.truncate(before);
                                continue;
                            }
                        }
                    }
                    paras.push(ParaPlan {
                        start,
                        end,
                        n: hashes.len() - before,
                        whole_scored,
                        ngram_mode: ngram.as_ref().is_some_and(|g| g.ngram_length > 0),
                    });
                }
            }
            DocPlan::Paragraphs(paras)
        }
    };
    Ok(DocKeys { hashes, plan })
}

fn is_text_key(steps: &[PathStep]) -> bool {
    matches!(steps, [PathStep::Key(k)] if k == "text")
}

fn explain(line: &str, e: &serde_json::Error) -> anyhow::Error {
    anyhow!("{}", crate::tag::explain_bad_document(line, e))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(57).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// One document's result: `None` = no attribute key (dolma's "not a duplicate" in doc mode).
type Spans = Option<Vec<(usize, usize, f64)>>;

fn decide(settings: &Settings, keys: &DocKeys, seen: &[bool], stats: &mut FileStats) -> Spans {
    match &keys.plan {
        DocPlan::Document(None) => Some(Vec::new()),
        DocPlan::Document(Some(end)) => {
            if seen[0] {
                stats.count("duplicate documents", 1);
                Some(vec![(0, *end, 1.0)])
            } else {
                None
            }
        }
        DocPlan::Paragraphs(paras) => {
            let threshold = match &settings.mode {
                Mode::Paragraphs { ngram: Some(g), .. } => g.overlap_threshold,
                _ => 1.0,
            };
            let mut spans = Vec::new();
            let mut at = 0;
            for p in paras {
                let answers = &seen[at..at + p.n];
                at += p.n;
                stats.count("paragraphs checked", 1);
                if !p.ngram_mode {
                    if answers.first() == Some(&true) {
                        spans.push((p.start, p.end, 1.0));
                    }
                    continue;
                }
                let score: f32 = if p.whole_scored {
                    if answers[0] {
                        1.0
                    } else {
                        0.0
                    }
                } else if p.n == 0 {
                    0.0
                } else {
                    answers.iter().filter(|&&d| d).count() as f32 / p.n as f32
                };
                if score >= threshold {
                    spans.push((p.start, p.end, score as f64));
                }
            }
            let dups = spans.iter().filter(|s| s.2 > 0.0).count() as u64;
            stats.count("duplicate paragraphs", dups);
            stats.count(
                "duplicate characters",
                spans
                    .iter()
                    .filter(|s| s.2 > 0.0)
                    .map(|s| (s.1 - s.0) as u64)
                    .sum(),
            );
            Some(spans)
        }
    }
}

/// `id_json`: the id exactly as it appears in the input (a JSON string or number).
fn write_line(buf: &mut Vec<u8>, id_json: &str, attribute: &str, spans: &Spans) {
    buf.extend_from_slice(b"{\"id\":");
    buf.extend_from_slice(id_json.as_bytes());
    buf.extend_from_slice(b",\"attributes\":{");
    if let Some(spans) = spans {
        serde_json::to_writer(&mut *buf, attribute).expect("json to vec");
        buf.extend_from_slice(b":[");
        for (i, (s, e, score)) in spans.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            write!(buf, "[{s},{e},").expect("write to vec");
            serde_json::to_writer(&mut *buf, score).expect("json to vec");
            buf.push(b']');
        }
        buf.push(b']');
    }
    buf.extend_from_slice(b"}}\n");
}

/// What to do with one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Dedupe and write the attribute file.
    Process,
    /// Output exists but the filter lacks this file's keys (a killed run): insert them only.
    Replay,
    /// Output exists and the filter holds the keys.
    Skip,
}

struct Job<'a> {
    settings: &'a Settings,
    filter: &'a BloomFilter,
    actions: &'a [Action],
    sequencer: Option<&'a Sequencer>,
    opts: &'a RunOptions,
}

/// Always advances the sequencer, also when the file fails.
struct Turn<'a>(Option<&'a Sequencer>, usize);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0 {
            s.done(self.1);
        }
    }
}

fn attribute_name(settings: &Settings) -> &str {
    match &settings.mode {
        Mode::Documents { attribute, .. } | Mode::Paragraphs { attribute, .. } => attribute,
    }
}

fn dedupe_file(job: &Job, index: usize, task: &Task, progress: &Progress) -> Result<FileStats> {
    let turn = Turn(job.sequencer, index);
    let action = job.actions[index];
    let mut stats = FileStats::default();
    if action == Action::Skip {
        return Ok(stats);
    }
    let mut reader = open_documents(&task.input.path, job.opts.max_line_bytes)?;
    let path = reader.path().to_string();
    // Parse and hash the whole file first (in parallel with other files)...
    let mut docs: Vec<(Box<str>, DocKeys)> = Vec::new();
    let mut pending = (0u64, 0u64);
    loop {
        let (line, line_no) = match reader.next_line()? {
            None => break,
            Some(Line::Text(t, n)) => (t, n),
            Some(Line::Bad(e)) => {
                if !job.opts.skip_bad_lines {
                    return Err(e.into());
                }
                stats.bad_lines += 1;
                tracing::warn!("skipping bad line {e}");
                continue;
            }
        };
        let parsed: Result<(Box<str>, DocKeys)> = (|| {
            let (id, keys, text_len) = match &job.settings.mode {
                Mode::Documents { steps, key, .. } if !is_text_key(steps) => {
                    let doc: Value = serde_json::from_str(line).map_err(|e| explain(line, &e))?;
                    let text = match doc.get("text") {
                        Some(Value::String(s)) => s.as_str(),
                        Some(other) => bail!("field `text` must be a string, got {}", short(other)),
                        None => bail!("missing field `text`"),
                    };
                    let value = select(&doc, steps)
                        .ok_or_else(|| anyhow!("key `{key}` not found in the document"))?;
                    let k = value.as_str().ok_or_else(|| {
                        anyhow!("key `{key}` must select a string, got {}", short(value))
                    })?;
                    let keys = plan_document(job.settings, Some(k), text)?;
                    let id = doc.get("id").map(|v| v.to_string()).unwrap_or_default();
                    (id, keys, text.len())
                }
                _ => {
                    let doc: TextDoc = serde_json::from_str(line).map_err(|e| explain(line, &e))?;
                    let keys = plan_document(job.settings, None, &doc.text)?;
                    (doc.id.get().to_string(), keys, doc.text.len())
                }
            };
            if !(id.starts_with('"') || id.starts_with(|c: char| c == '-' || c.is_ascii_digit())) {
                bail!("field `id` must be a string, got {id}");
            }
            stats.text_bytes += text_len as u64;
            Ok((id.into_boxed_str(), keys))
        })();
        match parsed {
            Ok(d) => {
                docs.push(d);
                stats.docs += 1;
                pending.0 += 1;
                pending.1 += line.len() as u64;
                if pending.0 >= 256 {
                    progress.add(pending.0, pending.1);
                    pending = (0, 0);
                }
            }
            Err(e) if job.opts.skip_bad_lines => {
                stats.bad_lines += 1;
                tracing::warn!("skipping bad line {path}:{line_no}: {e:#}");
            }
            Err(e) => return Err(e.context(format!("{path}:{line_no}"))),
        }
    }
    progress.add(pending.0, pending.1);

    // ...then query the filter, in input order when ordered.
    if let Some(s) = job.sequencer {
        s.wait_turn(index);
    }
    let all: Vec<KeyHash> = docs
        .iter()
        .flat_map(|(_, k)| k.hashes.iter().copied())
        .collect();
    let mut answers = Vec::new();
    job.filter.check_and_insert_batch(&all, &mut answers);
    drop(turn);
    if action == Action::Replay {
        return Ok(FileStats::default());
    }

    let mut writer = AtomicWriter::create(&task.outputs[0])?;
    let mut buf = Vec::with_capacity(1 << 16);
    let attribute = attribute_name(job.settings);
    let mut at = 0;
    for (id, keys) in &docs {
        buf.clear();
        let seen = &answers[at..at + keys.hashes.len()];
        at += keys.hashes.len();
        let spans = decide(job.settings, keys, seen, &mut stats);
        write_line(&mut buf, id, attribute, &spans);
        writer
            .write_all(&buf)
            .with_context(|| format!("cannot write {}", task.outputs[0].display()))?;
    }
    writer.finish()?;
    Ok(stats)
}

/// `<...>/<document_dir>/<rel>` -> `<...>/attributes/<name>/<rel>`.
fn attributes_path(doc: &Path, document_dir: &str, name: &str) -> Result<PathBuf> {
    let s = doc.to_string_lossy();
    let needle = format!("/{document_dir}/");
    let Some(i) = s.find(&needle) else {
        bail!(
            "{}: the path has no `/{document_dir}/` directory, so there is nowhere to put its attributes \
             (dedupe writes `.../attributes/<name>/...` beside `.../{document_dir}/...`; set dedupe.document_dir)",
            doc.display()
        );
    };
    Ok(PathBuf::from(format!(
        "{}/attributes/{name}/{}",
        &s[..i],
        &s[i + needle.len()..]
    )))
}

fn input_name(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(cfg: DedupeRunConfig) -> Result<()> {
    let d = &cfg.dedupe;
    if cfg.shard.is_some() {
        bail!("--shard does not apply to dedupe (every file must see the same filter); split the key space with dedupe.num_partitions / dedupe.partition_index instead");
    }
    let partitions = d.num_partitions.unwrap_or(1);
    let partition = d.partition_index.unwrap_or(0);
    if partitions == 0 || partition >= partitions {
        bail!("dedupe.partition_index must be below dedupe.num_partitions ({partition} vs {partitions})");
    }
    let suffix = |s: &str| {
        if partitions > 1 {
            format!("{s}_{partition}")
        } else {
            s.to_string()
        }
    };
    let mode = match (&d.documents, &d.paragraphs) {
        (Some(doc), None) => Mode::Documents {
            steps: parse_key_path(&doc.key)?,
            attribute: suffix(&doc.attribute_name),
            key: doc.key.clone(),
        },
        (None, Some(p)) => {
            let separator = p
                .paragraph_separator
                .clone()
                .unwrap_or_else(|| "\n".to_string());
            if separator.is_empty() {
                bail!("dedupe.paragraphs.paragraph_separator must not be empty");
            }
            if let Some(g) = &p.by_ngram {
                if g.stride == 0 {
                    bail!("dedupe.paragraphs.by_ngram.stride must be at least 1");
                }
                if !(0.0..=1.0).contains(&g.overlap_threshold) {
                    bail!(
                        "dedupe.paragraphs.by_ngram.overlap_threshold must be in [0, 1], got {}",
                        g.overlap_threshold
                    );
                }
            }
            Mode::Paragraphs {
                separator,
                attribute: suffix(&p.attribute_name),
                ngram: p.by_ngram.as_ref().map(|g| NgramDedupe {
                    ngram_length: g.ngram_length,
                    stride: g.stride,
                    overlap_threshold: g.overlap_threshold,
                    skip_short_paragraphs: g.skip_short_paragraphs,
                }),
            }
        }
        (Some(_), Some(_)) => bail!("set either dedupe.documents or dedupe.paragraphs, not both"),
        (None, None) => bail!("set dedupe.documents (whole-document keys) or dedupe.paragraphs"),
    };
    let name = suffix(
        d.name
            .as_deref()
            .unwrap_or_else(|| match (&d.documents, &d.paragraphs) {
                (Some(doc), _) => doc.attribute_name.as_str(),
                (_, Some(p)) => p.attribute_name.as_str(),
                _ => unreachable!("mode checked above"),
            }),
    );
    let settings = Settings {
        mode,
        skip_empty: d.skip_empty.unwrap_or(false),
        min_length: d.min_length.unwrap_or(0),
        min_words: d.min_words.unwrap_or(0),
        partitions,
        partition,
    };
    let document_dir = d
        .document_dir
        .clone()
        .unwrap_or_else(|| "documents".to_string());

    let inputs = expand_inputs(&cfg.documents)?;
    let mut tasks = Vec::with_capacity(inputs.len());
    for input in inputs {
        let out = attributes_path(&std::path::absolute(&input.path)?, &document_dir, &name)?;
        tasks.push(Task {
            input,
            outputs: vec![out],
        });
    }

    // The filter: load (resume, or read-only decontamination) or create.
    let bf = &cfg.bloom_filter;
    let filter_path = PathBuf::from(&bf.file);
    let mut filter = if filter_path.exists() {
        let f = BloomFilter::load(&filter_path, bf.read_only)?;
        tracing::info!(
            "loaded bloom filter {} ({} bytes, k={}, {} keys, {} inputs recorded)",
            filter_path.display(),
            f.size_in_bytes(),
            f.k(),
            f.keys_inserted(),
            f.inputs.len()
        );
        f
    } else {
        if bf.read_only {
            bail!(
                "bloom_filter.read_only is set but {} does not exist",
                filter_path.display()
            );
        }
        let expected = bf.estimated_doc_count.unwrap_or(0);
        let size = match bf.size_in_bytes.filter(|&s| s > 0) {
            Some(s) => s,
            None => {
                let (Some(n), Some(p)) = (bf.estimated_doc_count, bf.desired_false_positive_rate)
                else {
                    bail!("set bloom_filter.size_in_bytes, or estimated_doc_count and desired_false_positive_rate");
                };
                if !(p > 0.0 && p < 1.0) {
                    bail!("bloom_filter.desired_false_positive_rate must be in (0, 1), got {p}");
                }
                bloom::suggest_size_in_bytes(n, p)
            }
        };
        let k = match (expected, bf.desired_false_positive_rate) {
            (0, _) => 7,
            (n, Some(rate)) if rate > 0.0 && rate < 1.0 => {
                bloom::smallest_k_for_rate(size, n, rate)
            }
            (n, _) => bloom::optimal_k(size, n),
        };
        tracing::info!(
            "new bloom filter: {size} bytes, k={k}{}",
            if expected > 0 {
                format!(
                    ", predicted false-positive rate {:.2e} at {expected} keys",
                    bloom::false_positive_rate(size, expected, k)
                )
            } else {
                String::new()
            }
        );
        BloomFilter::new(size, k, false)?
    };

    // Decide per input: process, replay into the filter, or skip.
    let mut actions = Vec::with_capacity(tasks.len());
    for t in &tasks {
        let recorded = filter.inputs.contains_key(&input_name(&t.input.path));
        let done = t.outputs[0].exists();
        actions.push(match (bf.read_only, recorded, done) {
            (true, _, true) => Action::Skip,
            (true, _, false) => Action::Process,
            (false, true, true) => Action::Skip,
            (false, false, true) => Action::Replay,
            (false, false, false) => Action::Process,
            (false, true, false) => bail!(
                "{} already holds the keys of {}, but its attribute file {} is missing: rerunning would mark \
                 every paragraph of it as a duplicate. Restore the attribute file, or delete the filter to start over",
                filter_path.display(),
                t.input.path.display(),
                t.outputs[0].display()
            ),
        });
    }
    let n_process = actions.iter().filter(|a| **a == Action::Process).count();
    let n_replay = actions.iter().filter(|a| **a == Action::Replay).count();
    let n_skip = actions.len() - n_process - n_replay;
    if n_replay + n_skip > 0 {
        tracing::info!("{n_skip} files already deduped, {n_replay} re-read to restore the filter, {n_process} to do");
    }
    if cfg.dryrun {
        for (t, a) in tasks.iter().zip(&actions) {
            println!(
                "{:?}: {} -> {}",
                a,
                t.input.path.display(),
                t.outputs[0].display()
            );
        }
        return Ok(());
    }

    let opts = RunOptions::new(
        cfg.processes,
        true,
        cfg.skip_bad_lines,
        cfg.max_line_bytes,
        cfg.progress,
    );
    let sequencer = Sequencer::default();
    let ordered = d.ordered.unwrap_or(true);
    let names: Vec<(String, u64)> = tasks
        .iter()
        .map(|t| {
            (
                input_name(&t.input.path),
                std::fs::metadata(&t.input.path).map_or(0, |m| m.len()),
            )
        })
        .collect();
    let job = Job {
        settings: &settings,
        filter: &filter,
        actions: &actions,
        sequencer: ordered.then_some(&sequencer),
        opts: &opts,
    };
    let result = runner::run("dedupe", tasks, &opts, |i, task, progress| {
        dedupe_file(&job, i, task, progress)
    });

    // Save what the filter holds, also after a partial failure, so the finished files resume.
    if !bf.read_only {
        // Only a complete run is saved: after a failure or a kill, the finished files are
        // re-read into a fresh filter on the rerun (Action::Replay), which restores the state
        // an uninterrupted run would have had.
        if result.is_ok() {
            for (name, size) in names {
                filter.inputs.insert(name, size);
            }
            filter.save(&filter_path)?;
        } else {
            tracing::warn!("not saving the bloom filter: some files failed (rerun the same command to redo them)");
        }
    }
    let summary = result?;
    let s = &summary.stats;
    let c = |k: &str| s.counters.get(k).copied().unwrap_or(0);
    eprintln!(
        "dedupe: {} files done ({n_skip} already done, {n_replay} replayed); {} docs ({} bad lines skipped) in {:.1}s: {:.0} docs/s, {:.1} MB/s of text",
        summary.files_done - n_skip - n_replay,
        s.docs,
        s.bad_lines,
        summary.elapsed.as_secs_f64(),
        summary.docs_per_sec(),
        summary.mb_per_sec()
    );
    match &settings.mode {
        Mode::Documents { .. } => eprintln!(
            "dedupe: {} duplicate documents marked",
            c("duplicate documents")
        ),
        Mode::Paragraphs { .. } => eprintln!(
            "dedupe: {} of {} paragraphs marked ({} characters)",
            c("duplicate paragraphs"),
            c("paragraphs checked"),
            c("duplicate characters")
        ),
    }
    eprintln!(
        "bloom filter: {} bytes, k={}, {} keys, fill {:.4}, false-positive rate now {:.2e}{}; peak RSS {}",
        filter.size_in_bytes(),
        filter.k(),
        filter.keys_inserted(),
        filter.fill_ratio(),
        filter.current_false_positive_rate(),
        if bf.read_only { " (read-only)" } else { "" },
        peak_rss_bytes().map_or("unknown".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths() {
        assert_eq!(
            parse_key_path("$.text").unwrap(),
            vec![PathStep::Key("text".into())]
        );
        assert_eq!(
            parse_key_path("$.metadata['url']").unwrap(),
            vec![
                PathStep::Key("metadata".into()),
                PathStep::Key("url".into())
            ]
        );
        assert_eq!(
            parse_key_path("$.a[2].b").unwrap(),
            vec![
                PathStep::Key("a".into()),
                PathStep::Index(2),
                PathStep::Key("b".into())
            ]
        );
        assert!(parse_key_path("text").is_err());
        assert!(parse_key_path("$.a[?(@.x)]").is_err());
        let doc = serde_json::json!({"metadata": {"url": "u"}, "a": [0, 1, {"b": "x"}]});
        assert_eq!(
            select(&doc, &parse_key_path("$.metadata.url").unwrap()),
            Some(&Value::from("u"))
        );
        assert_eq!(
            select(&doc, &parse_key_path("$.a[2].b").unwrap()),
            Some(&Value::from("x"))
        );
    }

    #[test]
    fn attribute_paths() {
        assert_eq!(
            attributes_path(Path::new("/d/documents/s/x.json.gz"), "documents", "dd").unwrap(),
            PathBuf::from("/d/attributes/dd/s/x.json.gz")
        );
        let e = attributes_path(Path::new("/d/docs/x.json.gz"), "documents", "dd").unwrap_err();
        assert!(e.to_string().contains("no `/documents/` directory"));
    }

    fn para_settings(ngram: Option<NgramDedupe>) -> Settings {
        Settings {
            mode: Mode::Paragraphs {
                separator: "\n".into(),
                attribute: "a".into(),
                ngram,
            },
            skip_empty: false,
            min_length: 0,
            min_words: 0,
            partitions: 1,
            partition: 0,
        }
    }

    fn run_docs(settings: &Settings, texts: &[&str]) -> Vec<Spans> {
        let filter = BloomFilter::new(1 << 16, 7, false).unwrap();
        let mut stats = FileStats::default();
        texts
            .iter()
            .map(|t| {
                let keys = plan_document(settings, None, t).unwrap();
                let seen: Vec<bool> = keys
                    .hashes
                    .iter()
                    .map(|&h| filter.check_and_insert(h))
                    .collect();
                decide(settings, &keys, &seen, &mut stats)
            })
            .collect()
    }

    #[test]
    fn paragraph_spans_use_code_points() {
        let s = para_settings(None);
        let out = run_docs(&s, &["héllo\nwörld", "wörld\nnew\nhéllo"]);
        assert_eq!(out[0], Some(vec![]));
        // "wörld" is chars 0..6 (with its newline), "héllo" the last paragraph 10..15
        assert_eq!(out[1], Some(vec![(0, 6, 1.0), (10, 15, 1.0)]));
    }

    #[test]
    fn min_words_does_not_switch_dedupe_off() {
        let mut s = para_settings(None);
        s.min_words = 2;
        let out = run_docs(&s, &["one two three\nsolo", "one two three\nsolo"]);
        assert_eq!(
            out[1],
            Some(vec![(0, 14, 1.0)]),
            "long paragraph deduped, short one skipped"
        );
    }

    #[test]
    fn ngram_overlap_scores() {
        let s = para_settings(Some(NgramDedupe {
            ngram_length: 2,
            stride: 1,
            overlap_threshold: 0.5,
            skip_short_paragraphs: None,
        }));
        let out = run_docs(&s, &["a b c d e", "a b c x y", "z"]);
        // second: bigrams ab bc cx xy -> 2 of 4 seen
        assert_eq!(out[1], Some(vec![(0, 9, 0.5)]));
        // a paragraph with < 2 n-grams is hashed whole and scored 0 (new) -> below threshold
        assert_eq!(out[2], Some(vec![]));
    }

    #[test]
    fn document_mode_marks_repeats_only() {
        let s = Settings {
            mode: Mode::Documents {
                steps: parse_key_path("$.text").unwrap(),
                attribute: "dup".into(),
                key: "$.text".into(),
            },
            skip_empty: true,
            min_length: 0,
            min_words: 0,
            partitions: 1,
            partition: 0,
        };
        let out = run_docs(&s, &["same é", "other", "same é", "  "]);
        assert_eq!(out[0], None);
        assert_eq!(out[1], None);
        assert_eq!(out[2], Some(vec![(0, 6, 1.0)]));
        assert_eq!(out[3], Some(vec![]));
    }
}
