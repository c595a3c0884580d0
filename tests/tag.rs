//! End-to-end tests of `dolma tag`: parity with dolma 1.2.1, bad input, resume, sharding,
//! determinism. They run the built `dolma` binary on files the repository commits.

mod common;

use common::*;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const GOLDEN_TAGGERS: &[&str] = &[
    "char_length_v1",
    "char_length_with_paragraphs_v1",
    "whitespace_tokenizer_v1",
    "uniseg_length_paragraphs_v1",
    "gopher_v1",
    "c4_v1",
    "c4_v2",
    "pii_regex_v2",
    "pii_regex_with_counts_fast_v2",
    "repetitions_v1",
    "not_alphanum_paragraph_v1",
    "ft_lang_id_en_doc_v2",
    "ft_lang_id_doc_v1",
    "ft_lang_id_en_paragraph_v2",
];

/// The golden attributes under tests/data/golden were written by dolma 1.2.1 itself
/// (`dolma tag --taggers <all above>`, lid.176 in its cache) on the golden documents: 84
/// documents from every sample source plus hand-made edge cases.
#[test]
fn attributes_match_dolma_reference() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(
        &repo().join("tests/data/golden/documents"),
        &tmp.path().join("documents"),
    );
    let pattern = format!("{}/documents/*/*.gz", tmp.path().display());
    let mut args = vec![
        "tag",
        "--documents",
        &pattern,
        "--processes",
        "2",
        "--no-progress",
        "--taggers",
    ];
    args.extend_from_slice(GOLDEN_TAGGERS);
    let model = repo().join("tests/data/models/lid.176.ftz");
    let out = Command::new(env!("CARGO_BIN_EXE_dolma"))
        .args(&args)
        .env("DOLMA_FASTTEXT_LID_MODEL", &model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    for tagger in GOLDEN_TAGGERS {
        let rel = format!("{tagger}/mixed/mixed-0000.json.gz");
        let theirs = read_gz_lines(&repo().join("tests/data/golden/attributes").join(&rel));
        let ours = read_gz_lines(&tmp.path().join("attributes").join(&rel));
        assert_eq!(ours.len(), theirs.len(), "{tagger}: line count");
        let (mut agree, mut total) = (0usize, 0usize);
        for (o, t) in ours.iter().zip(&theirs) {
            assert_eq!(o["id"], t["id"], "{tagger}: order of lines");
            assert_eq!(o["source"], t["source"]);
            let (oa, ta) = (
                o["attributes"].as_object().unwrap(),
                t["attributes"].as_object().unwrap(),
            );
            let keys: std::collections::BTreeSet<&String> = oa.keys().chain(ta.keys()).collect();
            for k in keys {
                let empty = Vec::new();
                let ov = oa.get(k).and_then(Value::as_array).unwrap_or(&empty);
                let tv = ta.get(k).and_then(Value::as_array).unwrap_or(&empty);
                total += ov.len().max(tv.len());
                agree += ov
                    .iter()
                    .zip(tv)
                    .filter(|(a, b)| {
                        a[0] == b[0]
                            && a[1] == b[1]
                            && (a[2].as_f64().unwrap() - b[2].as_f64().unwrap()).abs() <= 1e-4
                    })
                    .count();
            }
        }
        let frac = agree as f64 / total as f64;
        assert!(total > 0, "{tagger}: no values");
        assert!(
            frac >= 0.99,
            "{tagger}: only {agree}/{total} values agree with dolma"
        );
    }
}

fn one_file_corpus(dir: &Path, body: &[u8]) -> String {
    write_gz(&dir.join("documents/src/part-0.jsonl.gz"), body);
    format!("{}/documents/src/*.gz", dir.display())
}

#[test]
fn malformed_lines_are_errors_naming_file_line_and_problem() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":\"b\",\"text\":\n",
            "part-0.jsonl.gz:2: malformed JSON",
        ),
        (
            b"{\"id\":\"a\"}\n",
            "part-0.jsonl.gz:1: missing field `text`",
        ),
        (
            b"{\"id\":7,\"text\":\"x\"}\n",
            "part-0.jsonl.gz:1: field `id` must be a string",
        ),
        (
            b"{\"id\":\"a\",\"text\":\"ok\"}\n{\"id\":\"b\",\"text\":\"\xff\"}\n",
            "part-0.jsonl.gz:2: invalid UTF-8",
        ),
        (
            b"[1,2]\n",
            "part-0.jsonl.gz:1: a document must be a JSON object",
        ),
    ];
    for (body, expected) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let pattern = one_file_corpus(tmp.path(), body);
        let out = dolma(&[
            "tag",
            "--documents",
            &pattern,
            "--taggers",
            "char_length_v1",
            "--no-progress",
        ]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(expected),
            "want `{expected}` in:\n{}",
            stderr(&out)
        );
        // nothing half-written is left under the final name
        assert!(!tmp
            .path()
            .join("attributes/char_length_v1/src/part-0.jsonl.gz")
            .exists());
    }
}

#[test]
fn skip_bad_lines_counts_and_keeps_good_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let body = b"{\"id\":\"a\",\"text\":\"one\"}\nnot json\n{\"id\":\"b\"}\n{\"id\":\"c\",\"text\":\"three\"}\n";
    let pattern = one_file_corpus(tmp.path(), body);
    let out = dolma(&[
        "tag",
        "--documents",
        &pattern,
        "--taggers",
        "char_length_v1",
        "--skip-bad-lines",
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("part-0.jsonl.gz:2") && err.contains("part-0.jsonl.gz:3"),
        "{err}"
    );
    assert!(err.contains("2 docs (2 bad lines skipped)"), "{err}");
    let lines = read_gz_lines(
        &tmp.path()
            .join("attributes/char_length_v1/src/part-0.jsonl.gz"),
    );
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["a", "c"]);
}

#[test]
fn truncated_gzip_empty_file_and_huge_document() {
    let tmp = tempfile::tempdir().unwrap();
    // truncated gzip
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for i in 0..5000 {
        writeln!(
            e,
            "{{\"id\":\"{i}\",\"text\":\"document number {i} with some words\"}}"
        )
        .unwrap();
    }
    let bytes = e.finish().unwrap();
    let dir = tmp.path().join("t");
    std::fs::create_dir_all(dir.join("documents")).unwrap();
    std::fs::write(
        dir.join("documents/cut.jsonl.gz"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let pattern = format!("{}/documents/*.gz", dir.display());
    let out = dolma(&[
        "tag",
        "--documents",
        &pattern,
        "--taggers",
        "char_length_v1",
        "--no-progress",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cut.jsonl.gz: read failed after line"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("attributes/char_length_v1/cut.jsonl.gz").exists());

    // empty file: fine, with an empty attribute file and a warning
    let dir = tmp.path().join("e");
    std::fs::create_dir_all(dir.join("documents")).unwrap();
    std::fs::write(dir.join("documents/empty.jsonl"), b"").unwrap();
    let pattern = format!("{}/documents/*.jsonl", dir.display());
    let out = dolma(&[
        "tag",
        "--documents",
        &pattern,
        "--taggers",
        "char_length_v1",
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("no documents"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(dir.join("attributes/char_length_v1/empty.jsonl")).unwrap(),
        b""
    );

    // a document over --max-line-bytes
    let dir = tmp.path().join("h");
    let big = format!("{{\"id\":\"big\",\"text\":\"{}\"}}\n", "x".repeat(5000));
    let pattern = one_file_corpus(&dir, big.as_bytes());
    let out = dolma(&[
        "tag",
        "--documents",
        &pattern,
        "--taggers",
        "char_length_v1",
        "--max-line-bytes",
        "1000",
        "--no-progress",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("part-0.jsonl.gz:1: line longer than the 1000 byte limit"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_tagger_and_options_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = one_file_corpus(tmp.path(), b"{\"id\":\"a\",\"text\":\"x\"}\n");
    let out = dolma(&["tag", "--documents", &pattern, "--taggers", "gopher_v7"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown tagger `gopher_v7`"),
        "{}",
        stderr(&out)
    );
    let out = dolma(&[
        "tag",
        "--documents",
        &pattern,
        "--taggers",
        "char_length_v1",
        "--procesess",
        "2",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown field `procesess`"),
        "{}",
        stderr(&out)
    );
    let out = dolma(&[
        "tag",
        "--documents",
        &pattern,
        "--taggers",
        "ft_lang_id_en_doc_v2",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("model_path"), "{}", stderr(&out));
    assert!(!tmp.path().join("attributes").exists());
}

fn sample_copy(dst: &Path) -> String {
    copy_dir(&repo().join("tests/data/sample/documents"), &{
        std::fs::create_dir_all(dst.join("documents")).unwrap();
        dst.join("documents")
    });
    format!("{}/documents/*/*.gz", dst.display())
}

const TAGGERS: &[&str] = &[
    "char_length_v1",
    "gopher_v1",
    "pii_regex_with_counts_fast_v2",
    "random_number_v1",
];

fn tag_args<'a>(pattern: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "tag",
        "--documents",
        pattern,
        "--experiment",
        "e",
        "--no-progress",
    ];
    a.extend_from_slice(extra);
    a.push("--taggers");
    a.extend_from_slice(TAGGERS);
    a
}

#[test]
fn outputs_are_identical_whatever_the_thread_count_and_resume_after_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let pattern = sample_copy(&one);
    let out = dolma(&tag_args(&pattern, &["--processes", "1"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let reference = files_under(&one.join("attributes"));
    assert_eq!(reference.len(), 7);

    let two = tmp.path().join("two");
    let pattern2 = sample_copy(&two);
    let out = dolma(&tag_args(&pattern2, &["--processes", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_tree(
        &files_under(&two.join("attributes")),
        &reference,
        "2 threads vs 1",
    );

    // Kill a run part-way, then rerun the same command: same bytes as uninterrupted.
    let killed = tmp.path().join("killed");
    let pattern3 = sample_copy(&killed);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dolma"))
        .args(tag_args(&pattern3, &["--processes", "1"]))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let _ = child.kill();
    let _ = child.wait();
    // Whatever the kill left, a stale partial file must not survive the rerun.
    let stale = killed.join("attributes/e/fortunes/fortunes-0000.json.gz.tmp");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"partial garbage").unwrap();
    let out = dolma(&tag_args(&pattern3, &["--processes", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_tree(
        &files_under(&killed.join("attributes")),
        &reference,
        "resumed after kill",
    );

    // A third run skips everything and changes nothing.
    let out = dolma(&tag_args(&pattern3, &["--processes", "2"]));
    assert!(
        stderr(&out).contains("7 of 7 files already have outputs"),
        "{}",
        stderr(&out)
    );
    assert_same_tree(
        &files_under(&killed.join("attributes")),
        &reference,
        "third run",
    );
}

#[test]
fn shards_cover_every_file_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = sample_copy(tmp.path());
    let mut seen: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for i in 0..3 {
        let dest = tmp.path().join(format!("shard{i}"));
        let dest_s = dest.display().to_string();
        let shard = format!("{i}/3");
        let out = dolma(&[
            "tag",
            "--documents",
            &pattern,
            "--taggers",
            "char_length_v1",
            "--experiment",
            "e",
            "--destination",
            &dest_s,
            "--shard",
            &shard,
            "--no-progress",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        for f in files_under(&dest).keys() {
            *seen.entry(f.clone()).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert!(seen.values().all(|&c| c == 1), "{seen:?}");

    // Slurm job-array variables select the same shards.
    let dest = tmp.path().join("slurm");
    let dest_s = dest.display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_dolma"))
        .args([
            "tag",
            "--documents",
            &pattern,
            "--taggers",
            "char_length_v1",
            "--experiment",
            "e",
            "--destination",
            &dest_s,
            "--no-progress",
        ])
        .env("SLURM_ARRAY_TASK_ID", "2")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        files_under(&dest).keys().collect::<Vec<_>>(),
        files_under(&tmp.path().join("shard2"))
            .keys()
            .collect::<Vec<_>>()
    );
}

#[test]
fn yaml_config_with_command_line_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = one_file_corpus(tmp.path(), b"{\"id\":\"a\",\"text\":\"hello world\",\"source\":\"s\",\"metadata\":{\"url\":\"https://ads.bad.test/x\"}}\n{\"id\":\"b\",\"text\":\"fine\",\"source\":\"s\",\"metadata\":{\"url\":\"https://good.test/\"}}\n");
    let list = tmp.path().join("block.txt");
    std::fs::write(&list, "# list\nbad.test\n").unwrap();
    let cfg = tmp.path().join("tag.yaml");
    std::fs::write(
        &cfg,
        format!(
            "documents:\n  - {pattern}\ntaggers:\n  - char_length_v1\n  - domain_blocklist_v1\nexperiment: qual\nprocesses: 1\n\
             tagger_options:\n  domain_blocklist_v1:\n    blocklist: {}\n",
            list.display()
        ),
    )
    .unwrap();
    let cfg_s = cfg.display().to_string();
    let out = dolma(&["-c", &cfg_s, "tag", "--experiment", "q2", "--no-progress"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = read_gz_lines(&tmp.path().join("attributes/q2/src/part-0.jsonl.gz"));
    assert_eq!(
        lines[0]["attributes"]["q2__char_length_v1__length"],
        serde_json::json!([[0, 11, 11.0]])
    );
    assert_eq!(
        lines[0]["attributes"]["q2__domain_blocklist_v1__url"],
        serde_json::json!([[0, 11, 1.0]])
    );
    assert!(lines[1]["attributes"]
        .get("q2__domain_blocklist_v1__url")
        .is_none());
    assert_eq!(lines[1]["source"], "s");
}

#[test]
fn list_prints_every_tagger() {
    let out = dolma(&["list"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for name in GOLDEN_TAGGERS.iter().chain(
        [
            "whatlang_doc_v1",
            "fasttext_classifier_v1",
            "url_blocklist_v1",
        ]
        .iter(),
    ) {
        assert!(s.contains(name), "{name} missing from `dolma list`");
    }
}
