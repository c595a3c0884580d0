//! The training config: OLMo's YAML field names (`model`, `optimizer`, `scheduler`, `data`,
//! `tokenizer`, `evaluators`, and the flat train fields), with OLMo's defaults where they make
//! sense on this engine. Fields OLMo has that change nothing here (dropout 0, FSDP, compile,
//! wandb, ...) are accepted and listed in a warning; values this engine does not implement
//! (biases, ALiBi, QK-norm, dropout > 0, ...) are errors, never silently ignored.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::device::Request;
use crate::instance_filter::InstanceFilter;
use crate::model::{Checkpointing, InitFn, ModelConfig};
use crate::ops::NormKind;

#[derive(Debug, Deserialize)]
pub struct TrainConfig {
    #[serde(default)]
    pub run_name: Option<String>,
    pub model: ModelSection,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    #[serde(default)]
    pub scheduler: SchedulerSection,
    pub data: DataSection,
    #[serde(default)]
    pub tokenizer: Option<TokenizerSection>,
    #[serde(default)]
    pub evaluators: Vec<EvaluatorSection>,
    #[serde(default = "default_eval_interval")]
    pub eval_interval: u64,
    #[serde(default = "default_eval_batch")]
    pub device_eval_batch_size: usize,
    /// Batches per LM eval set (-1: all).
    #[serde(default = "minus_one")]
    pub eval_subset_num_batches: i64,
    /// Folder of the `../shared/eval`-style task files, for downstream evaluators without `path`.
    #[serde(default)]
    pub eval_data_dir: Option<String>,
    pub global_train_batch_size: u64,
    #[serde(default)]
    pub device_train_microbatch_size: Option<u64>,
    /// Training length: steps (`1000`), tokens (`2e12T`) or epochs (`2ep`).
    pub max_duration: Duration,
    /// Stop after this step (the schedule still runs to `max_duration`).
    #[serde(default)]
    pub stop_at: Option<u64>,
    /// Stop after this many steps of this run (a job's share of a long run).
    #[serde(default)]
    pub stop_after: Option<u64>,
    /// Seconds after which the run saves and stops (OLMo's; for a job's wall-clock limit).
    #[serde(default)]
    pub time_limit: Option<f64>,
    /// OLMo's `eval_on_load`: evaluate the starting weights before the first step.
    #[serde(default)]
    pub eval_on_load: bool,
    /// OLMo's `dry_run`: check the config and the data, then stop without training.
    #[serde(default)]
    pub dry_run: bool,
    /// OLMo's: without it a new model (not resumed, no `load_path`) is saved as `step0` before
    /// the first step, so an unwritable or full `save_folder` shows now, not an interval later.
    #[serde(default)]
    pub no_pre_train_checkpoint: bool,
    /// OLMo's loss-spike stop: past the warmup, a step whose train loss is above this factor
    /// times the lowest train loss so far saves and stops the run.
    #[serde(default)]
    pub early_stopping_factor: Option<f64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// First epoch (OLMo counts from 0).
    #[serde(default)]
    pub epoch: Option<u64>,
    #[serde(default)]
    pub max_grad_norm: Option<f32>,
    /// OLMo's adaptive clipping, per tensor: in place of `max_grad_norm` when set.
    #[serde(default)]
    pub max_grad_norm_ratio: Option<f64>,
    #[serde(default)]
    pub softmax_auxiliary_loss: bool,
    #[serde(default = "default_aux")]
    pub auxiliary_loss_multiplier: f32,
    #[serde(default)]
    pub save_folder: Option<String>,
    /// Steps between checkpoints (`null`: only at the end, and OLMo's other series).
    #[serde(default = "default_save_interval")]
    pub save_interval: Option<u64>,
    /// Steps between OLMo's unsharded checkpoints: here of the one format, kept apart from
    /// `save_num_checkpoints_to_keep`, by `save_num_unsharded_checkpoints_to_keep`.
    #[serde(default)]
    pub save_interval_unsharded: Option<u64>,
    #[serde(default = "minus_one")]
    pub save_num_unsharded_checkpoints_to_keep: i64,
    /// Steps between OLMo's ephemeral checkpoints: each is removed by the next save, for
    /// frequent restart points without keeping them all.
    #[serde(default)]
    pub save_interval_ephemeral: Option<u64>,
    /// Step folders to keep (-1: all).
    #[serde(default = "minus_one")]
    pub save_num_checkpoints_to_keep: i64,
    /// A checkpoint folder to start from.
    #[serde(default)]
    pub load_path: Option<String>,
    /// Resume from the newest checkpoint in `save_folder` when there is one. On by default
    /// (unlike OLMo), so a killed run rerun with the same command continues.
    #[serde(default = "yes")]
    pub try_load_latest_save: bool,
    /// A run that does not resume (`try_load_latest_save: false`) replaces the checkpoints
    /// already in `save_folder`; without it, it refuses to mix its checkpoints with them.
    #[serde(default)]
    pub save_overwrite: bool,
    /// Starting from `load_path`: take its weights with fresh AdamW moments (an LR warmup of
    /// `t_warmup` steps is bolted on at the checkpoint's step unless the trainer state is reset
    /// too, as OLMo). The checkpoint may then lack `optim.safetensors`.
    #[serde(default)]
    pub reset_optimizer_state: bool,
    /// Starting from `load_path`: start at step 0 of epoch `epoch` (or 0) with the config's data
    /// (fine-tuning); the optimizer state is kept unless `reset_optimizer_state`.
    #[serde(default)]
    pub reset_trainer_state: bool,
    /// Starting from `load_path`: `false` restarts the data order at the beginning of epoch
    /// `epoch` (or 0), keeping the step; the tokens seen count again from 0 (as OLMo's), so a
    /// schedule in tokens and a `T` max_duration start again.
    #[serde(default = "yes")]
    pub restore_dataloader: bool,
    /// Starting from `load_path`: skip this many global batches of the data (past a loss spike).
    #[serde(default)]
    pub fast_forward_batches: Option<u64>,
    /// Write `data-indices/rank{R}.tsv.gz`: the instances each step trained on (OLMo's).
    #[serde(default = "yes")]
    pub save_data_indices: bool,
    #[serde(default = "one")]
    pub console_log_interval: u64,
    /// `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: Option<String>,
    /// `amp_bf16` (bf16 GEMM operands, f32 master weights; the CUDA default) or `fp32`. The
    /// CPU engine always computes in f32.
    #[serde(default)]
    pub precision: Option<String>,
    #[serde(default)]
    pub speed_monitor: SpeedMonitorSection,
    /// OLMo's `activation_checkpointing`: the blocks computed again in the backward pass
    /// rather than kept (`whole_layer`, `one_in_two`, ...; `true` is `whole_layer`, as OLMo
    /// reads its old configs), or each block's attention (`fine_grained`).
    #[serde(default, deserialize_with = "checkpointing")]
    pub activation_checkpointing: Checkpointing,
    #[serde(flatten)]
    pub other: BTreeMap<String, IgnoredAny>,
}

fn checkpointing<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Checkpointing, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Flag(bool),
        Name(String),
    }
    Ok(match Option::<Raw>::deserialize(d)? {
        None | Some(Raw::Flag(false)) => Checkpointing::Off,
        Some(Raw::Flag(true)) => Checkpointing::WholeLayer,
        Some(Raw::Name(n)) => match Checkpointing::from_name(&n) {
            Some(c) => c,
            None => {
                return Err(serde::de::Error::custom(format!(
                    "activation_checkpointing: unknown strategy {n:?}: OLMo's are {} (or false)",
                    Checkpointing::NAMES.join(", ")
                )))
            }
        },
    })
}

/// OLMo's `speed_monitor:` section.
#[derive(Debug, Deserialize)]
pub struct SpeedMonitorSection {
    /// Batches in the throughput window.
    #[serde(default = "default_speed_window")]
    pub window_size: usize,
    /// The device's peak FLOP/s for MFU, in place of the known bf16 peak of the GPU (OLMo
    /// reads this field but never uses it); it also gives MFU on a CPU or an unlisted GPU.
    #[serde(default)]
    pub gpu_flops_available: Option<f64>,
    #[serde(flatten)]
    pub other: BTreeMap<String, IgnoredAny>,
}

impl Default for SpeedMonitorSection {
    fn default() -> Self {
        SpeedMonitorSection {
            window_size: default_speed_window(),
            gpu_flops_available: None,
            other: BTreeMap::new(),
        }
    }
}

fn default_speed_window() -> usize {
    100
}

fn default_eval_interval() -> u64 {
    1000
}
fn default_eval_batch() -> usize {
    16
}
fn minus_one() -> i64 {
    -1
}
fn default_seed() -> u64 {
    6198
}
fn default_aux() -> f32 {
    1e-4
}
fn default_save_interval() -> Option<u64> {
    Some(1000)
}
fn yes() -> bool {
    true
}
fn one() -> u64 {
    1
}

/// `max_duration`: OLMo's int (steps) or string with a `T` (tokens) or `ep` (epochs) suffix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Duration {
    Steps(u64),
    Tokens(u64),
    Epochs(f64),
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Duration::Steps(n)),
            Raw::Str(s) => Duration::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Duration {
    pub fn parse(s: &str) -> Result<Duration> {
        let s = s.trim();
        let num = |v: &str| -> Result<f64> {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| anyhow!("max_duration `{s}`: `{v}` is not a number"))
        };
        if let Some(v) = s.strip_suffix("ep") {
            Ok(Duration::Epochs(num(v)?))
        } else if let Some(v) = s.strip_suffix('T') {
            Ok(Duration::Tokens(num(v)? as u64))
        } else {
            Ok(Duration::Steps(num(s)? as u64))
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ModelSection {
    pub d_model: usize,
    pub n_heads: usize,
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// OLMo's older switch for one k and v head; with `n_kv_heads` both must agree.
    #[serde(default)]
    pub multi_query_attention: Option<bool>,
    pub n_layers: usize,
    #[serde(default)]
    pub mlp_hidden_size: Option<usize>,
    #[serde(default = "default_ratio")]
    pub mlp_ratio: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub embedding_size: Option<usize>,
    pub max_sequence_length: usize,
    // The defaults below are OLMo's (`olmo/config.py`), so that a config means the same model
    // here as there: where OLMo's default is something this engine does not implement (no RoPE,
    // biases, dropout, LionW), leaving the key out is an error that says so, never a quietly
    // different model.
    #[serde(default)]
    pub rope: bool,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_norm")]
    pub layer_norm_type: String,
    #[serde(default = "yes")]
    pub layer_norm_with_affine: bool,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    #[serde(default = "yes")]
    pub include_bias: bool,
    #[serde(default)]
    pub bias_for_layer_norm: Option<bool>,
    #[serde(default = "yes")]
    pub weight_tying: bool,
    #[serde(default = "default_init")]
    pub init_fn: String,
    #[serde(default = "default_std")]
    pub init_std: f32,
    #[serde(default)]
    pub init_cutoff_factor: Option<f32>,
    /// The embedding's std in place of the init's (OLMo's; all three inits).
    #[serde(default)]
    pub emb_init_std: Option<f32>,
    /// full_megatron: the embedding's std is `init_std × √d_model` (OLMo's).
    #[serde(default)]
    pub scale_emb_init: bool,
    /// OLMo's norm right after the embedding: not implemented, refused when true.
    #[serde(default)]
    pub embedding_layer_norm: bool,
    #[serde(default = "default_act")]
    pub activation_type: String,
    #[serde(default = "default_block")]
    pub block_type: String,
    #[serde(default)]
    pub alibi: bool,
    /// QK-norm (OLMo 2): a norm of the layer_norm_type over the whole q and the whole k
    /// after their projection (and clip_qkv), before the head split and RoPE.
    #[serde(default)]
    pub attention_layer_norm: bool,
    #[serde(default = "yes")]
    pub attention_layer_norm_with_affine: bool,
    /// OLMo 2's reordered norms: `x + norm(attn(x))`, `x + norm(mlp(x))`.
    #[serde(default)]
    pub norm_after: bool,
    #[serde(default)]
    pub clip_qkv: Option<f32>,
    #[serde(default)]
    pub scale_logits: bool,
    /// OLMo's switch for the flash-attn library; here the CUDA engine's flash kernels (bf16
    /// only). The CPU engine computes the same exact attention either way.
    #[serde(default)]
    pub flash_attention: bool,
    #[serde(default = "default_dropout")]
    pub attention_dropout: f32,
    #[serde(default = "default_dropout")]
    pub residual_dropout: f32,
    #[serde(default = "default_dropout")]
    pub embedding_dropout: f32,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(flatten)]
    pub other: BTreeMap<String, IgnoredAny>,
}

fn default_ratio() -> usize {
    4
}
fn default_dropout() -> f32 {
    0.1
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_norm() -> String {
    "default".into()
}
fn default_eps() -> f32 {
    1e-5
}
fn default_init() -> String {
    "normal".into()
}
fn default_std() -> f32 {
    0.02
}
fn default_act() -> String {
    "swiglu".into()
}
fn default_block() -> String {
    "sequential".into()
}

#[derive(Debug, Deserialize)]
pub struct OptimizerSection {
    #[serde(default = "default_opt")]
    pub name: String,
    #[serde(default = "default_lr")]
    pub learning_rate: f32,
    #[serde(default = "default_wd")]
    pub weight_decay: f32,
    #[serde(default = "default_betas")]
    pub betas: (f32, f32),
    #[serde(default = "default_adam_eps")]
    pub eps: f32,
    #[serde(default)]
    pub decay_norm_and_bias: bool,
    #[serde(default)]
    pub decay_embeddings: bool,
    #[serde(flatten)]
    pub other: BTreeMap<String, IgnoredAny>,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        OptimizerSection {
            name: default_opt(),
            learning_rate: default_lr(),
            weight_decay: default_wd(),
            betas: default_betas(),
            eps: default_adam_eps(),
            decay_norm_and_bias: false,
            decay_embeddings: false,
            other: BTreeMap::new(),
        }
    }
}

// OLMo's optimizer defaults: LionW (not implemented: an error), lr 1e-4, weight decay 0.01
fn default_opt() -> String {
    "lionw".into()
}
fn default_lr() -> f32 {
    1e-4
}
fn default_wd() -> f32 {
    0.01
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
    #[serde(default = "default_units")]
    pub units: String,
    #[serde(default = "default_warmup")]
    pub t_warmup: f64,
    #[serde(default)]
    pub t_max: Option<f64>,
    #[serde(default = "default_alpha")]
    pub alpha_f: f64,
    #[serde(default)]
    pub warmup_min_lr: Option<f64>,
    #[serde(default)]
    pub grad_clip_warmup_steps: Option<f64>,
    #[serde(default)]
    pub grad_clip_warmup_factor: Option<f32>,
    #[serde(flatten)]
    pub other: BTreeMap<String, IgnoredAny>,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            name: default_sched(),
            units: default_units(),
            t_warmup: default_warmup(),
            t_max: None,
            alpha_f: default_alpha(),
            warmup_min_lr: None,
            grad_clip_warmup_steps: None,
            grad_clip_warmup_factor: None,
            other: BTreeMap::new(),
        }
    }
}

fn default_warmup() -> f64 {
    100.0
}
fn default_sched() -> String {
    "cosine_with_warmup".into()
}
fn default_units() -> String {
    "steps".into()
}
fn default_alpha() -> f64 {
    0.1
}

/// Token files: `paths`, or `datasets` (label → paths; labels sorted, as OLMo orders them).
#[derive(Debug, Deserialize, Default)]
pub struct DataSection {
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub datasets: BTreeMap<String, Vec<String>>,
    /// OLMo's label masks (NumPy bool memmaps), one per file of `paths` in the same order:
    /// targets whose mask is false are not trained on (a fine-tuning set's prompts).
    #[serde(default)]
    pub label_mask_paths: Vec<String>,
    /// OLMo-2's repetition filter: instances with a long periodic run are not trained on.
    #[serde(default)]
    pub instance_filter: Option<InstanceFilter>,
    /// Attention within documents (OLMo's name): a position attends only to the positions of
    /// its own document, documents ending with `model.eos_token_id`.
    #[serde(default)]
    pub generate_doc_lengths: bool,
    #[serde(default = "default_dtype")]
    pub memmap_dtype: String,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub drop_last: bool,
    #[serde(flatten)]
    pub other: BTreeMap<String, IgnoredAny>,
}

fn default_dtype() -> String {
    "uint16".into()
}

impl DataSection {
    /// Every path pattern, in OLMo's order (the training data as one instance space).
    pub fn all_patterns(&self) -> Vec<String> {
        self.groups("train")
            .into_iter()
            .flat_map(|(_, p)| p)
            .collect()
    }

    /// `(label, patterns)` groups in OLMo's order.
    pub fn groups(&self, default_label: &str) -> Vec<(String, Vec<String>)> {
        let mut g: Vec<(String, Vec<String>)> = Vec::new();
        if !self.paths.is_empty() {
            g.push((default_label.to_string(), self.paths.clone()));
        }
        g.extend(self.datasets.iter().map(|(k, v)| (k.clone(), v.clone())));
        g
    }
}

#[derive(Debug, Deserialize)]
pub struct TokenizerSection {
    /// A `tokenizer.json` path (OLMo takes a hub name here; this tool reads local files).
    pub identifier: String,
    #[serde(flatten)]
    pub other: BTreeMap<String, IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub struct EvaluatorSection {
    pub label: String,
    /// `lm` (token shards, the default) or `downstream` (a multiple-choice task).
    #[serde(default = "default_eval_type", rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: DataSection,
    /// Downstream: the task's name (default: the label), e.g. `arc_easy`, `hellaswag`.
    #[serde(default)]
    pub task: Option<String>,
    /// Downstream: its JSONL file.
    #[serde(default)]
    pub path: Option<String>,
    /// Downstream: score only the first N questions.
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(flatten)]
    pub other: BTreeMap<String, IgnoredAny>,
}

fn default_eval_type() -> String {
    "lm".into()
}

/// A config field set on the command line as OLMo's scripts take them: `--model.d_model=64`,
/// the value read as YAML (`--data.paths=[a.npy,b.npy]`); a bare `--save_overwrite` is `true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub key: String,
    pub value: String,
}

impl Override {
    /// `--key=value` or a bare `--key`, dashes in the key read as underscores (OLMo's
    /// `clean_opt`); None for anything not starting with `--`.
    pub fn parse(arg: &str) -> Option<Override> {
        let rest = arg.strip_prefix("--")?;
        let (key, value) = rest.split_once('=').unwrap_or((rest, "true"));
        Some(Override {
            key: key.replace('-', "_"),
            value: value.to_string(),
        })
    }
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--{}={}", self.key, self.value)
    }
}

/// OLMo's fields whose effect is on the machinery around training (a logging service,
/// compilation, sharding, data-loader workers, profiling, garbage collection, checkpoint
/// formats of its own), never on what a run computes or where it writes it: a field, or a
/// section with everything under it. `remote_save_folder`, say, is not one: a run without
/// the upload it asks for loses checkpoints.
const OLMO_MACHINERY: &[&str] = &[
    "wandb",
    "compile",
    "fsdp",
    "ddp",
    "single",
    "distributed_strategy",
    "fused_loss",
    "gen1_gc_interval",
    "canceled_check_interval",
    "extra_steps_after_cancel",
    "python_profiling",
    "torch_profiling",
    "sharded_checkpointer",
    "new_style_checkpoints",
    "load_path_sharded_checkpointer",
    "hf_datasets_cache_dir",
    "device_train_batch_size",
    "device_train_grad_accum",
    "model.init_device",
    "model.precision",
    "model.block_group_size",
    "optimizer.metrics_log_interval",
    "data.num_workers",
    "data.pin_memory",
    "data.prefetch_factor",
    "data.persistent_workers",
    "data.timeout",
];

/// Whether a dotted key is in `OLMO_MACHINERY` (an evaluator's `data.` too).
fn olmo_machinery(key: &str) -> bool {
    let key = match key
        .strip_prefix("evaluators.")
        .and_then(|r| r.split_once('.'))
    {
        Some((index, rest)) if index.parse::<usize>().is_ok() => rest,
        _ => key,
    };
    OLMO_MACHINERY.iter().any(|f| is_or_under(key, f))
}

/// Whether a dotted key names `field` or something inside it.
fn is_or_under(key: &str, field: &str) -> bool {
    key.strip_prefix(field)
        .is_some_and(|r| r.is_empty() || r.starts_with('.'))
}

/// `model.d_model` → [model, d_model]; `evaluators[0].label` is `evaluators.0.label`.
pub(crate) fn key_path(key: &str) -> Result<Vec<String>> {
    let parts: Vec<String> = key
        .replace('[', ".")
        .replace(']', "")
        .split('.')
        .map(str::to_string)
        .collect();
    if parts.iter().any(|s| s.is_empty()) {
        bail!("`{key}` has an empty part");
    }
    Ok(parts)
}

/// The place `path` names in a YAML tree, making the sections that are missing; list items
/// by index.
fn slot<'a>(
    mut node: &'a mut serde_json::Value,
    path: &[String],
) -> Result<&'a mut serde_json::Value> {
    use serde_json::Value;
    for (i, part) in path.iter().enumerate() {
        if node.is_null() {
            *node = Value::Object(Default::default());
        }
        node = match node {
            Value::Object(map) => map.entry(part.clone()).or_insert(Value::Null),
            Value::Array(items) => {
                let n = items.len();
                // one past the end appends (`--evaluators.1.label=x` to a list of 1)
                let index = part.parse::<usize>().ok().filter(|&k| k <= n);
                let index = index.ok_or_else(|| {
                    anyhow!(
                        "`{}` is a list of {n}: `{part}` is not an index in it (0 to {n}, {n} appends)",
                        path[..i].join(".")
                    )
                })?;
                if index == n {
                    items.push(Value::Null);
                }
                &mut items[index]
            }
            other => bail!(
                "`{}` is `{other}`, not a section with fields",
                path[..i].join(".")
            ),
        };
    }
    Ok(node)
}

/// A config's text with the command-line overrides applied and OmegaConf's interpolations
/// (`${run_name}`, `${oc.env:VAR}`, ...: see [`crate::interpolation`]) resolved in the merged
/// config, as OLMo's loader does: the text itself when there are neither, else the merged
/// config as YAML, which is what checkpoints save (so `config.yaml` in a checkpoint describes
/// the run that wrote it, as OLMo's does).
pub fn apply_overrides(text: &str, overrides: &[Override]) -> Result<String> {
    if overrides.is_empty() && !crate::interpolation::present(text) {
        return Ok(text.to_string());
    }
    let mut root: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| anyhow!("{e}"))?;
    for o in overrides {
        // A value YAML cannot read (`--run_name=a: b: c`) is taken as the string it is.
        let value = serde_saphyr::from_str(&o.value)
            .unwrap_or_else(|_| serde_json::Value::String(o.value.clone()));
        let place = slot(&mut root, &key_path(&o.key)?).with_context(|| o.to_string())?;
        // Where the config has a string, a number or a boolean stays the text it was
        // (`--run_name=007`); `null` still unsets (`--save_folder=null`). An interpolation
        // is no such string: it stood for the value given.
        let keep_text = place.as_str().is_some_and(|s| !s.contains("${"))
            && (value.is_number() || value.is_boolean());
        *place = if keep_text {
            serde_json::Value::String(o.value.clone())
        } else {
            value
        };
    }
    crate::interpolation::resolve(&mut root)?;
    serde_saphyr::to_string(&root).map_err(|e| anyhow!("{e}"))
}

/// The text of the config file at `path` with the overrides applied (`apply_overrides`).
pub fn read_with_overrides(path: &Path, overrides: &[Override]) -> Result<String> {
    Ok(read_and_merge(path, overrides)?.1)
}

/// The config file's text, and that text with the overrides applied.
fn read_and_merge(path: &Path, overrides: &[Override]) -> Result<(String, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let merged = apply_overrides(&text, overrides).with_context(|| match overrides.is_empty() {
        true => format!("{}: cannot resolve its interpolations", path.display()),
        false => format!("{}: cannot apply the overrides", path.display()),
    })?;
    Ok((text, merged))
}

impl TrainConfig {
    pub fn load(path: &Path) -> Result<(TrainConfig, String)> {
        Self::load_with(path, &[])
    }

    /// The config at `path` with command-line overrides applied; also the merged text.
    pub fn load_with(path: &Path, overrides: &[Override]) -> Result<(TrainConfig, String)> {
        let (text, merged) = read_and_merge(path, overrides)?;
        match serde_saphyr::from_str::<TrainConfig>(&merged) {
            Ok(cfg) => Ok((cfg, merged)),
            Err(e) if overrides.is_empty() => {
                // resolving interpolations rewrites the text: lines and columns are then its
                if merged != text {
                    bail!("{} (its interpolations resolved): {e}", path.display())
                }
                bail!("{}: {e}", path.display())
            }
            // Lines and columns are then the merged config's, not the file's.
            Err(e) => {
                let with: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
                bail!("{} with {}: {e}", path.display(), with.join(" "))
            }
        }
    }

    /// The device asked for: `overridden` (the command line), else `device:`, else auto.
    pub fn device_request(&self, overridden: Option<Request>) -> Result<Request> {
        match overridden {
            Some(r) => Ok(r),
            None => Request::parse(self.device.as_deref().unwrap_or("auto")),
        }
    }

    /// Windows per forward and backward pass: `device_train_microbatch_size`, within the
    /// global batch (all of it when unset).
    pub fn micro_batch_size(&self) -> u64 {
        let batch = self.global_train_batch_size;
        self.device_train_microbatch_size
            .unwrap_or(batch)
            .clamp(1, batch.max(1))
    }

    /// Whether GEMMs take bf16 operands (`precision: amp_bf16`, the default) or not (`fp32`).
    pub fn bf16(&self) -> Result<bool> {
        match self.precision.as_deref() {
            None | Some("amp_bf16") => Ok(true),
            Some("fp32") => Ok(false),
            Some(p) => bail!("precision `{p}`: amp_bf16 or fp32"),
        }
    }

    /// `speed_monitor:` checked: the window size and the peak FLOP/s for MFU (`None`: the
    /// engine's own).
    pub fn speed_monitor(&self) -> Result<(usize, Option<f64>)> {
        let s = &self.speed_monitor;
        if s.window_size == 0 {
            bail!(
                "speed_monitor.window_size must be at least 1 (batches in the throughput window)"
            );
        }
        if let Some(f) = s.gpu_flops_available {
            if !(f.is_finite() && f > 0.0) {
                bail!("speed_monitor.gpu_flops_available ({f}) must be a positive FLOP/s figure, e.g. 989e12");
            }
        }
        Ok((s.window_size, s.gpu_flops_available))
    }

    /// Config fields accepted without effect, for a warning (evaluators named by label).
    pub fn ignored_fields(&self) -> Vec<String> {
        self.ignored_paths(|_, e| format!("evaluators[{}]", e.label))
    }

    /// The fields without effect, each evaluator named by `evaluator(index, section)`.
    fn ignored_paths(&self, evaluator: impl Fn(usize, &EvaluatorSection) -> String) -> Vec<String> {
        let mut out: Vec<String> = self.other.keys().cloned().collect();
        let mut sect = |s: &str, m: &BTreeMap<String, IgnoredAny>| {
            out.extend(m.keys().map(|k| format!("{s}.{k}")))
        };
        sect("model", &self.model.other);
        sect("optimizer", &self.optimizer.other);
        sect("scheduler", &self.scheduler.other);
        sect("data", &self.data.other);
        sect("speed_monitor", &self.speed_monitor.other);
        if let Some(t) = &self.tokenizer {
            sect("tokenizer", &t.other);
        }
        // evaluation scores every target of every window, attending across the whole window
        let mut training_only = Vec::new();
        for (i, e) in self.evaluators.iter().enumerate() {
            let name = evaluator(i, e);
            sect(&name, &e.other);
            sect(&format!("{name}.data"), &e.data.other);
            if !e.data.label_mask_paths.is_empty() {
                training_only.push(format!("{name}.data.label_mask_paths"));
            }
            if e.data.instance_filter.is_some() {
                training_only.push(format!("{name}.data.instance_filter"));
            }
        }
        out.extend(training_only);
        out
    }

    /// The overrides that set a field this engine does not read: the command line says what
    /// to change for this run, so one that changes nothing is a mistake, not a warning;
    /// except OLMo's machinery fields (`OLMO_MACHINERY`), which its launch scripts pass and
    /// which change no result, warned about as the file's are.
    pub fn unread_overrides<'a>(&self, overrides: &'a [Override]) -> Vec<&'a Override> {
        // an override names evaluators by index, as `key_path` spells it
        let ignored = self.ignored_paths(|i, _| format!("evaluators.{i}"));
        overrides
            .iter()
            .filter(|o| {
                let key = key_path(&o.key).map_or(o.key.clone(), |p| p.join("."));
                !olmo_machinery(&key) && ignored.iter().any(|f| is_or_under(&key, f))
            })
            .collect()
    }

    /// OLMo options that would change what is trained and that this engine does not implement:
    /// errors, where options without effect (wandb, FSDP, ...) are only listed in a warning.
    pub fn check_training_options(&self) -> Result<()> {
        if let Some(r) = self
            .max_grad_norm_ratio
            .filter(|r| !(*r > 0.0 && r.is_finite()))
        {
            bail!("max_grad_norm_ratio ({r}) must be a positive number: each tensor's gradient is clipped to that many times its average norm");
        }
        if let Some(f) = &self.data.instance_filter {
            f.check()?;
        }
        let within_documents = self.data.generate_doc_lengths
            || self
                .evaluators
                .iter()
                .any(|e| e.kind == "lm" && e.data.generate_doc_lengths);
        if within_documents {
            match self.model.eos_token_id {
                None => bail!("data.generate_doc_lengths cuts documents at model.eos_token_id, which is not set (OLMo would take GPT-2's 50256): set it to the tokenizer's EOS id"),
                Some(e) if e as usize >= self.model.vocab_size => bail!(
                    "model.eos_token_id ({e}) is outside the vocabulary ({}), so data.generate_doc_lengths would find no document ends",
                    self.model.vocab_size
                ),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The model's shape, after checking every option against what this engine implements.
    pub fn model_config(&self) -> Result<(ModelConfig, InitFn)> {
        let m = &self.model;
        let unsupported =
            |what: &str| -> Result<()> { bail!("model.{what} is not implemented by olmo-train") };
        if m.n_heads == 0
            || !m.d_model.is_multiple_of(m.n_heads)
            || !(m.d_model / m.n_heads).is_multiple_of(2)
        {
            bail!("model.d_model ({}) must split into n_heads ({}) heads of even size (RoPE rotates pairs)", m.d_model, m.n_heads);
        }
        let n_kv_heads = match (m.n_kv_heads, m.multi_query_attention) {
            (None, mqa) => {
                if mqa == Some(true) {
                    1
                } else {
                    m.n_heads
                }
            }
            (Some(k), None) => k,
            (Some(k), Some(mqa)) => {
                let implied = if mqa { 1 } else { m.n_heads };
                if k != implied {
                    bail!("model.n_kv_heads ({k}) and multi_query_attention ({mqa}, meaning {implied} kv heads) disagree: set one of them");
                }
                k
            }
        };
        if n_kv_heads == 0 || !m.n_heads.is_multiple_of(n_kv_heads) {
            bail!("model.n_kv_heads ({n_kv_heads}) must divide n_heads ({}): each k and v head serves an equal group of q heads", m.n_heads);
        }
        if !m.rope {
            unsupported("rope: false (learned position embeddings; OLMo's default where the key is absent: set rope: true)")?;
        }
        if m.alibi {
            unsupported("alibi")?;
        }
        if m.include_bias || m.bias_for_layer_norm == Some(true) {
            unsupported("include_bias / bias_for_layer_norm (OLMo's default include_bias is true: set include_bias: false)")?;
        }
        if let Some(c) = m.clip_qkv.filter(|c| !(*c > 0.0 && c.is_finite())) {
            bail!("model.clip_qkv ({c}) must be a positive number: q, k and v are clamped to [-clip_qkv, clip_qkv]");
        }
        if m.scale_logits {
            unsupported("scale_logits")?;
        }
        if m.embedding_layer_norm {
            unsupported("embedding_layer_norm (a norm after the embedding)")?;
        }
        if m.activation_type != "swiglu" {
            unsupported(&format!("activation_type: {}", m.activation_type))?;
        }
        match (m.block_type.as_str(), m.norm_after) {
            // OLMo's llama block projects q, k and v with three Linears where sequential has one
            // (the same function of the same weights, stacked) and skips the document masking
            // (which this engine keeps); OLMo's GQA there only runs with one kv head, here any
            ("sequential", _) | ("llama", false) => {}
            ("llama", true) => bail!("model.block_type: llama with norm_after: true: OLMo's llama block never applies norm_after (it would train a pre-norm model); use block_type: sequential for OLMo 2's blocks"),
            (other, _) => unsupported(&format!("block_type: {other} (sequential or llama)"))?,
        }
        if m.attention_dropout > 0.0 || m.residual_dropout > 0.0 || m.embedding_dropout > 0.0 {
            unsupported("*_dropout > 0 (OLMo's default is 0.1: set attention_dropout, residual_dropout and embedding_dropout to 0)")?;
        }
        let norm = match m.layer_norm_type.as_str() {
            "default" | "low_precision" => NormKind::LayerNorm,
            "rms" => NormKind::Rms,
            other => {
                bail!("model.layer_norm_type `{other}`: expected default, low_precision or rms")
            }
        };
        let init = match self.model.init_fn.as_str() {
            "normal" => InitFn::Normal,
            "mitchell" => InitFn::Mitchell,
            "full_megatron" => InitFn::FullMegatron,
            other => bail!("model.init_fn `{other}`: expected normal, mitchell or full_megatron"),
        };
        let mlp_hidden = m.mlp_hidden_size.unwrap_or(m.mlp_ratio * m.d_model);
        if mlp_hidden == 0 || !mlp_hidden.is_multiple_of(2) {
            bail!("the MLP hidden size ({mlp_hidden}) must be even: SwiGLU splits it in halves");
        }
        let embedding_size = m.embedding_size.unwrap_or(m.vocab_size.div_ceil(128) * 128);
        if embedding_size < m.vocab_size {
            bail!(
                "model.embedding_size ({embedding_size}) is below vocab_size ({})",
                m.vocab_size
            );
        }
        Ok((
            ModelConfig {
                d_model: m.d_model,
                n_heads: m.n_heads,
                n_kv_heads,
                n_layers: m.n_layers,
                mlp_hidden: mlp_hidden / 2,
                vocab_size: m.vocab_size,
                embedding_size,
                rope_theta: m.rope_theta,
                eps: m.layer_norm_eps,
                z_loss: if self.softmax_auxiliary_loss {
                    self.auxiliary_loss_multiplier
                } else {
                    0.0
                },
                norm,
                norm_affine: m.layer_norm_with_affine,
                weight_tying: m.weight_tying,
                clip_qkv: m.clip_qkv,
                norm_after: m.norm_after,
                qk_norm: m.attention_layer_norm,
                qk_norm_affine: m.attention_layer_norm_with_affine,
            },
            init,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_olmo() {
        assert_eq!(Duration::parse("1000").unwrap(), Duration::Steps(1000));
        assert_eq!(
            Duration::parse("2e12T").unwrap(),
            Duration::Tokens(2_000_000_000_000)
        );
        assert_eq!(Duration::parse("2ep").unwrap(), Duration::Epochs(2.0));
        assert!(Duration::parse("many").is_err());
    }

    #[test]
    fn shipped_configs_parse_and_have_olmo_sizes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        for (file, params) in [
            ("OLMo-1B.yaml", 1_176_764_416usize),
            ("OLMo-7B.yaml", 6_888_095_744),
            // untied 100,352-row embedding and head, 16 layers of 67,117,056 (norms included)
            ("OLMo2-1B.yaml", 1_484_916_736),
            // 822,083,584 in embedding and head, 32 layers of 202,391,552, ln_f 4,096
            ("OLMo2-7B.yaml", 7_298_617_344),
            ("tiny.yaml", 0),
        ] {
            let (cfg, _) = TrainConfig::load(&dir.join(file)).unwrap();
            let (m, _) = cfg.model_config().unwrap();
            if params > 0 {
                assert_eq!(m.num_params(), params, "{file}");
            }
        }
    }

    /// A d_model 16, 4-head model of `layers` layers, with `extra` model keys.
    fn small_model(layers: usize, extra: &str) -> Result<ModelConfig> {
        let text = format!("model: {{d_model: 16, n_heads: 4, n_layers: {layers}, vocab_size: 10, max_sequence_length: 8, rope: true, include_bias: false, attention_dropout: 0, residual_dropout: 0, embedding_dropout: 0{extra}}}\n\
                            data: {{paths: [x]}}\nglobal_train_batch_size: 1\nmax_duration: 1\n");
        let cfg: TrainConfig = serde_saphyr::from_str(&text).unwrap();
        cfg.model_config().map(|(m, _)| m)
    }

    #[test]
    fn kv_heads_read_like_olmo() {
        let model = |extra: &str| small_model(1, extra);
        assert_eq!(model("").unwrap().n_kv_heads, 4);
        assert_eq!(model(", n_kv_heads: 2").unwrap().n_kv_heads, 2);
        assert_eq!(
            model(", multi_query_attention: true").unwrap().n_kv_heads,
            1
        );
        assert_eq!(
            model(", multi_query_attention: false").unwrap().n_kv_heads,
            4
        );
        let m = model(", n_kv_heads: 1, multi_query_attention: true").unwrap();
        assert_eq!((m.n_kv_heads, m.kv_dim(), m.qkv_width()), (1, 4, 24));
        let err = model(", n_kv_heads: 2, multi_query_attention: true").unwrap_err();
        assert!(err.to_string().contains("disagree"), "{err}");
        for k in [0, 3, 8] {
            let err = model(&format!(", n_kv_heads: {k}")).unwrap_err();
            assert!(err.to_string().contains("must divide n_heads (4)"), "{err}");
        }
        // OLMo 2 32B's shape (allenai/OLMo-2-0325-32B: 40 q heads, 8 kv heads, 64 layers):
        // 1,027,604,480 in embedding and head, 64 layers of 487,604,224 (q, o 5120²; k, v
        // 1024 × 5120; MLP 3 × 5120 × 27648; norms, k_norm 1024 wide), ln_f 5,120
        let text = "model: {d_model: 5120, n_heads: 40, n_kv_heads: 8, n_layers: 64, mlp_hidden_size: 55296, vocab_size: 100278, embedding_size: 100352, max_sequence_length: 4096, rope: true, include_bias: false, attention_dropout: 0, residual_dropout: 0, embedding_dropout: 0, weight_tying: false, layer_norm_type: rms, attention_layer_norm: true, norm_after: true}\n\
                    data: {paths: [x]}\nglobal_train_batch_size: 1\nmax_duration: 1\n";
        let cfg: TrainConfig = serde_saphyr::from_str(text).unwrap();
        assert_eq!(cfg.model_config().unwrap().0.num_params(), 32_234_279_936);
    }

    #[test]
    fn the_llama_block_is_the_sequential_one_without_norm_after() {
        let model = |extra: &str| small_model(2, extra);
        let llama = model(", block_type: llama, n_kv_heads: 2, init_fn: mitchell").unwrap();
        let sequential = model(", n_kv_heads: 2, init_fn: mitchell").unwrap();
        assert_eq!(format!("{llama:?}"), format!("{sequential:?}"));
        let err = model(", block_type: llama, norm_after: true").unwrap_err();
        assert!(
            err.to_string().contains("never applies norm_after"),
            "{err}"
        );
        let err = model(", embedding_layer_norm: true").unwrap_err();
        assert!(err.to_string().contains("embedding_layer_norm"), "{err}");
        let err = model(", block_type: parallel").unwrap_err();
        assert!(
            err.to_string()
                .contains("block_type: parallel (sequential or llama)"),
            "{err}"
        );
    }

    #[test]
    fn unimplemented_options_are_errors() {
        let text = "model: {d_model: 8, n_heads: 2, n_layers: 1, vocab_size: 10, max_sequence_length: 8, rope: true, include_bias: true}\n\
                    data: {paths: [x]}\nglobal_train_batch_size: 1\nmax_duration: 1\nwandb: {project: p}\n";
        let cfg: TrainConfig = serde_saphyr::from_str(text).unwrap();
        let err = cfg.model_config().unwrap_err().to_string();
        assert!(err.contains("include_bias"), "{err}");
        assert_eq!(cfg.ignored_fields(), vec!["wandb".to_string()]);
    }

    #[test]
    fn activation_checkpointing_reads_olmo_strategies_and_refuses_the_rest() {
        let base = "model: {d_model: 8, n_heads: 2, n_layers: 1, vocab_size: 10, max_sequence_length: 8}\n\
                    data: {paths: [x]}\nglobal_train_batch_size: 1\nmax_duration: 1\n";
        let parse = |extra: &str| {
            serde_saphyr::from_str::<TrainConfig>(&format!("{base}{extra}"))
                .map(|c| (c.activation_checkpointing, c.ignored_fields()))
                .map_err(|e| e.to_string())
        };
        let off = Ok((Checkpointing::Off, vec![]));
        assert_eq!(parse(""), off);
        assert_eq!(parse("activation_checkpointing: null\n"), off);
        assert_eq!(parse("activation_checkpointing: false\n"), off);
        // OLMo reads an old config's `true` as whole_layer
        let whole = Ok((Checkpointing::WholeLayer, vec![]));
        assert_eq!(parse("activation_checkpointing: true\n"), whole);
        assert_eq!(parse("activation_checkpointing: whole_layer\n"), whole);
        assert_eq!(
            parse("activation_checkpointing: three_in_four\n"),
            Ok((Checkpointing::AllButOneIn(4), vec![]))
        );
        assert_eq!(
            parse("activation_checkpointing: fine_grained\n"),
            Ok((Checkpointing::FineGrained, vec![]))
        );
        let err = parse("activation_checkpointing: every_layer\n").unwrap_err();
        assert!(
            err.contains("\"every_layer\"") && err.contains("whole_layer"),
            "{err}"
        );
    }

    #[test]
    fn speed_monitor_reads_olmo_fields_and_refuses_nonsense() {
        let base = "model: {d_model: 8, n_heads: 2, n_layers: 1, vocab_size: 10, max_sequence_length: 8}\n\
                    data: {paths: [x]}\nglobal_train_batch_size: 1\nmax_duration: 1\n";
        let parse = |extra: &str| -> TrainConfig {
            serde_saphyr::from_str(&format!("{base}{extra}")).unwrap()
        };
        assert_eq!(parse("").speed_monitor().unwrap(), (100, None));
        for peak in ["989e12", "989.0e+12", "989000000000000"] {
            let cfg = parse(&format!(
                "speed_monitor: {{window_size: 20, gpu_flops_available: {peak}}}\n"
            ));
            assert_eq!(cfg.speed_monitor().unwrap(), (20, Some(989e12)), "{peak}");
            assert!(cfg.ignored_fields().is_empty());
        }
        let cfg = parse("speed_monitor: {window_size: 20, stride: 3}\n");
        assert_eq!(
            cfg.ignored_fields(),
            vec!["speed_monitor.stride".to_string()]
        );
        let err = parse("speed_monitor: {window_size: 0}\n").speed_monitor();
        assert!(err.unwrap_err().to_string().contains("window_size"));
        let err = parse("speed_monitor: {gpu_flops_available: 0}\n").speed_monitor();
        assert!(err.unwrap_err().to_string().contains("gpu_flops_available"));
    }

    #[test]
    fn command_line_overrides_read_like_olmo_and_merge_into_the_config() {
        let o = |arg: &str| Override::parse(arg).unwrap();
        assert_eq!(
            o("--device-train-microbatch-size=4"),
            Override {
                key: "device_train_microbatch_size".into(),
                value: "4".into()
            }
        );
        assert_eq!(o("--save_overwrite").value, "true");
        assert_eq!(o("--run_name=a=b").value, "a=b");
        assert!(Override::parse("-c").is_none() && Override::parse("x=1").is_none());

        let base = "model: {d_model: 8, n_heads: 2, n_layers: 1, vocab_size: 10, max_sequence_length: 8}\n\
                    data: {paths: [x]}\nglobal_train_batch_size: 1\nmax_duration: 1\n\
                    run_name: r\nevaluators:\n- {label: a, data: {paths: [y]}}\n";
        assert_eq!(apply_overrides(base, &[]).unwrap(), base);
        let merged = apply_overrides(
            base,
            &[
                o("--model.n_layers=3"),
                o("--data.paths=[p.npy, q.npy]"),
                o("--optimizer.learning_rate=4e-4"),
                o("--scheduler.t_warmup=7"),
                o("--evaluators[0].label=held-out"),
                o("--evaluators.0.data.paths=[z]"),
                o("--run_name=007"),
            ],
        )
        .unwrap();
        let cfg: TrainConfig = serde_saphyr::from_str(&merged).unwrap();
        assert_eq!(cfg.model.n_layers, 3);
        assert_eq!(cfg.model.d_model, 8, "untouched fields stay");
        assert_eq!(cfg.data.paths, vec!["p.npy".to_string(), "q.npy".into()]);
        assert_eq!(cfg.optimizer.learning_rate, 4e-4);
        assert_eq!(cfg.scheduler.t_warmup, 7.0, "a missing section is made");
        assert_eq!(cfg.evaluators[0].label, "held-out");
        assert_eq!(cfg.evaluators[0].data.paths, vec!["z".to_string()]);
        assert_eq!(
            cfg.run_name.as_deref(),
            Some("007"),
            "a string field keeps the text"
        );
        // one past the end appends an entry, built field by field
        let merged = apply_overrides(
            base,
            &[
                o("--evaluators[1].label=more"),
                o("--evaluators.1.data.paths=[w]"),
                o("--data.paths.1=r.npy"),
            ],
        )
        .unwrap();
        let cfg: TrainConfig = serde_saphyr::from_str(&merged).unwrap();
        assert_eq!(cfg.evaluators.len(), 2);
        assert_eq!(cfg.evaluators[1].label, "more");
        assert_eq!(cfg.evaluators[1].data.paths, vec!["w".to_string()]);
        assert_eq!(cfg.data.paths, vec!["x".to_string(), "r.npy".into()]);
        let merged = apply_overrides(base, &[o("--run_name=null")]).unwrap();
        let cfg: TrainConfig = serde_saphyr::from_str(&merged).unwrap();
        assert_eq!(cfg.run_name, None, "null unsets a string field");

        for (bad, why) in [
            ("--model.d_model.x=1", "not a section"),
            (
                "--evaluators.3.label=x",
                "list of 1: `3` is not an index in it (0 to 1, 1 appends)",
            ),
            ("--model..x=1", "empty part"),
        ] {
            let err = apply_overrides(base, &[o(bad)]).unwrap_err();
            assert!(format!("{err:#}").contains(why), "{bad}: {err:#}");
        }

        let set = [
            o("--model.n_layer=2"),
            o("--wandb.name=r"),
            o("--seed=3"),
            o("--evaluators.0.foo=1"),
            o("--evaluators[0].data.num_workers=2"),
            o("--evaluators.0.data.drop_last=false"),
            o("--evaluators.0.data.label_mask_paths=[m.npy]"),
            o("--fsdp.sharding_strategy=HYBRID_SHARD"),
            o("--data.prefetch_factor=8"),
            o("--remote_save_folder=s3://b/run"),
            o("--data.num_workers_x=2"),
            o("--wandbx=1"),
        ];
        let cfg: TrainConfig =
            serde_saphyr::from_str(&apply_overrides(base, &set).unwrap()).unwrap();
        let unread: Vec<&str> = cfg
            .unread_overrides(&set)
            .iter()
            .map(|o| o.key.as_str())
            .collect();
        assert_eq!(
            unread,
            [
                "model.n_layer",
                "evaluators.0.foo",
                "evaluators.0.data.label_mask_paths",
                "remote_save_folder",
                "data.num_workers_x",
                "wandbx"
            ]
        );
        // OLMo's machinery, passed by its launch scripts: warned about, as in the file
        let ignored = cfg.ignored_fields();
        for f in ["wandb", "fsdp", "data.prefetch_factor"] {
            assert!(ignored.contains(&f.to_string()), "{f}: {ignored:?}");
        }
        // the file's own unknown fields under an evaluator's data are warned about too
        assert!(cfg
            .ignored_fields()
            .contains(&"evaluators[a].data.num_workers".to_string()));
    }
}
