//! A first training loop on the CPU reference model: OLMo's data order, gradient averaging over
//! the global batch (instances computed in parallel), global-norm clipping, the LR schedule,
//! AdamW with embeddings undecayed (OLMo's default groups), a progress line and JSON-lines
//! metrics. Checkpoints, evaluation and micro-batch memory bounds are not implemented yet.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde::Deserialize;

use crate::data::{batch_instances, expand_paths, global_order, Dtype, Shards};
use crate::model::{forward_backward, init_normal, ModelConfig};
use crate::optim::{clip_grad_norm, AdamW, Moments};
use crate::schedule::{Kind, Schedule};

#[derive(Debug, Deserialize)]
pub struct TrainConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    #[serde(default)]
    pub scheduler: SchedulerSection,
    pub data: DataSection,
    pub global_train_batch_size: u64,
    /// Steps to train (OLMo's `max_duration` as an integer).
    pub max_duration: u64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub max_grad_norm: Option<f32>,
    #[serde(default)]
    pub softmax_auxiliary_loss: bool,
    #[serde(default = "default_aux")]
    pub auxiliary_loss_multiplier: f32,
    #[serde(default)]
    pub save_folder: Option<String>,
}

fn default_seed() -> u64 {
    6198
}
fn default_aux() -> f32 {
    1e-4
}

#[derive(Debug, Deserialize)]
pub struct ModelSection {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    #[serde(default)]
    pub mlp_hidden_size: Option<usize>,
    #[serde(default = "default_ratio")]
    pub mlp_ratio: usize,
    pub vocab_size: usize,
    pub max_sequence_length: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_std")]
    pub init_std: f32,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
}

fn default_ratio() -> usize {
    4
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_std() -> f32 {
    0.02
}
fn default_eps() -> f32 {
    1e-5
}

#[derive(Debug, Deserialize)]
pub struct OptimizerSection {
    #[serde(default = "default_lr")]
    pub learning_rate: f32,
    #[serde(default = "default_wd")]
    pub weight_decay: f32,
    #[serde(default = "default_betas")]
    pub betas: (f32, f32),
    #[serde(default = "default_adam_eps")]
    pub eps: f32,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        OptimizerSection {
            learning_rate: default_lr(),
            weight_decay: default_wd(),
            betas: default_betas(),
            eps: default_adam_eps(),
        }
    }
}

fn default_lr() -> f32 {
    4e-4
}
fn default_wd() -> f32 {
    0.1
}
fn default_betas() -> (f32, f32) {
    (0.9, 0.95)
}
fn default_adam_eps() -> f32 {
    1e-5
}

#[derive(Debug, Deserialize)]
pub struct SchedulerSection {
    #[serde(default = "default_sched")]
    pub name: String,
    #[serde(default)]
    pub t_warmup: u64,
    #[serde(default)]
    pub t_max: Option<u64>,
    #[serde(default = "default_alpha")]
    pub alpha_f: f64,
    #[serde(default)]
    pub warmup_min_lr: Option<f64>,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            name: default_sched(),
            t_warmup: 0,
            t_max: None,
            alpha_f: default_alpha(),
            warmup_min_lr: None,
        }
    }
}

fn default_sched() -> String {
    "cosine_with_warmup".into()
}
fn default_alpha() -> f64 {
    0.1
}

#[derive(Debug, Deserialize)]
pub struct DataSection {
    pub paths: Vec<String>,
    #[serde(default = "default_dtype")]
    pub memmap_dtype: String,
}

fn default_dtype() -> String {
    "uint16".into()
}

pub fn run(cfg: TrainConfig) -> Result<()> {
    let m = &cfg.model;
    if m.n_heads == 0
        || !m.d_model.is_multiple_of(m.n_heads)
        || !(m.d_model / m.n_heads).is_multiple_of(2)
    {
        bail!("model.d_model must split into n_heads heads of even size (RoPE rotates pairs)");
    }
    let model = ModelConfig {
        d_model: m.d_model,
        n_heads: m.n_heads,
        n_layers: m.n_layers,
        mlp_hidden: m
            .mlp_hidden_size
            .map_or(m.mlp_ratio * m.d_model / 2, |h| h / 2),
        vocab_size: m.vocab_size,
        rope_theta: m.rope_theta,
        eps: m.layer_norm_eps,
        z_loss: if cfg.softmax_auxiliary_loss {
            cfg.auxiliary_loss_multiplier
        } else {
            0.0
        },
    };
    let kind = Kind::parse(&cfg.scheduler.name).ok_or_else(|| {
        anyhow!(
            "scheduler.name `{}` is not supported yet",
            cfg.scheduler.name
        )
    })?;
    let schedule = Schedule {
        kind,
        lr: cfg.optimizer.learning_rate as f64,
        t_warmup: cfg.scheduler.t_warmup,
        t_max: cfg.scheduler.t_max.unwrap_or(cfg.max_duration),
        alpha_f: cfg.scheduler.alpha_f,
        warmup_min_lr: cfg.scheduler.warmup_min_lr,
    };
    let paths = expand_paths(&cfg.data.paths)?;
    let shards = Shards::open(
        &paths,
        Dtype::parse(&cfg.data.memmap_dtype)?,
        m.max_sequence_length as u64,
    )?;
    let order = global_order(shards.len(), cfg.seed, 0, 1, false);
    let batch = cfg.global_train_batch_size;
    let steps_per_epoch = order.len() as u64 / batch;
    if steps_per_epoch == 0 {
        bail!("{} instances cannot fill one batch of {batch}", order.len());
    }
    let mut params = init_normal(&model, m.init_std, cfg.seed);
    let opt = AdamW {
        beta1: cfg.optimizer.betas.0,
        beta2: cfg.optimizer.betas.1,
        eps: cfg.optimizer.eps,
        weight_decay: cfg.optimizer.weight_decay,
    };
    let mut state = Moments::zeros(params.len());
    let emb_params = model.embedding_size() * model.d_model;
    let mut metrics = match &cfg.save_folder {
        Some(f) => {
            std::fs::create_dir_all(f).with_context(|| format!("cannot create {f}"))?;
            Some(std::fs::File::create(
                PathBuf::from(f).join("metrics.jsonl"),
            )?)
        }
        None => None,
    };
    eprintln!(
        "olmo-train: {} parameters, {} instances of {} tokens, {} steps of {batch} (epoch = {steps_per_epoch} steps)",
        model.num_params(),
        shards.len(),
        m.max_sequence_length,
        cfg.max_duration
    );
    let start = Instant::now();
    for step in 1..=cfg.max_duration {
        let epoch_step = (step - 1) % steps_per_epoch;
        let ids = batch_instances(&order, epoch_step, batch, 0, 1)?;
        let seqs: Vec<Vec<u32>> = ids
            .iter()
            .map(|&i| shards.read(i as u64, Some(m.vocab_size as u64)))
            .collect::<Result<_>>()?;
        // Each instance's gradient in parallel, then averaged (OLMo averages over the batch).
        let (mut grads, loss, z) = seqs
            .par_iter()
            .map(|s| {
                let mut g = vec![0.0f32; params.len()];
                let (l, z) = forward_backward(&model, &params, s, &mut g);
                (g, l as f64, z as f64)
            })
            .reduce(
                || (vec![0.0f32; params.len()], 0.0, 0.0),
                |mut a, b| {
                    a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
                    (a.0, a.1 + b.1, a.2 + b.2)
                },
            );
        let n = seqs.len() as f32;
        grads.iter_mut().for_each(|g| *g /= n);
        let (loss, z) = (loss / n as f64, z / n as f64);
        if !loss.is_finite() {
            bail!("loss is {loss} at step {step}: stopping (no checkpoint is written yet)");
        }
        let norm = match cfg.max_grad_norm {
            Some(max) => clip_grad_norm(&mut [&mut grads], max),
            None => clip_grad_norm(&mut [&mut grads], f32::INFINITY),
        };
        let lr = schedule.lr(step) as f32;
        // OLMo's groups: Linear weights decayed, the embedding not (decay_embeddings = false).
        let (emb_p, rest_p) = params.split_at_mut(emb_params);
        let (emb_g, rest_g) = grads.split_at(emb_params);
        let (emb_m, rest_m) = state.m.split_at_mut(emb_params);
        let (emb_v, rest_v) = state.v.split_at_mut(emb_params);
        opt.step_slices(step, lr, emb_p, emb_g, emb_m, emb_v, false);
        opt.step_slices(step, lr, rest_p, rest_g, rest_m, rest_v, true);
        let secs = start.elapsed().as_secs_f64();
        let tokens = step * batch * m.max_sequence_length as u64;
        let tps = tokens as f64 / secs;
        let eta = secs / step as f64 * (cfg.max_duration - step) as f64;
        eprintln!("step {step:>6}  loss {loss:.4}  z {z:.5}  lr {lr:.2e}  grad norm {norm:.3}  {tps:.0} tokens/s  ETA {eta:.0}s");
        if let Some(f) = &mut metrics {
            writeln!(
                f,
                "{{\"step\":{step},\"train/CrossEntropyLoss\":{},\"train/ZLoss\":{z},\"optim/total_grad_norm\":{norm},\"optim/learning_rate\":{lr},\"throughput/tokens_per_second\":{tps}}}",
                loss - z
            )?;
        }
    }
    Ok(())
}
