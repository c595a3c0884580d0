//! End-to-end tests of `dolma mix`: parity with dolma 1.2.1's mixer in both filter syntaxes,
//! sampling and upsampling, shard bounds and names, resume, and bad configurations.

mod common;

use common::*;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn files_under(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            out.insert(
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            );
        }
    }
    out
}

fn docs_in(dir: &Path) -> Vec<Value> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    names.sort();
    names.iter().flat_map(|p| read_gz_lines(p)).collect()
}

/// The golden outputs were written by dolma 1.2.1's mixer with the configs beside them
/// (tests/data/golden/mix/*.yaml) over the golden documents and dolma-made attributes.
#[test]
fn outputs_match_dolma_mixer_in_both_syntaxes() {
    for syntax in ["jsonpath", "jq"] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(
            &repo().join("tests/data/golden/documents"),
            &tmp.path().join("documents"),
        );
        copy_dir(
            &repo().join("tests/data/golden/attributes"),
            &tmp.path().join("attributes"),
        );
        let cfg = std::fs::read_to_string(
            repo().join(format!("tests/data/golden/mix/mix_{syntax}.yaml")),
        )
        .unwrap()
        .replace("/tmp/gm", &tmp.path().display().to_string());
        let cfg_path = tmp.path().join("mix.yaml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let out = dolma(&["-c", cfg_path.to_str().unwrap(), "mix", "--no-progress"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out_dir = tmp.path().join(format!("out_{syntax}"));
        let ours = docs_in(&out_dir);
        let theirs =
            read_gz_lines(&repo().join(format!("tests/data/golden/mix/{syntax}-0000.json.gz")));
        let key = |d: &Value| {
            (
                d["id"].as_str().unwrap().to_string(),
                d["text"].as_str().unwrap().to_string(),
            )
        };
        let mut a: Vec<_> = ours.iter().map(key).collect();
        let mut b: Vec<_> = theirs.iter().map(key).collect();
        a.sort();
        b.sort();
        assert_eq!(a.len(), 55, "{syntax}");
        assert!(a == b, "{syntax}: output documents differ from dolma's");
        // span replacement happened (the `{}` form is covered by the unit tests)
        assert!(
            a.iter().any(|(_, t)| t.contains("|||EMAIL_ADDRESS|||")),
            "{syntax}"
        );
        // provenance as dolma writes it
        assert_eq!(
            ours[0]["metadata"]["provenance"],
            theirs[0]["metadata"]["provenance"]
        );
        let report: Value = serde_json::from_str(
            &std::fs::read_to_string(out_dir.join(format!(
                "{}.report.json",
                if syntax == "jq" { "goldenjq" } else { "golden" }
            )))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(report["docs_in"], 92);
        assert_eq!(report["docs_kept"], 55);
        assert_eq!(report["removed"]["not included"], 29);
        assert_eq!(report["complete"], true);
    }
}

fn sample_corpus(dir: &Path) -> String {
    copy_dir(
        &repo().join("tests/data/sample/documents"),
        &dir.join("documents"),
    );
    format!("{}/documents/*/*.gz", dir.display())
}

fn write_cfg(dir: &Path, body: &str) -> String {
    let p = dir.join("mix.yaml");
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

#[test]
fn sampling_and_upsampling_are_reproducible_and_near_their_rates() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = sample_corpus(tmp.path());
    let out = tmp.path().join("out");
    let cfg = write_cfg(
        tmp.path(),
        &format!(
            "streams:\n  - name: s\n    documents: ['{pattern}']\n    sample: 0.25\n    seed: 3\n    output:\n      path: {}/a\n\
             \x20 - name: u\n    documents: ['{pattern}']\n    upsample: 2.5\n    output:\n      path: {}/b\nprocesses: 2\n",
            out.display(),
            out.display()
        ),
    );
    let run = || {
        let o = dolma(&["-c", &cfg, "mix", "--no-progress"]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    run();
    let first = (files_under(&out.join("a")), files_under(&out.join("b")));
    let sampled = docs_in(&out.join("a")).len() as i64;
    // 4150 docs at 0.25: mean 1037.5, sd ~27.9; six sigma
    assert!((sampled - 1038).abs() < 170, "{sampled}");
    let up = docs_in(&out.join("b"));
    let mut copies: HashMap<String, usize> = HashMap::new();
    for d in &up {
        *copies
            .entry(format!("{}\u{0}{}", d["source"], d["id"]))
            .or_default() += 1;
    }
    assert!(copies.values().all(|&c| c == 2 || c == 3));
    let thirds = copies.values().filter(|&&c| c == 3).count() as i64;
    assert!(
        (thirds - 2075).abs() < 200,
        "{thirds} of 4150 got a third copy"
    );
    // same config, fresh output: same bytes
    std::fs::remove_dir_all(&out).unwrap();
    run();
    assert!(
        (files_under(&out.join("a")), files_under(&out.join("b"))) == first,
        "not reproducible"
    );
}

#[test]
fn parts_are_bounded_consistently_named_and_resume_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = sample_corpus(tmp.path());
    let out = tmp.path().join("out");
    let cfg = write_cfg(
        tmp.path(),
        &format!(
            "streams:\n  - name: web\n    documents: ['{pattern}']\n    output:\n      path: {}\n      max_size_in_bytes: 500000\n",
            out.display()
        ),
    );
    let o = dolma(&["-c", &cfg, "mix", "--no-progress", "--processes", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = files_under(&out);
    let parts: Vec<&String> = reference
        .keys()
        .filter(|k| k.ends_with(".jsonl.gz"))
        .collect();
    assert!(parts.len() > 5, "{parts:?}");
    for p in &parts {
        let (name, rest) = p.split_once('-').unwrap();
        assert_eq!(name, "web");
        assert!(rest.len() == "0000-0000.jsonl.gz".len(), "{p}");
        let uncompressed: usize = read_gz_lines(&out.join(p))
            .iter()
            .map(|d| d.to_string().len() + 1)
            .sum();
        // each part holds at most one document past the bound
        assert!(uncompressed < 500_000 + 200_000, "{p}: {uncompressed}");
    }
    assert_eq!(docs_in(&out).len(), 4150);

    // Simulate a kill inside one group: its marker is missing and a part is half-written.
    let marker = reference
        .keys()
        .find(|k| k.starts_with(".web-0001"))
        .unwrap()
        .clone();
    std::fs::remove_file(out.join(&marker)).unwrap();
    std::fs::write(out.join("web-0001-0000.jsonl.gz"), b"garbage").unwrap();
    std::fs::write(out.join("web-0001-0007.jsonl.gz.tmp"), b"garbage").unwrap();
    let o = dolma(&["-c", &cfg, "mix", "--no-progress", "--processes", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        files_under(&out) == reference,
        "resumed mix differs from the uninterrupted one"
    );
}

#[test]
fn bad_configs_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = sample_corpus(tmp.path());
    let out = tmp.path().join("out");
    for (filter, expected) in [
        (
            "syntax: jq\n      include: ['.attributes.x | sum(']",
            "invalid jq filter",
        ),
        ("include: ['$.attributes[?(@.x <']", "invalid JSONPath"),
        (
            "syntax: xpath\n      include: ['x']",
            "unknown syntax `xpath`",
        ),
    ] {
        let cfg = write_cfg(
            tmp.path(),
            &format!(
                "streams:\n  - name: s\n    documents: ['{pattern}']\n    output:\n      path: {}\n    filter:\n      {filter}\n",
                out.display()
            ),
        );
        let o = dolma(&["-c", &cfg, "mix", "--no-progress"]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains(expected),
            "want {expected}: {}",
            stderr(&o)
        );
        assert!(!out.exists(), "work started despite a bad filter");
    }
}

#[test]
fn missing_attributes_are_reported_and_mismatched_ids_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(
        &repo().join("tests/data/golden/documents"),
        &tmp.path().join("documents"),
    );
    copy_dir(
        &repo().join("tests/data/golden/attributes"),
        &tmp.path().join("attributes"),
    );
    let pattern = format!("{}/documents/*/*.gz", tmp.path().display());
    let out = tmp.path().join("out");
    let cfg = write_cfg(
        tmp.path(),
        &format!(
            "streams:\n  - name: s\n    documents: ['{pattern}']\n    attributes: [gopher_v1]\n    output:\n      path: {}\n    filter:\n      exclude:\n        - \"$.attributes[?(@.gopher_v1__gopher_v1__most_common_2gram[0][2] > 0.1)]\"\n",
            out.display()
        ),
    );
    let o = dolma(&["-c", &cfg, "mix", "--no-progress"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("gopher_v1__gopher_v1__most_common_2gram") && err.contains("match nothing"),
        "{err}"
    );
    assert!(
        err.contains("gopher_v1__gopher_v1__fraction_of_characters_in_most_common_2grams"),
        "{err}"
    );

    // An attribute file out of step with its documents.
    let attr = tmp
        .path()
        .join("attributes/gopher_v1/mixed/mixed-0000.json.gz");
    let mut lines = read_gz_lines(&attr);
    lines.swap(3, 4);
    let mut e = flate2::write::GzEncoder::new(
        std::fs::File::create(&attr).unwrap(),
        flate2::Compression::fast(),
    );
    for l in &lines {
        writeln!(e, "{l}").unwrap();
    }
    e.finish().unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    let o = dolma(&["-c", &cfg, "mix", "--no-progress"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("mixed-0000.json.gz:4: id") && stderr(&o).contains("does not match"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn selector_replacements_and_curly_placeholder() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("documents/s/a.jsonl.gz");
    let attrs = tmp.path().join("attributes/pii/s/a.jsonl.gz");
    for (path, lines) in [
        (
            &docs,
            vec![serde_json::json!({"id": "1", "source": "web", "text": "mail bob@x.org now"})],
        ),
        (
            &attrs,
            vec![
                serde_json::json!({"id": "1", "attributes": {"email": [[5, 14, 1.0]], "low": [[0, 4, 0.1]]}}),
            ],
        ),
    ] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut e = flate2::write::GzEncoder::new(
            std::fs::File::create(path).unwrap(),
            flate2::Compression::fast(),
        );
        for l in lines {
            writeln!(e, "{l}").unwrap();
        }
        e.finish().unwrap();
    }
    for (syntax, span, replacement, expected) in [
        ("jsonpath", "$.attributes.email", "$.source", "mail web now"),
        ("jq", ".attributes.email", "$.source", "mail web now"),
        (
            "jsonpath",
            "$.attributes.email",
            "<{}>",
            "mail <bob@x.org> now",
        ),
    ] {
        let out = tmp
            .path()
            .join(format!("out-{syntax}-{}", replacement.len()));
        let cfg = write_cfg(
            tmp.path(),
            &format!(
                "streams:\n  - name: s\n    documents: ['{}/documents/*/*.gz']\n    attributes: [pii]\n    output:\n      path: {}\n\
                 \x20   span_replacement:\n      - span: '{span}'\n        syntax: {syntax}\n        replacement: '{replacement}'\n\
                 \x20       min_score: 0.5\n      - span: '{}'\n        syntax: {syntax}\n        replacement: 'X'\n        min_score: 0.5\n",
                tmp.path().display(),
                out.display(),
                if syntax == "jq" { ".attributes.low" } else { "$.attributes.low" }
            ),
        );
        let o = dolma(&["-c", &cfg, "mix", "--no-progress"]);
        assert!(o.status.success(), "{}", stderr(&o));
        // the low-score span (0.1 < min_score) is left alone
        assert_eq!(docs_in(&out)[0]["text"], expected, "{syntax} {replacement}");
    }
}
