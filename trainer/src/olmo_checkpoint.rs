//! OLMo's own checkpoints as a `load_path`: unsharded ones, `step{N}-unsharded/` as its
//! `FullCheckpointer` (or its `unshard.py`) writes them, with `model.pt` (the model's state
//! dict), `optim.pt` (the optimizer's, keyed by parameter name or by index) and `train.pt`
//! (step, epoch, data position, tokens seen), or `model/optim.safetensors` in OLMo's key
//! encoding instead of the `.pt` files; and sharded ones as its `torch_new`
//! checkpointer writes them, `step{N}/model_and_optim/` (a `torch.distributed.checkpoint`
//! folder of both state dicts, in chunks from every rank) with `train/rank0.pt`. A run OLMo
//! trained can so go on here, whole or in part with the usual `load_path` options, and
//! `export-hf` and `evaluate` read one; `export-olmo` writes the unsharded kind.
//!
//! Names are made compatible as OLMo's `_make_state_dict_compatible` does: FSDP's
//! `_fsdp_wrapped_module.` dropped, `block_groups.{g}.{i}` flattened to blocks, and an old
//! shared `norm` serving as both `attn_norm` and `ff_norm`; and DDP's `module.` dropped from
//! the `param_names` of a run OLMo trained without FSDP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::checkpoint::{self, Loaded, Parts, TrainerState};
use crate::config::TrainConfig;
use crate::dcp::Dcp;
use crate::model::Layout;
use crate::olmo_safetensors::{self, StFile};
use crate::pickle::Value;
use crate::torch_file::{f32_tensor, tensor_named, TensorRef, TorchFile};

/// Whether `dir` holds one of OLMo's unsharded checkpoints rather than one of ours: its
/// `model.pt`, or its `model.safetensors` in OLMo's key encoding.
pub fn is_unsharded(dir: &Path) -> bool {
    let st = dir.join("model.safetensors");
    match st.exists() {
        true => olmo_safetensors::is_encoded(&st),
        false => dir.join("model.pt").exists(),
    }
}

/// Whether `dir` holds one of OLMo's sharded checkpoints of the kind read here (its
/// `torch_new` checkpointer's, OLMo's configs' choice).
pub fn is_sharded(dir: &Path) -> bool {
    !dir.join("model.safetensors").exists() && dir.join("model_and_optim/.metadata").exists()
}

/// One of OLMo's unsharded files, `{stem}.safetensors` in OLMo's encoding or `{stem}.pt`,
/// opened, with its state dict; `None` where neither exists.
fn open_unsharded(dir: &Path, stem: &str) -> Result<Option<(Source, Value, PathBuf)>> {
    let st = dir.join(format!("{stem}.safetensors"));
    if st.exists() && olmo_safetensors::is_encoded(&st) {
        let f = StFile::open(&st)?;
        let root = f.root.clone();
        return Ok(Some((Source::St(f), root, st)));
    }
    let pt = dir.join(format!("{stem}.pt"));
    if !pt.exists() {
        return Ok(None);
    }
    let (f, root) = TorchFile::open(&pt)?;
    Ok(Some((Source::Torch(f), root, pt)))
}

/// Whether `dir` holds one of OLMo's checkpoints that this reads.
pub fn is_olmo(dir: &Path) -> bool {
    is_unsharded(dir) || is_sharded(dir)
}

/// The kind of OLMo's sharded checkpoint `dir` holds that is not read, if it holds one:
/// the legacy checkpointer's per-rank FSDP shards, or OLMo-core's own layout.
pub fn unread_kind(dir: &Path) -> Option<&'static str> {
    if dir.join("model.safetensors").exists() || is_olmo(dir) {
        None
    } else if dir.join("rank0.pt").exists() {
        Some("sharded by its legacy checkpointer (per-rank FSDP shards, rank{R}.pt)")
    } else if dir.join("model_and_optim").is_dir() || dir.join("model").is_dir() {
        Some("sharded but without model_and_optim/.metadata (torch.distributed.checkpoint's, the sharded kind read)")
    } else {
        None
    }
}

/// Puts a tensor's elements in their place.
fn fill(out: &mut [f32], v: Vec<f32>) -> Result<()> {
    if v.len() != out.len() {
        bail!("a tensor of {} elements read into {}", v.len(), out.len());
    }
    out.copy_from_slice(&v);
    Ok(())
}

/// Where a checkpoint's tensors are read from: a `torch.save` file or an OLMo-encoded
/// safetensors file of an unsharded checkpoint, or a sharded one's distributed-checkpoint
/// folder (whose tensors are named by their flattened key).
enum Source {
    Torch(TorchFile),
    St(StFile),
    Dcp(Dcp),
}

impl Source {
    fn f32s_into(&self, t: &TensorRef, out: &mut [f32]) -> Result<()> {
        match self {
            Source::Torch(f) => f.f32s_into(t, out),
            _ => fill(out, self.f32s(t)?),
        }
    }

    fn f32s(&self, t: &TensorRef) -> Result<Vec<f32>> {
        match self {
            Source::Torch(f) => f.f32s(t),
            Source::St(f) => f.f32s(t),
            Source::Dcp(d) => d.f32s(&t.storage.key),
        }
    }

    fn scalar(&self, t: &TensorRef) -> Result<f64> {
        match self {
            Source::Torch(f) => f.scalar(t),
            Source::St(f) => f.scalar(t),
            Source::Dcp(d) => match d.f32s(&t.storage.key)?.as_slice() {
                [x] => Ok(*x as f64),
                v => bail!("`{}` holds {} values, one expected", t.storage.key, v.len()),
            },
        }
    }
}

/// A sharded checkpoint's state dict under `prefix` (`model.`, `optim.state.`), its flat keys
/// split back into a tree `depth` deep (1: `{name: tensor}`; 2: `{name: {field: value}}`,
/// the field being the last part of the key).
fn dcp_tree(d: &Dcp, prefix: &str, depth: usize) -> Result<Value> {
    let mut tree: Vec<(String, Vec<(Value, Value)>)> = Vec::new();
    let mut put = |key: &str, v: Value| {
        let (name, field) = match depth {
            1 => (key, None),
            _ => match key.rsplit_once('.') {
                Some((n, f)) => (n, Some(f)),
                None => return,
            },
        };
        let i = match tree.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                tree.push((name.to_string(), Vec::new()));
                tree.len() - 1
            }
        };
        tree[i]
            .1
            .push((Value::Str(field.unwrap_or(name).to_string()), v));
    };
    let mut keys: Vec<&String> = d.tensors.keys().collect();
    keys.sort();
    for fqn in keys {
        if let Some(key) = fqn.strip_prefix(prefix) {
            put(key, tensor_named(fqn, &d.tensors[fqn].size));
        }
    }
    let mut objects: Vec<&str> = d.object_names().collect();
    objects.sort();
    for fqn in objects {
        if let (Some(key), Some(v)) = (fqn.strip_prefix(prefix), d.object(fqn)) {
            put(key, v?);
        }
    }
    Ok(Value::dict(
        tree.into_iter()
            .flat_map(|(name, items)| match depth {
                1 => items,
                _ => vec![(Value::Str(name), Value::dict(items))],
            })
            .collect(),
    ))
}

/// A state-dict key under the names this trainer's layout uses. A run OLMo trained with
/// `distributed_strategy: ddp` names its optimizer's parameters through the DDP wrapper
/// (`module.transformer...`), though its `model.pt` has the bare names.
fn compatible(key: &str, group_size: usize) -> String {
    let key = key.replace("_fsdp_wrapped_module.", "");
    let key = key
        .strip_prefix("module.")
        .map_or(key.clone(), str::to_string);
    if let Some(rest) = key.strip_prefix("transformer.block_groups.") {
        let mut parts = rest.splitn(3, '.');
        if let (Some(g), Some(i), Some(tail)) = (parts.next(), parts.next(), parts.next()) {
            if let (Ok(g), Ok(i)) = (g.parse::<usize>(), i.parse::<usize>()) {
                return format!("transformer.blocks.{}.{tail}", g * group_size + i);
            }
        }
    }
    key
}

/// The tensors of a state dict under compatible names, each with the names it had.
fn tensors_of(root: &Value, file: &Path) -> Result<HashMap<String, (TensorRef, String)>> {
    let entries = match root {
        Value::Dict(_) => root.entries(),
        other => bail!("{}: a {}, not a state dict", file.display(), other.kind()),
    };
    let keys: Vec<String> = entries
        .iter()
        .filter_map(|(k, _)| k.as_str().map(|s| s.replace("_fsdp_wrapped_module.", "")))
        .collect();
    let group_size = keys
        .iter()
        .filter(|k| {
            k.strip_prefix("transformer.block_groups.0.")
                .is_some_and(|r| r.ends_with(".attn_out.weight"))
        })
        .count()
        .max(1);
    let mut out = HashMap::new();
    for (k, v) in entries {
        let (Some(key), Value::Tensor(t)) = (k.as_str(), &v) else {
            bail!(
                "{}: entry {} is {}, a state dict maps names to tensors",
                file.display(),
                k.brief(),
                v.kind()
            );
        };
        let name = compatible(key, group_size);
        // before OLMo split it, one `norm` served both branches of a block
        if let Some(block) = name.strip_suffix(".norm.weight") {
            for n in ["attn_norm", "ff_norm"] {
                out.insert(format!("{block}.{n}.weight"), (t.clone(), key.to_string()));
            }
            continue;
        }
        out.insert(name, (t.clone(), key.to_string()));
    }
    Ok(out)
}

/// The layout's tensors from the model's state dict, as F32 master weights (BF16 and F16
/// ones widened).
pub fn read_model(dir: &Path, layout: &Layout) -> Result<Vec<f32>> {
    let (src, root, path) = if is_sharded(dir) {
        let path = dir.join("model_and_optim");
        let d = Dcp::open(&path)?;
        let root = dcp_tree(&d, "model.", 1)?;
        (Source::Dcp(d), root, path)
    } else {
        open_unsharded(dir, "model")?.ok_or_else(|| anyhow!("{}: no model.pt", dir.display()))?
    };
    let mut tensors = tensors_of(&root, &path)?;
    let mut missing = Vec::new();
    let mut found = Vec::new();
    for lt in &layout.tensors {
        let Some((t, key)) = tensors.remove(&lt.name) else {
            missing.push(lt.name.as_str());
            continue;
        };
        if t.shape != lt.shape {
            bail!(
                "{}: `{key}` is {:?}, the configured model's `{}` is {:?}: is the config's model the checkpoint's?",
                path.display(),
                t.shape,
                lt.name,
                lt.shape
            );
        }
        found.push((t, key));
    }
    if tensors.contains_key("embeddings.weight") {
        bail!(
            "{}: OLMo-core's parameter names (`embeddings.weight`, `blocks.N.attention.w_q.weight`, ...), which are not read: convert the checkpoint to transformers' format with OLMo-core's conversion script and read that with import-hf",
            path.display()
        );
    }
    if !missing.is_empty() {
        bail!(
            "{}: no {} for the configured model: is the config's model the checkpoint's?",
            path.display(),
            quoted(&missing)
        );
    }
    // the shared `norm` leaves its second name unclaimed when the model has no norm weights
    let mut extra: Vec<&str> = tensors
        .values()
        .map(|(_, key)| key.as_str())
        .filter(|k| !k.ends_with(".norm.weight"))
        .collect();
    if !extra.is_empty() {
        extra.sort();
        extra.dedup();
        bail!(
            "{}: {} {} not in the configured model (biases, a learned position embedding, an untied output?): is the config's model the checkpoint's?",
            path.display(),
            quoted(&extra),
            if extra.len() == 1 { "is" } else { "are" }
        );
    }
    let mut params = vec![0.0; layout.total];
    let parts: Vec<_> = layout
        .split_mut(&mut params)
        .into_iter()
        .zip(&found)
        .collect();
    let at = |key: &str| format!("{}: `{key}`", path.display());
    // tensors read in parallel where the reader is shared by threads (an OLMo-safetensors
    // file's reader keeps a pickled tree, which is not)
    use rayon::prelude::*;
    match &src {
        Source::Torch(f) => parts
            .into_par_iter()
            .try_for_each(|(dst, (t, key))| f.f32s_into(t, dst).with_context(|| at(key)))?,
        Source::Dcp(d) => parts.into_par_iter().try_for_each(|(dst, (t, key))| {
            d.f32s(&t.storage.key)
                .and_then(|v| fill(dst, v))
                .with_context(|| at(key))
        })?,
        Source::St(_) => parts
            .into_iter()
            .try_for_each(|(dst, (t, key))| src.f32s_into(t, dst).with_context(|| at(key)))?,
    }
    Ok(params)
}

fn quoted(names: &[&str]) -> String {
    let shown: Vec<String> = names.iter().take(4).map(|n| format!("`{n}`")).collect();
    match names.len() {
        n if n > 4 => format!("{} and {} more", shown.join(", "), n - 4),
        _ => shown.join(", "),
    }
}

/// A number in a checkpoint: an int, a float, or a one-element tensor.
fn number(f: &Source, v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(x) => Some(*x),
        Value::Tensor(t) => f.scalar(t).ok(),
        _ => None,
    }
}

/// AdamW's (or LionW's) state from `optim.pt`: moments, adaptive clipping's averages, and
/// the update count and optimizer they imply.
struct Optim {
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    grad_norm_exp_avg: Vec<Option<f32>>,
    steps: Option<u64>,
    optimizer: &'static str,
}

fn read_optim(dir: &Path, layout: &Layout) -> Result<Optim> {
    let (f, root, path) = if is_sharded(dir) {
        let path = dir.join("model_and_optim");
        let d = Dcp::open(&path)?;
        if !d.tensors.keys().any(|k| k.starts_with("optim.state.")) {
            bail!(
                "{}: no optimizer state in it (set reset_optimizer_state to start from the weights with fresh moments)",
                path.display()
            );
        }
        let root = Value::dict(vec![(
            Value::Str("state".into()),
            dcp_tree(&d, "optim.state.", 2)?,
        )]);
        (Source::Dcp(d), root, path)
    } else {
        open_unsharded(dir, "optim")?.ok_or_else(|| {
            anyhow!(
                "{} is missing (set reset_optimizer_state to start from the weights with fresh moments)",
                dir.join("optim.pt").display()
            )
        })?
    };
    let at = |what: &str| format!("{}: {what}", path.display());
    let state = root
        .get("state")
        .ok_or_else(|| anyhow!(at("no `state`: not an optimizer's state dict")))?;
    // FSDP's full optimizer state dict keys its state by name; a plain one by index, which
    // the param groups' `param_names` name
    let mut names: HashMap<i64, String> = HashMap::new();
    for g in root
        .get("param_groups")
        .and_then(|g| g.items())
        .unwrap_or_default()
    {
        let (Some(ids), Some(ns)) = (
            g.get("params").and_then(|p| p.items()),
            g.get("param_names").and_then(|p| p.items()),
        ) else {
            continue;
        };
        for (id, n) in ids.iter().zip(&ns) {
            if let (Some(id), Some(n)) = (id.as_int(), n.as_str()) {
                names.insert(id, n.to_string());
            }
        }
    }
    let mut by_name: HashMap<String, Value> = HashMap::new();
    for (k, v) in state.entries() {
        let name = match &k {
            Value::Str(s) => s.clone(),
            Value::Int(i) => names.get(i).cloned().ok_or_else(|| {
                anyhow!(at(&format!(
                    "state of parameter {i}, which no param group's `param_names` names"
                )))
            })?,
            other => bail!(at(&format!("a state keyed by {}", other.kind()))),
        };
        by_name.insert(compatible(&name, 1), v);
    }
    let lion = !by_name.values().any(|s| s.get("exp_avg_sq").is_some());
    let second = if lion { 0 } else { layout.total };
    let mut o = Optim {
        exp_avg: vec![0.0; layout.total],
        exp_avg_sq: vec![0.0; second],
        grad_norm_exp_avg: vec![None; layout.tensors.len()],
        steps: None,
        optimizer: if lion { "lionw" } else { "adamw" },
    };
    for (k, lt) in layout.tensors.iter().enumerate() {
        let s = by_name
            .get(&lt.name)
            .ok_or_else(|| anyhow!(at(&format!("no state for `{}`", lt.name))))?;
        let mut moments = vec![("exp_avg", &mut o.exp_avg)];
        if !lion {
            moments.push(("exp_avg_sq", &mut o.exp_avg_sq));
        }
        for (m, out) in moments {
            let t = match s.get(m) {
                Some(Value::Tensor(t)) => t,
                _ => bail!(at(&format!("`{}` has no `{m}` tensor", lt.name))),
            };
            if t.shape != lt.shape {
                bail!(at(&format!(
                    "`{}`'s {m} is {:?}, the parameter {:?}",
                    lt.name, t.shape, lt.shape
                )));
            }
            f.f32s_into(&t, &mut out[lt.range()])
                .with_context(|| at(&format!("`{}`'s {m}", lt.name)))?;
        }
        if let Some(v) = s.get("grad_norm_exp_avg") {
            o.grad_norm_exp_avg[k] = number(&f, &v).map(|x| x as f32);
        }
        if o.steps.is_none() {
            o.steps = s.get("step").and_then(|v| number(&f, &v)).map(|x| x as u64);
        }
    }
    Ok(o)
}

/// The trainer state `train.pt` records (`other.pt` in OLMo's oldest checkpoints,
/// `train/rank0.pt` in sharded ones: the data position is global, the same on every rank). OLMo
/// records neither the data's size nor its seed: those are left 0 for the caller. `batch`
/// is the run's global batch and window length, by which, as OLMo does, the counts of the
/// oldest checkpoints (in data steps) become instances and tokens.
fn read_train(dir: &Path, layout: &Layout, (batch, seq): (u64, u64)) -> Result<TrainerState> {
    let path = ["train.pt", "other.pt", "train/rank0.pt"]
        .map(|n| dir.join(n))
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!(
                "{} is missing (set reset_trainer_state to start from the weights alone)",
                dir.join("train.pt").display()
            )
        })?;
    let (file, root) = TorchFile::open(&path)?;
    let f = Source::Torch(file);
    let count = |name: &str| -> Result<Option<u64>> {
        match root.get(name) {
            None | Some(Value::None) => Ok(None),
            Some(v) => number(&f, &v)
                .filter(|x| *x >= 0.0)
                .map(|x| Some(x as u64))
                .ok_or_else(|| {
                    anyhow!(
                        "{}: `{name}` is {}, a count expected",
                        path.display(),
                        v.kind()
                    )
                }),
        }
    };
    let step =
        count("global_step")?.ok_or_else(|| anyhow!("{}: no `global_step`", path.display()))?;
    let data_steps = count("global_data_step")?.unwrap_or(step);
    let examples = match count("global_train_examples_seen_this_epoch")? {
        Some(n) => n,
        None => count("global_train_examples_seen")?.unwrap_or(data_steps * batch),
    };
    Ok(TrainerState {
        step,
        epoch: count("epoch")?.unwrap_or(0),
        global_train_examples_seen_this_epoch: examples,
        global_train_tokens_seen: count("global_train_tokens_seen")?
            .unwrap_or(data_steps * batch * seq),
        seed: 0,
        world_size: count("world_size")?.unwrap_or(1),
        instances: 0,
        seq_len: 0,
        num_params: layout.total as u64,
        optimizer_steps: step,
        lr_warmup_from: None,
        min_train_loss: None,
        optimizer: "adamw".into(),
    })
}

/// Loads one of OLMo's checkpoints as [`crate::checkpoint::load`] loads one of ours;
/// `batch` as [`read_train`] takes it.
pub fn load(dir: &Path, layout: &Layout, parts: Parts, batch: (u64, u64)) -> Result<Loaded> {
    let mut state = match parts.trainer {
        true => Some(read_train(dir, layout, batch)?),
        false => None,
    };
    let params = read_model(dir, layout)?;
    let mut grad_norm_exp_avg = vec![None; layout.tensors.len()];
    let moments = if parts.optimizer {
        let o = read_optim(dir, layout)?;
        if let Some(s) = &mut state {
            s.optimizer = o.optimizer.into();
            s.optimizer_steps = o.steps.unwrap_or(s.step);
        }
        grad_norm_exp_avg = o.grad_norm_exp_avg;
        Some((o.exp_avg, o.exp_avg_sq))
    } else {
        None
    };
    Ok(Loaded {
        params,
        moments,
        grad_norm_exp_avg,
        state,
    })
}

/// What the checkpoint's `config.yaml` says of the data order: its seed (`data.seed`, else
/// `seed`) and window length, where it says.
pub fn recorded_data(dir: &Path) -> (Option<u64>, Option<u64>) {
    let Ok(text) = std::fs::read_to_string(dir.join("config.yaml")) else {
        return (None, None);
    };
    let Ok(v) = serde_saphyr::from_str::<serde_json::Value>(&text) else {
        return (None, None);
    };
    let seed = v["data"]["seed"].as_u64().or_else(|| v["seed"].as_u64());
    (seed, v["model"]["max_sequence_length"].as_u64())
}

fn text(s: &str) -> Value {
    Value::Str(s.to_string())
}

fn map(items: Vec<(&str, Value)>) -> Value {
    Value::dict(items.into_iter().map(|(k, v)| (text(k), v)).collect())
}

/// The optimizer state dict's form OLMo's trainer saves, which depends on how it wraps the
/// model (`distributed_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// FSDP's full optimizer state dict: state keyed by name, groups marked `sharded`, so
    /// the grad norm is summed over the ranks' shards. OLMo's default.
    Fsdp,
    /// A plain `state_dict()`: state keyed by index, `param_names` through DDP's `module.`,
    /// not `sharded`. OLMo's DDP path loads an optimizer state as it stands, so a `sharded`
    /// flag would make each rank's whole-gradient norm count once per rank (√world too big).
    Ddp,
}

impl Strategy {
    /// `distributed_strategy` in a checkpoint's `config.yaml` (OLMo's default, FSDP, when
    /// it says none).
    pub fn of_checkpoint(dir: &Path) -> Result<Strategy> {
        let path = dir.join("config.yaml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value = serde_saphyr::from_str(&text)
            .with_context(|| format!("{}: not YAML", path.display()))?;
        match &v["distributed_strategy"] {
            serde_json::Value::Null => Ok(Strategy::Fsdp),
            s => Strategy::parse(s.as_str().unwrap_or_default()).with_context(|| {
                format!(
                    "{}: distributed_strategy (give the OLMo run's with --distributed_strategy fsdp|ddp)",
                    path.display()
                )
            }),
        }
    }

    /// OLMo's names: `fsdp`, `ddp`.
    pub fn parse(s: &str) -> Result<Strategy> {
        match s {
            "fsdp" => Ok(Strategy::Fsdp),
            "ddp" => Ok(Strategy::Ddp),
            other => {
                bail!("`{other}`: OLMo's unsharded checkpoints come from `fsdp` or `ddp` runs")
            }
        }
    }
}

/// A config number held as `f32` here, as the Python float the config's text gives OLMo
/// (0.1, not 0.10000000149011612): OLMo's DDP path takes betas, eps and weight decay from the
/// saved param groups.
fn py(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// The order OLMo's optimizer holds the tensors in (indices into `layout.tensors`), one list
/// per param group as its `get_param_groups` makes them: decayed tensors, then the others with
/// weight decay 0, each sorted by name, empty ones left out.
fn group_order(cfg: &TrainConfig, layout: &Layout) -> Vec<(bool, Vec<usize>)> {
    let o = &cfg.optimizer;
    let decay = layout.decay_mask(o.decay_embeddings, o.decay_norm_and_bias);
    [true, false]
        .into_iter()
        .filter_map(|decayed| {
            let mut ids: Vec<usize> = (0..layout.tensors.len())
                .filter(|&i| decay[i] == decayed)
                .collect();
            ids.sort_by(|&a, &b| layout.tensors[a].name.cmp(&layout.tensors[b].name));
            (!ids.is_empty()).then_some((decayed, ids))
        })
        .collect()
}

/// OLMo's param groups, in `strategy`'s form: the groups of [`group_order`], their tensors
/// by name (FSDP) or by their index in that order (DDP).
fn param_groups(cfg: &TrainConfig, layout: &Layout, strategy: Strategy) -> Value {
    let o = &cfg.optimizer;
    let opt = |x: Option<f64>| x.map_or(Value::None, Value::Float);
    let mut groups = Vec::new();
    let mut index = 0;
    for (decayed, ids) in group_order(cfg, layout) {
        let wd = if decayed { py(o.weight_decay) } else { 0.0 };
        let name = |i: &usize| layout.tensors[*i].name.as_str();
        let (param_names, params) = match strategy {
            Strategy::Fsdp => {
                let names = Value::list(ids.iter().map(|i| text(name(i))).collect());
                (names.clone(), names)
            }
            Strategy::Ddp => {
                let first = index;
                index += ids.len() as i64;
                (
                    Value::list(
                        ids.iter()
                            .map(|i| text(&format!("module.{}", name(i))))
                            .collect(),
                    ),
                    Value::list((first..index).map(Value::Int).collect()),
                )
            }
        };
        groups.push(map(vec![
            ("lr", Value::Float(py(o.learning_rate))),
            ("initial_lr", Value::Float(py(o.learning_rate))),
            (
                "betas",
                Value::Tuple(vec![
                    Value::Float(py(o.betas.0)),
                    Value::Float(py(o.betas.1)),
                ]),
            ),
            ("eps", Value::Float(py(o.eps))),
            ("weight_decay", Value::Float(wd)),
            ("amsgrad", Value::Bool(false)),
            ("maximize", Value::Bool(false)),
            ("foreach", Value::None),
            ("capturable", Value::Bool(false)),
            ("differentiable", Value::Bool(false)),
            ("fused", Value::None),
            ("sharded", Value::Bool(strategy == Strategy::Fsdp)),
            ("max_grad_norm", opt(cfg.max_grad_norm.map(py))),
            ("max_grad_norm_ratio", opt(cfg.max_grad_norm_ratio)),
            ("param_names", param_names),
            ("params", params),
        ]));
    }
    Value::list(groups)
}

/// Each tensor's part of a flat buffer.
fn slices<'a>(layout: &Layout, v: &'a [f32]) -> Vec<&'a [f32]> {
    layout.tensors.iter().map(|t| &v[t.range()]).collect()
}

/// `export-olmo`: one of our checkpoints as OLMo's unsharded checkpoint folder, which OLMo's
/// trainer resumes (`--load_path=OUT`; it takes a folder for unsharded by its `-unsharded`
/// name) and its scripts read (`convert_olmo_to_hf.py`, `OLMo.from_checkpoint`): `model.pt`,
/// `optim.pt` (in `strategy`'s form, param groups as OLMo's) and `train.pt` where the
/// checkpoint has moments and a trainer state, and its `config.yaml`. Returns what could not
/// be carried over, for the caller to say.
pub fn export(checkpoint: &Path, out: &Path, strategy: Strategy) -> Result<Vec<String>> {
    let (cfg, _) = TrainConfig::load(&checkpoint.join("config.yaml"))?;
    let (m, _) = cfg.model_config()?;
    let layout = Layout::new(&m);
    if out.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} exists and is not empty", out.display());
    }
    let parts = Parts {
        optimizer: checkpoint.join("optim.safetensors").exists(),
        trainer: checkpoint.join("train.json").exists(),
    };
    let l = checkpoint::load(checkpoint, &layout, parts)?;
    let tmp = out.with_file_name(format!(
        "{}.tmp",
        out.file_name().unwrap_or_default().to_string_lossy()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut lost = Vec::new();

    let model = layout
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (text(&t.name), f32_tensor(i, &t.shape)))
        .collect();
    crate::torch_file::save(
        &tmp.join("model.pt"),
        &Value::dict(model),
        &slices(&layout, &l.params),
    )?;

    if let (Some((m1, m2)), Some(state)) = (&l.moments, &l.state) {
        let lion = state.optimizer == "lionw";
        let n = layout.tensors.len();
        let steps = vec![[state.optimizer_steps as f32]; n];
        let norms: Vec<[f32; 1]> = l
            .grad_norm_exp_avg
            .iter()
            .map(|g| [g.unwrap_or(0.0)])
            .collect();
        let mut storages = slices(&layout, m1);
        if !lion {
            storages.extend(slices(&layout, m2));
        }
        let (steps_at, norms_at) = (storages.len(), storages.len() + n);
        storages.extend(steps.iter().map(|s| &s[..]));
        storages.extend(norms.iter().map(|s| &s[..]));
        // DDP's state is keyed by each tensor's index in the groups' order, and in that order
        let visit: Vec<usize> = match strategy {
            Strategy::Fsdp => (0..n).collect(),
            Strategy::Ddp => group_order(&cfg, &layout)
                .into_iter()
                .flat_map(|(_, ids)| ids)
                .collect(),
        };
        let per_tensor = visit
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let t = &layout.tensors[i];
                let key = match strategy {
                    Strategy::Fsdp => text(&t.name),
                    Strategy::Ddp => Value::Int(k as i64),
                };
                let mut s = vec![("exp_avg", f32_tensor(i, &t.shape))];
                if !lion {
                    s.push(("exp_avg_sq", f32_tensor(n + i, &t.shape)));
                    s.push(("step", f32_tensor(steps_at + i, &[])));
                }
                if l.grad_norm_exp_avg.get(i).is_some_and(|g| g.is_some()) {
                    s.push(("grad_norm_exp_avg", f32_tensor(norms_at + i, &[])));
                }
                (key, map(s))
            })
            .collect();
        let root = map(vec![
            ("state", Value::dict(per_tensor)),
            ("param_groups", param_groups(&cfg, &layout, strategy)),
        ]);
        crate::torch_file::save(&tmp.join("optim.pt"), &root, &storages)?;
        if let Some(from) = state.lr_warmup_from {
            lost.push(format!(
                "the LR's bolt-on warmup from step {from} (after reset_optimizer_state): OLMo applies one only when it resets the optimizer itself"
            ));
        }
    }
    if let Some(s) = &l.state {
        let int = |x: u64| Value::Int(x as i64);
        let root = map(vec![
            ("epoch", int(s.epoch)),
            ("global_step", int(s.step)),
            (
                "global_train_examples_seen_this_epoch",
                int(s.global_train_examples_seen_this_epoch),
            ),
            ("global_train_tokens_seen", int(s.global_train_tokens_seen)),
            ("world_size", int(s.world_size)),
            ("checkpoints", Value::list(Vec::new())),
            ("unsharded_checkpoints", Value::list(Vec::new())),
            ("ephemeral_checkpoints", Value::list(Vec::new())),
        ]);
        crate::torch_file::save(&tmp.join("train.pt"), &root, &[])?;
    }
    std::fs::copy(checkpoint.join("config.yaml"), tmp.join("config.yaml"))?;
    if out.exists() {
        std::fs::remove_dir(out)?;
    }
    std::fs::rename(&tmp, out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::ops::NormKind;
    use crate::torch_file::save;

    /// Two blocks of LayerNorm with weights, untied.
    fn layout() -> Layout {
        Layout::new(&ModelConfig::tiny(NormKind::LayerNorm, true, false))
    }

    /// Writes `model.pt` in `dir` holding `layout`'s tensors under the names `rename` gives
    /// (None: left out), tensor `i` filled with `i`.
    fn write(dir: &Path, layout: &Layout, rename: &dyn Fn(&str) -> Option<String>) {
        let data: Vec<Vec<f32>> = (0..layout.tensors.len())
            .map(|i| vec![i as f32; layout.tensors[i].len()])
            .collect();
        let mut items = Vec::new();
        for (i, t) in layout.tensors.iter().enumerate() {
            if let Some(name) = rename(&t.name) {
                items.push((Value::Str(name), f32_tensor(i, &t.shape)));
            }
        }
        let storages: Vec<&[f32]> = data.iter().map(|d| &d[..]).collect();
        save(&dir.join("model.pt"), &Value::dict(items), &storages).unwrap();
    }

    #[test]
    fn old_and_wrapped_names_read_as_olmo_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let layout = layout();
        let want: Vec<f32> = (0..layout.tensors.len())
            .flat_map(|i| vec![i as f32; layout.tensors[i].len()])
            .collect();
        // FSDP's wrapper prefix, blocks in groups of two
        write(dir.path(), &layout, &|n| {
            Some(format!(
                "_fsdp_wrapped_module.{}",
                n.replace("blocks.0.", "block_groups.0.0.")
                    .replace("blocks.1.", "block_groups.0.1.")
            ))
        });
        assert_eq!(read_model(dir.path(), &layout).unwrap(), want);
        // before attn_norm and ff_norm, one `norm` served both: block 0's ff_norm takes it
        let ff_norm = layout
            .tensors
            .iter()
            .position(|t| t.name == "transformer.blocks.0.ff_norm.weight")
            .unwrap();
        write(dir.path(), &layout, &|n| match n {
            "transformer.blocks.0.ff_norm.weight" => None,
            "transformer.blocks.0.attn_norm.weight" => {
                Some("transformer.blocks.0.norm.weight".into())
            }
            _ => Some(n.into()),
        });
        let got = read_model(dir.path(), &layout).unwrap();
        let attn_norm = ff_norm - 3; // attn_norm, att_proj, attn_out, ff_norm
        assert_eq!(
            layout.tensors[attn_norm].name,
            "transformer.blocks.0.attn_norm.weight"
        );
        assert!(got[layout.tensors[ff_norm].range()]
            .iter()
            .all(|&x| x == attn_norm as f32));
        // OLMo-core's names are said to be OLMo-core's, a missing tensor is named
        write(dir.path(), &layout, &|n| {
            Some(n.replace("transformer.wte.weight", "embeddings.weight"))
        });
        let e = format!("{:#}", read_model(dir.path(), &layout).unwrap_err());
        assert!(e.contains("OLMo-core's parameter names"), "{e}");
        write(dir.path(), &layout, &|n| {
            (!n.contains("ln_f")).then(|| n.into())
        });
        let e = format!("{:#}", read_model(dir.path(), &layout).unwrap_err());
        assert!(
            e.contains("no `transformer.ln_f.weight` for the configured model"),
            "{e}"
        );
    }

    #[test]
    fn names_are_made_compatible_as_olmo_does() {
        assert_eq!(
            compatible("_fsdp_wrapped_module.transformer.wte.weight", 1),
            "transformer.wte.weight"
        );
        assert_eq!(
            compatible("transformer.block_groups.1.2.att_proj.weight", 4),
            "transformer.blocks.6.att_proj.weight"
        );
        assert_eq!(
            compatible("transformer.block_groups.x.2.att_proj.weight", 4),
            "transformer.block_groups.x.2.att_proj.weight"
        );
        assert_eq!(
            compatible("module.transformer.blocks.0.ff_out.weight", 1),
            "transformer.blocks.0.ff_out.weight"
        );
    }

    /// Every tensor under `v` (a few levels deep: a damaged pickle can nest a list in
    /// itself), read; errors are what is wanted of damaged bytes, panics are not.
    fn read_all(src: &Source, v: &Value, depth: usize) {
        if depth > 6 {
            return;
        }
        match v {
            Value::Tensor(t) => {
                let _ = src.f32s(t);
                let _ = src.scalar(t);
            }
            Value::Object(o) => read_all(src, &o.args, depth + 1),
            _ => {
                for (_, item) in v.entries() {
                    read_all(src, &item, depth + 1);
                }
            }
        }
    }

    /// The fixtures' files, bytes changed or cut at random where their structure lies (the
    /// pickle at the start, the zip directory or the safetensors header): each reader gives
    /// an error or a value, never a panic, a hang or an abort.
    #[test]
    fn damaged_checkpoint_files_are_errors_never_panics() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let dir = tempfile::tempdir().unwrap();
        let mut rng = crate::xorshift::XorShift::new(7);
        let files = [
            "torch/views.pt",
            "olmo/step2-unsharded/model.pt",
            "olmo/step2-unsharded/optim-by-index.pt",
            "olmo/step2-unsharded/train.pt",
            "olmo/step2-unsharded-st/optim.safetensors",
            "olmo/step2-sharded/model_and_optim/.metadata",
            "olmo/step2-sharded/model_and_optim/__0_0.distcp",
        ];
        for name in files {
            let good = std::fs::read(fixtures.join(name)).unwrap();
            let file_name = Path::new(name).file_name().unwrap();
            // a sharded checkpoint is a folder: damage one file of a copy of it
            let sharded = name.contains("sharded/");
            let target = if sharded {
                let d = dir.path().join("dcp");
                for f in [".metadata", "__0_0.distcp", "__1_0.distcp"] {
                    let from = fixtures.join("olmo/step2-sharded/model_and_optim").join(f);
                    std::fs::create_dir_all(&d).unwrap();
                    std::fs::copy(from, d.join(f)).unwrap();
                }
                d.join(file_name)
            } else {
                dir.path().join(file_name)
            };
            for trial in 0..150 {
                let mut bytes = good.clone();
                if trial % 5 == 0 {
                    bytes.truncate(rng.next_u64() as usize % good.len());
                } else {
                    for _ in 0..1 + rng.next_u64() % 3 {
                        let span = 1200.min(good.len());
                        let at = match rng.next_u64() % 2 {
                            0 => rng.next_u64() as usize % span,
                            _ => good.len() - 1 - rng.next_u64() as usize % span,
                        };
                        bytes[at] = rng.next_u64() as u8;
                    }
                }
                std::fs::write(&target, &bytes).unwrap();
                if sharded {
                    if let Ok(d) = Dcp::open(target.parent().unwrap()) {
                        let names: Vec<String> = d.tensors.keys().cloned().collect();
                        for n in names {
                            let _ = d.f32s(&n);
                        }
                    }
                } else if name.ends_with(".safetensors") {
                    if let Ok(f) = StFile::open(&target) {
                        let root = f.root.clone();
                        read_all(&Source::St(f), &root, 0);
                    }
                } else if let Ok((f, root)) = TorchFile::open(&target) {
                    read_all(&Source::Torch(f), &root, 0);
                }
            }
            std::fs::remove_file(&target).unwrap();
        }
    }
}
