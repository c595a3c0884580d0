//! `dolma tag`: run taggers over documents and write dolma attribute files.
//!
//! Attribute files mirror the document paths (`.../documents/<rel>` ->
//! `.../attributes/<experiment>/<rel>`), one line per document in the same order:
//! `{"id": ..., "attributes": {"<exp>__<tagger>__<type>": [[start, end, score], ...]}, "source": ...}`.
//! Without `experiment`, each tagger is its own experiment and directory, as in dolma.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dolma_taggers::{
    build_tagger, group_spans, make_variable_name, Document, GroupedSpans, Span, Tagger,
    TaggerOptions,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::{one_or_many, opt_one_or_many, opt_string};
use crate::io::{open_documents, AtomicWriter, Line};
use crate::runner::{
    self, expand_inputs, glob_prefix, FileStats, Progress, RunOptions, Shard, Task,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagConfig {
    #[serde(deserialize_with = "one_or_many")]
    pub documents: Vec<String>,
    #[serde(default, deserialize_with = "opt_one_or_many")]
    pub destination: Option<Vec<String>>,
    #[serde(deserialize_with = "one_or_many")]
    pub taggers: Vec<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub experiment: Option<String>,
    #[serde(default)]
    pub processes: Option<usize>,
    #[serde(default)]
    pub ignore_existing: bool,
    #[serde(default)]
    pub skip_bad_lines: bool,
    #[serde(default, deserialize_with = "opt_string")]
    pub shard: Option<String>,
    #[serde(default)]
    pub max_line_bytes: Option<usize>,
    /// Per-tagger options, e.g. `tagger_options: {ft_lang_id_en_doc_v2: {model_path: lid.176.ftz}}`.
    #[serde(default)]
    pub tagger_options: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub dryrun: bool,
    /// Progress bar on stderr (`--no-progress` turns it off).
    #[serde(default = "crate::config::yes")]
    pub progress: bool,
    // Accepted for dolma config compatibility; they change nothing here.
    #[serde(default)]
    pub debug: bool,
    #[serde(default)]
    pub work_dir: Option<serde_json::Value>,
    #[serde(default)]
    pub profile: Option<serde_json::Value>,
    #[serde(default)]
    pub tagger_modules: Option<serde_json::Value>,
}

/// Taggers writing to one attribute directory.
struct Group {
    /// `make_variable_name(experiment)`, the first part of every key.
    exp: String,
    taggers: Vec<(String, Box<dyn Tagger>)>,
    /// Per documents pattern: the output directory mirroring that pattern's prefix.
    dest: Vec<PathBuf>,
}

/// Replaces the first `documents` component of `prefix` with `attributes/<name>`.
fn attributes_dir(prefix: &Path, name: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    let mut replaced = false;
    for c in prefix.components() {
        if !replaced && c.as_os_str() == "documents" {
            out.push("attributes");
            out.push(name);
            replaced = true;
        } else {
            out.push(c);
        }
    }
    if !replaced {
        bail!(
            "cannot derive the attributes path from `{}`: it has no `documents` directory; \
             set `destination`",
            prefix.display()
        );
    }
    Ok(out)
}

fn common_prefix(paths: &[PathBuf]) -> PathBuf {
    let mut it = paths.iter();
    let Some(first) = it.next() else {
        return PathBuf::new();
    };
    let mut common: Vec<_> = first.components().collect();
    for p in it {
        let n = common
            .iter()
            .zip(p.components())
            .take_while(|(a, b)| **a == *b)
            .count();
        common.truncate(n);
    }
    common.iter().collect()
}

fn destinations(cfg: &TagConfig, name: &str) -> Result<Vec<PathBuf>> {
    let prefixes: Vec<PathBuf> = cfg.documents.iter().map(|d| glob_prefix(d)).collect();
    match &cfg.destination {
        None => prefixes.iter().map(|p| attributes_dir(p, name)).collect(),
        Some(d) if d.len() == prefixes.len() => Ok(d.iter().map(PathBuf::from).collect()),
        Some(d) if d.len() == 1 => {
            let common = common_prefix(&prefixes);
            Ok(prefixes
                .iter()
                .map(|p| PathBuf::from(&d[0]).join(p.strip_prefix(&common).unwrap_or(p)))
                .collect())
        }
        Some(d) => bail!(
            "`destination` has {} entries for {} `documents` patterns: give one, or one per pattern",
            d.len(),
            prefixes.len()
        ),
    }
}

#[derive(Deserialize)]
struct InputDoc<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    text: Cow<'a, str>,
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
}

/// A precise message for a line that is not a valid document.
pub fn explain_bad_document(line: &str, err: &serde_json::Error) -> String {
    match serde_json::from_str::<serde_json::Value>(line) {
        Err(e) => format!("malformed JSON: {e}"),
        Ok(serde_json::Value::Object(m)) => {
            for field in ["id", "text"] {
                match m.get(field) {
                    None => return format!("missing field `{field}`"),
                    Some(serde_json::Value::String(_)) => {}
                    Some(v) => return format!("field `{field}` must be a string, got {v}"),
                }
            }
            if let Some(v) = m.get("source").filter(|v| !v.is_string() && !v.is_null()) {
                return format!("field `source` must be a string, got {v}");
            }
            format!("invalid document: {err}")
        }
        Ok(other) => format!(
            "a document must be a JSON object, got {}",
            type_name(&other)
        ),
    }
}

fn type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn write_attribute_line(
    buf: &mut Vec<u8>,
    id: &str,
    source: &str,
    attrs: &[(String, GroupedSpans)],
) {
    buf.extend_from_slice(b"{\"id\":");
    serde_json::to_writer(&mut *buf, id).expect("string to vec");
    buf.extend_from_slice(b",\"attributes\":{");
    let mut first = true;
    for (prefix, groups) in attrs {
        for (kind, spans) in groups {
            if !first {
                buf.push(b',');
            }
            first = false;
            let key = format!("{prefix}{}", make_variable_name(kind));
            serde_json::to_writer(&mut *buf, &key).expect("string to vec");
            buf.extend_from_slice(b":[");
            for (i, (s, e, score)) in spans.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                write!(buf, "[{s},{e},").expect("write to vec");
                serde_json::to_writer(&mut *buf, score).expect("number to vec");
                buf.push(b']');
            }
            buf.push(b']');
        }
    }
    buf.extend_from_slice(b"},\"source\":");
    serde_json::to_writer(&mut *buf, source).expect("string to vec");
    buf.extend_from_slice(b"}\n");
}

fn tag_file(
    task: &Task,
    groups: &[Group],
    opts: &RunOptions,
    progress: &Progress,
) -> Result<FileStats> {
    let mut reader = open_documents(&task.input.path, opts.max_line_bytes)?;
    let mut writers: Vec<AtomicWriter> = task
        .outputs
        .iter()
        .map(|p| AtomicWriter::create(p))
        .collect::<Result<_>>()?;
    let needs_metadata = groups
        .iter()
        .flat_map(|g| &g.taggers)
        .any(|(_, t)| t.needs_metadata());
    let mut stats = FileStats::default();
    let mut spans: Vec<Span> = Vec::new();
    let mut per_tagger: Vec<(String, GroupedSpans)> = Vec::new();
    let mut buf = Vec::with_capacity(1 << 16);
    let mut pending_docs = 0u64;
    let mut pending_bytes = 0u64;
    let mut reported_bad = 0u64;
    let path = reader.path().to_string();
    loop {
        let (line, line_no) = match reader.next_line()? {
            None => break,
            Some(Line::Text(t, n)) => (t, n),
            Some(Line::Bad(e)) => {
                if !opts.skip_bad_lines {
                    return Err(e.into());
                }
                stats.bad_lines += 1;
                if reported_bad < 10 {
                    tracing::warn!("skipping bad line {e}");
                    reported_bad += 1;
                }
                continue;
            }
        };
        if line.trim().is_empty() {
            // dolma would fail on a blank line; we skip it but count it as bad input.
            if !opts.skip_bad_lines {
                bail!(
                    "{}:{line_no}: empty line (use --skip-bad-lines to skip)",
                    path
                );
            }
            stats.bad_lines += 1;
            continue;
        }
        let doc: InputDoc = match serde_json::from_str(line) {
            Ok(d) => d,
            Err(e) => {
                let problem = explain_bad_document(line, &e);
                if !opts.skip_bad_lines {
                    bail!("{}:{line_no}: {problem}", path);
                }
                stats.bad_lines += 1;
                if reported_bad < 10 {
                    tracing::warn!("skipping bad line {}:{line_no}: {problem}", path);
                    reported_bad += 1;
                }
                continue;
            }
        };
        let metadata: Option<serde_json::Value> = match (needs_metadata, doc.metadata) {
            (true, Some(raw)) => Some(serde_json::from_str(raw.get()).with_context(|| {
                format!("{}:{line_no}: field `metadata` is not valid JSON", path)
            })?),
            _ => None,
        };
        let source = doc.source.as_deref().unwrap_or("");
        let document = Document::new(&doc.id, &doc.text)
            .with_source(source)
            .with_metadata(metadata.as_ref());
        for (g, group) in groups.iter().enumerate() {
            per_tagger.clear();
            for (name, tagger) in &group.taggers {
                spans.clear();
                tagger.predict(&document, &mut spans);
                let mut grouped = GroupedSpans::new();
                group_spans(&spans, &mut grouped);
                per_tagger.push((
                    format!("{}__{}__", group.exp, make_variable_name(name)),
                    grouped,
                ));
            }
            buf.clear();
            write_attribute_line(&mut buf, &doc.id, source, &per_tagger);
            writers[g]
                .write_all(&buf)
                .with_context(|| format!("cannot write {}", task.outputs[g].display()))?;
        }
        stats.docs += 1;
        stats.text_bytes += doc.text.len() as u64;
        pending_docs += 1;
        pending_bytes += doc.text.len() as u64;
        if pending_docs == 256 {
            progress.add(pending_docs, pending_bytes);
            pending_docs = 0;
            pending_bytes = 0;
        }
    }
    progress.add(pending_docs, pending_bytes);
    if stats.docs == 0 && stats.bad_lines == 0 {
        tracing::warn!("{}: no documents (empty file)", path);
    }
    if stats.bad_lines > reported_bad {
        tracing::warn!("{}: {} bad lines skipped in all", path, stats.bad_lines);
    }
    for w in writers {
        w.finish()?;
    }
    Ok(stats)
}

pub fn run(cfg: TagConfig) -> Result<()> {
    if cfg.taggers.is_empty() {
        bail!("no taggers given (set `taggers`; `dolma list` shows them)");
    }
    if cfg
        .tagger_modules
        .as_ref()
        .is_some_and(|m| !m.is_null() && m != &serde_json::json!([]))
    {
        bail!("`tagger_modules` (Python tagger plugins) is not supported; taggers are built in (see `dolma list`)");
    }
    for name in cfg.tagger_options.keys() {
        if !cfg.taggers.contains(name) {
            bail!(
                "`tagger_options.{name}` is set but `{name}` is not in `taggers` ({})",
                cfg.taggers.join(", ")
            );
        }
    }
    let mut seen = std::collections::HashSet::new();
    for t in &cfg.taggers {
        if !seen.insert(t) {
            bail!("tagger `{t}` is listed twice");
        }
    }

    let build = |name: &str| -> Result<Box<dyn Tagger>> {
        let opts: TaggerOptions = match cfg.tagger_options.get(name) {
            None | Some(serde_json::Value::Null) => TaggerOptions::new(),
            Some(serde_json::Value::Object(m)) => m.clone(),
            Some(other) => bail!("`tagger_options.{name}` must be a mapping, got {other}"),
        };
        build_tagger(name, &opts)
    };
    let groups: Vec<Group> = match &cfg.experiment {
        Some(exp) => vec![Group {
            exp: make_variable_name(exp),
            taggers: cfg
                .taggers
                .iter()
                .map(|n| Ok((n.clone(), build(n)?)))
                .collect::<Result<_>>()?,
            dest: destinations(&cfg, exp)?,
        }],
        None => cfg
            .taggers
            .iter()
            .map(|n| {
                Ok(Group {
                    exp: make_variable_name(n),
                    taggers: vec![(n.clone(), build(n)?)],
                    dest: destinations(&cfg, n)?,
                })
            })
            .collect::<Result<_>>()?,
    };
    if cfg.experiment.is_none() && cfg.destination.is_some() && groups.len() > 1 {
        bail!(
            "with several taggers and no `experiment`, each tagger needs its own directory: \
             set `experiment` to write them together under `destination`, or drop `destination`"
        );
    }

    let mut inputs = expand_inputs(&cfg.documents)?;
    let shard = match &cfg.shard {
        Some(s) => Some(Shard::parse(s)?),
        None => Shard::from_slurm()?,
    };
    let total_files = inputs.len();
    if let Some(s) = shard {
        inputs = s.select(inputs);
        tracing::info!(
            "shard {}/{}: {} of {total_files} files",
            s.index,
            s.count,
            inputs.len()
        );
    }
    let tasks: Vec<Task> = inputs
        .into_iter()
        .map(|input| {
            let outputs = groups
                .iter()
                .map(|g| g.dest[input.pattern].join(&input.relative))
                .collect();
            Task { input, outputs }
        })
        .collect();
    for t in &tasks {
        if t.outputs.iter().any(|o| o == &t.input.path) {
            bail!(
                "output {} would overwrite its input",
                t.input.path.display()
            );
        }
    }
    if cfg.dryrun {
        for t in &tasks {
            println!(
                "{} -> {}",
                t.input.path.display(),
                t.outputs
                    .iter()
                    .map(|o| o.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        return Ok(());
    }

    let opts = RunOptions::new(
        cfg.processes,
        cfg.ignore_existing,
        cfg.skip_bad_lines,
        cfg.max_line_bytes,
        cfg.progress,
    );
    let summary = runner::run("tag", tasks, &opts, |_, task, progress| {
        tag_file(task, &groups, &opts, progress)
    })?;
    let s = &summary.stats;
    eprintln!(
        "tag: {} files done, {} skipped as already tagged; {} docs ({} bad lines skipped) in {:.1}s: {:.0} docs/s, {:.1} MB/s of text; taggers: {}",
        summary.files_done,
        summary.files_skipped,
        s.docs,
        s.bad_lines,
        summary.elapsed.as_secs_f64(),
        summary.docs_per_sec(),
        summary.mb_per_sec(),
        cfg.taggers.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_paths_mirror_documents() {
        assert_eq!(
            attributes_dir(Path::new("/d/documents/src"), "exp").unwrap(),
            PathBuf::from("/d/attributes/exp/src")
        );
        assert!(attributes_dir(Path::new("/d/docs"), "exp")
            .unwrap_err()
            .to_string()
            .contains("destination"));
    }

    #[test]
    fn attribute_line_format() {
        let mut buf = Vec::new();
        let attrs = vec![(
            "e__t__".to_string(),
            vec![("length".to_string(), vec![(0, 3, 3.0)])],
        )];
        write_attribute_line(&mut buf, "a\"b", "src", &attrs);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "{\"id\":\"a\\\"b\",\"attributes\":{\"e__t__length\":[[0,3,3.0]]},\"source\":\"src\"}\n"
        );
    }

    #[test]
    fn bad_documents_are_explained() {
        let e = serde_json::from_str::<InputDoc>("{}").err().unwrap();
        assert_eq!(
            explain_bad_document("{\"id\":\"1\"}", &e),
            "missing field `text`"
        );
        assert_eq!(
            explain_bad_document("{\"id\":1,\"text\":\"\"}", &e),
            "field `id` must be a string, got 1"
        );
        assert!(explain_bad_document("{\"id\":", &e).starts_with("malformed JSON"));
        assert!(explain_bad_document("[1]", &e).contains("must be a JSON object"));
    }
}
