//! `dolma mix`: merge attributes into documents, filter, replace spans, sample, and write
//! size-bounded output shards.
//!
//! Config fields are dolma 1.2.1's (`streams[].{name, documents, attributes, output.{path,
//! max_size_in_bytes, discard_fields, min_text_length}, filter.{include, exclude, syntax},
//! span_replacement[].{span, min_score, max_score, replacement, syntax}, compression}`,
//! `processes`, `work_dir`), plus per-stream `sample`, `upsample` and `seed`.
//!
//! Per document, in order: merge attributes (ids must match line by line), filter (include:
//! keep if any include matches, or none are given; exclude: drop if any matches), replace
//! spans, drop `discard_fields`, drop if `text.trim()` is shorter than `min_text_length`
//! bytes, sample, set `metadata.provenance = "<file name>:<line>"`, write `upsample` copies.
//!
//! Outputs: input files are packed in order into groups of at most `max_size_in_bytes` of
//! input (dolma's rule); each group writes `<name>-<group>-<part>.jsonl.gz`, starting a new
//! part once a part holds `max_size_in_bytes` of (uncompressed) JSON, so no file is larger
//! than that, whatever sampling, upsampling or compression do, and every name has one form. A group is done when its marker
//! `.<name>-<group>.done.json` exists (it lists the parts and counts); a rerun skips done
//! groups and redoes the others from scratch, so the final bytes equal an uninterrupted run.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::config::one_or_many;
use crate::io::{open_documents, AtomicWriter, Line, LineReader};
use crate::runner::{self, expand_inputs, FileStats, Input, Progress, RunOptions, Shard, Task};
use crate::selector::{JqInput, Match, Selector, SelectorSpec, Syntax};

const DEFAULT_MAX_SIZE: u64 = 2 << 30;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixConfig {
    pub streams: Vec<StreamConfig>,
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
    #[serde(default)]
    pub shard: Option<String>,
    // Accepted for dolma config compatibility.
    #[serde(default)]
    pub work_dir: Option<Value>,
    /// dolma's `shuffle` never shuffled; groups are always formed in sorted input order.
    #[serde(default)]
    pub shuffle: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    #[serde(deserialize_with = "one_or_many")]
    pub documents: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub attributes: Vec<String>,
    pub output: OutputConfig,
    #[serde(default)]
    pub filter: Option<FilterConfig>,
    #[serde(default)]
    pub span_replacement: Option<Vec<SpanReplacementConfig>>,
    #[serde(default)]
    pub compression: Option<CompressionConfig>,
    /// Keep each document with this probability (a seeded hash of source and id).
    #[serde(default)]
    pub sample: Option<f64>,
    /// Write each kept document this many times on average: floor(x) copies, plus one more for
    /// a seeded-hash fraction of documents.
    #[serde(default)]
    pub upsample: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub path: String,
    #[serde(default)]
    pub max_size_in_bytes: Option<u64>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub discard_fields: Vec<String>,
    #[serde(default)]
    pub min_text_length: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    #[serde(default, deserialize_with = "one_or_many")]
    pub include: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub syntax: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpanReplacementConfig {
    pub span: String,
    #[serde(default)]
    pub min_score: Option<f64>,
    #[serde(default)]
    pub max_score: Option<f64>,
    pub replacement: String,
    #[serde(default)]
    pub syntax: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    #[serde(default)]
    pub input: Option<String>,
    #[serde(default)]
    pub output: Option<String>,
}

/// A validated stream: every selector compiled once up front (errors before any work).
struct Stream {
    name: String,
    attributes: Vec<String>,
    path: PathBuf,
    max_size: u64,
    discard: Vec<String>,
    min_text_length: usize,
    include: Vec<SelectorSpec>,
    exclude: Vec<SelectorSpec>,
    replacements: Vec<(SelectorSpec, f64, f64, Replacement)>,
    sample: Option<f64>,
    upsample: Option<f64>,
    seed: u64,
    extension: &'static str,
}

#[derive(Clone)]
enum Replacement {
    /// Literal text; `{}` stands for the replaced text.
    Text(String),
    /// `$...`: a selector on the document giving the replacement string.
    Selector(SelectorSpec),
}

/// Per-thread compiled selectors of a stream (jq programs are not `Send`).
struct Compiled {
    include: Vec<Selector>,
    exclude: Vec<Selector>,
    replacements: Vec<(Selector, f64, f64, Option<Selector>)>,
}

fn compile(s: &Stream) -> Result<Compiled> {
    Ok(Compiled {
        include: s
            .include
            .iter()
            .map(|x| x.compile())
            .collect::<Result<_>>()?,
        exclude: s
            .exclude
            .iter()
            .map(|x| x.compile())
            .collect::<Result<_>>()?,
        replacements: s
            .replacements
            .iter()
            .map(|(sel, lo, hi, r)| {
                Ok((
                    sel.compile()?,
                    *lo,
                    *hi,
                    match r {
                        Replacement::Text(_) => None,
                        Replacement::Selector(x) => Some(x.compile()?),
                    },
                ))
            })
            .collect::<Result<_>>()?,
    })
}

fn validate(cfg: &StreamConfig) -> Result<Stream> {
    let name = &cfg.name;
    if name.is_empty() || name.contains('/') {
        bail!("stream name `{name}` must be non-empty and contain no `/`");
    }
    let ctx = |what: &str| format!("stream `{name}`: {what}");
    let (include, exclude) = match &cfg.filter {
        None => (Vec::new(), Vec::new()),
        Some(f) => {
            let syntax =
                Syntax::parse(f.syntax.as_deref()).with_context(|| ctx("filter.syntax"))?;
            let mk = |v: &Vec<String>| -> Result<Vec<SelectorSpec>> {
                v.iter().map(|c| SelectorSpec::new(c, syntax)).collect()
            };
            (
                mk(&f.include).with_context(|| ctx("filter.include"))?,
                mk(&f.exclude).with_context(|| ctx("filter.exclude"))?,
            )
        }
    };
    let mut replacements = Vec::new();
    for (i, r) in cfg.span_replacement.iter().flatten().enumerate() {
        let what = format!("span_replacement[{i}]");
        let syntax = Syntax::parse(r.syntax.as_deref()).with_context(|| ctx(&what))?;
        let sel = SelectorSpec::new(&r.span, syntax).with_context(|| ctx(&what))?;
        let replacement = match r.replacement.strip_prefix('$') {
            Some(rest) if syntax == Syntax::Jq => {
                Replacement::Selector(SelectorSpec::new(rest, syntax).with_context(|| ctx(&what))?)
            }
            Some(_) => Replacement::Selector(
                SelectorSpec::new(&r.replacement, syntax).with_context(|| ctx(&what))?,
            ),
            None => Replacement::Text(r.replacement.clone()),
        };
        let lo = r.min_score.unwrap_or(f64::NEG_INFINITY);
        let hi = r.max_score.unwrap_or(f64::INFINITY);
        if lo >= hi {
            bail!(
                "{}: min_score {lo} must be below max_score {hi}",
                ctx(&what)
            );
        }
        replacements.push((sel, lo, hi, replacement));
    }
    if let Some(s) = cfg.sample {
        if !(0.0..=1.0).contains(&s) {
            bail!("{}: sample must be in [0, 1], got {s}", ctx("sample"));
        }
    }
    if let Some(u) = cfg.upsample {
        if !(u.is_finite() && u >= 0.0) {
            bail!(
                "{}: upsample must be a non-negative number, got {u}",
                ctx("upsample")
            );
        }
    }
    let extension = match cfg.compression.as_ref().and_then(|c| c.output.as_deref()) {
        None | Some("gz") | Some(".gz") | Some("gzip") => ".jsonl.gz",
        Some("zst") | Some(".zst") | Some("zstd") => ".jsonl.zst",
        Some("") => ".jsonl",
        Some(other) => bail!(
            "{}: unknown output compression `{other}` (gz, zst or \"\")",
            ctx("compression")
        ),
    };
    let max_size = cfg.output.max_size_in_bytes.unwrap_or(DEFAULT_MAX_SIZE);
    if max_size == 0 {
        bail!(
            "{}: output.max_size_in_bytes must be positive",
            ctx("output")
        );
    }
    Ok(Stream {
        name: name.clone(),
        attributes: cfg.attributes.clone(),
        path: PathBuf::from(&cfg.output.path),
        max_size,
        discard: cfg.output.discard_fields.clone(),
        min_text_length: cfg.output.min_text_length.unwrap_or(0),
        include,
        exclude,
        replacements,
        sample: cfg.sample,
        upsample: cfg.upsample,
        seed: cfg.seed.unwrap_or(0),
        extension,
    })
}

/// Attribute names a filter or span string refers to: `@.name`, `.attributes.name`,
/// `attributes['name']`.
pub fn referenced_attributes(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect()
    };
    for (i, _) in code.match_indices("attributes") {
        let rest = &code[i + "attributes".len()..];
        let rest = rest.trim_start_matches('?');
        if let Some(r) = rest.strip_prefix('.') {
            let n = ident(r);
            if !n.is_empty() {
                out.insert(n);
            }
        } else if let Some(r) = rest.strip_prefix("['").or_else(|| rest.strip_prefix("[\"")) {
            let n: String = r.chars().take_while(|c| *c != '\'' && *c != '"').collect();
            if !n.is_empty() {
                out.insert(n);
            }
        }
    }
    if code.contains("attributes[?(") {
        for (i, _) in code.match_indices("@.") {
            let n = ident(&code[i + 2..]);
            if !n.is_empty() {
                out.insert(n);
            }
        }
    }
    out
}

/// Uniform in [0, 1) from a seeded hash of the document's source and id.
fn doc_uniform(doc: &Value, seed: u64, salt: u64) -> f64 {
    let mut key = Vec::new();
    if let Some(s) = doc.get("source").and_then(Value::as_str) {
        key.extend_from_slice(s.as_bytes());
    }
    key.push(0);
    match doc.get("id") {
        Some(Value::String(s)) => key.extend_from_slice(s.as_bytes()),
        Some(other) => key.extend_from_slice(other.to_string().as_bytes()),
        None => {}
    }
    (xxh3_64_with_seed(&key, seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 11) as f64
        / (1u64 << 53) as f64
}

/// Replaces `[start, end)` character spans (sorted by start; a span starting inside an earlier
/// replaced one is skipped, as in dolma).
fn replace_spans(text: &str, spans: &mut [(usize, usize, String)]) -> String {
    spans.sort_by_key(|s| (s.0, s.1));
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let byte_at = |c: usize| if c >= n { text.len() } else { chars[c].0 };
    let mut out = String::with_capacity(text.len());
    let mut cursor = 0usize;
    for (start, end, replacement) in spans.iter() {
        let (start, end) = ((*start).min(n), (*end).min(n));
        if start < cursor || end < start {
            continue;
        }
        out.push_str(&text[byte_at(cursor)..byte_at(start)]);
        out.push_str(&replacement.replace("{}", &text[byte_at(start)..byte_at(end)]));
        cursor = end;
    }
    out.push_str(&text[byte_at(cursor)..]);
    out
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamReport {
    pub docs_in: u64,
    pub docs_kept: u64,
    pub docs_written: u64,
    /// Removed documents by reason: `not included`, `exclude[i]: <rule>`, `min_text_length`,
    /// `sample`.
    pub removed: BTreeMap<String, u64>,
    pub spans_replaced: u64,
    pub jq_errors: u64,
    pub bytes_out: u64,
    pub files_out: Vec<String>,
}

impl StreamReport {
    fn merge(&mut self, o: &StreamReport) {
        self.docs_in += o.docs_in;
        self.docs_kept += o.docs_kept;
        self.docs_written += o.docs_written;
        for (k, v) in &o.removed {
            *self.removed.entry(k.clone()).or_insert(0) += v;
        }
        self.spans_replaced += o.spans_replaced;
        self.jq_errors += o.jq_errors;
        self.bytes_out += o.bytes_out;
        self.files_out.extend(o.files_out.iter().cloned());
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupMarker {
    stream: String,
    group: usize,
    inputs: Vec<String>,
    report: StreamReport,
    attribute_names: BTreeSet<String>,
}

/// One unit of work: a stream's group of input files.
struct GroupTask {
    stream: usize,
    group: usize,
    inputs: Vec<Input>,
}

fn attribute_path(doc: &Path, name: &str) -> Result<PathBuf> {
    let s = doc.to_string_lossy();
    if !s.contains("/documents/") {
        bail!("{}: no `/documents/` directory in the path, so attribute `{name}` cannot be found beside it", doc.display());
    }
    Ok(PathBuf::from(s.replacen(
        "/documents/",
        &format!("/attributes/{name}/"),
        1,
    )))
}

fn marker_path(s: &Stream, group: usize) -> PathBuf {
    s.path.join(format!(".{}-{group:04}.done.json", s.name))
}

fn part_name(s: &Stream, group: usize, part: usize) -> String {
    format!("{}-{group:04}-{part:04}{}", s.name, s.extension)
}

/// Counts bytes that reach the file (after compression), to bound parts by their real size.
struct CountingWriter {
    inner: AtomicWriter,
    written: u64,
}

fn open_part(s: &Stream, group: usize, part: usize) -> Result<AtomicWriter> {
    AtomicWriter::create(&s.path.join(part_name(s, group, part)))
}

/// What one document turned into.
#[derive(Default)]
struct DocOutcome {
    /// The JSON line to write (without newline) and how many copies, or the removal reason.
    line: Option<(Vec<u8>, u64)>,
    removed: Option<String>,
    spans_replaced: u64,
    jq_errors: u64,
    text_bytes: u64,
    attribute_names: Vec<String>,
}

/// Documents are read in order (attribute files in step), processed in parallel in batches of
/// this many, and written in order: the output does not depend on the thread count.
const MIX_BATCH: usize = 1024;

/// Reads up to `MIX_BATCH` documents with their attribute lines; also says whether the file
/// ended and how many bad lines were skipped.
fn read_batch(
    reader: &mut LineReader,
    attr_readers: &mut [(PathBuf, LineReader)],
    path: &str,
    opts: &RunOptions,
) -> Result<(Vec<RawDoc>, bool, u64)> {
    let mut batch: Vec<RawDoc> = Vec::with_capacity(MIX_BATCH);
    let mut bad = 0u64;
    while batch.len() < MIX_BATCH {
        let (line, line_no) = match reader.next_line()? {
            None => return Ok((batch, true, bad)),
            Some(Line::Text(t, n)) => (t.to_string(), n),
            Some(Line::Bad(e)) => {
                if !opts.skip_bad_lines {
                    return Err(e.into());
                }
                bad += 1;
                tracing::warn!("skipping bad line {e}");
                for (_, r) in attr_readers.iter_mut() {
                    let _ = r.next_line()?;
                }
                continue;
            }
        };
        let mut attrs = Vec::with_capacity(attr_readers.len());
        for (apath, r) in attr_readers.iter_mut() {
            attrs.push(match r.next_line()? {
                Some(Line::Text(t, _)) => t.to_string(),
                Some(Line::Bad(e)) => bail!("{e}"),
                None => bail!(
                    "{}: ends before line {line_no} of {path} (attribute files must have one line per document)",
                    apath.display()
                ),
            });
        }
        batch.push(RawDoc {
            line_no,
            line,
            attrs,
        });
    }
    Ok((batch, false, bad))
}

/// One document with its attribute lines, as read.
struct RawDoc {
    line_no: u64,
    line: String,
    attrs: Vec<String>,
}

fn process_doc(
    s: &Stream,
    compiled: &Compiled,
    path: &str,
    attr_paths: &[PathBuf],
    file_name: &str,
    raw: &RawDoc,
) -> Result<DocOutcome> {
    let line_no = raw.line_no;
    let mut out = DocOutcome::default();
    let mut doc: Value = match serde_json::from_str(&raw.line) {
        Ok(Value::Object(m)) => Value::Object(m),
        Ok(_) => bail!("{path}:{line_no}: a document must be a JSON object"),
        Err(e) => bail!("{path}:{line_no}: malformed JSON: {e}"),
    };
    if !doc.get("text").is_some_and(Value::is_string) {
        bail!("{path}:{line_no}: missing or non-string field `text`");
    }
    // 1. merge attributes
    for (apath, aline) in attr_paths.iter().zip(&raw.attrs) {
        let a: Value = serde_json::from_str(aline)
            .map_err(|e| anyhow!("{}:{line_no}: malformed JSON: {e}", apath.display()))?;
        if a.get("id") != doc.get("id") {
            bail!(
                "{}:{line_no}: id {} does not match the document's id {} at {path}:{line_no}",
                apath.display(),
                a.get("id").unwrap_or(&Value::Null),
                doc.get("id").unwrap_or(&Value::Null)
            );
        }
        let Some(Value::Object(attrs)) = a.get("attributes") else {
            bail!("{}:{line_no}: no `attributes` object", apath.display());
        };
        let target = doc
            .as_object_mut()
            .expect("object")
            .entry("attributes")
            .or_insert_with(|| Value::Object(Map::new()));
        if !target.is_object() {
            *target = Value::Object(Map::new());
        }
        let target = target.as_object_mut().expect("object");
        for (k, v) in attrs {
            out.attribute_names.push(k.clone());
            target.insert(k.clone(), v.clone());
        }
    }
    out.text_bytes = doc["text"].as_str().map_or(0, str::len) as u64;

    // 2. filter
    let mut jq: Option<JqInput> = None;
    if !compiled.include.is_empty() {
        let mut any = false;
        for sel in &compiled.include {
            match sel.matches(&doc, &mut jq)? {
                Match::Yes => {
                    any = true;
                    break;
                }
                Match::No => {}
                Match::Error(e) => {
                    out.jq_errors += 1;
                    tracing::debug!("{path}:{line_no}: jq error: {e}");
                }
            }
        }
        if !any {
            out.removed = Some("not included".to_string());
            return Ok(out);
        }
    }
    for (i, sel) in compiled.exclude.iter().enumerate() {
        match sel.matches(&doc, &mut jq)? {
            Match::Yes => {
                out.removed = Some(format!("exclude[{i}]: {}", s.exclude[i].code));
                return Ok(out);
            }
            Match::No => {}
            Match::Error(e) => {
                out.jq_errors += 1;
                tracing::debug!("{path}:{line_no}: jq error: {e}");
            }
        }
    }

    // 3. span replacement
    if !compiled.replacements.is_empty() {
        let mut spans: Vec<(usize, usize, String)> = Vec::new();
        for ((sel, lo, hi, rsel), (_, _, _, rspec)) in
            compiled.replacements.iter().zip(&s.replacements)
        {
            for v in sel
                .values(&doc, &mut jq)
                .with_context(|| format!("{path}:{line_no}"))?
            {
                let list: Vec<&Value> = match &v {
                    Value::Null => continue,
                    Value::Array(a) if a.first().is_some_and(Value::is_array) => a.iter().collect(),
                    Value::Array(a) if a.is_empty() => continue,
                    Value::Array(_) => vec![&v],
                    other => bail!("{path}:{line_no}: span selector gave {other}, not a list of [start, end, score]"),
                };
                for span in list {
                    let (Some(st), Some(en), Some(score)) = (
                        span.get(0).and_then(Value::as_f64),
                        span.get(1).and_then(Value::as_f64),
                        span.get(2).and_then(Value::as_f64),
                    ) else {
                        bail!("{path}:{line_no}: span {span} is not [start, end, score]");
                    };
                    if score >= *lo && score < *hi {
                        let text = match (rsel, rspec) {
                            (Some(r), _) => match r.values(&doc, &mut jq)?.into_iter().next() {
                                Some(Value::String(s)) => s,
                                Some(other) => other.to_string(),
                                None => String::new(),
                            },
                            (None, Replacement::Text(t)) => t.clone(),
                            (None, Replacement::Selector(_)) => {
                                unreachable!("compiled with the spec")
                            }
                        };
                        spans.push((st as usize, en as usize, text));
                    }
                }
            }
        }
        if !spans.is_empty() {
            out.spans_replaced = spans.len() as u64;
            let new_text = replace_spans(doc["text"].as_str().expect("checked"), &mut spans);
            doc["text"] = Value::String(new_text);
        }
    }

    // 4. discard fields, 5. minimum length
    let obj = doc.as_object_mut().expect("object");
    for f in &s.discard {
        obj.remove(f);
    }
    if obj
        .get("text")
        .and_then(Value::as_str)
        .map_or(0, |t| t.trim().len())
        < s.min_text_length
    {
        out.removed = Some("min_text_length".to_string());
        return Ok(out);
    }
    // 6. sampling
    if let Some(rate) = s.sample {
        if doc_uniform(&doc, s.seed, 1) >= rate {
            out.removed = Some("sample".to_string());
            return Ok(out);
        }
    }
    let copies = match s.upsample {
        None => 1,
        Some(u) => u.floor() as u64 + u64::from(doc_uniform(&doc, s.seed, 2) < u.fract()),
    };
    // 7. provenance
    let meta = doc
        .as_object_mut()
        .expect("object")
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut().expect("object").insert(
        "provenance".into(),
        Value::String(format!("{file_name}:{line_no}")),
    );
    out.line = Some((serde_json::to_vec(&doc)?, copies));
    Ok(out)
}

fn process_group(
    s: &Stream,
    t: &GroupTask,
    opts: &RunOptions,
    progress: &Progress,
) -> Result<(StreamReport, BTreeSet<String>, FileStats)> {
    use rayon::prelude::*;

    compile(s)?;
    // Remove what a killed run left of this group.
    if let Ok(entries) = std::fs::read_dir(&s.path) {
        let prefix = format!("{}-{:04}-", s.name, t.group);
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("cannot remove stale {n}"))?;
            }
        }
    }
    let mut report = StreamReport::default();
    let mut names = BTreeSet::new();
    let mut stats = FileStats::default();
    let mut part = 0usize;
    let mut writer: Option<CountingWriter> = None;

    for input in &t.inputs {
        let mut reader = open_documents(&input.path, opts.max_line_bytes)?;
        let path = reader.path().to_string();
        let file_name = input
            .path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut attr_readers: Vec<(PathBuf, LineReader)> = s
            .attributes
            .iter()
            .map(|a| {
                let p = attribute_path(&input.path, a)?;
                if !p.exists() {
                    bail!(
                        "attribute file {} (attribute `{a}` of {}) does not exist",
                        p.display(),
                        input.path.display()
                    );
                }
                Ok((p.clone(), LineReader::open(&p, opts.max_line_bytes)?))
            })
            .collect::<Result<_>>()?;
        let attr_paths: Vec<PathBuf> = attr_readers.iter().map(|(p, _)| p.clone()).collect();
        // Read the next batch while the current one is processed and written.
        let mut next = Some(read_batch(&mut reader, &mut attr_readers, &path, opts)?);
        while let Some((batch, done, bad_lines)) = next.take() {
            stats.bad_lines += bad_lines;
            let (outcomes, following) = std::thread::scope(|scope| {
                let ahead = (!done).then(|| {
                    scope.spawn(|| read_batch(&mut reader, &mut attr_readers, &path, opts))
                });
                // Process it in parallel (selectors compiled per worker: jq programs are not Send).
                let outcomes: Vec<Result<DocOutcome>> = batch
                    .par_iter()
                    .map_init(
                        || compile(s).expect("compiled once already"),
                        |compiled, raw| {
                            process_doc(s, compiled, &path, &attr_paths, &file_name, raw)
                        },
                    )
                    .collect();
                (
                    outcomes,
                    ahead.map(|h| h.join().expect("reader thread panicked")),
                )
            });
            next = following.transpose()?;
            // Write it in order.
            let mut text_bytes = 0u64;
            for o in outcomes {
                let o = o?;
                report.docs_in += 1;
                stats.docs += 1;
                text_bytes += o.text_bytes;
                report.jq_errors += o.jq_errors;
                report.spans_replaced += o.spans_replaced;
                names.extend(o.attribute_names);
                if let Some(r) = o.removed {
                    *report.removed.entry(r).or_insert(0) += 1;
                    continue;
                }
                let Some((mut line, copies)) = o.line else {
                    continue;
                };
                line.push(b'\n');
                report.docs_kept += 1;
                for _ in 0..copies {
                    let w = match &mut writer {
                        Some(w) => w,
                        None => writer.insert(CountingWriter {
                            inner: open_part(s, t.group, part)?,
                            written: 0,
                        }),
                    };
                    w.inner.write_all(&line)?;
                    w.written += line.len() as u64;
                    report.docs_written += 1;
                    report.bytes_out += line.len() as u64;
                    // Uncompressed bytes bound the part conservatively (compressed size <= this).
                    if w.written >= s.max_size {
                        let finished = writer.take().expect("open");
                        finished.inner.finish()?;
                        report.files_out.push(part_name(s, t.group, part));
                        part += 1;
                    }
                }
            }
            stats.text_bytes += text_bytes;
            progress.add(batch.len() as u64, text_bytes);
        }
        for (apath, r) in attr_readers.iter_mut() {
            if let Some(Line::Text(_, n)) = r.next_line()? {
                bail!(
                    "{}:{n}: more attribute lines than documents in {path}",
                    apath.display()
                );
            }
        }
    }
    if let Some(w) = writer.take() {
        w.inner.finish()?;
        report.files_out.push(part_name(s, t.group, part));
    }
    Ok((report, names, stats))
}

pub fn run(cfg: MixConfig) -> Result<()> {
    if cfg.streams.is_empty() {
        bail!("no streams configured");
    }
    let streams: Vec<Stream> = cfg.streams.iter().map(validate).collect::<Result<_>>()?;
    let mut seen_names = BTreeSet::new();
    for s in &streams {
        if !seen_names.insert((s.path.clone(), s.name.clone())) {
            bail!(
                "two streams named `{}` write to {}",
                s.name,
                s.path.display()
            );
        }
    }

    // Group inputs per stream: pack files in sorted order up to max_size_in_bytes of input.
    let mut groups: Vec<GroupTask> = Vec::new();
    for (si, (sc, s)) in cfg.streams.iter().zip(&streams).enumerate() {
        let inputs =
            expand_inputs(&sc.documents).with_context(|| format!("stream `{}`", s.name))?;
        for i in &inputs {
            for a in &s.attributes {
                attribute_path(&i.path, a)?;
            }
        }
        let mut current: Vec<Input> = Vec::new();
        let mut size = 0u64;
        let mut g = 0usize;
        for input in inputs {
            let len = std::fs::metadata(&input.path).map_or(0, |m| m.len());
            if !current.is_empty() && size + len > s.max_size {
                groups.push(GroupTask {
                    stream: si,
                    group: g,
                    inputs: std::mem::take(&mut current),
                });
                g += 1;
                size = 0;
            }
            size += len;
            current.push(input);
        }
        if !current.is_empty() {
            groups.push(GroupTask {
                stream: si,
                group: g,
                inputs: current,
            });
        }
    }
    let shard = match &cfg.shard {
        Some(x) => Some(Shard::parse(x)?),
        None => Shard::from_slurm()?,
    };
    if let Some(sh) = shard {
        groups = sh.select(groups);
    }
    if cfg.dryrun {
        for g in &groups {
            let s = &streams[g.stream];
            println!(
                "{} group {}: {} files -> {}",
                s.name,
                g.group,
                g.inputs.len(),
                s.path.join(part_name(s, g.group, 0)).display()
            );
        }
        return Ok(());
    }
    for s in &streams {
        std::fs::create_dir_all(&s.path)
            .with_context(|| format!("cannot create {}", s.path.display()))?;
    }

    let opts = RunOptions::new(
        cfg.processes,
        false,
        cfg.skip_bad_lines,
        cfg.max_line_bytes,
        cfg.progress,
    );
    // The runner works on tasks with outputs: a group's output is its done-marker.
    let tasks: Vec<Task> = groups
        .iter()
        .map(|g| Task {
            input: g.inputs[0].clone(),
            outputs: vec![marker_path(&streams[g.stream], g.group)],
        })
        .collect();
    let by_marker: BTreeMap<PathBuf, &GroupTask> = groups
        .iter()
        .map(|g| (marker_path(&streams[g.stream], g.group), g))
        .collect();
    let summary = runner::run("mix", tasks, &opts, |_, task, progress| {
        let g = by_marker[&task.outputs[0]];
        let s = &streams[g.stream];
        let (report, attribute_names, stats) = process_group(s, g, &opts, progress)
            .with_context(|| format!("stream `{}` group {}", s.name, g.group))?;
        let marker = GroupMarker {
            stream: s.name.clone(),
            group: g.group,
            inputs: g
                .inputs
                .iter()
                .map(|i| i.path.display().to_string())
                .collect(),
            report,
            attribute_names,
        };
        let mut w = AtomicWriter::create(&task.outputs[0])?;
        serde_json::to_writer_pretty(&mut w, &marker)?;
        w.finish()?;
        Ok(stats)
    })?;

    // Reports from every done group (this run's and earlier ones').
    for (si, s) in streams.iter().enumerate() {
        let mut report = StreamReport::default();
        let mut names = BTreeSet::new();
        let mut missing = 0;
        let total = groups.iter().filter(|g| g.stream == si).count();
        for g in groups.iter().filter(|g| g.stream == si) {
            match std::fs::read_to_string(marker_path(s, g.group)) {
                Ok(text) => {
                    let m: GroupMarker = serde_json::from_str(&text).with_context(|| {
                        format!("corrupt marker {}", marker_path(s, g.group).display())
                    })?;
                    report.merge(&m.report);
                    names.extend(m.attribute_names);
                }
                Err(_) => missing += 1,
            }
        }
        // Filters naming attributes that no attribute file has match nothing in dolma,
        // silently: say so.
        let mut referenced = BTreeSet::new();
        for spec in s
            .include
            .iter()
            .chain(&s.exclude)
            .chain(s.replacements.iter().map(|r| &r.0))
        {
            referenced.extend(referenced_attributes(&spec.code));
        }
        for r in &referenced {
            if !names.contains(r) && !s.attributes.is_empty() {
                let known: Vec<&String> = names.iter().collect();
                tracing::warn!(
                    "stream `{}`: filters refer to attribute `{r}`, which no attribute file of this stream contains; \
                     such rules match nothing. Attributes present: {}",
                    s.name,
                    if known.is_empty() { "none".to_string() } else { known.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ") }
                );
            }
        }
        let mut doc = serde_json::to_value(&report)?;
        doc["stream"] = Value::String(s.name.clone());
        doc["complete"] = Value::Bool(missing == 0);
        if missing > 0 {
            doc["groups_missing"] = Value::from(missing);
        }
        let rpath = s.path.join(format!("{}.report.json", s.name));
        let mut w = AtomicWriter::create(&rpath)?;
        serde_json::to_writer_pretty(&mut w, &doc)?;
        w.write_all(b"\n")?;
        w.finish()?;
        let removed: Vec<String> = report
            .removed
            .iter()
            .map(|(k, v)| format!("{v} by {k}"))
            .collect();
        eprintln!(
            "mix: stream `{}`: {} docs in, {} kept, {} written ({} files, {:.1} MB){}{}{}; report {}",
            s.name,
            report.docs_in,
            report.docs_kept,
            report.docs_written,
            report.files_out.len(),
            report.bytes_out as f64 / 1e6,
            if removed.is_empty() { String::new() } else { format!("; removed {}", removed.join(", ")) },
            if report.spans_replaced > 0 { format!("; {} spans replaced", report.spans_replaced) } else { String::new() },
            if missing > 0 { format!("; {missing} of {total} groups not done yet") } else { String::new() },
            rpath.display()
        );
        if report.jq_errors > 0 {
            tracing::warn!("stream `{}`: {} jq evaluations failed and counted as no match (RUST_LOG=debug shows them)", s.name, report.jq_errors);
        }
    }
    eprintln!(
        "mix: {} groups done, {} already done; {} docs read in {:.1}s: {:.0} docs/s, {:.1} MB/s of text",
        summary.files_done,
        summary.files_skipped,
        summary.stats.docs,
        summary.elapsed.as_secs_f64(),
        summary.docs_per_sec(),
        summary.mb_per_sec()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_replacement_over_characters() {
        let mut spans = vec![
            (6, 11, "|||EMAIL|||".to_string()),
            (0, 2, "[{}]".to_string()),
        ];
        assert_eq!(
            replace_spans("héllo wörld!", &mut spans),
            "[hé]llo |||EMAIL|||!"
        );
        // overlapping spans: the later-starting one inside a replaced span is skipped
        let mut spans = vec![
            (0, 5, "X".to_string()),
            (2, 4, "Y".to_string()),
            (8, 100, "Z".to_string()),
        ];
        assert_eq!(replace_spans("abcdefghij", &mut spans), "XfghZ");
    }

    #[test]
    fn referenced_attribute_names() {
        let r = referenced_attributes("$.attributes[?(@.exp__t__x[0][2] < 0.5 && @.y)]");
        assert_eq!(r.into_iter().collect::<Vec<_>>(), vec!["exp__t__x", "y"]);
        let r = referenced_attributes(".attributes.foo | add >= 6");
        assert_eq!(r.into_iter().collect::<Vec<_>>(), vec!["foo"]);
        let r = referenced_attributes("$.attributes['a b']");
        assert_eq!(r.into_iter().collect::<Vec<_>>(), vec!["a b"]);
    }

    #[test]
    fn sampling_is_reproducible_and_near_the_rate() {
        let docs: Vec<Value> = (0..20_000)
            .map(|i| serde_json::json!({"id": format!("d{i}"), "source": "s"}))
            .collect();
        let kept = docs.iter().filter(|d| doc_uniform(d, 7, 1) < 0.25).count();
        // binomial(20000, 0.25): sd ~61, six sigma
        assert!((kept as i64 - 5000).abs() < 370, "{kept}");
        let again = docs.iter().filter(|d| doc_uniform(d, 7, 1) < 0.25).count();
        assert_eq!(kept, again);
        let other_seed = docs.iter().filter(|d| doc_uniform(d, 8, 1) < 0.25).count();
        assert_ne!(
            docs.iter()
                .map(|d| doc_uniform(d, 7, 1) < 0.25)
                .collect::<Vec<_>>(),
            docs.iter()
                .map(|d| doc_uniform(d, 8, 1) < 0.25)
                .collect::<Vec<_>>()
        );
        assert!((other_seed as i64 - 5000).abs() < 370);
    }
}
