//! `dolma` command line: `dolma [-c config.yaml] <command> [--field value ...]`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};

// glibc's malloc took a quarter of tokenization time (HF tokenizers allocates per word);
// mimalloc is markedly faster for these many small, multi-threaded allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: dolma [-c CONFIG] <command> [--field value ...]

Commands:
  tag        run taggers over documents, writing attribute files
  list       list the available taggers
  dedupe     mark duplicate documents or paragraphs with a Bloom filter
  mix        filter documents on attributes, replace spans, sample, write shards
  tokenize   (alias: tokens) tokenize documents into uint16/uint32 shards for OLMo
  stat       histograms of attribute scores and span lengths (--attributes GLOB
             [--report DIR] [--bins N] [--regex NAME_RE]), to choose mix thresholds
  tokens-info DIR [--tokenizer FILE] [--decode N]
             token counts per file and source, and the first documents decoded
  train-tokenizer
             train a byte-level BPE tokenizer.json (--documents, --vocab_size, --output)

Options:
  -c, --config FILE   YAML or JSON config with dolma's field names
  --FIELD VALUE...    set or override a config field; dotted names reach into
                      mappings (--tagger_options.random_number_v1.seed 7);
                      several values make a list; a bare --FLAG is true
  -h, --help          this help
  -V, --version       version

Common fields: documents, destination, processes, ignore_existing, skip_bad_lines,
shard (I/N, or from SLURM_ARRAY_TASK_ID/COUNT), max_line_bytes, progress (--no-progress), dryrun.
Logs: RUST_LOG=debug for more detail.";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let mut config: Option<PathBuf> = None;
    let mut i = 0;
    let command = loop {
        let Some(a) = args.get(i) else {
            eprintln!("{USAGE}");
            bail!("no command given");
        };
        match a.as_str() {
            "-h" | "--help" | "help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "-V" | "--version" => {
                println!("dolma {}", env!("CARGO_PKG_VERSION"));
                return Ok(());
            }
            "-c" | "--config" => {
                let Some(p) = args.get(i + 1) else {
                    bail!("-c needs a config file path")
                };
                config = Some(PathBuf::from(p));
                i += 2;
            }
            _ if a.starts_with("--config=") => {
                config = Some(PathBuf::from(&a["--config=".len()..]));
                i += 1;
            }
            _ if a.starts_with('-') => bail!("unknown option `{a}` before the command\n\n{USAGE}"),
            _ => break a.clone(),
        }
    };
    let mut rest: Vec<String> = args[i + 1..].to_vec();
    // `-c` is also accepted after the command, as dolma users often write it there.
    if let Some(pos) = rest.iter().position(|a| a == "-c" || a == "--config") {
        if pos + 1 >= rest.len() {
            bail!("-c needs a config file path");
        }
        config = Some(PathBuf::from(rest.remove(pos + 1)));
        rest.remove(pos);
    }
    if rest.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    match command.as_str() {
        "tag" => dolma::tag::run(dolma::config::load(config.as_deref(), &rest, "tag")?),
        "list" => {
            for t in dolma_taggers::TAGGERS {
                println!("{:<34} {}", t.name, t.description);
            }
            Ok(())
        }
        "dedupe" => dolma::dedupe::run(dolma::config::load(config.as_deref(), &rest, "dedupe")?),
        "mix" => dolma::mix::run(dolma::config::load(config.as_deref(), &rest, "mix")?),
        "tokenize" | "tokens" => {
            dolma::tokenize::run(dolma::config::load(config.as_deref(), &rest, "tokenize")?)
        }
        "tokens-info" => dolma::tokenize::info(&rest),
        "stat" => dolma::stat::run(dolma::config::load(config.as_deref(), &rest, "stat")?),
        "train-tokenizer" => dolma::tokenize::train(dolma::config::load(
            config.as_deref(),
            &rest,
            "train-tokenizer",
        )?),
        other => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}
