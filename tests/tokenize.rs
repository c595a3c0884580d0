//! End-to-end tests of `dolma tokenize`, `tokens-info` and `train-tokenizer`.

mod common;

use common::*;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Output;

fn neox() -> String {
    repo()
        .join("tests/data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json")
        .display()
        .to_string()
}

/// (id, file name of src, loc) -> tokens, read through the csv index.
fn documents(dir: &Path) -> HashMap<(String, String, u64), Vec<u16>> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "npy") {
            continue;
        }
        let data = std::fs::read(&p).unwrap();
        let tokens: Vec<u16> = data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        for row in gunzip(&p.with_extension("csv.gz")).lines() {
            let f: Vec<&str> = row.split(',').collect();
            let n = f.len();
            let (start, end): (usize, usize) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            let src = Path::new(f[n - 2])
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let id = f[2..n - 2].join(",");
            out.insert(
                (id, src, f[n - 1].parse().unwrap()),
                tokens[start..end].to_vec(),
            );
        }
    }
    out
}

fn files_under(root: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// tests/data/golden/tokens was written by `dolma tokens` 1.2.1 (NeoX tokenizer, eos 50279,
/// pad 1, uint16) from tests/data/golden/documents.
#[test]
fn token_sequences_match_dolma_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pattern = format!("{}/tests/data/golden/documents/*/*.gz", repo().display());
    let tok = neox();
    let o = dolma(&[
        "tokenize",
        "--documents",
        &pattern,
        "--destination",
        out.to_str().unwrap(),
        "--tokenizer.name_or_path",
        &tok,
        "--tokenizer.eos_token_id",
        "50279",
        "--tokenizer.pad_token_id",
        "1",
        "--dtype",
        "uint16",
        "--no-progress",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ours = documents(&out);
    let theirs = documents(&repo().join("tests/data/golden/tokens"));
    assert_eq!(ours.len(), theirs.len());
    assert!(ours.len() > 80);
    for (k, v) in &theirs {
        assert_eq!(ours.get(k), Some(v), "{k:?}");
        assert_eq!(v.last(), Some(&50279));
    }
}

fn sample_pattern() -> String {
    format!("{}/tests/data/sample/documents/*/*.gz", repo().display())
}

fn tokenize(out: &Path, extra: &[&str]) -> Output {
    let pattern = sample_pattern();
    let tok = neox();
    let mut args = vec![
        "tokenize",
        "--documents",
        &pattern,
        "--destination",
        out.to_str().unwrap(),
        "--tokenizer.name_or_path",
        &tok,
        "--tokenizer.eos_token_id",
        "50279",
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    dolma(&args)
}

#[test]
fn placement_is_seeded_and_independent_of_threads_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let common = [
        "--files_per_process",
        "2",
        "--batch_size",
        "300",
        "--max_size",
        "300000",
    ];
    let o = tokenize(&a, &[&common[..], &["--processes", "1"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = tokenize(&b, &[&common[..], &["--processes", "2"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = files_under(&a);
    assert!(
        reference == files_under(&b),
        "thread count changed the output"
    );
    assert!(reference.keys().filter(|k| k.ends_with(".npy")).count() >= 8);
    // every document once, shuffled: not in input order within a file
    let docs = documents(&a);
    assert_eq!(docs.len(), 4150);
    let first_csv = gunzip(&a.join("part-00000-00000.csv.gz"));
    let locs: Vec<u64> = first_csv
        .lines()
        .map(|r| r.rsplit(',').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        locs.windows(2).any(|w| w[1] < w[0]),
        "documents were not shuffled"
    );
    // a different seed places documents differently
    let c = tmp.path().join("c");
    let o = tokenize(&c, &[&common[..], &["--seed", "7"]].concat());
    assert!(o.status.success());
    assert!(files_under(&c) != reference);

    // resume: a group killed half-way is redone, done groups are kept
    let marker = reference
        .keys()
        .find(|k| k.starts_with(".part-00001"))
        .unwrap()
        .clone();
    std::fs::remove_file(b.join(&marker)).unwrap();
    std::fs::write(b.join("part-00001-00000.npy"), b"junk").unwrap();
    std::fs::write(b.join("part-00001-00009.npy.tmp"), b"junk").unwrap();
    let o = tokenize(&b, &[&common[..], &["--processes", "2"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 groups done"), "{}", stderr(&o));
    assert!(files_under(&b) == reference, "resumed output differs");
}

#[test]
fn long_documents_get_their_own_file_and_max_size_counts_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = tokenize(&out, &["--max_size", "2000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut oversized = 0;
    for (name, bytes) in files_under(&out) {
        if name.ends_with(".npy") {
            let tokens = bytes.len() / 2;
            let rows = gunzip(&out.join(name.replace(".npy", ".csv.gz")))
                .lines()
                .count();
            if tokens > 2000 {
                assert_eq!(rows, 1, "{name}: an oversized document must be alone");
                oversized += 1;
            }
        }
    }
    assert!(oversized > 0, "the sample has documents over 2000 tokens");
    assert_eq!(documents(&out).len(), 4150);
}

#[test]
fn dtype_and_special_token_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // A 70k-token vocabulary: the NeoX tokenizer plus added tokens.
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(neox()).unwrap()).unwrap();
    let added = tok["added_tokens"].as_array_mut().unwrap();
    for i in 50_280..70_000u32 {
        added.push(
            serde_json::json!({"id": i, "content": format!("<|extra_{i}|>"), "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
        );
    }
    let big = tmp.path().join("big.json");
    std::fs::write(&big, tok.to_string()).unwrap();
    let pattern = sample_pattern();
    let out = tmp.path().join("o");
    let o = dolma(&[
        "tokenize",
        "--documents",
        &pattern,
        "--destination",
        out.to_str().unwrap(),
        "--tokenizer.name_or_path",
        big.to_str().unwrap(),
        "--tokenizer.eos_token_id",
        "0",
        "--dtype",
        "uint16",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("dtype uint16 cannot hold token ids up to 69999"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());

    let o = tokenize(&out, &["--tokenizer.eos_token_id", "99999"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("outside the vocabulary"),
        "{}",
        stderr(&o)
    );
    let pattern = sample_pattern();
    let tok = neox();
    let o = dolma(&[
        "tokenize",
        "--documents",
        &pattern,
        "--destination",
        out.to_str().unwrap(),
        "--tokenizer.name_or_path",
        &tok,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("bos_token_id or tokenizer.eos_token_id"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn train_tokenizer_then_tokenize_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok.json");
    let pattern = sample_pattern();
    let o = dolma(&[
        "train-tokenizer",
        "--documents",
        &pattern,
        "--vocab_size",
        "2000",
        "--output",
        tok.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    let vocab = t["model"]["vocab"].as_object().unwrap();
    assert!(vocab.len() <= 2000 && vocab.len() > 1500, "{}", vocab.len());
    assert_eq!(vocab["<|endoftext|>"], 0);
    assert_eq!(vocab["<|padding|>"], 1);

    let out = tmp.path().join("o");
    let o = dolma(&[
        "tokens",
        "--documents",
        &pattern,
        "--destination",
        out.to_str().unwrap(),
        "--tokenizer.name_or_path",
        tok.to_str().unwrap(),
        "--tokenizer.eos_token_id",
        "0",
        "--no-progress",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dolma(&[
        "tokens-info",
        out.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--decode",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("total") && s.contains("4150") && s.contains("fortunes"),
        "{s}"
    );
    // the decoded document ends with the EOS token's text
    assert!(s.contains("<|endoftext|>"), "{s}");
}
