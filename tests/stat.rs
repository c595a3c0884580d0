//! End-to-end tests of `dolma stat`: parity with dolma 1.2.1's analyzer, results that do not
//! depend on the process count, several patterns (which dolma's rejects), name filtering,
//! binning past `bins` distinct values, and bad lines.

mod common;

use common::*;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// The golden attributes copied under a temporary folder, and that folder.
fn attributes() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(
        &repo().join("tests/data/golden/attributes"),
        &tmp.path().join("attributes"),
    );
    tmp
}

/// `dolma stat` over `patterns` with extra arguments, writing its report under `report`;
/// returns the report's lines by name and the printed tables.
fn stat(patterns: &[String], report: &Path, extra: &[&str]) -> (BTreeMap<String, Value>, String) {
    let mut args = vec!["stat", "--no-progress", "--attributes"];
    args.extend(patterns.iter().map(String::as_str));
    let report_arg = report.display().to_string();
    args.extend(["--report", report_arg.as_str()]);
    args.extend(extra);
    let out = dolma(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = read_gz_lines(&report.join("summaries.jsonl.gz"))
        .into_iter()
        .map(|l| (l["name"].as_str().unwrap().to_string(), l))
        .collect();
    (lines, String::from_utf8(out.stdout).unwrap())
}

/// A JSON array of numbers.
fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_f64().unwrap())
        .collect()
}

/// dolma's resolution: five decimal digits of the binary mantissa (`math.frexp`).
fn dolma_quantum(v: f64) -> f64 {
    if v == 0.0 {
        return 0.0;
    }
    let e = v.abs().log2().floor() as i32 + 1;
    let m = v / 2f64.powi(e);
    (m * 1e5).floor() / 1e5 * 2f64.powi(e)
}

/// `tests/data/golden/stat/summaries.jsonl.gz` was written by dolma 1.2.1 (`dolma stat
/// --attributes 'attributes/*/mixed/*.gz' --report ...` over the golden attributes). Every
/// histogram's total and sum are dolma's to the bit; where dolma's tracker is exact (values
/// at its resolution) so are the bins and counts; elsewhere ours are exact and dolma's are
/// rounded to its resolution.
#[test]
fn totals_sums_and_exact_histograms_match_dolma_s_analyzer() {
    let tmp = attributes();
    let pattern = format!("{}/attributes/*/mixed/*.gz", tmp.path().display());
    let (ours, tables) = stat(&[pattern], &tmp.path().join("report"), &[]);
    let golden: BTreeMap<String, Value> =
        read_gz_lines(&repo().join("tests/data/golden/stat/summaries.jsonl.gz"))
            .into_iter()
            .map(|l| (l["name"].as_str().unwrap().to_string(), l))
            .collect();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        golden.keys().collect::<Vec<_>>()
    );
    let mut compared = 0;
    for (name, g) in &golden {
        let o = &ours[name];
        assert_eq!(o["total"], g["total"], "{name}");
        assert_eq!(o["sum"].as_f64(), g["sum"].as_f64(), "{name}");
        let bins = floats(&o["bins"]);
        let listed = bins.len() == o["counts"].as_array().unwrap().len() + 1;
        if listed
            && bins[..bins.len() - 1]
                .iter()
                .all(|&b| dolma_quantum(b) == b)
        {
            assert_eq!(
                (&o["bins"], &o["counts"]),
                (&g["bins"], &g["counts"]),
                "{name}"
            );
            compared += 1;
        }
        assert!(tables.contains(&format!("{name}: count ")), "{name}");
    }
    assert!(compared >= 30, "{compared}");
}

#[test]
fn results_do_not_depend_on_processes_and_several_patterns_are_read() {
    let tmp = attributes();
    let root = tmp.path().display().to_string();
    let all = format!("{root}/attributes/*/mixed/*.gz");
    let report = |name: &str| tmp.path().join(name).join("summaries.jsonl.gz");
    stat(
        std::slice::from_ref(&all),
        &tmp.path().join("one"),
        &["--processes", "1"],
    );
    stat(&[all], &tmp.path().join("three"), &["--processes", "3"]);
    assert_eq!(
        std::fs::read(report("one")).unwrap(),
        std::fs::read(report("three")).unwrap()
    );
    // two patterns (dolma 1.2.1's analyzer fails on more than one) read both sets of files,
    // each name as over all files
    let (everything, _) = stat(
        &[format!("{root}/attributes/*/mixed/*.gz")],
        &tmp.path().join("all"),
        &[],
    );
    let (two, _) = stat(
        &[
            format!("{root}/attributes/c4_v2/mixed/*.gz"),
            format!("{root}/attributes/char_length_v1/mixed/*.gz"),
        ],
        &tmp.path().join("two"),
        &[],
    );
    assert!(two.keys().any(|k| k.starts_with("c4_v2__")));
    assert!(two.keys().any(|k| k.starts_with("char_length_v1__")));
    for (name, line) in &two {
        assert_eq!(line, &everything[name], "{name}");
    }
    // --regex keeps the names it finds a match in
    let (some, _) = stat(
        &[format!("{root}/attributes/*/mixed/*.gz")],
        &tmp.path().join("regex"),
        &["--regex", "too_few_words"],
    );
    assert!(!some.is_empty() && some.keys().all(|k| k.contains("too_few_words")));
}

#[test]
fn past_bins_distinct_values_the_range_is_binned() {
    let tmp = attributes();
    let pattern = format!("{}/attributes/*/mixed/*.gz", tmp.path().display());
    let (lines, tables) = stat(&[pattern], &tmp.path().join("report"), &["--bins", "5"]);
    let mut binned = 0;
    for (name, l) in &lines {
        let counts: Vec<u64> = l["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        let bins = floats(&l["bins"]);
        assert_eq!(
            counts.iter().sum::<u64>(),
            l["total"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(bins.len(), counts.len() + 1, "{name}");
        let (min, max) = (l["min"].as_f64().unwrap(), l["max"].as_f64().unwrap());
        assert_eq!(bins[0], min, "{name}");
        if bins[bins.len() - 1] == max && min < max {
            // more than 5 values: 5 equal-width bins over the whole range
            assert_eq!(counts.len(), 5, "{name}");
            let width = (max - min) / 5.0;
            for (i, b) in bins.iter().enumerate().take(5) {
                assert!((b - (min + i as f64 * width)).abs() <= 1e-9 * width.max(1.0));
            }
            binned += 1;
        } else {
            // at most 5: the values themselves, closed by an edge past the largest
            assert!(counts.len() <= 5 && bins[bins.len() - 1] > max, "{name}");
        }
    }
    assert!(binned > 100, "{binned}");
    // the printed tables bin each histogram into ten ranges at most
    assert!(tables.contains(") ") && tables.contains("] "));
}

#[test]
fn bad_lines_are_named_or_skipped_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("attributes/x/a.jsonl.gz");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_gz(
        &path,
        b"{\"id\": \"1\", \"attributes\": {\"s\": [[0, 5, 0.5]]}}\n{\"id\": \"2\", \"attributes\": {\"s\": [[0, 5]]}}\n",
    );
    let pattern = format!("{}/attributes/x/*.gz", tmp.path().display());
    let out = dolma(&["stat", "--no-progress", "--attributes", &pattern]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("a.jsonl.gz:2: not an attributes line"),
        "{err}"
    );
    let out = dolma(&[
        "stat",
        "--no-progress",
        "--skip_bad_lines",
        "--attributes",
        &pattern,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 docs (1 bad lines skipped)"));
    let out = dolma(&["stat", "--no-progress", "--attributes", "/no/such/*.gz"]);
    assert!(stderr(&out).contains("attributes: pattern `/no/such/*.gz` matched no files"));
}
