//! `import-hf`: a Hugging Face transformers OLMo (`OlmoForCausalLM`), OLMo 2
//! (`Olmo2ForCausalLM`) or Llama-layout (`LlamaForCausalLM`) model folder as weights this
//! trainer starts from: the inverse of `export-hf`, through the same name table. The folder's
//! `config.json` must describe the training config's model; `model.safetensors` may be sharded
//! (`model.safetensors.index.json`) and in F32, BF16 or F16 (read into F32 master weights). The
//! output is a weights-only checkpoint folder (`model.safetensors` under OLMo's names, and the
//! training config as `config.yaml`) for `load_path` with `reset_trainer_state` and
//! `reset_optimizer_state`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafeTensors};

use crate::checkpoint::write_model;
use crate::config::TrainConfig;
use crate::export::{hf_tensors, HfArch};
use crate::model::{Layout, ModelConfig};

/// The safetensors files of a transformers folder: one, or the shards its index names.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "{}: neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| index.display().to_string())?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Checks the folder's `config.json` against the model the training config describes.
fn check_config(dir: &Path, m: &ModelConfig, arch: HfArch) -> Result<()> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let c: serde_json::Value =
        serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let want_type = arch.model_type();
    let got_type = c["model_type"].as_str().unwrap_or("?");
    if got_type != want_type {
        bail!(
            "{}: model_type `{got_type}`, the training config's model is `{want_type}` ({})",
            path.display(),
            arch.describe()
        );
    }
    let heads = m.n_heads;
    for (key, want) in [
        ("hidden_size", m.d_model),
        ("intermediate_size", m.mlp_hidden),
        ("num_attention_heads", heads),
        ("num_hidden_layers", m.n_layers),
        ("vocab_size", m.embedding_size),
    ] {
        let got = c[key].as_u64();
        if got != Some(want as u64) {
            bail!(
                "{}: {key} is {}, the training config's model has {want}",
                path.display(),
                got.map_or("missing".to_string(), |g| g.to_string())
            );
        }
    }
    // transformers reads a missing num_key_value_heads as num_attention_heads
    let kv_heads = c["num_key_value_heads"].as_u64().unwrap_or(heads as u64);
    if kv_heads != m.n_kv_heads as u64 {
        bail!(
            "{}: num_key_value_heads is {kv_heads}, the training config's model has {} kv heads (model.n_kv_heads)",
            path.display(),
            m.n_kv_heads
        );
    }
    let tied = c["tie_word_embeddings"].as_bool().unwrap_or(true);
    if tied != m.weight_tying {
        bail!(
            "{}: tie_word_embeddings is {tied}, the training config's model.weight_tying {}",
            path.display(),
            m.weight_tying
        );
    }
    if c["attention_bias"].as_bool() == Some(true) || c["mlp_bias"].as_bool() == Some(true) {
        bail!("{}: biases are not implemented", path.display());
    }
    // numbers that change the model without changing a shape
    for (key, want, field) in [
        ("rope_theta", m.rope_theta, "rope_theta"),
        ("rms_norm_eps", m.eps, "layer_norm_eps"),
    ] {
        if let Some(got) = c[key].as_f64() {
            if (got as f32 - want).abs() > 1e-6 * want.abs() {
                bail!(
                    "{}: {key} is {got}, the training config's model.{field} {want}",
                    path.display()
                );
            }
        }
    }
    let clip = c["clip_qkv"].as_f64().map(|x| x as f32);
    if clip != m.clip_qkv {
        let show = |c: Option<f32>| c.map_or("none".to_string(), |c| c.to_string());
        bail!(
            "{}: clip_qkv is {}, the training config's model.clip_qkv {}",
            path.display(),
            show(clip),
            show(m.clip_qkv)
        );
    }
    Ok(())
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!("{other:?} weights: F32, BF16 or F16 expected"),
    })
}

/// Imports `hf_dir` for the model of the training config at `config` (its text as given,
/// overrides applied) into the checkpoint folder `out`.
pub fn import_hf(hf_dir: &Path, cfg: &TrainConfig, config_text: &str, out: &Path) -> Result<()> {
    let (m, _) = cfg.model_config()?;
    check_config(hf_dir, &m, HfArch::of(&m)?)?;
    let layout = Layout::new(&m);
    let table = hf_tensors(&m, &layout)?;
    let mut wanted: BTreeMap<&str, &crate::export::HfTensor> =
        table.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut params = vec![0.0f32; layout.total];
    for file in weight_files(hf_dir)? {
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e}", file.display()))?;
        for (name, view) in st.tensors() {
            let Some(t) = wanted.remove(name.as_str()) else {
                // transformers stores a tied head too, and rotary caches in some versions
                if name == "lm_head.weight" || name.contains("rotary_emb") {
                    continue;
                }
                bail!(
                    "{}: tensor `{name}` has no place in the training config's model",
                    file.display()
                );
            };
            if view.shape() != t.shape.as_slice() {
                bail!(
                    "{}: `{name}` is {:?}, the model needs {:?}",
                    file.display(),
                    view.shape(),
                    t.shape
                );
            }
            let values = to_f32(view.dtype(), view.data())
                .with_context(|| format!("{}: `{name}`", file.display()))?;
            match t.at {
                Some(at) => params[at..at + values.len()].copy_from_slice(&values),
                // a norm without a weight in this model: the checkpoint's must be ones
                None => {
                    if let Some(v) = values.iter().find(|&&v| v != 1.0) {
                        bail!(
                            "{}: `{name}` holds {v}, but the training config's norms have no weight: set model.layer_norm_with_affine: true",
                            file.display()
                        );
                    }
                }
            }
        }
    }
    if let Some(missing) = wanted.keys().next() {
        bail!(
            "{}: no tensor `{missing}` ({} missing)",
            hf_dir.display(),
            wanted.len()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_model(&out.join("model.safetensors"), &layout, &params)?;
    std::fs::write(out.join("config.yaml"), config_text)
        .with_context(|| format!("cannot write {}/config.yaml", out.display()))?;
    Ok(())
}
