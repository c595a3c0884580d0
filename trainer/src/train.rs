//! The training loop (llm.c style: one readable loop over explicit passes): OLMo's data order
//! across epochs, micro-batches accumulated into the global batch's mean gradient, global-norm
//! clipping (with OLMo's clip warmup), the LR schedule, AdamW in OLMo's decay groups,
//! evaluation every `eval_interval` steps, checkpoints every `save_interval` steps, JSON-lines
//! metrics and a loss plot. Where the run starts (fresh, its own checkpoint, `load_path`) is
//! `start`'s business.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::backend::{Backend, Cpu, Update};
use crate::checkpoint::{self, Checkpoint, TrainerState};
use crate::config::{Duration, TrainConfig};
use crate::data::{epoch_len, expand_paths, global_order, write_global_indices, Dtype, Shards};
use crate::data_indices::DataIndices;
use crate::device::{self, Device, Request};
use crate::dist::{Tcp, World};
use crate::eval::{self, LmSet, McSet, Task, Unigram};
use crate::instance_filter::InstanceFilter;
use crate::model::{Batch, Layout, Model, ModelConfig};
use crate::ops::document_count;
use crate::optim::{AdamW, AdaptiveClip, LionW, Optimizer};
use crate::schedule::{Kind, Schedule};
use crate::speed::SpeedMonitor;
use crate::start::{self, DataFacts};
use crate::stop::{self, Reason, Stopped};

/// Tokens read for the unigram baseline (enough for a stable estimate, cheap on huge data).
const UNIGRAM_TOKENS: u64 = 50_000_000;

/// Opens one group of token files, checking dtype and vocabulary up front on each file's first
/// window (a uint32 file read as uint16, or a tokenizer/vocabulary mismatch, shows there).
pub fn open_shards(patterns: &[String], dtype: &str, seq: u64, vocab: usize) -> Result<Shards> {
    let dtype = Dtype::parse(dtype)?;
    if dtype == Dtype::U16 && vocab > 65536 {
        bail!("memmap_dtype uint16 cannot hold a vocabulary of {vocab}: use uint32");
    }
    let shards = Shards::open(&expand_paths(patterns)?, dtype, seq)?;
    for f in shards.files.iter().filter(|f| f.instances > 0) {
        shards
            .read(f.first_instance, Some(vocab as u64))
            .with_context(|| {
                format!(
                    "checking {} (memmap_dtype {:?}, vocab_size {vocab})",
                    f.path.display(),
                    dtype
                )
            })?;
    }
    Ok(shards)
}

struct Evaluators {
    lm: Vec<LmSet>,
    mc: Vec<McSet>,
    /// Unigram cross-entropy per LM set label, for reading perplexities against.
    unigram: Vec<(String, f64)>,
}

fn setup_evals(cfg: &TrainConfig, train: Option<&Shards>, vocab: usize) -> Result<Evaluators> {
    let seq = cfg.model.max_sequence_length as u64;
    let mut lm = Vec::new();
    let mut mc = Vec::new();
    let mut tokenizer = None;
    for e in &cfg.evaluators {
        match e.kind.as_str() {
            "lm" => {
                let groups = e.data.groups(&e.label);
                if groups.is_empty() {
                    bail!(
                        "evaluator `{}`: data.paths or data.datasets is required",
                        e.label
                    );
                }
                let doc_eos = match (e.data.generate_doc_lengths, cfg.model.eos_token_id) {
                    (false, _) => None,
                    (true, Some(eos)) => Some(eos),
                    (true, None) => bail!(
                        "evaluator `{}`: data.generate_doc_lengths cuts documents at model.eos_token_id, which is not set",
                        e.label
                    ),
                };
                for (label, patterns) in groups {
                    let shards = open_shards(&patterns, &e.data.memmap_dtype, seq, vocab)
                        .with_context(|| format!("evaluator `{label}`"))?;
                    let limit = if cfg.eval_subset_num_batches < 0 {
                        u64::MAX
                    } else {
                        cfg.eval_subset_num_batches as u64 * cfg.device_eval_batch_size as u64
                    };
                    lm.push(LmSet {
                        label,
                        shards,
                        limit,
                        doc_eos,
                    });
                }
            }
            "downstream" => {
                let name = e.task.as_deref().unwrap_or(&e.label);
                let task = Task::parse(name).ok_or_else(|| {
                    anyhow!(
                        "evaluator `{}`: unknown task `{name}` (known: {}); drop it from evaluators, or train without any: --evaluators=[]",
                        e.label,
                        Task::NAMES
                            .iter()
                            .map(|t| t.0)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
                let path = eval::task_file(task, e.path.as_deref(), cfg.eval_data_dir.as_deref())
                    .with_context(|| format!("evaluator `{}`", e.label))?;
                if tokenizer.is_none() {
                    let t = cfg.tokenizer.as_ref().ok_or_else(|| {
                        anyhow!("downstream evaluators need `tokenizer: {{identifier: path/to/tokenizer.json}}`")
                    })?;
                    tokenizer = Some(
                        tokenizers::Tokenizer::from_file(&t.identifier).map_err(|err| {
                            // OLMo's configs name its repository's files (tokenizers/...)
                            let hint = match Path::new(&t.identifier).exists() {
                                true => "",
                                false => " (a tokenizer.json file, relative to where olmo-train runs: OLMo's configs name files in OLMo's repository)",
                            };
                            anyhow!("tokenizer.identifier {}: {err}{hint}", t.identifier)
                        })?,
                    );
                }
                mc.push(eval::load_mc(
                    &e.label,
                    task,
                    &path,
                    tokenizer.as_ref().unwrap(),
                    e.limit,
                )?);
            }
            other => bail!(
                "evaluator `{}`: type `{other}` (expected lm or downstream)",
                e.label
            ),
        }
    }
    let mut unigram = Vec::new();
    if let (false, Some(train)) = (lm.is_empty(), train) {
        let u = Unigram::count(train, vocab, UNIGRAM_TOKENS)?;
        for set in &lm {
            unigram.push((set.label.clone(), u.loss(set)?));
        }
    }
    Ok(Evaluators { lm, mc, unigram })
}

/// The evaluators' results, or None (said in the log) where a stop signal cut them short.
fn run_evals(
    engine: &mut dyn Backend,
    evals: &Evaluators,
    cfg: &TrainConfig,
) -> Result<Option<eval::Results>> {
    match score(engine, evals, cfg) {
        Ok(r) => Ok(Some(r)),
        Err(e) if e.is::<eval::Abandoned>() => {
            eprintln!("olmo-train: {e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn score(engine: &mut dyn Backend, evals: &Evaluators, cfg: &TrainConfig) -> Result<eval::Results> {
    let mut out = eval::Results::new();
    for set in &evals.lm {
        let ce = eval::lm_loss(
            engine,
            cfg.model.vocab_size,
            set,
            cfg.device_eval_batch_size,
        )?;
        out.insert(format!("eval/{}/CrossEntropyLoss", set.label), ce);
        out.insert(format!("eval/{}/Perplexity", set.label), ce.exp());
    }
    for set in &evals.mc {
        let (acc, len_norm) = eval::mc_accuracy(
            engine,
            set,
            cfg.model.max_sequence_length,
            cfg.device_eval_batch_size,
        )?;
        out.insert(format!("eval/downstream/{}_acc", set.label), acc);
        out.insert(format!("eval/downstream/{}_len_norm", set.label), len_norm);
    }
    Ok(out)
}

/// Appends JSON-lines metrics; on resume keeps only the lines up to the resumed step.
struct Metrics {
    file: Option<std::fs::File>,
}

impl Metrics {
    fn open(folder: Option<&Path>, resume_step: u64) -> Result<Metrics> {
        let Some(folder) = folder else {
            return Ok(Metrics { file: None });
        };
        let path = folder.join("metrics.jsonl");
        let kept: String = if resume_step > 0 {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= resume_step)
                })
                .map(|l| format!("{l}\n"))
                .collect()
        } else {
            String::new()
        };
        let tmp = folder.join("metrics.jsonl.tmp");
        std::fs::write(&tmp, kept)?;
        std::fs::rename(&tmp, &path)?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(Metrics { file: Some(file) })
    }

    fn write(&mut self, step: u64, fields: &[(String, f64)]) -> Result<()> {
        if let Some(f) = &mut self.file {
            let mut obj = serde_json::Map::new();
            obj.insert("step".into(), step.into());
            for (k, v) in fields {
                obj.insert(k.clone(), serde_json::Value::from(*v));
            }
            writeln!(f, "{}", serde_json::Value::Object(obj))?;
        }
        Ok(())
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// What the memory planner foresees for a training step of `micro` windows on this GPU, in
/// the log; more than the GPU has is an error now rather than an out-of-memory error in the
/// first step. `free` is what the GPU had left with the state in place.
fn gpu_memory_check(
    cfg: &TrainConfig,
    mcfg: ModelConfig,
    seq: usize,
    micro: usize,
    (free, total): (u64, u64),
    lead: bool,
) -> Result<()> {
    use crate::memory_plan::{gib, training, Setup};
    let plan = training(mcfg, seq, micro, &Setup::of_run(cfg)?)?;
    let step = plan.peak - plan.state;
    if lead {
        eprintln!(
            "olmo-train: GPU memory (memory planner): state {}, a training step's peak {} of the GPU's {} ({} free now)",
            gib(plan.state),
            gib(plan.peak),
            gib(total),
            gib(free)
        );
    }
    if step > free {
        bail!(
            "a training step of {micro} x {seq} would need {} of GPU memory on top of the state's {} (the memory planner's count), and the GPU has {} free of {}: lower device_train_microbatch_size (gradient accumulation keeps the global batch) or set activation_checkpointing; `olmo-train info` shows each choice's peak",
            gib(step),
            gib(plan.state),
            gib(free),
            gib(total)
        );
    }
    Ok(())
}

/// Builds the engine for the device.
fn engine(
    device: Device,
    (bf16, flash): (bool, bool),
    model: Model,
    state: [Vec<f32>; 3],
    tcp: Option<&mut Tcp>,
) -> Result<Box<dyn Backend>> {
    let [params, exp_avg, exp_avg_sq] = state;
    match device {
        Device::Cpu => Ok(Box::new(Cpu::new(model, params, exp_avg, exp_avg_sq))),
        Device::Cuda(n) => {
            let mut e = crate::cuda::CudaEngine::with_precision(
                n,
                model,
                &params,
                &exp_avg,
                &exp_avg_sq,
                bf16,
            )?;
            if let Some(t) = tcp {
                e.enable_nccl(t)?;
            }
            flash_attention(&mut e, flash);
            Ok(Box::new(e))
        }
        Device::CudaEmulator => {
            let mut e = crate::cuda::CudaEngine::on(
                crate::gpu::Gpu::host_emulator(),
                model,
                [&params, &exp_avg, &exp_avg_sq],
                bf16,
            )?;
            flash_attention(&mut e, flash);
            Ok(Box::new(e))
        }
    }
}

/// `model.flash_attention` on the CUDA engine; where its kernels cannot run (fp32, an
/// unsupported head size) training goes on with the materialised attention and says so.
fn flash_attention(e: &mut crate::cuda::CudaEngine, on: bool) {
    if let Err(why) = e.set_flash_attention(on) {
        eprintln!("olmo-train: model.flash_attention: {why}; using the materialised attention");
    }
}

/// Trains as the config says.
pub fn run(cfg: TrainConfig, config_text: &str) -> Result<()> {
    run_on(cfg, config_text, None)
}

/// Trains as the config says; `device` overrides the config's `device:`. Installs the process's
/// SIGTERM and SIGINT handlers (see [`crate::stop`]): a signal ends the run after its step with
/// a checkpoint and the [`Stopped`] error.
pub fn run_on(cfg: TrainConfig, config_text: &str, device: Option<Request>) -> Result<()> {
    let began = Instant::now();
    stop::catch_signals();
    let world = World::from_env()?;
    // Rank 0 logs, evaluates and writes; every rank trains on its slice of each batch.
    let lead = world.rank == 0;
    let ignored = cfg.ignored_fields();
    if lead && !ignored.is_empty() {
        eprintln!(
            "olmo-train: ignoring config fields with no effect here: {}",
            ignored.join(", ")
        );
    }
    let request = cfg.device_request(device)?;
    let request = if world.size > 1 {
        request.on_local_rank(world.local_rank)
    } else {
        request
    };
    let (device, why) = device::resolve(request)?;
    if lead {
        eprintln!("olmo-train: device {why}");
    }
    let mut tcp = if world.size > 1 {
        let t = Tcp::connect(&world)?;
        if lead {
            eprintln!(
                "olmo-train: {} ranks joined at {}",
                world.size,
                t.meeting_place(&world)
            );
        }
        Some(t)
    } else {
        None
    };
    if !matches!(cfg.optimizer.name.as_str(), "adamw" | "lionw") {
        bail!(
            "optimizer.name `{}`: adamw and lionw are implemented",
            cfg.optimizer.name
        );
    }
    let (mcfg, init_fn) = cfg.model_config()?;
    cfg.check_training_options()?;
    let seq = cfg.model.max_sequence_length;
    let vocab = mcfg.vocab_size;
    let patterns = cfg.data.all_patterns();
    if patterns.is_empty() {
        bail!("data.paths (or data.datasets) is required");
    }
    let shards = open_shards(&patterns, &cfg.data.memmap_dtype, seq as u64, vocab)?;
    let shards = if cfg.data.label_mask_paths.is_empty() {
        shards
    } else {
        if !cfg.data.datasets.is_empty() {
            bail!("data.label_mask_paths goes with data.paths (one mask per token file), not data.datasets");
        }
        let masks = expand_paths(&cfg.data.label_mask_paths).context("data.label_mask_paths")?;
        shards.with_label_masks(masks)?
    };
    let data_seed = cfg.data.seed.unwrap_or(cfg.seed);
    let batch = cfg.global_train_batch_size;
    let ranks = world.size as u64;
    if !batch.is_multiple_of(ranks) {
        bail!("global_train_batch_size ({batch}) must be a multiple of the world size ({ranks})");
    }
    let micro = cfg.micro_batch_size();
    let per_epoch = epoch_len(shards.len(), ranks, cfg.data.drop_last);
    let steps_per_epoch = per_epoch / batch;
    if steps_per_epoch == 0 {
        bail!(
            "{} instances of {seq} tokens cannot fill one global batch of {batch}",
            shards.len()
        );
    }
    let tokens_per_step = batch * seq as u64;
    let max_steps = match cfg.max_duration {
        Duration::Steps(s) => s,
        Duration::Tokens(t) if t < tokens_per_step => {
            bail!("max_duration {t}T is less than one global batch ({tokens_per_step} tokens)")
        }
        // OLMo's whole batches within the tokens
        Duration::Tokens(t) => t / tokens_per_step,
        Duration::Epochs(e) => (e * steps_per_epoch as f64).ceil() as u64,
    };
    // OLMo runs the schedule in its units: steps, or tokens seen (t_warmup, t_max and
    // grad_clip_warmup_steps then count tokens, not rounded to steps)
    let in_tokens = match cfg.scheduler.units.as_str() {
        "steps" => false,
        "tokens" => true,
        other => bail!("scheduler.units `{other}`: steps or tokens"),
    };
    let kind = Kind::parse(&cfg.scheduler.name).ok_or_else(|| {
        anyhow!(
            "scheduler.name `{}` is not one of OLMo's: {}",
            cfg.scheduler.name,
            Kind::names().join(", ")
        )
    })?;
    let t_warmup = cfg.scheduler.t_warmup as u64;
    let layout = &Layout::new(&mcfg);
    if cfg.dry_run {
        // before anything is written: a dry run must not clear or create a save_folder, and
        // reads no weights (a big model's would fill a login node's memory)
        let own = start::own_checkpoint(&cfg, cfg.save_folder.as_deref().map(Path::new))?;
        let from = match (own, &cfg.load_path) {
            (Some(d), _) => format!("would resume {}", d.display()),
            (None, Some(p)) => format!(
                "would start from {}",
                start::checkpoint_of(Path::new(p))?.display()
            ),
            (None, None) => "would start from a new model".to_string(),
        };
        if lead {
            eprintln!(
                "olmo-train: dry_run: the config and data check out ({} parameters, {} instances of {seq} tokens, {max_steps} steps of {batch}; {from}); nothing trained or written (`olmo-train info -c` plans the memory)",
                layout.total,
                shards.len(),
            );
        }
        return Ok(());
    }
    let save_folder = cfg.save_folder.as_ref().map(PathBuf::from);
    if let Some(f) = &save_folder {
        std::fs::create_dir_all(f).with_context(|| format!("cannot create {}", f.display()))?;
    } else if lead {
        // OLMo's default is ./; a run that keeps nothing should say so before it starts
        eprintln!("olmo-train: no save_folder: this run keeps no checkpoint, metrics or data indices (set save_folder to keep them)");
    }

    let start = start::start(
        &cfg,
        (&mcfg, init_fn),
        layout,
        &DataFacts {
            instances: shards.len(),
            seq_len: seq as u64,
            seed: data_seed,
            world_size: ranks,
            global_batch: batch,
        },
        (save_folder.as_deref(), lead),
        t_warmup,
    )?;
    if lead {
        for note in &start.notes {
            eprintln!("olmo-train: {note}");
        }
    }
    let new_model = start.new_model;
    let (mut params, mut exp_avg, mut exp_avg_sq, mut state) =
        (start.params, start.exp_avg, start.exp_avg_sq, start.state);
    let mut grad_norm_exp_avg = start.grad_norm_exp_avg;
    // OLMo's T counts the tokens still to be seen: T more after a dataloader reset
    let max_steps = match cfg.max_duration {
        Duration::Tokens(t) => {
            state.step + t.saturating_sub(state.global_train_tokens_seen) / tokens_per_step
        }
        _ => max_steps,
    };
    let stop = cfg.stop_at.map_or(max_steps, |s| s.min(max_steps));
    let unit = if in_tokens { tokens_per_step } else { 1 };
    let t_max = match (cfg.scheduler.t_max, cfg.max_duration) {
        (Some(t), _) => t as u64,
        (None, Duration::Tokens(t)) if in_tokens => t,
        // OLMo's max_tokens: the tokens seen and those of the steps to go (a dataloader
        // reset starts the count again)
        (None, Duration::Steps(_)) if in_tokens => {
            state.global_train_tokens_seen + max_steps.saturating_sub(state.step) * unit
        }
        (None, _) => max_steps * unit,
    };
    let schedule = Schedule {
        kind,
        lr: cfg.optimizer.learning_rate as f64,
        t_warmup,
        t_max,
        alpha_f: cfg.scheduler.alpha_f,
        warmup_min_lr: cfg.scheduler.warmup_min_lr,
    };
    let evals = if lead {
        setup_evals(&cfg, Some(&shards), vocab)?
    } else {
        Evaluators {
            lm: Vec::new(),
            mc: Vec::new(),
            unigram: Vec::new(),
        }
    };
    let decay = layout.decay_mask(
        cfg.optimizer.decay_embeddings,
        cfg.optimizer.decay_norm_and_bias,
    );
    let bf16 = cfg.bf16()?;
    let mut engine = engine(
        device,
        (bf16, cfg.model.flash_attention),
        Model::new(mcfg, seq).with_checkpointing(cfg.activation_checkpointing),
        [
            std::mem::take(&mut params),
            std::mem::take(&mut exp_avg),
            std::mem::take(&mut exp_avg_sq),
        ],
        tcp.as_mut(),
    )?;
    if let Some((free, total)) = engine.device_memory() {
        let local = micro.min((batch / ranks).max(1)) as usize;
        gpu_memory_check(&cfg, mcfg, seq, local, (free, total), lead)?;
    }
    // Only rank 0 writes: metrics, checkpoints, indices, plot.
    let out_folder = if lead { save_folder.clone() } else { None };
    let mut metrics = Metrics::open(out_folder.as_deref(), state.step)?;
    // every rank records its own share, as OLMo
    let mut data_indices = match &save_folder {
        Some(f) if cfg.save_data_indices => Some(DataIndices::open(f, world.rank, state.step)?),
        _ => None,
    };
    let mut order = global_order(
        shards.len(),
        data_seed,
        state.epoch,
        ranks,
        cfg.data.drop_last,
    );
    if let Some(f) = &out_folder {
        write_global_indices(&f.join("train_data").join("global_indices.npy"), &order)?;
    }
    if lead {
        eprintln!(
        "olmo-train: {} parameters ({} non-embedding) in {} layers of {}, {:.1} MFLOPs/token; {} instances of {seq} tokens; {max_steps} steps of {batch} (micro-batch {micro}; {steps_per_epoch} steps per epoch); {}{}",
        layout.total,
        mcfg.non_embedding_params(),
        mcfg.n_layers,
        mcfg.block(),
        mcfg.flops_per_token(seq) / 1e6,
        shards.len(),
        engine.describe(),
        cfg.activation_checkpointing.describe(mcfg.n_layers)
    );
    }
    for (label, ce) in &evals.unigram {
        eprintln!(
            "olmo-train: unigram baseline on {label}: cross-entropy {ce:.4}, perplexity {:.1}",
            ce.exp()
        );
    }
    let plan = checkpoint::Plan {
        interval: cfg.save_interval,
        unsharded_interval: cfg.save_interval_unsharded,
        ephemeral_interval: cfg.save_interval_ephemeral,
        keep: checkpoint::Keep {
            regular: cfg.save_num_checkpoints_to_keep,
            unsharded: cfg.save_num_unsharded_checkpoints_to_keep,
        },
    };
    let save = |engine: &mut dyn Backend,
                state: &TrainerState,
                grad_norm_exp_avg: &[Option<f32>],
                kind: checkpoint::Kind|
     -> Result<()> {
        if let Some(f) = &out_folder {
            engine.with_state(&mut |params, m, v| {
                let dir = checkpoint::save(
                    f,
                    &Checkpoint {
                        layout,
                        params,
                        exp_avg: m,
                        exp_avg_sq: v,
                        grad_norm_exp_avg,
                        state,
                        config_text,
                        kind,
                    },
                    plan.keep,
                )?;
                let kind = match kind {
                    checkpoint::Kind::Regular => "",
                    checkpoint::Kind::Ephemeral => " (ephemeral)",
                    checkpoint::Kind::Unsharded => " (save_interval_unsharded: kept apart)",
                };
                eprintln!("olmo-train: saved {}{kind}", dir.display());
                Ok(())
            })?;
        }
        Ok(())
    };
    // OLMo's pre-train checkpoint: a save_folder that cannot take a checkpoint fails the run
    // now, not after the first interval's work
    if new_model && !cfg.no_pre_train_checkpoint {
        save(
            engine.as_mut(),
            &state,
            &grad_norm_exp_avg,
            plan.final_kind(),
        )?;
    }
    // the weights the run starts from: always the initial ones, and with OLMo's eval_on_load
    // a checkpoint's
    let mut first_eval = eval::Results::new();
    if (state.step == 0 || cfg.eval_on_load) && (!evals.lm.is_empty() || !evals.mc.is_empty()) {
        let mut fields: Vec<(String, f64)> = evals
            .unigram
            .iter()
            .map(|(l, ce)| (format!("eval/{l}/UnigramCrossEntropy"), *ce))
            .collect();
        if let Some(r) = run_evals(engine.as_mut(), &evals, &cfg)? {
            first_eval = r;
            print_evals(state.step, &first_eval);
            fields.extend(first_eval.iter().map(|(k, v)| (k.clone(), *v)));
        }
        if !fields.is_empty() {
            metrics.write(state.step, &fields)?;
        }
    }

    let (beta1, beta2) = cfg.optimizer.betas;
    let weight_decay = cfg.optimizer.weight_decay;
    let opt = match cfg.optimizer.name.as_str() {
        "lionw" => Optimizer::LionW(LionW {
            beta1,
            beta2,
            weight_decay,
        }),
        _ => Optimizer::AdamW(AdamW {
            beta1,
            beta2,
            eps: cfg.optimizer.eps,
            weight_decay,
        }),
    };
    let adaptive = cfg.max_grad_norm_ratio.map(|r| AdaptiveClip::new(r, &opt));
    let stop = cfg.stop_after.map_or(stop, |n| stop.min(state.step + n));
    if lead && state.step >= stop {
        eprintln!(
            "olmo-train: the checkpoint is already at step {} (stop at {stop}): nothing to train",
            state.step
        );
    }
    let (window, flops_available) = cfg.speed_monitor()?;
    let peak = flops_available.or(engine.peak_flops());
    let flops_per_token = mcfg.flops_per_token(seq);
    let mfu = |device_tps: f64| peak.map(|peak| 100.0 * flops_per_token * device_tps / peak);
    let mut speed = SpeedMonitor::new(window);
    let device_tokens = tokens_per_step / ranks;
    let start = Instant::now();
    let start_step = state.step;
    let (mut inputs, mut targets, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    let mut train_secs = 0.0f64;
    // (the summary names the latest evaluation of a checkpoint, not of the initial weights)
    let mut last_eval = if cfg.eval_on_load {
        first_eval
    } else {
        eval::Results::new()
    };
    let mut last_loss = f64::NAN;
    let mut stopped = None;
    let mut filtered_in_run = 0u64;
    // attention within documents: the EOS token that ends one
    let doc_eos = cfg
        .data
        .generate_doc_lengths
        .then_some(cfg.model.eos_token_id)
        .flatten();
    let mut first_step_docs = 0u64;
    while state.step < stop {
        let t0 = Instant::now();
        speed.batch_start(t0, device_tokens, state.step > start_step);
        if state.global_train_examples_seen_this_epoch + batch > order.len() as u64 {
            state.epoch += 1;
            state.global_train_examples_seen_this_epoch = 0;
            order = global_order(
                shards.len(),
                data_seed,
                state.epoch,
                ranks,
                cfg.data.drop_last,
            );
            if lead {
                eprintln!("olmo-train: epoch {} begins", state.epoch);
            }
        }
        let at = state.global_train_examples_seen_this_epoch as usize;
        // This rank's slice of the global batch, as OLMo's `[rank::world]`.
        let ids: Vec<u32> = order[at..at + batch as usize]
            .iter()
            .skip(world.rank)
            .step_by(world.size)
            .copied()
            .collect();
        engine.zero_grad()?;
        // OLMo divides each micro-batch's summed loss by the whole batch's token count
        // (`input_ids.numel()`, B × S, though each window scores S - 1 targets), so the
        // accumulated gradient is the same whatever the micro-batch size, and the reported
        // loss and the gradient's scale (which clipping sees) are OLMo's: (S - 1) / S of the
        // per-target mean. Evaluation losses are true means, as OLMo's evaluators.
        let scored = (batch * seq as u64) as f64;
        let (mut ce, mut z) = (0.0f64, 0.0f64);
        let mut filtered = 0u64;
        for chunk in ids.chunks(micro as usize) {
            let windows: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&i| shards.read(i as u64, Some(vocab as u64)))
                .collect::<Result<_>>()?;
            let (masks, dropped) =
                micro_batch_masks(&shards, chunk, &windows, cfg.data.instance_filter.as_ref())?;
            filtered += dropped;
            let b =
                Batch::from_masked_windows(&windows, masks.as_deref(), &mut inputs, &mut targets)
                    .within_documents(doc_eos, &mut starts);
            if let (Some(s), true) = (b.doc_starts, state.step == start_step) {
                first_step_docs += document_count(s, b.t);
            }
            let s = engine.forward_backward(&b, (1.0 / scored) as f32)?;
            ce += s.ce_sum;
            z += s.z_sum;
        }
        if let (Some(eos), true) = (doc_eos, lead && state.step == start_step) {
            let windows = ids.len() as u64;
            eprintln!(
                "olmo-train: attention within documents (EOS id {eos}): {first_step_docs} documents in this rank's {windows} windows of step {}{}",
                state.step + 1,
                if first_step_docs == windows {
                    "; no window holds an EOS, so attention spans each whole window: is model.eos_token_id the tokenizer's?"
                } else {
                    ""
                }
            );
        }
        let mut votes = Reason::votes(cfg.time_limit, began);
        if let Some(t) = tcp.as_mut() {
            engine.all_reduce_grads(t)?;
            let mut sums = [ce, z, votes[0], votes[1], votes[2], filtered as f64];
            t.all_reduce_f64(&mut sums)?;
            (ce, z) = (sums[0], sums[1]);
            votes = [sums[2], sums[3], sums[4]];
            filtered_in_run += sums[5] as u64;
        } else {
            filtered_in_run += filtered;
        }
        let early = Reason::decide(votes, cfg.time_limit);
        let (ce, z) = (ce / scored, z / scored);
        let step = state.step + 1;
        // where the schedule is at this step, in its units (OLMo counts the step's tokens in)
        let now = if in_tokens {
            state.global_train_tokens_seen + tokens_per_step
        } else {
            step
        };
        if !(ce + z).is_finite() {
            let last = save_folder
                .as_deref()
                .and_then(|f| checkpoint::latest(f).ok().flatten())
                .map_or("none was saved".to_string(), |p| p.display().to_string());
            bail!("loss is {} at step {step}: stopping. The last good checkpoint: {last}. A rerun resumes from it; consider a lower learning rate or clipping.", ce + z);
        }
        let lowest = state.min_train_loss.map_or(ce, |m| m.min(ce));
        state.min_train_loss = Some(lowest);
        // OLMo's spike stop, past the warmup (counted in the schedule's units, where OLMo
        // compares the step number with t_warmup even when that counts tokens)
        let early = early.or(match cfg.early_stopping_factor {
            Some(factor) if now > t_warmup && ce > factor * lowest => Some(Reason::LossIncrease {
                loss: ce,
                lowest,
                factor,
            }),
            _ => None,
        });
        // the bound and the ratio warm up alike
        let clip_warmup = match (
            cfg.scheduler.grad_clip_warmup_steps,
            cfg.scheduler.grad_clip_warmup_factor,
        ) {
            // OLMo's bolt-on warmup scheduler has no clip warmup
            (Some(w), Some(f)) if now <= w as u64 && state.lr_warmup_from.is_none() => f,
            _ => 1.0,
        };
        let max_norm = cfg.max_grad_norm.map(|m| m * clip_warmup);
        // OLMo's adaptive clipping, when set, takes the place of the global bound
        let coefs = match adaptive {
            Some(a) => {
                let a = AdaptiveClip {
                    ratio: a.ratio * clip_warmup,
                    ..a
                };
                let norms = engine.grad_norms()?;
                Some(a.coefficients(&norms, &mut grad_norm_exp_avg, step))
            }
            None => None,
        };
        // OLMo starts its bolt-on warmup at a step even when the schedule counts tokens; here
        // it starts where the schedule was then, in the schedule's units
        let warming_from = state
            .lr_warmup_from
            .map(|from| now.saturating_sub((step - from) * unit));
        let lr = schedule.lr_warming_from(now, warming_from) as f32;
        let norm = engine.step(&Update {
            step: state.optimizer_steps + 1,
            lr,
            max_norm,
            coefs: coefs.as_deref(),
            optimizer: opt,
            decay: &decay,
        })?;
        // OLMo's share of the gradients clipped: every tensor or none under the global bound
        let clipping_rate = match (&coefs, max_norm) {
            (Some(c), _) => c.iter().filter(|&&c| c < 1.0).count() as f64 / c.len() as f64,
            (None, Some(m)) => f64::from(u8::from(m / (norm + 1e-6) < 1.0)),
            (None, None) => 0.0,
        };
        state.step = step;
        state.optimizer_steps += 1;
        if let Some(d) = data_indices.as_mut() {
            d.write(step, &ids)?;
        }
        state.global_train_examples_seen_this_epoch += batch;
        state.global_train_tokens_seen += tokens_per_step;
        let now = Instant::now();
        train_secs += now.duration_since(t0).as_secs_f64();
        let rate = speed.check(now);
        last_loss = ce;
        let mut logged = vec![
            ("epoch".into(), state.epoch as f64),
            ("train/CrossEntropyLoss".into(), ce),
            ("train/Perplexity".into(), ce.exp()),
            ("train/ZLoss".into(), z),
            ("optim/total_grad_norm".into(), norm as f64),
            ("optim/clipping_rate".into(), clipping_rate),
            ("optim/learning_rate_group0".into(), lr as f64),
            (
                "throughput/total_tokens".into(),
                state.global_train_tokens_seen as f64,
            ),
            (
                "throughput/device/model_flops_per_token".into(),
                flops_per_token,
            ),
        ];
        if cfg.data.instance_filter.is_some() {
            // OLMo's metric: this rank's count
            logged.push(("train/masked_instances_local_rank".into(), filtered as f64));
        }
        if let Some(r) = rate {
            logged.push((
                "throughput/device/tokens_per_second".into(),
                r.tokens_per_second,
            ));
            logged.push((
                "throughput/device/batches_per_second".into(),
                r.batches_per_second,
            ));
            if let Some(m) = mfu(r.tokens_per_second) {
                logged.push(("throughput/device/MFU".into(), m));
            }
        }
        // OLMo's name and unit (10^6 bytes); this rank's peak (the ranks hold the same shapes)
        if let Some(bytes) = engine.peak_memory()? {
            logged.push(("System/Peak GPU Memory (MB)".into(), bytes as f64 / 1e6));
        }
        metrics.write(step, &logged)?;
        if lead {
            for note in engine.tuning_notes() {
                eprintln!("olmo-train: {note}");
            }
        }
        if lead && (step % cfg.console_log_interval.max(1) == 0 || step == stop) {
            let done = (step - start_step) as f64;
            let eta = start.elapsed().as_secs_f64() / done * (stop - step) as f64;
            // every rank trains in step with the others: the run's rate is this device's
            // times the world size
            let rate = rate.map_or(String::new(), |r| {
                format!(
                    "  {:.0} tokens/s{}",
                    r.tokens_per_second * ranks as f64,
                    mfu(r.tokens_per_second).map_or(String::new(), |m| format!("  MFU {m:.1}%"))
                )
            });
            eprintln!(
                "step {step:>6}/{stop}  loss {ce:.4}  z {z:.5}  lr {lr:.2e}  grad norm {norm:.3}{rate}  ETA {}",
                fmt_secs(eta)
            );
        }
        // stopping early is short of time: no evals then
        let evaluate = !(evals.lm.is_empty() && evals.mc.is_empty())
            && early.is_none()
            && (step % cfg.eval_interval.max(1) == 0 || step == stop);
        if evaluate {
            if let Some(r) = run_evals(engine.as_mut(), &evals, &cfg)? {
                print_evals(step, &r);
                metrics.write(
                    step,
                    &r.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>(),
                )?;
                last_eval = r;
            }
            speed.reset();
        }
        if let Some(kind) = plan.kind_at(step, step == stop || early.is_some()) {
            save(engine.as_mut(), &state, &grad_norm_exp_avg, kind)?;
            speed.reset();
        }
        if let Some(reason) = early {
            if lead {
                eprintln!(
                    "olmo-train: {}: stopping after step {step}{}",
                    reason.describe(),
                    if out_folder.is_some() {
                        ""
                    } else {
                        " (no save_folder: nothing was saved)"
                    }
                );
            }
            stopped = Some(reason);
            break;
        }
    }
    drop(metrics);
    if let Some(f) = &out_folder {
        let plot = f.join("loss.png");
        match crate::plot::loss_plot(&f.join("metrics.jsonl"), &plot) {
            Ok(()) => eprintln!("olmo-train: loss curves in {}", plot.display()),
            Err(e) => eprintln!("olmo-train: no plot: {e:#}"),
        }
    }
    let trained = state.step - start_step;
    let mut summary = format!(
        "olmo-train: done: {trained} steps this run (step {}, epoch {}), {} tokens in {} ({:.0} tokens/s), final train loss {last_loss:.4}",
        state.step,
        state.epoch,
        trained * tokens_per_step,
        fmt_secs(train_secs),
        (trained * tokens_per_step) as f64 / train_secs.max(1e-9),
    );
    // the largest rank's peak (rank 0's also holds the evaluations); every rank joins, a
    // rank without a peak sending -1
    let mut peak = engine.peak_memory()?.map(|b| b as f64);
    if let Some(t) = tcp.as_mut() {
        let mut each = vec![0.0; world.size];
        each[world.rank] = peak.unwrap_or(-1.0);
        t.all_reduce_f64(&mut each)?;
        peak = Some(each.iter().copied().fold(-1.0, f64::max)).filter(|p| *p >= 0.0);
    }
    if let Some(bytes) = peak {
        let whose = if world.size > 1 {
            " (the largest rank's)"
        } else {
            ""
        };
        summary += &format!(
            ", peak GPU memory {:.2} GiB{whose}",
            bytes / (1u64 << 30) as f64
        );
    }
    if cfg.data.instance_filter.is_some() {
        summary += &format!(
            "; the instance filter masked {filtered_in_run} of {} instances",
            trained * batch
        );
    }
    for (label, uni) in &evals.unigram {
        if let Some(ce) = last_eval.get(&format!("eval/{label}/CrossEntropyLoss")) {
            summary += &format!(
                "; {label} perplexity {:.1} (unigram {:.1})",
                ce.exp(),
                uni.exp()
            );
        }
    }
    match stopped {
        Some(Reason::TimeLimit(_)) => {
            summary += "; stopped early by time_limit: rerun the same command to continue"
        }
        Some(Reason::Signal(signal)) => {
            if lead {
                eprintln!("{summary}");
            }
            return Err(Stopped {
                signal,
                step: state.step,
            }
            .into());
        }
        // not a finished run: a job script must not go on to the next stage
        Some(reason @ Reason::LossIncrease { .. }) => {
            if lead {
                eprintln!("{summary}");
            }
            let next = match out_folder {
                Some(_) => " with a checkpoint. A rerun of the same command goes on (the lowest loss is kept, so it stops again while the loss stays that high); to pass the spike, start a new save_folder from the checkpoint with load_path and fast_forward_batches, or raise early_stopping_factor",
                None => " (no save_folder: nothing was saved)",
            };
            bail!(
                "{} after step {}: stopped early{next}",
                reason.describe(),
                state.step
            );
        }
        None => {}
    }
    if lead {
        eprintln!("{summary}");
    }
    Ok(())
}

fn print_evals(step: u64, r: &eval::Results) {
    for (k, v) in r {
        eprintln!("eval step {step:>6}  {k} {v:.4}");
    }
}

/// Evaluates a checkpoint (the given folder, else the newest in `save_folder`) with the
/// config's evaluators, without training; prints one line per metric and returns them.
pub fn evaluate(
    cfg: TrainConfig,
    device: Option<Request>,
    checkpoint: Option<PathBuf>,
) -> Result<eval::Results> {
    if cfg.evaluators.is_empty() {
        bail!("the config has no evaluators");
    }
    let (mcfg, _) = cfg.model_config()?;
    let seq = cfg.model.max_sequence_length;
    let layout = Layout::new(&mcfg);
    let dir = match checkpoint {
        Some(d) => d,
        None => {
            let folder = cfg
                .save_folder
                .as_ref()
                .ok_or_else(|| anyhow!("no --checkpoint and no save_folder to look in"))?;
            checkpoint::latest(Path::new(folder))?
                .ok_or_else(|| anyhow!("no checkpoint in {folder}"))?
        }
    };
    let params = checkpoint::read_weights(&dir, &layout)?;
    let (device, why) = device::resolve(cfg.device_request(device)?)?;
    eprintln!("olmo-train: evaluating {} on {why}", dir.display());
    // The unigram baseline needs the training files; without them it is left out.
    let patterns = cfg.data.all_patterns();
    let train = if patterns.is_empty() {
        None
    } else {
        open_shards(
            &patterns,
            &cfg.data.memmap_dtype,
            seq as u64,
            mcfg.vocab_size,
        )
        .ok()
    };
    let evals = setup_evals(&cfg, train.as_ref(), mcfg.vocab_size)?;
    let bf16 = cfg.bf16()?;
    let mut engine = engine(
        device,
        (bf16, cfg.model.flash_attention),
        Model::new(mcfg, seq),
        // evaluation never steps: no optimizer moments
        [params, Vec::new(), Vec::new()],
        None,
    )?;
    let mut r = score(engine.as_mut(), &evals, &cfg)?;
    for (label, ce) in &evals.unigram {
        r.insert(format!("eval/{label}/UnigramCrossEntropy"), *ce);
    }
    for (k, v) in &r {
        println!("{k} {v:.6}");
    }
    Ok(r)
}

/// A micro-batch's label masks: OLMo's label masks where the data has them, and every target
/// of an instance the instance filter drops (OLMo's `instance_mask`); with how many it dropped.
fn micro_batch_masks(
    shards: &Shards,
    ids: &[u32],
    windows: &[Vec<u32>],
    filter: Option<&InstanceFilter>,
) -> Result<(Option<Vec<Vec<bool>>>, u64)> {
    let mut masks = shards
        .has_label_masks()
        .then(|| {
            ids.iter()
                .map(|&i| shards.read_label_mask(i as u64))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    let Some(filter) = filter else {
        return Ok((masks, 0));
    };
    let mut dropped = 0;
    for (k, w) in windows.iter().enumerate() {
        if !filter.keeps(w) {
            dropped += 1;
            masks.get_or_insert_with(|| windows.iter().map(|w| vec![true; w.len()]).collect())[k]
                .fill(false);
        }
    }
    Ok((masks, dropped))
}
