//! `dolma tokenize` (alias `tokens`): documents to token shards OLMo reads.
//!
//! Output is dolma's: `<destination>/part-<group>-<n>.npy`, a headerless little-endian
//! `uint16`/`uint32` array (`numpy.memmap(path, dtype=...)` reads it), and beside it
//! `part-<group>-<n>.csv.gz` with one row `start,end,id,src,loc` per document (token offsets,
//! end exclusive; `loc` is the 1-based input line). Each document becomes
//! `[bos] + encode(text.strip()) + [eos]`, each special token added only when set and not
//! already there; empty documents are skipped, as in dolma.
//!
//! `max_size` counts **tokens** per `.npy` file (as in dolma, whose name suggests bytes). A
//! document longer than `max_size` gets a file of its own (dolma loops forever on it).
//!
//! Placement: the input files are shuffled with `seed`, then cut into groups of
//! `files_per_process` files; each group streams its files through a ring of `ring_size` open
//! readers (round-robin), collects `batch_size` documents, shuffles them with a generator seeded
//! by `seed` and the group, and appends them to its current file. Groups are independent
//! tasks, so the output bytes depend on the seed and the file list, never on the thread count.
//! A group is done when its marker `.part-<group>.done.json` exists; a rerun skips done groups
//! and redoes the others from scratch.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::config::{one_or_many, opt_string};
use crate::io::{open_documents, AtomicWriter, Line, LineReader};
use crate::runner::{self, expand_inputs, FileStats, Input, Progress, RunOptions, Task};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    #[serde(deserialize_with = "one_or_many")]
    pub documents: Vec<String>,
    pub destination: String,
    #[serde(default)]
    pub tokenizer: Option<TokenizerConfig>,
    /// Deprecated dolma field: sets `tokenizer.name_or_path`, EOS = vocab size - 1, pad = 1.
    #[serde(default, deserialize_with = "opt_string")]
    pub tokenizer_name_or_path: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub dtype: Option<String>,
    /// Tokens per output file (default 2^30).
    #[serde(default)]
    pub max_size: Option<u64>,
    #[serde(default)]
    pub ring_size: Option<usize>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub processes: Option<usize>,
    #[serde(default)]
    pub files_per_process: Option<usize>,
    #[serde(default)]
    pub fields: Option<FieldsConfig>,
    #[serde(default)]
    pub skip_bad_lines: bool,
    #[serde(default)]
    pub max_line_bytes: Option<usize>,
    #[serde(default = "crate::config::yes")]
    pub progress: bool,
    #[serde(default)]
    pub dryrun: bool,
    // Accepted for dolma config compatibility.
    #[serde(default)]
    pub debug: bool,
    #[serde(default)]
    pub work_dir: Option<Value>,
    #[serde(default)]
    pub sample_ring_prop: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    #[serde(deserialize_with = "crate::config::string")]
    pub name_or_path: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub segment_before_tokenization: bool,
    #[serde(default)]
    pub encode_special_tokens: Option<bool>,
    #[serde(default)]
    pub fast: Option<bool>,
    #[serde(default)]
    pub refresh: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldsConfig {
    #[serde(default)]
    pub text_field_name: Option<String>,
    #[serde(default)]
    pub text_field_type: Option<String>,
    #[serde(default)]
    pub id_field_name: Option<String>,
    #[serde(default)]
    pub id_field_type: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    fn parse(s: &str) -> Result<Dtype> {
        match s {
            "uint16" | "u16" => Ok(Dtype::U16),
            "uint32" | "u32" => Ok(Dtype::U32),
            other => bail!("dtype `{other}` is not supported: use uint16 or uint32"),
        }
    }
    fn max(self) -> u64 {
        match self {
            Dtype::U16 => u16::MAX as u64,
            Dtype::U32 => u32::MAX as u64,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U16 => "uint16",
            Dtype::U32 => "uint32",
        }
    }
    pub fn width(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
}

/// SplitMix64: a tiny generator whose output never changes with a dependency upgrade.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n), Lemire's nearly-divisionless method.
    pub fn below(&mut self, n: u64) -> u64 {
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let t = n.wrapping_neg() % n;
            while (m as u64) < t {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

struct Settings {
    tokenizer: Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    dtype: Dtype,
    max_size: u64,
    ring_size: usize,
    batch_size: usize,
    seed: u64,
    segment: bool,
    text_field: String,
    id_field: Option<String>,
    destination: PathBuf,
    has_prefix_space: bool,
}

/// One tokenized document waiting to be written.
struct Tokenized {
    ids: Vec<u32>,
    id: String,
    src: String,
    loc: u64,
}

/// dolma's `split_into_paragraphs`: `(^\n*|\n+)[^\n]*` matches, a space in front of every
/// paragraph but the first when the tokenizer adds a prefix space (removed after encoding).
fn segment(text: &str, prefix_space: bool) -> Vec<String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    let mut first = true;
    while i < b.len() || first {
        let start = i;
        while i < b.len() && b[i] == b'\n' {
            i += 1;
        }
        if !first && i == start {
            break;
        }
        while i < b.len() && b[i] != b'\n' {
            i += 1;
        }
        let piece = &text[start..i];
        out.push(if prefix_space && !first {
            format!(" {piece}")
        } else {
            piece.to_string()
        });
        first = false;
        if i >= b.len() {
            break;
        }
    }
    out
}

impl Settings {
    fn encode_batch(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>> {
        let mut all = if self.segment {
            let mut pieces = Vec::new();
            let mut slices = Vec::new();
            for t in &texts {
                let p = segment(t, self.has_prefix_space);
                slices.push((pieces.len(), pieces.len() + p.len()));
                pieces.extend(p);
            }
            let enc = self
                .tokenizer
                .encode_batch(pieces, false)
                .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
            slices
                .iter()
                .map(|&(a, z)| {
                    let mut ids = Vec::new();
                    for (k, e) in enc[a..z].iter().enumerate() {
                        let skip = usize::from(self.has_prefix_space && k > 0);
                        ids.extend_from_slice(&e.get_ids()[skip.min(e.get_ids().len())..]);
                    }
                    ids
                })
                .collect::<Vec<_>>()
        } else {
            self.tokenizer
                .encode_batch(texts, false)
                .map_err(|e| anyhow!("tokenizer failed: {e}"))?
                .into_iter()
                .map(|e| e.get_ids().to_vec())
                .collect()
        };
        for ids in &mut all {
            if ids.is_empty() {
                continue;
            }
            if let Some(b) = self.bos {
                if ids[0] != b {
                    ids.insert(0, b);
                }
            }
            if let Some(e) = self.eos {
                if ids.last() != Some(&e) {
                    ids.push(e);
                }
            }
        }
        Ok(all)
    }
}

/// Python's `csv.writer` quoting (QUOTE_MINIMAL).
fn csv_field(out: &mut Vec<u8>, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push(b'"');
        out.extend_from_slice(s.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

struct PartWriter {
    npy: AtomicWriter,
    csv: AtomicWriter,
    tokens: u64,
    name: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct GroupMarker {
    group: usize,
    inputs: Vec<String>,
    parts: Vec<String>,
    documents: u64,
    tokens: u64,
    skipped_empty: u64,
    /// Tokens per source directory (the component after `documents/`, else the file name).
    tokens_by_source: BTreeMap<String, u64>,
}

fn source_of(path: &str) -> String {
    match path.split_once("/documents/") {
        Some((_, rest)) => rest.split('/').next().unwrap_or(rest).to_string(),
        None => Path::new(path)
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
    }
}

fn open_part(s: &Settings, group: usize, n: usize) -> Result<PartWriter> {
    let name = format!("part-{group:05}-{n:05}");
    Ok(PartWriter {
        npy: AtomicWriter::create(&s.destination.join(format!("{name}.npy")))?,
        csv: AtomicWriter::create(&s.destination.join(format!("{name}.csv.gz")))?,
        tokens: 0,
        name,
    })
}

fn write_doc(s: &Settings, w: &mut PartWriter, doc: &Tokenized) -> Result<()> {
    let mut buf = Vec::with_capacity(doc.ids.len() * s.dtype.width());
    for &t in &doc.ids {
        if t as u64 > s.dtype.max() {
            bail!(
                "token id {t} of document {} does not fit {} (it would wrap)",
                doc.id,
                s.dtype.name()
            );
        }
        match s.dtype {
            Dtype::U16 => buf.extend_from_slice(&(t as u16).to_le_bytes()),
            Dtype::U32 => buf.extend_from_slice(&t.to_le_bytes()),
        }
    }
    w.npy.write_all(&buf)?;
    let mut row = Vec::new();
    write!(row, "{},{},", w.tokens, w.tokens + doc.ids.len() as u64)?;
    csv_field(&mut row, &doc.id);
    row.push(b',');
    csv_field(&mut row, &doc.src);
    write!(row, ",{}\r\n", doc.loc)?;
    w.csv.write_all(&row)?;
    w.tokens += doc.ids.len() as u64;
    Ok(())
}

struct Reader {
    lines: LineReader,
    path: String,
}

#[derive(Deserialize)]
struct StdDoc<'a> {
    #[serde(borrow)]
    id: &'a serde_json::value::RawValue,
    #[serde(borrow, default)]
    text: Option<std::borrow::Cow<'a, str>>,
}

/// One batch of documents read round-robin from a ring of open files.
struct Batch {
    texts: Vec<String>,
    meta: Vec<(String, String, u64)>,
    docs: u64,
    bad_lines: u64,
    skipped_empty: u64,
    text_bytes: u64,
}

/// dolma's ring: up to `ring_size` open files read round-robin, refilled as files end.
struct Ring {
    pending: VecDeque<Input>,
    open: Vec<Reader>,
    turn: usize,
    max_line_bytes: usize,
    skip_bad_lines: bool,
}

impl Ring {
    fn fill(&mut self, size: usize) -> Result<()> {
        while self.open.len() < size {
            match self.pending.pop_front() {
                Some(i) => self.open.push(Reader {
                    lines: open_documents(&i.path, self.max_line_bytes)?,
                    path: i.path.display().to_string(),
                }),
                None => break,
            }
        }
        Ok(())
    }

    /// The next batch, or `None` when every file is done.
    fn read_batch(&mut self, s: &Settings) -> Result<Option<Batch>> {
        let mut b = Batch {
            texts: Vec::new(),
            meta: Vec::new(),
            docs: 0,
            bad_lines: 0,
            skipped_empty: 0,
            text_bytes: 0,
        };
        while b.texts.len() < s.batch_size && !self.open.is_empty() {
            let j = self.turn % self.open.len();
            self.turn += 1;
            let r = &mut self.open[j];
            let (line, loc) = match r.lines.next_line()? {
                Some(Line::Text(t, n)) => (t.to_string(), n),
                Some(Line::Bad(e)) => {
                    if !self.skip_bad_lines {
                        return Err(e.into());
                    }
                    b.bad_lines += 1;
                    tracing::warn!("skipping bad line {e}");
                    continue;
                }
                None => {
                    self.open.remove(j);
                    let size = self.open.len() + 1;
                    self.fill(size)?;
                    continue;
                }
            };
            let parsed = if s.text_field == "text" && s.id_field.as_deref() == Some("id") {
                // The usual layout: parse only `id` and `text`, borrowed (much faster than a tree).
                serde_json::from_str::<StdDoc>(&line).map(|d| {
                    let id = match serde_json::from_str::<Value>(d.id.get()) {
                        Ok(Value::String(x)) => Some(x),
                        Ok(Value::Number(n)) => Some(n.to_string()),
                        _ => None,
                    };
                    (d.text.map(|t| t.into_owned()), id, true)
                })
            } else {
                serde_json::from_str::<Value>(&line).map(|doc| {
                    let text = doc
                        .get(&s.text_field)
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    let id = match s.id_field.as_ref().map(|f| doc.get(f)) {
                        Some(Some(Value::String(x))) => Some(x.clone()),
                        Some(Some(Value::Number(n))) => Some(n.to_string()),
                        _ => None,
                    };
                    (text, id, false)
                })
            };
            let (text, id) = match parsed {
                Ok((Some(text), id, _)) => (text, id),
                Ok((None, _, _)) | Err(_) => {
                    let problem = match serde_json::from_str::<Value>(&line) {
                        Err(e) => format!("malformed JSON: {e}"),
                        Ok(doc) => match doc.get(&s.text_field) {
                            None => format!("missing field `{}`", s.text_field),
                            Some(Value::String(_)) => "missing or invalid field `id`".to_string(),
                            Some(v) => {
                                format!("field `{}` must be a string, got {v}", s.text_field)
                            }
                        },
                    };
                    if self.skip_bad_lines {
                        b.bad_lines += 1;
                        tracing::warn!("skipping bad line {}:{loc}: {problem}", r.path);
                        continue;
                    }
                    bail!("{}:{loc}: {problem}", r.path);
                }
            };
            let id = match (&s.id_field, id) {
                (None, _) => format!("{}-{loc}", path_digest(r.path.as_bytes())),
                (Some(_), Some(id)) => id,
                (Some(f), None) => bail!("{}:{loc}: missing or invalid id field `{f}`", r.path),
            };
            b.docs += 1;
            b.text_bytes += text.len() as u64;
            let stripped = dolma_taggers::text::py_strip(&text);
            if stripped.is_empty() {
                b.skipped_empty += 1;
                continue;
            }
            b.texts.push(stripped.to_string());
            b.meta.push((id, r.path.clone(), loc));
        }
        Ok((b.docs > 0 || b.bad_lines > 0).then_some(b))
    }
}

fn process_group(
    s: &Settings,
    group: usize,
    inputs: &[Input],
    opts: &RunOptions,
    progress: &Progress,
) -> Result<(GroupMarker, FileStats)> {
    // Remove what a killed run left of this group.
    let prefix = format!("part-{group:05}-");
    if let Ok(entries) = std::fs::read_dir(&s.destination) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_file(e.path())?;
            }
        }
    }
    let mut rng = SplitMix64::new(s.seed ^ (group as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let mut marker = GroupMarker {
        group,
        inputs: inputs
            .iter()
            .map(|i| i.path.display().to_string())
            .collect(),
        ..Default::default()
    };
    let mut stats = FileStats::default();
    let mut ring = Ring {
        pending: inputs.iter().cloned().collect(),
        open: Vec::new(),
        turn: 0,
        max_line_bytes: opts.max_line_bytes,
        skip_bad_lines: opts.skip_bad_lines,
    };
    ring.fill(s.ring_size)?;
    let mut part_n = 0usize;
    let mut current: Option<PartWriter> = None;
    // Read the next batch while the current one is encoded: decompression and JSON parsing
    // overlap with the tokenizer instead of leaving cores idle between batches.
    let mut next = ring.read_batch(s)?;
    while let Some(batch) = next.take() {
        stats.docs += batch.docs;
        stats.bad_lines += batch.bad_lines;
        stats.text_bytes += batch.text_bytes;
        marker.skipped_empty += batch.skipped_empty;
        progress.add(batch.docs, batch.text_bytes);
        let (encoded, following) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| ring.read_batch(s));
            let encoded = s.encode_batch(batch.texts);
            (encoded, reader.join().expect("reader thread panicked"))
        });
        next = following?;
        let encoded = encoded?;
        let meta = batch.meta;
        let mut docs: Vec<Tokenized> = encoded
            .into_iter()
            .zip(meta)
            .filter(|(ids, _)| !ids.is_empty())
            .map(|(ids, (id, src, loc))| Tokenized { ids, id, src, loc })
            .collect();
        rng.shuffle(&mut docs);
        for d in &docs {
            let len = d.ids.len() as u64;
            let fits = current
                .as_ref()
                .is_some_and(|w| w.tokens + len <= s.max_size);
            let empty = current.as_ref().is_some_and(|w| w.tokens == 0);
            if !fits && !empty {
                if let Some(w) = current.take() {
                    marker.parts.push(w.name.clone());
                    w.npy.finish()?;
                    w.csv.finish()?;
                }
                current = Some(open_part(s, group, part_n)?);
                part_n += 1;
            }
            let w = current.as_mut().expect("opened above");
            write_doc(s, w, d)?;
            marker.documents += 1;
            marker.tokens += len;
            *marker
                .tokens_by_source
                .entry(source_of(&d.src))
                .or_insert(0) += len;
        }
    }
    if let Some(w) = current.take() {
        marker.parts.push(w.name.clone());
        w.npy.finish()?;
        w.csv.finish()?;
    }
    stats.count("tokens", marker.tokens);
    Ok((marker, stats))
}

fn path_digest(data: &[u8]) -> String {
    // dolma ids documents without an id field by sha256(path)-line; a stable 128-bit xxh3
    // serves the same purpose without another dependency.
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(data))
}

fn load_tokenizer(path: &str) -> Result<Tokenizer> {
    if !Path::new(path).exists() {
        bail!(
            "tokenizer `{path}` is not a local file; this build loads tokenizer.json files only \
             (download it once, e.g. from the model's repository, and give its path)"
        );
    }
    Tokenizer::from_file(path).map_err(|e| anyhow!("cannot load tokenizer {path}: {e}"))
}

pub fn run(cfg: TokenizeConfig) -> Result<()> {
    let (tcfg, deprecated) = match (&cfg.tokenizer, &cfg.tokenizer_name_or_path) {
        (Some(t), None) => (
            TokenizerConfig {
                name_or_path: t.name_or_path.clone(),
                bos_token_id: t.bos_token_id,
                eos_token_id: t.eos_token_id,
                pad_token_id: t.pad_token_id,
                segment_before_tokenization: t.segment_before_tokenization,
                encode_special_tokens: t.encode_special_tokens,
                fast: t.fast,
                refresh: t.refresh,
            },
            false,
        ),
        (None, Some(p)) => (
            TokenizerConfig {
                name_or_path: p.clone(),
                bos_token_id: None,
                eos_token_id: None,
                pad_token_id: None,
                segment_before_tokenization: false,
                encode_special_tokens: None,
                fast: None,
                refresh: None,
            },
            true,
        ),
        (Some(_), Some(_)) => bail!(
            "set `tokenizer.name_or_path` or the deprecated `tokenizer_name_or_path`, not both"
        ),
        (None, None) => bail!("set `tokenizer.name_or_path` (a tokenizer.json file)"),
    };
    if cfg.sample_ring_prop == Some(true) {
        tracing::warn!("sample_ring_prop is not supported: files in the ring are read round-robin");
    }
    let tokenizer = load_tokenizer(&tcfg.name_or_path)?;
    let vocab = tokenizer.get_vocab_size(true) as u64;
    let (bos, mut eos) = (tcfg.bos_token_id, tcfg.eos_token_id);
    if deprecated {
        tracing::warn!(
            "`tokenizer_name_or_path` is deprecated: using EOS = vocab size - 1 = {} as dolma does",
            vocab - 1
        );
        eos = Some((vocab - 1) as u32);
    }
    if bos.is_none() && eos.is_none() {
        bail!("set tokenizer.bos_token_id or tokenizer.eos_token_id (or both): documents must be delimited");
    }
    for (name, id) in [
        ("bos_token_id", bos),
        ("eos_token_id", eos),
        ("pad_token_id", tcfg.pad_token_id),
    ] {
        if let Some(id) = id {
            if id as u64 >= vocab {
                bail!(
                    "tokenizer.{name} = {id} is outside the vocabulary of {} ({vocab} tokens)",
                    tcfg.name_or_path
                );
            }
        }
    }
    let needed = if vocab - 1 <= u16::MAX as u64 {
        Dtype::U16
    } else {
        Dtype::U32
    };
    let dtype = match &cfg.dtype {
        None => needed,
        Some(d) => Dtype::parse(d)?,
    };
    if vocab - 1 > dtype.max() {
        bail!(
            "dtype {} cannot hold token ids up to {} ({} has {vocab} tokens): use dtype uint32",
            dtype.name(),
            vocab - 1,
            tcfg.name_or_path
        );
    }
    let fields = cfg.fields.as_ref();
    let text_field = fields
        .and_then(|f| f.text_field_name.clone())
        .unwrap_or_else(|| "text".into());
    let id_field = match fields {
        Some(f) => f.id_field_name.clone(),
        None => Some("id".into()),
    };
    // Tokenizers that add a prefix space (e.g. Llama's) change the first token of a segment.
    let has_prefix_space = tokenizer
        .encode("a", false)
        .ok()
        .zip(tokenizer.encode(" a", false).ok())
        .is_some_and(|(a, b)| a.get_ids() == b.get_ids());
    let max_size = cfg.max_size.unwrap_or(1 << 30);
    if max_size == 0 {
        bail!("max_size must be positive");
    }
    let settings = Settings {
        tokenizer,
        bos,
        eos,
        dtype,
        max_size,
        ring_size: cfg.ring_size.unwrap_or(8).max(1),
        batch_size: cfg.batch_size.unwrap_or(10_000).max(1),
        seed: cfg.seed.unwrap_or(3920),
        segment: tcfg.segment_before_tokenization,
        text_field,
        id_field,
        destination: PathBuf::from(&cfg.destination),
        has_prefix_space,
    };

    let mut inputs = expand_inputs(&cfg.documents)?;
    SplitMix64::new(settings.seed).shuffle(&mut inputs);
    let per_group = cfg.files_per_process.unwrap_or(settings.ring_size).max(1);
    let groups: Vec<Vec<Input>> = inputs.chunks(per_group).map(|c| c.to_vec()).collect();
    if cfg.dryrun {
        for (g, files) in groups.iter().enumerate() {
            println!(
                "part-{g:05}: {}",
                files
                    .iter()
                    .map(|i| i.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(&settings.destination)
        .with_context(|| format!("cannot create {}", settings.destination.display()))?;
    let marker = |g: usize| settings.destination.join(format!(".part-{g:05}.done.json"));
    let tasks: Vec<Task> = groups
        .iter()
        .enumerate()
        .map(|(g, files)| Task {
            input: files[0].clone(),
            outputs: vec![marker(g)],
        })
        .collect();
    let opts = RunOptions::new(
        cfg.processes,
        false,
        cfg.skip_bad_lines,
        cfg.max_line_bytes,
        cfg.progress,
    );
    let summary = runner::run("tokenize", tasks, &opts, |g, task, progress| {
        let (m, stats) = process_group(&settings, g, &groups[g], &opts, progress)?;
        let mut w = AtomicWriter::create(&task.outputs[0])?;
        serde_json::to_writer_pretty(&mut w, &m)?;
        w.finish()?;
        Ok(stats)
    })?;
    let mut total_tokens = 0u64;
    let mut total_docs = 0u64;
    let mut files = 0usize;
    for g in 0..groups.len() {
        if let Ok(t) = std::fs::read_to_string(marker(g)) {
            let m: GroupMarker = serde_json::from_str(&t)?;
            total_tokens += m.tokens;
            total_docs += m.documents;
            files += m.parts.len();
        }
    }
    let secs = summary.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "tokenize: {} groups done, {} already done; {} docs ({} bad lines skipped) in {:.1}s: {:.0} docs/s, {:.1} MB/s of text, {:.0} tokens/s; \
         output: {total_docs} docs, {total_tokens} tokens ({}) in {files} files under {}",
        summary.files_done,
        summary.files_skipped,
        summary.stats.docs,
        summary.stats.bad_lines,
        secs,
        summary.stats.docs as f64 / secs,
        summary.mb_per_sec(),
        summary.stats.counters.get("tokens").copied().unwrap_or(0) as f64 / secs,
        settings.dtype.name(),
        settings.destination.display()
    );
    Ok(())
}

/// `dolma tokens-info DIR [--tokenizer FILE] [--decode N]`: what a tokenize run produced.
pub fn info(args: &[String]) -> Result<()> {
    let mut dir: Option<PathBuf> = None;
    let mut tokenizer: Option<String> = None;
    let mut decode = 3usize;
    let mut dtype: Option<Dtype> = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--tokenizer" => {
                tokenizer = Some(args.get(i + 1).ok_or_else(|| anyhow!("--tokenizer needs a path"))?.clone());
                i += 2;
            }
            "--decode" => {
                decode = args.get(i + 1).ok_or_else(|| anyhow!("--decode needs a number"))?.parse()?;
                i += 2;
            }
            "--dtype" => {
                dtype = Some(Dtype::parse(args.get(i + 1).ok_or_else(|| anyhow!("--dtype needs a value"))?)?);
                i += 2;
            }
            a if !a.starts_with("--") && dir.is_none() => {
                dir = Some(PathBuf::from(a));
                i += 1;
            }
            other => bail!("unexpected argument `{other}`; usage: dolma tokens-info DIR [--tokenizer FILE] [--decode N] [--dtype uint16|uint32]"),
        }
    }
    let dir =
        dir.ok_or_else(|| anyhow!("usage: dolma tokens-info DIR [--tokenizer FILE] [--decode N]"))?;
    let mut npys: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "npy"))
        .collect();
    npys.sort();
    if npys.is_empty() {
        bail!("{}: no .npy token files", dir.display());
    }
    let tok = tokenizer.as_deref().map(load_tokenizer).transpose()?;
    let dtype = dtype.unwrap_or(match &tok {
        Some(t) if t.get_vocab_size(true) > 65536 => Dtype::U32,
        _ => Dtype::U16,
    });
    let mut by_source: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut total = (0u64, 0u64);
    let mut first_docs: Vec<(PathBuf, u64, u64, String)> = Vec::new();
    println!("{:<28} {:>12} {:>10}", "file", "tokens", "docs");
    for npy in &npys {
        let bytes = std::fs::metadata(npy)?.len();
        if bytes % dtype.width() as u64 != 0 {
            bail!(
                "{}: {bytes} bytes is not a whole number of {} tokens (wrong --dtype?)",
                npy.display(),
                dtype.name()
            );
        }
        let tokens = bytes / dtype.width() as u64;
        let csv = npy.with_extension("csv.gz");
        let text = crate::io::read_to_string(&csv)?;
        let mut docs = 0u64;
        for row in text.lines() {
            let fields = parse_csv_row(row);
            if fields.len() != 5 {
                bail!("{}: malformed row `{row}`", csv.display());
            }
            let (start, end): (u64, u64) = (fields[0].parse()?, fields[1].parse()?);
            if end > tokens || start > end {
                bail!(
                    "{}: row `{row}` points outside {} ({tokens} tokens)",
                    csv.display(),
                    npy.display()
                );
            }
            let e = by_source.entry(source_of(&fields[3])).or_insert((0, 0));
            e.0 += 1;
            e.1 += end - start;
            if first_docs.len() < decode {
                first_docs.push((npy.clone(), start, end, fields[2].clone()));
            }
            docs += 1;
        }
        total.0 += docs;
        total.1 += tokens;
        println!(
            "{:<28} {:>12} {:>10}",
            npy.file_name().unwrap_or_default().to_string_lossy(),
            tokens,
            docs
        );
    }
    println!(
        "{:<28} {:>12} {:>10}  ({}, {} files)",
        "total",
        total.1,
        total.0,
        dtype.name(),
        npys.len()
    );
    println!("\n{:<28} {:>12} {:>10}", "source", "tokens", "docs");
    for (s, (d, t)) in &by_source {
        println!("{s:<28} {t:>12} {d:>10}");
    }
    if let Some(tok) = tok {
        for (npy, start, end, id) in first_docs {
            let data = std::fs::read(&npy)?;
            let w = dtype.width();
            let ids: Vec<u32> = data[start as usize * w..end as usize * w]
                .chunks_exact(w)
                .map(|c| {
                    if w == 2 {
                        u16::from_le_bytes([c[0], c[1]]) as u32
                    } else {
                        u32::from_le_bytes([c[0], c[1], c[2], c[3]])
                    }
                })
                .collect();
            let text = tok
                .decode(&ids, false)
                .map_err(|e| anyhow!("decode failed: {e}"))?;
            let shown: String = text.chars().take(300).collect();
            println!(
                "\n--- {id} ({} tokens, first {} chars) ---\n{shown}",
                ids.len(),
                shown.chars().count()
            );
        }
    }
    Ok(())
}

/// Splits a CSV row written by Python's csv module (QUOTE_MINIMAL).
pub fn parse_csv_row(row: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = row.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', false) if cur.is_empty() => quoted = true,
            ('"', true) => {
                if chars.peek() == Some(&'"') {
                    cur.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            }
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// `dolma train-tokenizer`: byte-level BPE on documents.
pub fn train(cfg: TrainTokenizerConfig) -> Result<()> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;

    if cfg.vocab_size < 257 + cfg.special_tokens.len() {
        bail!("vocab_size {} is too small: byte-level BPE needs 256 byte tokens plus the special tokens", cfg.vocab_size);
    }
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = cfg
        .special_tokens
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency.unwrap_or(2))
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    let inputs = expand_inputs(&cfg.documents)?;
    let mut texts: Vec<String> = Vec::new();
    let mut bytes = 0usize;
    let limit = cfg.max_bytes.unwrap_or(1 << 30);
    'files: for input in &inputs {
        let mut r = open_documents(&input.path, crate::io::DEFAULT_MAX_LINE_BYTES)?;
        while let Some(line) = r.next_line()? {
            let Line::Text(t, n) = line else { continue };
            let doc: Value = serde_json::from_str(t)
                .map_err(|e| anyhow!("{}:{n}: malformed JSON: {e}", input.path.display()))?;
            if let Some(text) = doc.get("text").and_then(Value::as_str) {
                bytes += text.len();
                texts.push(text.to_string());
                if bytes >= limit {
                    break 'files;
                }
            }
        }
    }
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("training failed: {e}"))?;
    let out = PathBuf::from(&cfg.output);
    if let Some(p) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p)?;
    }
    tokenizer
        .save(crate::io::tmp_path(&out), true)
        .map_err(|e| anyhow!("cannot save {}: {e}", out.display()))?;
    std::fs::rename(crate::io::tmp_path(&out), &out)?;
    let specials: Vec<String> = cfg
        .special_tokens
        .iter()
        .map(|s| {
            format!(
                "{s}={}",
                tokenizer
                    .token_to_id(s)
                    .map_or("?".into(), |i| i.to_string())
            )
        })
        .collect();
    eprintln!(
        "train-tokenizer: {} documents ({:.1} MB) -> {} ({} tokens; special: {})",
        texts.len(),
        bytes as f64 / 1e6,
        out.display(),
        tokenizer.get_vocab_size(true),
        specials.join(", ")
    );
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTokenizerConfig {
    #[serde(deserialize_with = "one_or_many")]
    pub documents: Vec<String>,
    pub output: String,
    pub vocab_size: usize,
    #[serde(default = "default_specials", deserialize_with = "one_or_many")]
    pub special_tokens: Vec<String>,
    #[serde(default)]
    pub min_frequency: Option<u64>,
    /// Stop reading documents after this many bytes of text (default 1 GiB).
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

fn default_specials() -> Vec<String> {
    vec!["<|endoftext|>".into(), "<|padding|>".into()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_fixed_permutation() {
        let mut v: Vec<u32> = (0..10).collect();
        SplitMix64::new(3920).shuffle(&mut v);
        let mut w: Vec<u32> = (0..10).collect();
        SplitMix64::new(3920).shuffle(&mut w);
        assert_eq!(v, w);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(v, (0..10).collect::<Vec<_>>());
        // SplitMix64 reference value (seed 0, first output).
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn segmentation_matches_dolma_regex() {
        assert_eq!(segment("a\nb\n\nc", false), vec!["a", "\nb", "\n\nc"]);
        assert_eq!(segment("\n\na", false), vec!["\n\na"]);
        assert_eq!(segment("a\nb", true), vec!["a", " \nb"]);
        assert_eq!(segment("", false), vec![""]);
    }

    #[test]
    fn csv_quoting_round_trips() {
        let mut row = Vec::new();
        csv_field(&mut row, "plain");
        row.push(b',');
        csv_field(&mut row, "with,comma \"q\"");
        let s = String::from_utf8(row).unwrap();
        assert_eq!(s, "plain,\"with,comma \"\"q\"\"\"");
        assert_eq!(parse_csv_row(&s), vec!["plain", "with,comma \"q\""]);
    }

    #[test]
    fn source_names() {
        assert_eq!(source_of("/x/documents/wiki/a.json.gz"), "wiki");
        assert_eq!(source_of("/x/other/a.json.gz"), "a.json.gz");
    }
}
