//! `olmo-train`: the OLMo trainer (work in progress). `train` runs a first CPU training loop
//! (no checkpoints or evaluation yet); `batch-at STEP -c config.yaml` prints which instances
//! (file, token offset) and tokens form a step's batch, instantly.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use olmo_train::data::{batch_instances, expand_paths, global_order, Dtype, Shards};
use serde::Deserialize;

const USAGE: &str = "\
usage: olmo-train batch-at STEP -c CONFIG [--epoch E] [--rank R --world-size W]
       olmo-train train -c CONFIG        (a first CPU loop: no checkpoints or evals yet)

batch-at prints the instances (file, token offset, first tokens) of global step STEP (0-based)
in OLMo's data order: NumPy PCG64(seed + epoch) permutation of all seq_len windows.";

#[derive(Deserialize)]
struct Config {
    model: ModelConfig,
    data: DataConfig,
    global_train_batch_size: u64,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default)]
    epoch: Option<u64>,
}

fn default_seed() -> u64 {
    6198
}

#[derive(Deserialize)]
struct ModelConfig {
    max_sequence_length: u64,
    #[serde(default)]
    vocab_size: Option<u64>,
}

#[derive(Deserialize)]
struct DataConfig {
    paths: Vec<String>,
    #[serde(default = "default_dtype")]
    memmap_dtype: String,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    drop_last: bool,
}

fn default_dtype() -> String {
    "uint16".into()
}

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn value<'a>(args: &'a [String], i: usize, flag: &str) -> Result<&'a str> {
    args.get(i + 1)
        .map(String::as_str)
        .ok_or_else(|| anyhow!("{flag} needs a value"))
}

fn run(args: Vec<String>) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("batch-at") => batch_at(&args[1..]),
        Some("train") => train(&args[1..]),
        Some("-h") | Some("--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

fn train(args: &[String]) -> Result<()> {
    let config = match args {
        [flag, path] if flag == "-c" || flag == "--config" => PathBuf::from(path),
        _ => bail!("usage: olmo-train train -c CONFIG"),
    };
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let cfg: olmo_train::train::TrainConfig =
        serde_saphyr::from_str(&text).map_err(|e| anyhow!("{}: {e}", config.display()))?;
    olmo_train::train::run(cfg)
}

fn batch_at(args: &[String]) -> Result<()> {
    let mut step: Option<u64> = None;
    let mut config: Option<PathBuf> = None;
    let (mut epoch, mut rank, mut world) = (None, 0u64, 1u64);
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-c" | "--config" => config = Some(PathBuf::from(value(args, i, "-c")?)),
            "--epoch" => epoch = Some(value(args, i, "--epoch")?.parse()?),
            "--rank" => rank = value(args, i, "--rank")?.parse()?,
            "--world-size" => world = value(args, i, "--world-size")?.parse()?,
            a if step.is_none() && !a.starts_with('-') => {
                step = Some(
                    a.parse()
                        .with_context(|| format!("STEP must be a number, got `{a}`"))?,
                );
                i += 1;
                continue;
            }
            other => bail!("unexpected argument `{other}`\n\n{USAGE}"),
        }
        i += 2;
    }
    let step = step.ok_or_else(|| anyhow!("missing STEP\n\n{USAGE}"))?;
    let config = config.ok_or_else(|| anyhow!("missing -c CONFIG\n\n{USAGE}"))?;
    if world == 0 || rank >= world {
        bail!("--rank must be below --world-size");
    }
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let cfg: Config =
        serde_saphyr::from_str(&text).map_err(|e| anyhow!("{}: {e}", config.display()))?;
    let paths = expand_paths(&cfg.data.paths)?;
    let shards = Shards::open(
        &paths,
        Dtype::parse(&cfg.data.memmap_dtype)?,
        cfg.model.max_sequence_length,
    )?;
    let seed = cfg.data.seed.unwrap_or(cfg.seed);
    let epoch = epoch.or(cfg.epoch).unwrap_or(0);
    let order = global_order(shards.len(), seed, epoch, world, cfg.data.drop_last);
    let batch = batch_instances(&order, step, cfg.global_train_batch_size, rank, world)?;
    println!(
        "step {step} (epoch {epoch}, seed {seed}, rank {rank}/{world}): {} instances of {} tokens; {} instances in all",
        batch.len(),
        shards.seq_len,
        shards.len()
    );
    for inst in batch {
        let (file, offset) = shards.locate(inst as u64)?;
        let tokens = shards.read(inst as u64, cfg.model.vocab_size)?;
        let head: Vec<String> = tokens.iter().take(12).map(|t| t.to_string()).collect();
        println!(
            "{inst:>10}  {}  @{offset:<10}  [{} ...]",
            file.path.display(),
            head.join(" ")
        );
    }
    Ok(())
}
