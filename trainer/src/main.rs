//! `olmo-train`: train an OLMo-architecture model on dolma token shards (`train`), print a
//! step's batch without training (`batch-at`), move weights to and from Hugging Face format
//! (`export-hf`, `import-hf`) and write OLMo's own checkpoint format (`export-olmo`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use olmo_train::config::{read_with_overrides, Override, TrainConfig};
use olmo_train::data::{batch_instances, global_order};
use olmo_train::train::open_shards;

const USAGE: &str = "\
usage: olmo-train train [-c] CONFIG [--device auto|cpu|cuda[:N]] [--threads N] [--KEY=VALUE ...]
       olmo-train batch-at STEP -c CONFIG [--epoch E] [--rank R --world-size W] [--from-run SAVE_FOLDER] [--KEY=VALUE ...]
       olmo-train export-hf CHECKPOINT_DIR OUTPUT_DIR
       olmo-train import-hf HF_DIR OUTPUT_DIR -c CONFIG [--KEY=VALUE ...]
       olmo-train export-olmo CHECKPOINT_DIR OUTPUT_DIR [--distributed_strategy fsdp|ddp]
       olmo-train eval [-c] CONFIG [--checkpoint DIR] [--device D] [--KEY=VALUE ...]
       olmo-train info [-c] CONFIG [--KEY=VALUE ...]
       olmo-train gpu-check [--device cuda:N] [--attention both|materialised|flash] [--train-steps N] [--olmo-1b-steps N] [--olmo2-1b-steps N] [--micro N] [--gemm-reps N] [--tokens FILE]

train      trains (on a GPU when one is usable, else on the CPU: --device auto); resumes from
           the newest checkpoint in save_folder if there is one, else starts from load_path
           (ours, or OLMo's step{N}-unsharded or sharded step{N}; reset_trainer_state,
           reset_optimizer_state, restore_dataloader, fast_forward_batches as OLMo) if given.
batch-at   prints the instances (file, token offset, first tokens) of global step STEP (0-based)
           in OLMo's data order: NumPy PCG64(seed + epoch) permutation of all seq_len windows.
           --from-run: the instances a run recorded in its data-indices (after a fast-forward
           or an epoch jump the record, not the order, says what was trained on).
export-hf  writes config.json + model.safetensors loadable by transformers (OlmoForCausalLM,
           or LlamaForCausalLM for RMSNorm models).
import-hf  reads a transformers OLMo or Llama-layout folder (sharded, F32/BF16/F16) for CONFIG's
           model into a weights-only checkpoint: start from it with load_path and
           reset_trainer_state + reset_optimizer_state (fine-tuning).
export-olmo writes a checkpoint as OLMo's unsharded one (model.pt, optim.pt, train.pt), which
           OLMo's trainer resumes and its scripts read; load_path reads those folders too.
           optim.pt takes the form of the OLMo run that will resume it: FSDP's (OLMo's
           default) or DDP's, as the checkpoint's distributed_strategy says unless given.
eval       scores a checkpoint (default: the newest in save_folder) with the config's evaluators.
info       prints the model's size and FLOPs per token.
gpu-check  on a GPU machine: CUDA engine vs CPU engine, a short training run, OLMo-1B speed.

--KEY=VALUE sets a config field for this run, as OLMo's scripts take them: --save_folder=/ckpt,
           --model.n_layers=4, --data.paths=[a.npy,b.npy], --evaluators.0.label=x (the value
           read as YAML; a bare --KEY is true; dashes in KEY are underscores). A field the
           trainer does not read is an error, but for OLMo's machinery (wandb, fsdp, compile,
           data.num_workers, ...), which is a warning. Checkpoints save the merged config.";

/// The part of a training config `batch-at` needs (any training config parses as one).
#[derive(serde::Deserialize)]
struct BatchAtConfig {
    model: BatchAtModel,
    data: olmo_train::config::DataSection,
    global_train_batch_size: u64,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default)]
    epoch: Option<u64>,
}

#[derive(serde::Deserialize)]
struct BatchAtModel {
    max_sequence_length: u64,
    #[serde(default)]
    vocab_size: Option<usize>,
}

fn default_seed() -> u64 {
    6198
}

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => match e.downcast_ref::<olmo_train::stop::Stopped>() {
            Some(s) => {
                eprintln!("olmo-train: {s}");
                ExitCode::from((128 + s.signal) as u8)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
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
        Some("export-hf") => export(&args[1..]),
        Some("import-hf") => import(&args[1..]),
        Some("export-olmo") => export_olmo(&args[1..]),
        Some("info") => info(&args[1..]),
        Some("eval") => evaluate(&args[1..]),
        Some("gpu-check") => gpu_check(&args[1..]),
        Some("-h") | Some("--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

/// A command's arguments: `-c CONFIG` (or the config as the first plain argument, as OLMo's
/// `train.py CONFIG`), the command's own `--flag value` pairs, other plain arguments, and every
/// other `--key=value` or bare `--key` as a config override, as OLMo's scripts take them.
struct CommandLine {
    config: Option<String>,
    flags: Vec<(String, String)>,
    plain: Vec<String>,
    overrides: Vec<Override>,
}

fn command_line(args: &[String], own: &[&str]) -> Result<CommandLine> {
    let mut cl = CommandLine {
        config: None,
        flags: Vec::new(),
        plain: Vec::new(),
        overrides: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let (name, inline) = arg
            .split_once('=')
            .map_or((arg, None), |(n, v)| (n, Some(v)));
        let mut take = || -> Result<String> {
            match inline {
                Some(v) => Ok(v.to_string()),
                None => {
                    i += 1;
                    Ok(value(args, i - 1, name)?.to_string())
                }
            }
        };
        if name == "-c" || name == "--config" {
            cl.config = Some(take()?);
        } else if own.contains(&name) {
            let v = take()?;
            cl.flags.push((name.to_string(), v));
        } else if let Some(o) = Override::parse(arg) {
            cl.overrides.push(o);
        } else if arg.starts_with('-') {
            bail!("unexpected argument `{arg}`\n\n{USAGE}");
        } else {
            cl.plain.push(arg.to_string());
        }
        i += 1;
    }
    Ok(cl)
}

impl CommandLine {
    /// The training config with the overrides applied (and its merged text); the config may
    /// be the one plain argument instead of `-c`.
    fn load(&mut self) -> Result<(TrainConfig, String)> {
        if self.config.is_none() && !self.plain.is_empty() {
            self.config = Some(self.plain.remove(0));
        }
        if let Some(extra) = self.plain.first() {
            bail!("unexpected argument `{extra}`\n\n{USAGE}");
        }
        let path = self
            .config
            .as_deref()
            .ok_or_else(|| anyhow!("missing -c CONFIG\n\n{USAGE}"))?;
        let (cfg, text) = TrainConfig::load_with(Path::new(path), &self.overrides)?;
        let unread = cfg.unread_overrides(&self.overrides);
        if !unread.is_empty() {
            let keys: Vec<String> = unread.iter().map(|o| format!("`{}`", o.key)).collect();
            let args: Vec<String> = unread.iter().map(|o| o.to_string()).collect();
            bail!(
                "{}: olmo-train does not read {} (a misspelling, or an OLMo field this engine does not implement: leave it out)",
                args.join(" "),
                keys.join(", ")
            );
        }
        Ok((cfg, text))
    }
}

fn train(args: &[String]) -> Result<()> {
    let mut cl = command_line(args, &["--device", "--threads"])?;
    let mut device = None;
    let mut threads = None;
    for (flag, v) in &cl.flags {
        match flag.as_str() {
            "--device" => device = Some(olmo_train::device::Request::parse(v)?),
            "--threads" => {
                threads = Some(v.parse().with_context(|| format!("--threads `{v}`"))?);
            }
            _ => unreachable!("command_line keeps only the flags asked for"),
        }
    }
    // torchrun's ranks on one host share its cores (rather than each taking them all), unless
    // --threads or RAYON_NUM_THREADS says otherwise
    let local_ranks = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 1);
    if threads.is_none() && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        if let Some(n) = local_ranks {
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            threads = Some((cores / n).max(1));
        }
    }
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow!("{e}"))?;
    }
    let (cfg, text) = cl.load()?;
    olmo_train::train::run_on(cfg, &text, device)
}

fn evaluate(args: &[String]) -> Result<()> {
    let mut cl = command_line(args, &["--device", "--checkpoint"])?;
    let (mut device, mut checkpoint) = (None, None);
    for (flag, v) in &cl.flags {
        match flag.as_str() {
            "--device" => device = Some(olmo_train::device::Request::parse(v)?),
            "--checkpoint" => checkpoint = Some(PathBuf::from(v)),
            _ => unreachable!("command_line keeps only the flags asked for"),
        }
    }
    let (cfg, _) = cl.load()?;
    olmo_train::train::evaluate(cfg, device, checkpoint).map(|_| ())
}

fn info(args: &[String]) -> Result<()> {
    let mut cl = command_line(args, &[])?;
    let (cfg, _) = cl.load()?;
    let config = cl.config.unwrap_or_default();
    let (m, init) = cfg.model_config()?;
    let seq = cfg.model.max_sequence_length;
    println!(
        "{}: {} parameters ({} non-embedding), embedding {}x{}, {} layers of {}, init {init:?}, {:.3} GFLOPs per training token at seq {seq}",
        config,
        m.num_params(),
        m.non_embedding_params(),
        m.embedding_size,
        m.d_model,
        m.n_layers,
        m.block(),
        m.flops_per_token(seq) / 1e9
    );
    print!("{}", gpu_memory_table(&cfg, m, seq)?);
    Ok(())
}

/// What a training run of `cfg` would take of each GPU's memory, by micro-batch and activation
/// checkpointing, from the memory planner (the engine run without a GPU, counting its buffers).
fn gpu_memory_table(
    cfg: &olmo_train::config::TrainConfig,
    m: olmo_train::model::ModelConfig,
    seq: usize,
) -> Result<String> {
    use olmo_train::memory_plan::{self, gib, Setup};
    use olmo_train::model::Checkpointing;
    use std::fmt::Write;
    let configured = cfg.activation_checkpointing;
    let setup = Setup::of_run(cfg)?;
    let micro = cfg.micro_batch_size() as usize;
    let mut strategies = vec![Checkpointing::Off, Checkpointing::WholeLayer];
    if !strategies.contains(&configured) {
        strategies.push(configured);
    }
    let flash = memory_plan::runs_flash(m, seq, &setup)?;
    let mut out = String::new();
    let state = memory_plan::training(m, seq, 1, &setup)?.state;
    writeln!(
        out,
        "\nCUDA memory per GPU ({}, {} attention, {}; the engine's buffers, counted without a GPU):",
        if setup.bf16 { "amp_bf16" } else { "fp32" },
        if flash { "flash" } else { "materialised" },
        if setup.moments == 1 { "LionW" } else { "AdamW" },
    )?;
    writeln!(
        out,
        "  state: {} (f32 weights, gradients and {} optimizer moment{}{})",
        gib(state),
        setup.moments,
        if setup.moments == 1 { "" } else { "s" },
        if setup.bf16 { ", bf16 weight copy" } else { "" }
    )?;
    // a table: micro-batches down, strategies across
    let mut header = vec![format!("micro-batch x {seq}")];
    for &c in &strategies {
        let name = match c {
            Checkpointing::Off => "no checkpointing",
            c => c.name(),
        };
        let mark = if c == configured { " (configured)" } else { "" };
        header.push(format!("{name}{mark}"));
    }
    let mut rows = vec![header];
    let mut sizes: Vec<usize> = (0..)
        .map(|k| 1 << k)
        .take_while(|&b| b <= 16.max(2 * micro))
        .collect();
    if !sizes.contains(&micro) {
        sizes.push(micro);
        sizes.sort();
    }
    for b in sizes {
        let mut row = vec![format!(
            "{b}{}",
            if b == micro { " (configured)" } else { "" }
        )];
        for &c in &strategies {
            let plan = memory_plan::training(
                m,
                seq,
                b,
                &Setup {
                    checkpointing: c,
                    ..setup
                },
            )?;
            row.push(gib(plan.peak));
        }
        rows.push(row);
    }
    writeln!(out, "  training step peak:")?;
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:>w$}"))
            .collect();
        writeln!(out, "    {}", cells.join(" | "))?;
    }
    let eval = memory_plan::evaluation(m, seq, cfg.device_eval_batch_size.max(1), &setup)?;
    writeln!(
        out,
        "  evaluation batch {} x {seq} (device_eval_batch_size) during training: {}",
        cfg.device_eval_batch_size,
        gib(eval.peak)
    )?;
    writeln!(
        out,
        "  not counted: the CUDA context and kernels (about 0.5 GiB), cuBLASLt's workspace (32 MiB on Hopper), NCCL's buffers with several GPUs, and the memory pool's fragmentation"
    )?;
    Ok(out)
}

fn gpu_check(args: &[String]) -> Result<()> {
    let default_tokens = PathBuf::from("tests/data/golden/tokens/part-0-00000.npy");
    let mut opts = olmo_train::gpu_check::Options {
        ordinal: 0,
        train_steps: 300,
        olmo_1b_steps: 5,
        olmo2_1b_steps: 0,
        olmo_1b_micro: 8,
        tokens: default_tokens.exists().then_some(default_tokens),
        attention: vec![false, true],
        gemm_reps: 10,
    };
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        let v = value(args, i, flag)?;
        let num = || v.parse::<u64>().with_context(|| format!("{flag} `{v}`"));
        match flag {
            "--device" => match olmo_train::device::Request::parse(v)? {
                olmo_train::device::Request::Cuda(n) => opts.ordinal = n,
                _ => bail!("gpu-check runs on cuda[:N]"),
            },
            "--train-steps" => opts.train_steps = num()?,
            "--olmo-1b-steps" => opts.olmo_1b_steps = num()?,
            "--olmo2-1b-steps" => opts.olmo2_1b_steps = num()?,
            "--micro" => opts.olmo_1b_micro = num()? as usize,
            "--gemm-reps" => opts.gemm_reps = num()? as usize,
            "--tokens" => opts.tokens = Some(PathBuf::from(v)),
            "--attention" => {
                opts.attention = match v {
                    "both" => vec![false, true],
                    "materialised" => vec![false],
                    "flash" => vec![true],
                    _ => bail!("--attention `{v}`: both, materialised or flash"),
                }
            }
            other => bail!("unknown flag `{other}`\n\n{USAGE}"),
        }
        i += 2;
    }
    olmo_train::gpu_check::run(&opts)
}

fn export(args: &[String]) -> Result<()> {
    match args {
        [ck, out] => {
            olmo_train::export::export_hf(Path::new(ck), Path::new(out))?;
            println!("wrote {out}/config.json and {out}/model.safetensors");
            Ok(())
        }
        _ => bail!("usage: olmo-train export-hf CHECKPOINT_DIR OUTPUT_DIR"),
    }
}

fn export_olmo(args: &[String]) -> Result<()> {
    use olmo_train::olmo_checkpoint::{export, Strategy};
    let usage =
        "usage: olmo-train export-olmo CHECKPOINT_DIR OUTPUT_DIR [--distributed_strategy fsdp|ddp]";
    let flag = |f: &str| f.replace('-', "_");
    let (ck, out, strategy): (&String, &String, Option<String>) = match args {
        [ck, out] => (ck, out, None),
        [ck, out, f, s] if flag(f) == "__distributed_strategy" => (ck, out, Some(s.clone())),
        [ck, out, f] => match flag(f).strip_prefix("__distributed_strategy=") {
            Some(s) => (ck, out, Some(s.to_string())),
            None => bail!(usage),
        },
        _ => bail!(usage),
    };
    let ck = Path::new(ck);
    let strategy = match strategy {
        Some(s) => Strategy::parse(&s)?,
        None => Strategy::of_checkpoint(ck)?,
    };
    let out = Path::new(out);
    for lost in export(ck, out, strategy)? {
        eprintln!("olmo-train: not carried over: {lost}");
    }
    let files: Vec<String> = ["model.pt", "optim.pt", "train.pt", "config.yaml"]
        .into_iter()
        .filter(|f| out.join(f).exists())
        .map(String::from)
        .collect();
    println!("wrote {} in {}", files.join(", "), out.display());
    if !out
        .to_string_lossy()
        .trim_end_matches('/')
        .ends_with("-unsharded")
    {
        eprintln!(
            "olmo-train: OLMo takes a load_path for an unsharded checkpoint by its name: rename {} to end in -unsharded (as step{{N}}-unsharded) before OLMo loads it",
            out.display()
        );
    }
    Ok(())
}

fn import(args: &[String]) -> Result<()> {
    let mut cl = command_line(args, &[])?;
    if cl.config.is_none() || cl.plain.len() != 2 {
        bail!("usage: olmo-train import-hf HF_DIR OUTPUT_DIR -c CONFIG [--KEY=VALUE ...]");
    }
    let (hf, out) = (PathBuf::from(&cl.plain[0]), PathBuf::from(&cl.plain[1]));
    cl.plain.clear();
    let (cfg, text) = cl.load()?;
    olmo_train::import::import_hf(&hf, &cfg, &text, &out)?;
    println!(
        "wrote {o}/model.safetensors and {o}/config.yaml; start from them with load_path: {o}, reset_trainer_state: true, reset_optimizer_state: true",
        o = out.display()
    );
    Ok(())
}

fn batch_at(args: &[String]) -> Result<()> {
    let cl = command_line(args, &["--epoch", "--rank", "--world-size", "--from-run"])?;
    let (mut epoch, mut rank, mut world, mut from_run) = (None, 0u64, 1u64, None);
    let mut rank_given = false;
    for (flag, v) in &cl.flags {
        let num = || v.parse::<u64>().with_context(|| format!("{flag} `{v}`"));
        match flag.as_str() {
            "--epoch" => epoch = Some(num()?),
            "--rank" => {
                rank = num()?;
                rank_given = true;
            }
            "--world-size" => world = num()?,
            "--from-run" => from_run = Some(PathBuf::from(v)),
            _ => unreachable!("command_line keeps only the flags asked for"),
        }
    }
    let step: u64 = match cl.plain.as_slice() {
        [s] => s
            .parse()
            .with_context(|| format!("STEP must be a number, got `{s}`"))?,
        [] => bail!("missing STEP\n\n{USAGE}"),
        [_, extra, ..] => bail!("unexpected argument `{extra}`\n\n{USAGE}"),
    };
    let config = PathBuf::from(
        cl.config
            .ok_or_else(|| anyhow!("missing -c CONFIG\n\n{USAGE}"))?,
    );
    // a run's record says how many ranks it had
    if from_run.is_none() && (world == 0 || rank >= world) {
        bail!("--rank must be below --world-size");
    }
    let text = read_with_overrides(&config, &cl.overrides)?;
    let cfg: BatchAtConfig =
        serde_saphyr::from_str(&text).map_err(|e| anyhow!("{}: {e}", config.display()))?;
    let patterns = cfg.data.all_patterns();
    // Without a vocabulary in the config, ids are checked against the dtype's range only.
    let vocab = cfg
        .model
        .vocab_size
        .unwrap_or(match cfg.data.memmap_dtype.as_str() {
            "uint16" => 1 << 16,
            _ => 1 << 32,
        });
    let shards = open_shards(
        &patterns,
        &cfg.data.memmap_dtype,
        cfg.model.max_sequence_length,
        vocab,
    )?;
    // `batch-at ... | head` closes the pipe early: that ends the listing, not in a panic.
    let mut out = std::io::stdout().lock();
    let batch = match &from_run {
        // what the run recorded (data-indices counts steps from 1)
        Some(run) => {
            let r = rank_given.then_some(rank as usize);
            let batch = olmo_train::data_indices::recorded_batch(run, step + 1, r)?;
            writeln!(
                out,
                "step {step} as {} recorded it ({}): {} instances of {} tokens; {} instances in all",
                run.display(),
                r.map_or("every rank".to_string(), |r| format!("rank {r}")),
                batch.len(),
                shards.seq_len,
                shards.len()
            )?;
            batch
        }
        None => {
            let seed = cfg.data.seed.unwrap_or(cfg.seed);
            let epoch = epoch.or(cfg.epoch).unwrap_or(0);
            let order = global_order(shards.len(), seed, epoch, world, cfg.data.drop_last);
            let batch = batch_instances(&order, step, cfg.global_train_batch_size, rank, world)?;
            writeln!(
                out,
                "step {step} (epoch {epoch}, seed {seed}, rank {rank}/{world}): {} instances of {} tokens; {} instances in all",
                batch.len(),
                shards.seq_len,
                shards.len()
            )?;
            batch
        }
    };
    for inst in batch {
        let (file, offset) = shards.locate(inst as u64)?;
        let tokens = shards.read(inst as u64, Some(vocab as u64))?;
        let head: Vec<String> = tokens.iter().take(12).map(|t| t.to_string()).collect();
        writeln!(
            out,
            "{inst:>10}  {}  @{offset:<10}  [{} ...]",
            file.path.display(),
            head.join(" ")
        )?;
    }
    Ok(())
}
