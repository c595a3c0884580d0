//! Where a run starts: from scratch, from its own latest checkpoint (a restart, which must
//! continue exactly), or from another checkpoint, `load_path`, taken whole or in part with
//! OLMo's options (`reset_optimizer_state`, `reset_trainer_state`, `restore_dataloader`,
//! `fast_forward_batches`).
//!
//! Unlike OLMo, those options describe only the first start from `load_path`: once the run has
//! saved a checkpoint of its own, a restart resumes that one whole, so a fine-tuning or
//! spike-skipping run that is killed and rerun with the same config ends with the same bytes
//! as one that never stopped (OLMo resets or skips again on every restart).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use crate::checkpoint::{self, Loaded, Parts, TrainerState};
use crate::config::TrainConfig;
use crate::model::{init_params, Init, InitFn, Layout, ModelConfig};
use crate::olmo_checkpoint;

/// What the data order looks like now, to check a checkpoint's position against.
pub struct DataFacts {
    pub instances: u64,
    pub seq_len: u64,
    pub seed: u64,
    pub world_size: u64,
    pub global_batch: u64,
}

/// The weights, AdamW moments and trainer state the run starts with.
pub struct Start {
    pub params: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// Adaptive clipping's average gradient norm per tensor, where one was saved.
    pub grad_norm_exp_avg: Vec<Option<f32>>,
    pub state: TrainerState,
    /// What happened, for the log.
    pub notes: Vec<String>,
    /// A newly initialised model: neither a checkpoint resumed nor `load_path`'s weights.
    pub new_model: bool,
}

/// Chooses the checkpoint to start from and builds the starting point.
pub fn start(
    cfg: &TrainConfig,
    model: (&ModelConfig, InitFn),
    layout: &Layout,
    data: &DataFacts,
    (save_folder, lead): (Option<&Path>, bool),
    t_warmup: u64,
) -> Result<Start> {
    let own = own_checkpoint(cfg, save_folder)?;
    let mut notes = Vec::new();
    if let Some(f) = save_folder.filter(|_| !cfg.try_load_latest_save) {
        refuse_or_clear_earlier(cfg, f, lead, &mut notes)?;
    }
    if let Some(f) = save_folder.filter(|_| own.is_none() && cfg.try_load_latest_save) {
        let step0 = checkpoint::step_dir(f, 0);
        if step0.is_dir() {
            notes.push(format!(
                "{} is a pre-train checkpoint (initial weights, which the config makes again): starting anew, not resuming it",
                step0.display()
            ));
        }
    }
    let options = start_options(cfg);
    let fresh = |epoch: u64| TrainerState {
        step: 0,
        epoch,
        global_train_examples_seen_this_epoch: 0,
        global_train_tokens_seen: 0,
        seed: data.seed,
        world_size: data.world_size,
        instances: data.instances,
        seq_len: data.seq_len,
        num_params: layout.total as u64,
        optimizer_steps: 0,
        lr_warmup_from: None,
        min_train_loss: None,
        optimizer: cfg.optimizer.name.clone(),
    };
    let mut start = match (own, &cfg.load_path) {
        (Some(dir), load_path) => {
            if load_path.is_some() || !options.is_empty() {
                let given: Vec<String> = load_path
                    .iter()
                    .map(|_| "load_path".to_string())
                    .chain(options)
                    .collect();
                notes.push(format!(
                    "{} is this run's own checkpoint: resuming it whole ({} only shape the run's first start)",
                    dir.display(),
                    given.join(", ")
                ));
            }
            resume(&dir, layout, data, &cfg.optimizer.name)?
        }
        (None, Some(p)) => {
            let mut s = from_load_path(
                cfg,
                Path::new(p),
                (layout, t_warmup),
                data,
                &fresh,
                &mut notes,
            )?;
            // another run's lowest loss is no yardstick for this one's spikes
            s.state.min_train_loss = None;
            s
        }
        (None, None) => {
            if !options.is_empty() {
                notes.push(format!(
                    "{} {} no effect without load_path",
                    options.join(", "),
                    if options.len() == 1 { "has" } else { "have" }
                ));
            }
            let (mcfg, init_fn) = model;
            let (exp_avg, exp_avg_sq) = fresh_moments(layout.total, &cfg.optimizer.name);
            Start {
                params: init_params(
                    mcfg,
                    &Init {
                        kind: init_fn,
                        std: cfg.model.init_std,
                        cutoff: cfg.model.init_cutoff_factor,
                        emb_std: cfg.model.emb_init_std,
                        scale_emb: cfg.model.scale_emb_init,
                    },
                    cfg.seed,
                ),
                exp_avg,
                exp_avg_sq,
                grad_norm_exp_avg: vec![None; layout.tensors.len()],
                state: fresh(cfg.epoch.unwrap_or(0)),
                notes: Vec::new(),
                new_model: true,
            }
        }
    };
    // The world size may change between segments of a run (the order is the same: each rank
    // takes every world-th instance of the same global batch); record the present one.
    start.state.world_size = data.world_size;
    notes.append(&mut start.notes);
    start.notes = notes;
    Ok(start)
}

/// A run that does not resume must not leave an earlier run's later checkpoints beside its
/// own: a restart would take the newest, which is not this run's. `save_overwrite` removes
/// them (on rank 0, which alone writes checkpoints).
fn refuse_or_clear_earlier(
    cfg: &TrainConfig,
    folder: &Path,
    lead: bool,
    notes: &mut Vec<String>,
) -> Result<()> {
    let Some(newest) = checkpoint::list_steps(folder)?.into_iter().max() else {
        return Ok(());
    };
    if !cfg.save_overwrite {
        bail!(
            "{} holds checkpoints of an earlier run (up to step {newest}): resume it (try_load_latest_save: true), choose another save_folder, or set save_overwrite: true to replace them",
            folder.display()
        );
    }
    if let Some(p) = &cfg.load_path {
        let canonical = |p: &Path| std::fs::canonicalize(p).ok();
        if let (Some(p), Some(f)) = (canonical(Path::new(p)), canonical(folder)) {
            if p.starts_with(&f) {
                bail!(
                    "load_path {} is inside save_folder {}, which save_overwrite would clear: branch into another save_folder",
                    p.display(),
                    f.display()
                );
            }
        }
    }
    if lead {
        checkpoint::remove_all(folder)?;
        notes.push(format!(
            "save_overwrite: removed the earlier checkpoints in {} (up to step {newest})",
            folder.display()
        ));
    }
    Ok(())
}

/// The `load_path` options set away from their defaults, by name.
fn start_options(cfg: &TrainConfig) -> Vec<String> {
    let mut set = Vec::new();
    if cfg.reset_optimizer_state {
        set.push("reset_optimizer_state".to_string());
    }
    if cfg.reset_trainer_state {
        set.push("reset_trainer_state".to_string());
    }
    if !cfg.restore_dataloader {
        set.push("restore_dataloader: false".to_string());
    }
    if let Some(n) = cfg.fast_forward_batches {
        set.push(format!("fast_forward_batches: {n}"));
    }
    set
}

/// Zeroed optimizer moments for `total` parameters: `exp_avg`, and `exp_avg_sq` for AdamW only
/// (LionW keeps one moment, and its engines hold no second: 4 bytes a parameter).
fn fresh_moments(total: usize, optimizer: &str) -> (Vec<f32>, Vec<f32>) {
    let second = if optimizer == "lionw" { 0 } else { total };
    (vec![0.0; total], vec![0.0; second])
}

/// A restart from the run's own checkpoint: everything as it was, on the same data.
fn resume(dir: &Path, layout: &Layout, data: &DataFacts, optimizer: &str) -> Result<Start> {
    let parts = Parts {
        optimizer: true,
        trainer: true,
    };
    // OLMo's own, where save_folder is the run folder of one OLMo trained
    let l = load_any(dir, layout, parts, data)?;
    let state = l.state.expect("asked for");
    check_same_data(dir, &state, data)?;
    check_same_optimizer(dir, &state, optimizer)?;
    let (exp_avg, exp_avg_sq) = l.moments.expect("asked for");
    Ok(Start {
        params: l.params,
        exp_avg,
        exp_avg_sq,
        grad_norm_exp_avg: l.grad_norm_exp_avg,
        notes: vec![format!(
            "resuming from {} (step {})",
            dir.display(),
            state.step
        )],
        state,
        new_model: false,
    })
}

/// Moments carry over only to the optimizer that made them.
fn check_same_optimizer(dir: &Path, state: &TrainerState, optimizer: &str) -> Result<()> {
    if state.optimizer != optimizer {
        bail!(
            "{}: the checkpoint holds {}'s moments, the config asks for optimizer.name `{optimizer}`: set reset_optimizer_state: true to start {optimizer} with fresh moments",
            dir.display(),
            state.optimizer
        );
    }
    Ok(())
}

/// The checkpoint's data position means something only over the same windows in the same
/// order: say so when the data or its seed changed under the run.
fn check_same_data(dir: &Path, state: &TrainerState, data: &DataFacts) -> Result<()> {
    let hint = "to train it on other data, start a new save_folder from it with load_path and restore_dataloader: false (or reset_trainer_state: true)";
    if state.instances != data.instances || state.seq_len != data.seq_len {
        bail!(
            "{}: the checkpoint was trained on {} windows of {} tokens, the configured data has {} of {}: the data order would not continue; {hint}",
            dir.display(),
            state.instances,
            state.seq_len,
            data.instances,
            data.seq_len
        );
    }
    if state.seed != data.seed {
        bail!(
            "{}: the checkpoint's data order was shuffled with seed {}, the config gives {} (data.seed, else seed): the order would not continue; put the seed back, or {hint}",
            dir.display(),
            state.seed,
            data.seed
        );
    }
    Ok(())
}

/// The run's own newest checkpoint in `save_folder`, which it resumes whole, where it has
/// one past step 0 and `try_load_latest_save` is on. `step0` is the pre-train checkpoint, the
/// initial weights that the config makes again: a rerun after a failed or killed first step
/// starts anew, so a config fixed in between (the data, the model, an added `load_path`)
/// takes effect rather than being refused or overruled by an abandoned start.
pub fn own_checkpoint(cfg: &TrainConfig, save_folder: Option<&Path>) -> Result<Option<PathBuf>> {
    match save_folder {
        Some(f) if cfg.try_load_latest_save => Ok(checkpoint::list_steps(f)?
            .into_iter()
            .filter(|&s| s > 0)
            .max()
            .map(|s| checkpoint::step_dir(f, s))),
        _ => Ok(None),
    }
}

/// The checkpoint `load_path` names: a step folder (ours, or OLMo's `step{N}-unsharded` or
/// sharded `step{N}`), or a run's folder standing for its newest.
pub fn checkpoint_of(dir: &Path) -> Result<PathBuf> {
    crate::data::remote_refused(&dir.to_string_lossy(), "load_path")?;
    if !dir.is_dir() {
        bail!("load_path {}: no such checkpoint folder", dir.display());
    }
    let unread = |d: &Path, kind: &str| {
        anyhow!(
            "load_path {}: one of OLMo's checkpoints, {kind}, which olmo-train does not read: unshard it with OLMo's scripts/unshard.py and load the step{{N}}-unsharded folder",
            d.display()
        )
    };
    if dir.join("model.safetensors").exists() || olmo_checkpoint::is_olmo(dir) {
        return Ok(dir.to_path_buf());
    }
    if let Some(kind) = olmo_checkpoint::unread_kind(dir) {
        return Err(unread(dir, kind));
    }
    // the newest step; of one step's, ours, then OLMo's unsharded, then its sharded
    let mut newest: Option<(u64, u8, PathBuf)> = None;
    let mut unreadable = None;
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(n) = name.strip_prefix("step") else {
            continue;
        };
        let Ok(step) = n.strip_suffix("-unsharded").unwrap_or(n).parse::<u64>() else {
            continue;
        };
        let rank = if path.join("model.safetensors").exists() {
            0
        } else if olmo_checkpoint::is_unsharded(&path) {
            1
        } else if olmo_checkpoint::is_sharded(&path) {
            2
        } else {
            if let Some(kind) = olmo_checkpoint::unread_kind(&path) {
                unreadable = Some((path.clone(), kind));
            }
            continue;
        };
        if newest
            .as_ref()
            .is_none_or(|(s, r, _)| step > *s || (step == *s && rank < *r))
        {
            newest = Some((step, rank, path));
        }
    }
    match (newest, unreadable) {
        (Some((_, _, d)), _) => Ok(d),
        (None, Some((d, kind))) => Err(unread(&d, kind)),
        (None, None) => bail!(
            "load_path {}: no model.safetensors or model.pt, and no checkpoint folders in it (a checkpoint such as run/step1000, or OLMo's run/step1000-unsharded, is expected)",
            dir.display()
        ),
    }
}

/// Loads our checkpoint or OLMo's; of OLMo's, fills in what its trainer state does not record
/// (the data's size and seed) from the configured data, after checking the seed and window
/// length its `config.yaml` gives against the config's.
fn load_any(dir: &Path, layout: &Layout, parts: Parts, data: &DataFacts) -> Result<Loaded> {
    if !olmo_checkpoint::is_olmo(dir) {
        return checkpoint::load(dir, layout, parts);
    }
    let mut l = olmo_checkpoint::load(dir, layout, parts, (data.global_batch, data.seq_len))?;
    if let Some(s) = &mut l.state {
        let (seed, seq_len) = olmo_checkpoint::recorded_data(dir);
        s.seed = seed.unwrap_or(data.seed);
        s.seq_len = seq_len.unwrap_or(data.seq_len);
        s.instances = data.instances;
    }
    Ok(l)
}

/// The first start from another checkpoint, with OLMo's reset and data options.
fn from_load_path(
    cfg: &TrainConfig,
    dir: &Path,
    (layout, t_warmup): (&Layout, u64),
    data: &DataFacts,
    fresh: &dyn Fn(u64) -> TrainerState,
    notes: &mut Vec<String>,
) -> Result<Start> {
    let dir = &checkpoint_of(dir)?;
    let keep_moments = !cfg.reset_optimizer_state;
    // train.json holds AdamW's update count too, needed to keep its moments.
    let parts = Parts {
        optimizer: keep_moments,
        trainer: !cfg.reset_trainer_state || keep_moments,
    };
    let l = load_any(dir, layout, parts, data)?;
    if olmo_checkpoint::is_olmo(dir) && !cfg.reset_trainer_state && cfg.restore_dataloader {
        notes.push(format!(
            "{} is OLMo's: its train.pt does not record the data, so the data position assumes the configured data is the data it trained on",
            dir.display()
        ));
    }
    let loaded = l.state;
    if let (Some(ck), true) = (&loaded, keep_moments) {
        check_same_optimizer(dir, ck, &cfg.optimizer.name)?;
    }
    let mut what = vec!["weights".to_string()];
    let mut state = if cfg.reset_trainer_state {
        let mut s = fresh(cfg.epoch.unwrap_or(0));
        if let Some(ck) = &loaded {
            s.optimizer_steps = ck.optimizer_steps;
        }
        s
    } else {
        let mut s = loaded.expect("asked for");
        if cfg.restore_dataloader {
            what.push(format!("step {}", s.step));
            check_same_data(dir, &s, data)?;
            match cfg.epoch {
                Some(e) if e > s.epoch => {
                    what.push(format!("the data from the start of epoch {e}"));
                    s.epoch = e;
                    s.global_train_examples_seen_this_epoch = 0;
                }
                Some(e) if e < s.epoch => bail!(
                    "{}: the checkpoint is in epoch {}, the config asks for epoch {e}: remove `epoch` to continue the data, or set restore_dataloader: false to start it again",
                    dir.display(),
                    s.epoch
                ),
                _ => what.push(format!(
                    "the data position (epoch {}, {} instances in)",
                    s.epoch, s.global_train_examples_seen_this_epoch
                )),
            }
        } else {
            // OLMo's restore_dataloader: false (0.6.0's load_trainer_state_dict): the data
            // order, the count of tokens seen and the step all start again; the optimizer's
            // state, AdamW's update count included, is kept.
            s.epoch = cfg.epoch.unwrap_or(0);
            s.step = 0;
            s.global_train_examples_seen_this_epoch = 0;
            s.global_train_tokens_seen = 0;
            s.seed = data.seed;
            s.instances = data.instances;
            s.seq_len = data.seq_len;
            what.push(format!(
                "step 0 and the data from the start of epoch {} (restore_dataloader: false)",
                s.epoch
            ));
        }
        s
    };
    let name = match cfg.optimizer.name.as_str() {
        "lionw" => "LionW",
        _ => "AdamW",
    };
    let (exp_avg, exp_avg_sq) = match l.moments {
        Some(m) => {
            what.push(format!("{name}'s moments"));
            m
        }
        None => {
            state.optimizer = cfg.optimizer.name.clone();
            state.optimizer_steps = 0;
            if !cfg.reset_trainer_state {
                // OLMo's BoltOnWarmupScheduler: fresh moments under a running schedule.
                state.lr_warmup_from = Some(state.step);
                what.push(format!(
                    "fresh {name} moments with the LR warming up again from step {} over {} {}",
                    state.step, t_warmup, cfg.scheduler.units
                ));
            } else {
                what.push(format!("fresh {name} moments"));
            }
            fresh_moments(layout.total, &cfg.optimizer.name)
        }
    };
    if cfg.reset_trainer_state {
        what.push(format!(
            "a new trainer state at step 0 of epoch {} on the configured data",
            state.epoch
        ));
    }
    if let Some(n) = cfg.fast_forward_batches.filter(|&n| n > 0) {
        // OLMo counts skipped batches as seen examples (the data position) but not as tokens
        // trained on.
        state.global_train_examples_seen_this_epoch += n * data.global_batch;
        what.push(format!(
            "{n} batches skipped ({} instances)",
            n * data.global_batch
        ));
    }
    notes.push(format!(
        "starting from {}: {}",
        dir.display(),
        what.join(", ")
    ));
    Ok(Start {
        params: l.params,
        exp_avg,
        exp_avg_sq,
        grad_norm_exp_avg: l.grad_norm_exp_avg,
        state,
        notes: Vec::new(),
        new_model: false,
    })
}
