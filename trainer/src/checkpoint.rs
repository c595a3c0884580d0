//! Checkpoints: one self-describing folder per step, `{save_folder}/step{N}/` with
//! `model.safetensors` (tensors under OLMo's state-dict names), `optim.safetensors` (AdamW's
//! `exp_avg`/`exp_avg_sq` per tensor, and under adaptive clipping OLMo's scalar
//! `grad_norm_exp_avg` per tensor), `train.json` (step, epoch, data position, tokens seen)
//! and `config.yaml`. A folder is written as `step{N}.tmp` and renamed when complete, then the
//! `latest` link moves to it, so a killed run never leaves a half checkpoint that looks whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::Dtype as StDtype;
use serde::{Deserialize, Serialize};

use crate::model::Layout;

/// Where training stands; enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    pub epoch: u64,
    /// Instances of the current epoch's order already trained on (OLMo's name).
    pub global_train_examples_seen_this_epoch: u64,
    pub global_train_tokens_seen: u64,
    pub seed: u64,
    pub world_size: u64,
    /// The data the order was built over: instances and window length (a mismatch on resume
    /// means the data changed under the run).
    pub instances: u64,
    pub seq_len: u64,
    pub num_params: u64,
    /// AdamW's own update count (its bias correction), which `reset_optimizer_state` restarts
    /// while the step goes on. Checkpoints written before the field existed read it as `step`.
    #[serde(default = "count_unknown")]
    pub optimizer_steps: u64,
    /// The step where fresh AdamW moments joined a running schedule (`reset_optimizer_state`
    /// without `reset_trainer_state`): from there the LR warms up again over `t_warmup` steps,
    /// OLMo's bolt-on warmup. Kept so that a resumed run follows the same LR.
    #[serde(default)]
    pub lr_warmup_from: Option<u64>,
    /// The lowest train loss of the run so far, which `early_stopping_factor` compares each
    /// step's with. Kept (OLMo's starts again at each restart) so that a resumed run stops
    /// where an uninterrupted one would; a start from `load_path` begins a new record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_train_loss: Option<f64>,
    /// The optimizer whose moments `optim.safetensors` holds (`adamw`, or `lionw`, which keeps
    /// no `exp_avg_sq`). Checkpoints written before the field existed are AdamW's.
    #[serde(default = "adamw")]
    pub optimizer: String,
}

fn adamw() -> String {
    "adamw".into()
}

fn count_unknown() -> u64 {
    u64::MAX
}

pub(crate) fn as_bytes(v: &[f32]) -> &[u8] {
    #[cfg(not(target_endian = "little"))]
    compile_error!("safetensors stores little-endian floats");
    // Safety: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Floats as the bytes to read them into, in place.
pub(crate) fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // Safety: any byte pattern is a valid f32, and the slice covers exactly `v`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

pub(crate) fn write_tensors(path: &Path, items: Vec<(String, Vec<usize>, &[f32])>) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = items
        .into_iter()
        .map(|(name, shape, data)| {
            let view = safetensors::tensor::TensorView::new(StDtype::F32, shape, as_bytes(data))
                .map_err(|e| anyhow!("{name}: {e}"))?;
            Ok((name, view))
        })
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    // Written under a temporary name and renamed: a reader never sees half a file.
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Writes a model's tensors under `names` (a renaming of the layout, as HF export needs).
pub fn write_model(path: &Path, layout: &Layout, params: &[f32]) -> Result<()> {
    write_tensors(
        path,
        layout
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), &params[t.range()]))
            .collect(),
    )
}

/// A safetensors file's header (its JSON) and where its data begin, read alone.
pub(crate) fn safetensors_header(
    file: &std::fs::File,
    path: &Path,
) -> Result<(serde_json::Map<String, serde_json::Value>, u64)> {
    use std::os::unix::fs::FileExt;
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0)
        .map_err(|_| anyhow!("{}: too short for safetensors", path.display()))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        bail!("{}: a header of {n} bytes: not safetensors", path.display());
    }
    let mut text = vec![0u8; n as usize];
    file.read_exact_at(&mut text, 8)
        .map_err(|_| anyhow!("{}: the header is cut short", path.display()))?;
    let map = serde_json::from_slice(&text)
        .with_context(|| format!("{}: the safetensors header", path.display()))?;
    Ok((map, 8 + n))
}

/// Reads F32 tensors of a safetensors file into flat buffers, each straight into its place
/// (a 7B run's optimizer file is 54 GB: never held whole): for each buffer, the layout's
/// tensors under their names plus `suffix` (`""`, `".exp_avg"`, ...); and for each of
/// `scalars`, the F32 scalar `{tensor}{suffix}` of each tensor where the file has one
/// (adaptive clipping's averages).
fn read_f32(
    path: &Path,
    layout: &Layout,
    outs: &mut [(&str, &mut [f32])],
    scalars: &mut [(&str, &mut Vec<Option<f32>>)],
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let size = file.metadata()?.len();
    let (header, start) = safetensors_header(&file, path)?;
    // Where tensor `name`'s bytes lie, if the file has it with this dtype and shape.
    let place = |name: &str, shape: &[usize]| -> Result<Option<(u64, u64)>> {
        let Some(meta) = header.get(name) else {
            return Ok(None);
        };
        let dtype = meta["dtype"].as_str().unwrap_or("?");
        let got: Vec<u64> = meta["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        let want: Vec<u64> = shape.iter().map(|&n| n as u64).collect();
        if dtype != "F32" || got != want {
            bail!(
                "{}: `{name}` is {dtype} {got:?}, the model needs F32 {want:?}",
                path.display()
            );
        }
        let offsets: Vec<u64> = meta["data_offsets"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        let len = shape.iter().product::<usize>() as u64 * 4;
        match offsets[..] {
            [from, to] if to.checked_sub(from) == Some(len) && start + to <= size => {
                Ok(Some((start + from, len)))
            }
            _ => bail!(
                "{}: `{name}`'s bytes {offsets:?} do not lie within the file (a truncated file?)",
                path.display()
            ),
        }
    };
    for (suffix, out) in scalars.iter_mut() {
        **out = layout
            .tensors
            .iter()
            .map(|tensor| {
                let name = format!("{}{suffix}", tensor.name);
                let Some((at, _)) = place(&name, &[])? else {
                    return Ok(None);
                };
                let mut b = [0u8; 4];
                file.read_exact_at(&mut b, at)?;
                Ok(Some(f32::from_le_bytes(b)))
            })
            .collect::<Result<_>>()?;
    }
    for (suffix, out) in outs.iter_mut() {
        let places = layout
            .tensors
            .iter()
            .map(|tensor| {
                let name = format!("{}{suffix}", tensor.name);
                place(&name, &tensor.shape)?
                    .map(|(at, _)| (at, name.clone()))
                    .ok_or_else(|| anyhow!("{}: no tensor `{name}`", path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        // tensors read in parallel: the copy from the page cache, and the first touch of the
        // buffer's pages, are the cost, and they spread over cores
        use rayon::prelude::*;
        layout
            .split_mut(out)
            .into_par_iter()
            .zip(places)
            .try_for_each(|(dst, (at, name))| {
                file.read_exact_at(as_bytes_mut(dst), at)
                    .with_context(|| format!("{}: `{name}`", path.display()))
            })?;
    }
    Ok(())
}

/// Reads model weights written by [`write_model`] for this layout.
pub fn read_model(path: &Path, layout: &Layout) -> Result<Vec<f32>> {
    let mut params = vec![0.0; layout.total];
    read_f32(path, layout, &mut [("", &mut params)], &mut [])?;
    Ok(params)
}

/// A checkpoint folder's weights: ours, or OLMo's.
pub fn read_weights(dir: &Path, layout: &Layout) -> Result<Vec<f32>> {
    if crate::olmo_checkpoint::is_olmo(dir) {
        crate::olmo_checkpoint::read_model(dir, layout)
    } else {
        read_model(&dir.join("model.safetensors"), layout)
    }
}

pub struct Checkpoint<'a> {
    pub layout: &'a Layout,
    pub params: &'a [f32],
    pub exp_avg: &'a [f32],
    pub exp_avg_sq: &'a [f32],
    /// Adaptive clipping's average gradient norm per tensor, where it has one (empty: none).
    pub grad_norm_exp_avg: &'a [Option<f32>],
    pub state: &'a TrainerState,
    pub config_text: &'a str,
    pub kind: Kind,
}

/// Which of OLMo's checkpoint series a save belongs to: each is kept by its own rule. One
/// format serves them all (OLMo's sharded and unsharded ones differ only in layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `save_interval` (and the last step): the newest `save_num_checkpoints_to_keep` kept.
    Regular,
    /// `save_interval_ephemeral`: kept only until the next save.
    Ephemeral,
    /// `save_interval_unsharded`: the newest `save_num_unsharded_checkpoints_to_keep` kept
    /// (all by default), whatever the regular series keeps.
    Unsharded,
}

impl Kind {
    /// The file that marks a checkpoint of the kind, so a restarted run still knows it.
    fn marker(self) -> Option<&'static str> {
        match self {
            Kind::Regular => None,
            Kind::Ephemeral => Some("ephemeral"),
            Kind::Unsharded => Some("unsharded"),
        }
    }

    fn of(folder: &Path, step: u64) -> Kind {
        let dir = step_dir(folder, step);
        [Kind::Ephemeral, Kind::Unsharded]
            .into_iter()
            .find(|k| k.marker().is_some_and(|m| dir.join(m).exists()))
            .unwrap_or(Kind::Regular)
    }
}

/// How many checkpoints of each kept series to keep (negative: all; 0: OLMo's "none at
/// intervals", so nothing to prune).
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    pub regular: i64,
    pub unsharded: i64,
}

/// When a run saves: OLMo's intervals of each series and their depths.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub interval: Option<u64>,
    pub unsharded_interval: Option<u64>,
    pub ephemeral_interval: Option<u64>,
    pub keep: Keep,
}

impl Plan {
    /// The series step `step` saves into, if any, as OLMo's trainer decides: a series whose
    /// depth is 0 saves nothing at its interval (`save_num_checkpoints_to_keep: 0` is OLMo's
    /// "no sharded checkpoints"), a step of two series joins the one kept longest, and an
    /// ephemeral one only where no other is due. `last` (the end, or a stop) always saves,
    /// unlike OLMo's, which saves no final checkpoint when both series are off: into the
    /// unsharded series where the regular one keeps none and that one has an interval, as
    /// OLMo's final unsharded checkpoint.
    pub fn kind_at(&self, step: u64, last: bool) -> Option<Kind> {
        let every = |interval: Option<u64>, keep: i64| {
            keep != 0 && interval.is_some_and(|i| step.is_multiple_of(i.max(1)))
        };
        if every(self.unsharded_interval, self.keep.unsharded) {
            Some(Kind::Unsharded)
        } else if every(self.interval, self.keep.regular) {
            Some(Kind::Regular)
        } else if last {
            Some(self.final_kind())
        } else if every(self.ephemeral_interval, -1) {
            Some(Kind::Ephemeral)
        } else {
            None
        }
    }

    /// The series of the pre-train checkpoint (and of the last step's, off any interval):
    /// the regular one, unless it keeps none and the unsharded one is on, as OLMo's.
    pub fn final_kind(&self) -> Kind {
        match self.keep.regular == 0 && self.unsharded_interval.is_some() {
            true => Kind::Unsharded,
            false => Kind::Regular,
        }
    }
}

pub fn step_dir(folder: &Path, step: u64) -> PathBuf {
    folder.join(format!("step{step}"))
}

/// Writes `step{N}/` atomically, points `latest` at it, removes the ephemeral checkpoints
/// before it and keeps the newest `keep` of each other series. Returns the folder written.
pub fn save(folder: &Path, ck: &Checkpoint, keep: Keep) -> Result<PathBuf> {
    let dir = step_dir(folder, ck.state.step);
    let tmp = folder.join(format!("step{}.tmp", ck.state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    write_model(&tmp.join("model.safetensors"), ck.layout, ck.params)?;
    let mut optim = Vec::new();
    for (k, t) in ck.layout.tensors.iter().enumerate() {
        // a zip would stop at an empty list of averages, and write no moment at all
        if let Some(Some(a)) = ck.grad_norm_exp_avg.get(k) {
            optim.push((
                format!("{}.grad_norm_exp_avg", t.name),
                vec![],
                std::slice::from_ref(a),
            ));
        }
        optim.push((
            format!("{}.exp_avg", t.name),
            t.shape.clone(),
            &ck.exp_avg[t.range()],
        ));
        if ck.state.optimizer != "lionw" {
            optim.push((
                format!("{}.exp_avg_sq", t.name),
                t.shape.clone(),
                &ck.exp_avg_sq[t.range()],
            ));
        }
    }
    write_tensors(&tmp.join("optim.safetensors"), optim)?;
    std::fs::write(
        tmp.join("train.json"),
        serde_json::to_string_pretty(ck.state)? + "\n",
    )?;
    std::fs::write(tmp.join("config.yaml"), ck.config_text)?;
    if let Some(m) = ck.kind.marker() {
        std::fs::write(tmp.join(m), "")?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    let link_tmp = folder.join("latest.tmp");
    let _ = std::fs::remove_file(&link_tmp);
    std::os::unix::fs::symlink(dir.file_name().unwrap(), &link_tmp)?;
    std::fs::rename(&link_tmp, folder.join("latest"))?;
    // Any save supersedes the ephemeral ones before it; each other series is kept its own
    // depth, counting this save in its own series.
    let mut series: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for s in list_steps(folder)? {
        let kind = if s == ck.state.step {
            ck.kind
        } else {
            Kind::of(folder, s)
        };
        match kind {
            Kind::Ephemeral if s != ck.state.step => std::fs::remove_dir_all(step_dir(folder, s))?,
            Kind::Ephemeral => {}
            Kind::Regular => series[0].push(s),
            Kind::Unsharded => series[1].push(s),
        }
    }
    for (mut steps, keep) in series.into_iter().zip([keep.regular, keep.unsharded]) {
        if keep > 0 {
            steps.sort();
            let excess = steps.len().saturating_sub(keep as usize);
            for s in &steps[..excess] {
                if *s != ck.state.step {
                    std::fs::remove_dir_all(step_dir(folder, *s))?;
                }
            }
        }
    }
    Ok(dir)
}

/// Steps of the complete checkpoints in `folder`.
pub fn list_steps(folder: &Path) -> Result<Vec<u64>> {
    let mut steps = Vec::new();
    let Ok(rd) = std::fs::read_dir(folder) else {
        return Ok(steps);
    };
    for e in rd {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_prefix("step")
            .and_then(|n| n.parse::<u64>().ok())
        {
            steps.push(n);
        }
    }
    Ok(steps)
}

/// Removes every checkpoint of `folder` (complete or not) and the `latest` link.
pub fn remove_all(folder: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(folder) else {
        return Ok(());
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // `step{N}` and the `step{N}.tmp` a killed save left
        let step = name
            .strip_prefix("step")
            .map(|n| n.trim_end_matches(".tmp"));
        if step.is_some_and(|n| n.parse::<u64>().is_ok()) {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    let _ = std::fs::remove_file(folder.join("latest"));
    Ok(())
}

/// The newest complete checkpoint folder under `folder`, if any.
pub fn latest(folder: &Path) -> Result<Option<PathBuf>> {
    Ok(list_steps(folder)?
        .into_iter()
        .max()
        .map(|s| step_dir(folder, s)))
}

/// What a run takes from a checkpoint besides the weights.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    /// AdamW's moments (`optim.safetensors`).
    pub optimizer: bool,
    /// Step, data position and the rest of `train.json`.
    pub trainer: bool,
}

pub struct Loaded {
    pub params: Vec<f32>,
    /// `exp_avg` and `exp_avg_sq`, when asked for.
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
    /// Adaptive clipping's averages, one per tensor (`None` where the file has none).
    pub grad_norm_exp_avg: Vec<Option<f32>>,
    /// When asked for.
    pub state: Option<TrainerState>,
}

/// Loads the weights of a checkpoint folder for this layout, and the parts asked for: the files
/// not asked for may be missing (a folder of weights alone starts a fine-tuning run).
pub fn load(dir: &Path, layout: &Layout, parts: Parts) -> Result<Loaded> {
    let state = if parts.trainer {
        let path = dir.join("train.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (set reset_trainer_state to start from the weights alone)",
                path.display()
            )
        })?;
        let mut state: TrainerState =
            serde_json::from_str(&text).with_context(|| path.display().to_string())?;
        if state.num_params != layout.total as u64 {
            bail!(
                "{}: checkpoint has {} parameters, the configured model {}",
                dir.display(),
                state.num_params,
                layout.total
            );
        }
        if state.optimizer_steps == count_unknown() {
            state.optimizer_steps = state.step;
        }
        Some(state)
    } else {
        None
    };
    let params = read_model(&dir.join("model.safetensors"), layout)?;
    let mut grad_norm_exp_avg = vec![None; layout.tensors.len()];
    let moments = if parts.optimizer {
        let path = dir.join("optim.safetensors");
        if !path.exists() {
            bail!(
                "{} is missing (set reset_optimizer_state to start from the weights with fresh AdamW moments)",
                path.display()
            );
        }
        // LionW keeps no second moment: none is read, and none held
        let lion = state.as_ref().is_some_and(|s| s.optimizer == "lionw");
        let second = if lion { 0 } else { layout.total };
        let (mut m, mut v) = (vec![0.0; layout.total], vec![0.0; second]);
        let mut outs: Vec<(&str, &mut [f32])> = vec![(".exp_avg", &mut m)];
        if !lion {
            outs.push((".exp_avg_sq", &mut v));
        }
        read_f32(
            &path,
            layout,
            &mut outs,
            &mut [(".grad_norm_exp_avg", &mut grad_norm_exp_avg)],
        )?;
        Some((m, v))
    } else {
        None
    };
    Ok(Loaded {
        params,
        moments,
        state,
        grad_norm_exp_avg,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_plan_saves_as_olmo_s_trainer_decides() {
        use super::{Keep, Kind, Plan};
        use Kind::{Ephemeral as E, Regular as R, Unsharded as U};
        let plan = |interval, unsharded_interval, regular, unsharded| Plan {
            interval,
            unsharded_interval,
            ephemeral_interval: Some(3),
            keep: Keep { regular, unsharded },
        };
        let saves = |p: &Plan| -> Vec<(u64, Kind)> {
            (1..=14)
                .filter_map(|s| p.kind_at(s, s == 14).map(|k| (s, k)))
                .collect()
        };
        // two series due: the one kept longest; ephemeral only where no other is
        let both = plan(Some(4), Some(6), 2, -1);
        let want = [(3, E), (4, R), (6, U), (8, R), (9, E), (12, U), (14, R)];
        assert_eq!(saves(&both), want);
        assert_eq!(both.final_kind(), R);
        // save_num_checkpoints_to_keep: 0 is OLMo's "no regular checkpoints": the end and
        // the pre-train one go to the unsharded series
        let unsharded_only = plan(Some(4), Some(6), 0, -1);
        let want = [(3, E), (6, U), (9, E), (12, U), (14, U)];
        assert_eq!(saves(&unsharded_only), want);
        assert_eq!(unsharded_only.final_kind(), U);
        // both off: the end still saves
        let none = plan(Some(4), None, 0, -1);
        let want = [(3, E), (6, E), (9, E), (12, E), (14, R)];
        assert_eq!(saves(&none), want);
        // save_num_unsharded_checkpoints_to_keep: 0, alike
        let regular_only = plan(Some(4), Some(6), -1, 0);
        let want = [(3, E), (4, R), (6, E), (8, R), (9, E), (12, R), (14, R)];
        assert_eq!(saves(&regular_only), want);
    }

    use super::*;
    use crate::model::ModelConfig;
    use crate::ops::NormKind;

    /// A trainer state at `step` of a run from the start on one window, for `optimizer`.
    fn state_at(step: u64, layout: &Layout, optimizer: &str) -> TrainerState {
        TrainerState {
            step,
            epoch: 0,
            global_train_examples_seen_this_epoch: 0,
            global_train_tokens_seen: 0,
            seed: 0,
            world_size: 1,
            instances: 1,
            seq_len: 1,
            num_params: layout.total as u64,
            optimizer_steps: step,
            lr_warmup_from: None,
            min_train_loss: None,
            optimizer: optimizer.into(),
        }
    }

    #[test]
    fn a_checkpoint_reads_back_exactly_and_a_cut_one_is_an_error() {
        let layout = Layout::new(&ModelConfig::tiny(NormKind::Rms, true, false));
        let mut rng = crate::xorshift::XorShift::new(3);
        let (p, m, v) = (
            rng.vec(layout.total, 1.0),
            rng.vec(layout.total, 1.0),
            rng.vec(layout.total, 1.0),
        );
        let norms: Vec<Option<f32>> = (0..layout.tensors.len())
            .map(|i| (i % 2 == 0).then_some(i as f32 + 0.5))
            .collect();
        let state = state_at(3, &layout, "adamw");
        let ck = Checkpoint {
            layout: &layout,
            params: &p,
            exp_avg: &m,
            exp_avg_sq: &v,
            grad_norm_exp_avg: &norms,
            state: &state,
            config_text: "",
            kind: Kind::Regular,
        };
        let dir = tempfile::tempdir().unwrap();
        let keep = Keep {
            regular: -1,
            unsharded: -1,
        };
        let saved = save(dir.path(), &ck, keep).unwrap();
        let all = Parts {
            optimizer: true,
            trainer: true,
        };
        let back = load(&saved, &layout, all).unwrap();
        assert_eq!((back.params, back.moments), (p, Some((m, v))));
        assert_eq!(back.grad_norm_exp_avg, norms);
        // another model's layout is named; a file cut short is said to be
        let other = Layout::new(&ModelConfig::tiny(NormKind::Rms, true, true));
        let e = format!("{:#}", load(&saved, &other, all).err().unwrap());
        assert!(e.contains("checkpoint has"), "{e}");
        let optim = saved.join("optim.safetensors");
        let bytes = std::fs::read(&optim).unwrap();
        std::fs::write(&optim, &bytes[..bytes.len() - 100]).unwrap();
        let e = format!("{:#}", load(&saved, &layout, all).err().unwrap());
        assert!(
            e.contains("optim.safetensors") && e.contains("a truncated file?"),
            "{e}"
        );
        std::fs::write(&optim, &bytes[..4]).unwrap();
        let e = format!("{:#}", load(&saved, &layout, all).err().unwrap());
        assert!(e.contains("too short for safetensors"), "{e}");
    }

    #[test]
    fn each_checkpoint_series_is_kept_by_its_own_rule() {
        let layout = Layout::new(&ModelConfig {
            d_model: 4,
            n_heads: 1,
            n_kv_heads: 1,
            n_layers: 1,
            mlp_hidden: 4,
            vocab_size: 8,
            embedding_size: 8,
            rope_theta: 10_000.0,
            eps: 1e-5,
            z_loss: 0.0,
            norm: NormKind::LayerNorm,
            norm_affine: false,
            weight_tying: true,
            clip_qkv: None,
            norm_after: false,
            qk_norm: false,
            qk_norm_affine: false,
        });
        let zeros = vec![0.0; layout.total];
        let dir = tempfile::tempdir().unwrap();
        let save_at = |step: u64, kind: Kind, optimizer: &str| {
            let state = state_at(step, &layout, optimizer);
            let ck = Checkpoint {
                layout: &layout,
                params: &zeros,
                exp_avg: &zeros,
                exp_avg_sq: &zeros,
                grad_norm_exp_avg: &[],
                state: &state,
                config_text: "",
                kind,
            };
            let keep = Keep {
                regular: 1,
                unsharded: 2,
            };
            let saved = save(dir.path(), &ck, keep).unwrap();
            // a run without adaptive clipping's averages still saves every moment
            let parts = Parts {
                optimizer: true,
                trainer: true,
            };
            let back = load(&saved, &layout, parts).unwrap();
            let (m, v) = back.moments.unwrap();
            assert_eq!(m.len(), layout.total);
            // a LionW checkpoint holds no second moment, nor does what loading it gives
            let second = if optimizer == "lionw" {
                0
            } else {
                layout.total
            };
            assert_eq!(v.len(), second);
            assert!(back.grad_norm_exp_avg.iter().all(Option::is_none));
            let mut steps = list_steps(dir.path()).unwrap();
            steps.sort();
            steps
        };
        assert_eq!(save_at(10, Kind::Regular, "adamw"), [10]);
        // keep 1: the ephemeral one stands beside the regular one, not in its place
        assert_eq!(save_at(12, Kind::Ephemeral, "lionw"), [10, 12]);
        assert_eq!(save_at(14, Kind::Ephemeral, "adamw"), [10, 14]);
        assert_eq!(save_at(20, Kind::Regular, "lionw"), [20]);
        // the unsharded series is kept 2 deep beside the regular one, whatever it keeps
        assert_eq!(save_at(25, Kind::Unsharded, "adamw"), [20, 25]);
        assert_eq!(save_at(30, Kind::Regular, "adamw"), [25, 30]);
        assert_eq!(save_at(35, Kind::Ephemeral, "adamw"), [25, 30, 35]);
        assert_eq!(save_at(40, Kind::Unsharded, "adamw"), [25, 30, 40]);
        assert_eq!(save_at(50, Kind::Unsharded, "adamw"), [30, 40, 50]);
        assert_eq!(save_at(60, Kind::Regular, "adamw"), [40, 50, 60]);
    }
}
