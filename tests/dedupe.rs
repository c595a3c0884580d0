//! End-to-end tests of `dolma dedupe`: parity with dolma 1.2.1's paragraph dedupe, exact
//! document duplicates, determinism across thread counts, resume, decontamination, bad input.

mod common;

use common::*;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn sample(dir: &Path) -> String {
    copy_dir(
        &repo().join("tests/data/sample/documents"),
        &dir.join("documents"),
    );
    format!("{}/documents/*/*.gz", dir.display())
}

fn para_args<'a>(pattern: &'a str, filter: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "dedupe",
        "--documents",
        pattern,
        "--dedupe.name",
        "para_dedupe",
        "--dedupe.paragraphs.attribute_name",
        "bff_duplicate_paragraph_spans",
        "--bloom_filter.file",
        filter,
        "--bloom_filter.estimated_doc_count",
        "1000000",
        "--bloom_filter.desired_false_positive_rate",
        "1e-6",
        "--no-progress",
    ];
    a.extend_from_slice(extra);
    a
}

/// tests/data/golden/dedupe was written by dolma 1.2.1's deduper (`--processes 1`) on the
/// sample corpus. dolma's paragraph offsets mix bytes and characters, so on non-ASCII text its
/// last span ends past the text; that bug is fixed here, and the comparison clamps dolma's
/// spans to the text length.
#[test]
fn paragraph_spans_match_dolma_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = sample(tmp.path());
    let filter = tmp.path().join("filter.bin").display().to_string();
    let out = dolma(&para_args(&pattern, &filter, &["--processes", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let golden = repo().join("tests/data/golden/dedupe/para_dedupe");
    let (mut both, mut either) = (0usize, 0usize);
    for source in std::fs::read_dir(&golden).unwrap() {
        let source = source.unwrap().file_name();
        let name = format!("{}-0000.json.gz", source.to_string_lossy());
        let theirs = read_gz_lines(&golden.join(&source).join(&name));
        let ours = read_gz_lines(
            &tmp.path()
                .join("attributes/para_dedupe")
                .join(&source)
                .join(&name),
        );
        let docs = read_gz_lines(&tmp.path().join("documents").join(&source).join(&name));
        assert_eq!(ours.len(), theirs.len());
        for ((o, t), d) in ours.iter().zip(&theirs).zip(&docs) {
            assert_eq!(o["id"], t["id"]);
            let n = d["text"].as_str().unwrap().chars().count() as u64;
            let spans = |v: &Value, clamp: bool| -> HashSet<(u64, u64)> {
                v["attributes"]["bff_duplicate_paragraph_spans"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| {
                                let end = s[1].as_u64().unwrap();
                                (s[0].as_u64().unwrap(), if clamp { end.min(n) } else { end })
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let (so, st) = (spans(o, false), spans(t, true));
            assert!(
                so.iter().all(|&(_, e)| e <= n),
                "our span past the end of {}",
                o["id"]
            );
            both += so.intersection(&st).count();
            either += so.union(&st).count();
        }
    }
    assert!(
        either > 10_000,
        "the sample has many duplicate paragraphs: {either}"
    );
    let agreement = both as f64 / either as f64;
    assert!(
        agreement >= 0.999,
        "agreement {agreement} ({both}/{either})"
    );
}

#[test]
fn document_mode_finds_exactly_the_exact_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = sample(tmp.path());
    let filter = tmp.path().join("doc.bin").display().to_string();
    let out = dolma(&[
        "dedupe",
        "--documents",
        &pattern,
        "--dedupe.name",
        "dd",
        "--dedupe.documents.attribute_name",
        "dup",
        "--dedupe.documents.key",
        "$.text",
        "--bloom_filter.file",
        &filter,
        "--bloom_filter.size_in_bytes",
        "1048576",
        "--bloom_filter.estimated_doc_count",
        "10000",
        "--processes",
        "2",
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Count by hash: every text after its first occurrence (file order, line order) is a duplicate.
    let mut files: Vec<PathBuf> = std::fs::read_dir(tmp.path().join("documents"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut seen = HashSet::new();
    let (mut expected, mut marked) = (0, 0);
    for dir in files {
        let name = format!(
            "{}-0000.json.gz",
            dir.file_name().unwrap().to_string_lossy()
        );
        let docs = read_gz_lines(&dir.join(&name));
        let attrs = read_gz_lines(
            &tmp.path()
                .join("attributes/dd")
                .join(dir.file_name().unwrap())
                .join(&name),
        );
        for (d, a) in docs.iter().zip(&attrs) {
            let text = d["text"].as_str().unwrap();
            let is_dup = !seen.insert(text.to_string());
            let got = a["attributes"]
                .get("dup")
                .is_some_and(|v| !v.as_array().unwrap().is_empty());
            assert_eq!(got, is_dup, "{}", d["id"]);
            if is_dup {
                expected += 1;
                assert_eq!(
                    a["attributes"]["dup"][0][1].as_u64().unwrap(),
                    text.chars().count() as u64
                );
            }
            marked += got as usize;
        }
    }
    assert!(expected > 0, "the sample has exact duplicates");
    assert_eq!(marked, expected);
}

#[test]
fn same_bytes_whatever_the_thread_count_and_resume_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, procs: &str| -> (PathBuf, String) {
        let dir = tmp.path().join(name);
        let pattern = sample(&dir);
        let filter = dir.join("filter.bin").display().to_string();
        let out = dolma(&para_args(&pattern, &filter, &["--processes", procs]));
        assert!(out.status.success(), "{}", stderr(&out));
        (dir, pattern)
    };
    let (one, _) = run("one", "1");
    let reference = files_under(&one.join("attributes"));
    assert_eq!(reference.len(), 7);
    let (two, pattern) = run("two", "2");
    assert!(
        files_under(&two.join("attributes")) == reference,
        "2 threads changed the output"
    );

    // A crash after some files: their outputs exist but the filter was never saved.
    let filter = two.join("filter.bin");
    std::fs::remove_file(&filter).unwrap();
    for f in [
        "nlp-corpus/nlp-corpus-0000.json.gz",
        "python-docs/python-docs-0000.json.gz",
    ] {
        std::fs::remove_file(two.join("attributes/para_dedupe").join(f)).unwrap();
    }
    let filter_s = filter.display().to_string();
    let out = dolma(&para_args(&pattern, &filter_s, &["--processes", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("5 re-read to restore the filter"),
        "{}",
        stderr(&out)
    );
    assert!(
        files_under(&two.join("attributes")) == reference,
        "resumed run differs"
    );

    // Rerun with the saved filter: nothing to do, nothing marked anew.
    let out = dolma(&para_args(&pattern, &filter_s, &["--processes", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("7 files already deduped"),
        "{}",
        stderr(&out)
    );
    assert!(files_under(&two.join("attributes")) == reference);

    // The filter holds a file's keys but its output is gone: refuse instead of marking all.
    std::fs::remove_file(two.join("attributes/para_dedupe/fortunes/fortunes-0000.json.gz"))
        .unwrap();
    let out = dolma(&para_args(&pattern, &filter_s, &["--processes", "2"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already holds the keys of"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn read_only_filter_from_eval_questions_flags_only_contaminated_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let questions: Vec<String> =
        std::fs::read_to_string(repo().join("tests/data/eval/arc_easy_sample.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["question"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
    // The eval set as Dolma documents, one question per paragraph.
    let eval_docs: Vec<Value> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({"id": format!("q{i}"), "text": q, "source": "arc"}))
        .collect();
    write_gz_lines(
        &tmp.path().join("eval/documents/arc/q.jsonl.gz"),
        &eval_docs,
    );
    let filter = tmp.path().join("eval.bin").display().to_string();
    let eval_pattern = format!("{}/eval/documents/*/*.gz", tmp.path().display());
    let out = dolma(&para_args(&eval_pattern, &filter, &["--processes", "1"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let filter_bytes = std::fs::read(&filter).unwrap();

    // A corpus: the sample, plus documents quoting some questions among other text.
    let pattern = sample(&tmp.path().join("corpus"));
    let mut planted = Vec::new();
    let mut contaminated = HashSet::new();
    for (i, q) in questions.iter().enumerate().step_by(7) {
        let id = format!("leak{i}");
        planted.push(serde_json::json!({"id": id, "text": format!("Some intro.\n{q}\nAnd an outro.\n"), "source": "web"}));
        contaminated.insert(id);
    }
    planted.push(serde_json::json!({"id": "near", "text": format!("{} (paraphrased)\n", questions[1]), "source": "web"}));
    write_gz_lines(
        &tmp.path().join("corpus/documents/web/web-0000.json.gz"),
        &planted,
    );
    let out = dolma(&[
        "dedupe",
        "--documents",
        &pattern,
        &format!("{}/corpus/documents/web/*.gz", tmp.path().display()),
        "--dedupe.name",
        "decon",
        "--dedupe.paragraphs.attribute_name",
        "eval_overlap",
        "--bloom_filter.file",
        &filter,
        "--bloom_filter.read_only",
        "true",
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&filter).unwrap(),
        filter_bytes,
        "a read-only filter must not change"
    );

    let mut flagged = HashSet::new();
    for (path, _) in files_under(&tmp.path().join("corpus/attributes/decon")) {
        for l in read_gz_lines(&tmp.path().join("corpus/attributes/decon").join(path)) {
            if !l["attributes"]["eval_overlap"]
                .as_array()
                .unwrap()
                .is_empty()
            {
                flagged.insert(l["id"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(flagged, contaminated);
    // The flagged span is the question's paragraph.
    let web = read_gz_lines(
        &tmp.path()
            .join("corpus/attributes/decon/web/web-0000.json.gz"),
    );
    let span = &web[0]["attributes"]["eval_overlap"][0];
    assert_eq!(span[0], 12);
    assert_eq!(
        span[1].as_u64().unwrap(),
        12 + questions[0].chars().count() as u64 + 1
    );
}

#[test]
fn configuration_and_path_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs/x.jsonl");
    std::fs::create_dir_all(docs.parent().unwrap()).unwrap();
    std::fs::write(&docs, "{\"id\":\"a\",\"text\":\"x\"}\n").unwrap();
    let pattern = docs.display().to_string();
    let filter = tmp.path().join("f.bin").display().to_string();
    let out = dolma(&para_args(&pattern, &filter, &[]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no `/documents/` directory"),
        "{}",
        stderr(&out)
    );
    assert!(!Path::new(&filter).exists());

    let good = tmp.path().join("documents/x.jsonl");
    std::fs::create_dir_all(good.parent().unwrap()).unwrap();
    std::fs::write(&good, "{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":\"b\"}\n").unwrap();
    let pattern = good.display().to_string();
    let out = dolma(&para_args(&pattern, &filter, &[]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("x.jsonl:2") && stderr(&out).contains("missing field `text`"),
        "{}",
        stderr(&out)
    );

    let out = dolma(&[
        "dedupe",
        "--documents",
        &pattern,
        "--dedupe.documents.attribute_name",
        "d",
        "--dedupe.documents.key",
        "$.metadata.url",
        "--bloom_filter.file",
        &filter,
        "--bloom_filter.size_in_bytes",
        "1024",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("key `$.metadata.url` not found"),
        "{}",
        stderr(&out)
    );

    let out = dolma(&[
        "dedupe",
        "--documents",
        &pattern,
        "--bloom_filter.file",
        &filter,
        "--bloom_filter.size_in_bytes",
        "1024",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("missing field `dedupe`"),
        "{}",
        stderr(&out)
    );
}
