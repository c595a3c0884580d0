//! `export-hf`: a checkpoint as a Hugging Face transformers model folder (`config.json` +
//! `model.safetensors`, plus the tokenizer when the config names one). OLMo-1 blocks
//! (non-parametric LayerNorm) become `OlmoForCausalLM`; RMSNorm blocks are exactly Llama's
//! (pre-norm RMSNorm, SwiGLU, rotate-half RoPE, no biases) and become `LlamaForCausalLM`;
//! OLMo 2 blocks (weighted RMSNorms after each branch, weighted QK-norm) become
//! `Olmo2ForCausalLM`.
//! Weight splits follow OLMo's own conversion script: `att_proj` rows are q, k, v (k and v
//! `n_kv_heads` heads each, transformers' `num_key_value_heads`); `ff_proj` rows are up (the
//! value half) then gate.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::checkpoint::{read_weights, write_tensors};
use crate::config::TrainConfig;
use crate::model::{Layout, ModelConfig};
use crate::ops::NormKind;

/// One tensor of the transformers layout and where it lives in the flat parameters: `d × …`
/// rows from `at`, or, for a norm this model has no weight for, `None` (all ones).
pub(crate) struct HfTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub at: Option<usize>,
}

impl HfTensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The transformers model class a model is exported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HfArch {
    /// OLMo-1 blocks, non-parametric LayerNorm (`OlmoForCausalLM`).
    Olmo,
    /// Pre-norm RMSNorm blocks (`LlamaForCausalLM`).
    Llama,
    /// OLMo 2 blocks (`Olmo2ForCausalLM`).
    Olmo2,
}

impl HfArch {
    pub fn of(m: &ModelConfig) -> Result<HfArch> {
        if m.norm_after || m.qk_norm {
            let olmo2 = m.norm_after
                && m.qk_norm
                && m.qk_norm_affine
                && m.norm == NormKind::Rms
                && m.norm_affine;
            if !olmo2 {
                bail!("transformers' Olmo2 has weighted RMSNorms after each branch and a weighted QK-norm (layer_norm_type: rms, layer_norm_with_affine, norm_after, attention_layer_norm, attention_layer_norm_with_affine): this model has no transformers model class");
            }
            if m.clip_qkv.is_some() {
                bail!("transformers' Olmo2 has no clip_qkv: an OLMo 2 model with clip_qkv has no transformers model class");
            }
            return Ok(HfArch::Olmo2);
        }
        match (m.norm, m.norm_affine) {
            (NormKind::LayerNorm, false) => Ok(HfArch::Olmo),
            (NormKind::Rms, _) if m.clip_qkv.is_some() => bail!(
                "transformers' Llama has no clip_qkv: an RMSNorm model with clip_qkv has no transformers model class"
            ),
            (NormKind::Rms, _) => Ok(HfArch::Llama),
            (NormKind::LayerNorm, true) => bail!(
                "a LayerNorm with a weight but no bias has no transformers model class: export needs non-parametric LayerNorm (OLMo) or RMSNorm (Llama)"
            ),
        }
    }

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            HfArch::Olmo => "olmo",
            HfArch::Llama => "llama",
            HfArch::Olmo2 => "olmo2",
        }
    }

    /// What the training config's model is, for errors.
    pub fn describe(self) -> &'static str {
        match self {
            HfArch::Olmo => "OLMo-1 blocks, non-parametric LayerNorm",
            HfArch::Llama => "pre-norm RMSNorm blocks",
            HfArch::Olmo2 => "OLMo 2 blocks",
        }
    }
}

/// The transformers tensors of a model, in file order, mapped onto its layout: the one table
/// both `export-hf` and `import-hf` read, so the two cannot disagree.
pub(crate) fn hf_tensors(m: &ModelConfig, layout: &Layout) -> Result<Vec<HfTensor>> {
    let arch = HfArch::of(m)?;
    let (d, h, emb, kvd) = (m.d_model, m.mlp_hidden, m.embedding_size, m.kv_dim());
    let t = |name: String, shape: Vec<usize>, at: Option<usize>| HfTensor { name, shape, at };
    let mut out = vec![t(
        "model.embed_tokens.weight".into(),
        vec![emb, d],
        Some(layout.wte),
    )];
    for (i, l) in layout.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        // att_proj's rows: q (d), then k and v (kvd each)
        for (name, rows, from) in [
            ("q_proj", d, 0),
            ("k_proj", kvd, d),
            ("v_proj", kvd, d + kvd),
        ] {
            out.push(t(
                format!("{p}.self_attn.{name}.weight"),
                vec![rows, d],
                Some(l.att_proj + from * d),
            ));
        }
        out.push(t(
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, d],
            Some(l.attn_out),
        ));
        out.push(t(
            format!("{p}.mlp.up_proj.weight"),
            vec![h, d],
            Some(l.ff_proj),
        ));
        out.push(t(
            format!("{p}.mlp.gate_proj.weight"),
            vec![h, d],
            Some(l.ff_proj + h * d),
        ));
        out.push(t(
            format!("{p}.mlp.down_proj.weight"),
            vec![d, h],
            Some(l.ff_out),
        ));
        // transformers' names of the two block norms: Llama's normalise each branch's input
        // (the second one "post attention"), Olmo2's each branch's output
        let norms = match arch {
            HfArch::Olmo => None,
            HfArch::Llama => Some(("input_layernorm", "post_attention_layernorm")),
            HfArch::Olmo2 => Some(("post_attention_layernorm", "post_feedforward_layernorm")),
        };
        if let Some((attn, ff)) = norms {
            out.push(t(format!("{p}.{attn}.weight"), vec![d], l.attn_norm));
            out.push(t(format!("{p}.{ff}.weight"), vec![d], l.ff_norm));
        }
        if arch == HfArch::Olmo2 {
            out.push(t(format!("{p}.self_attn.q_norm.weight"), vec![d], l.q_norm));
            out.push(t(
                format!("{p}.self_attn.k_norm.weight"),
                vec![kvd],
                l.k_norm,
            ));
        }
    }
    if arch != HfArch::Olmo {
        out.push(t("model.norm.weight".into(), vec![d], layout.ln_f));
    }
    // tied: transformers re-ties lm_head to the embedding, so it is not stored
    if !m.weight_tying {
        out.push(t("lm_head.weight".into(), vec![emb, d], layout.head));
    }
    Ok(out)
}

pub fn export_hf(checkpoint: &Path, out: &Path) -> Result<()> {
    let (cfg, _) = TrainConfig::load(&checkpoint.join("config.yaml"))?;
    let (m, _) = cfg.model_config()?;
    let layout = Layout::new(&m);
    let params = read_weights(checkpoint, &layout)?;
    let (d, h) = (m.d_model, m.mlp_hidden);
    let arch = HfArch::of(&m)?;
    let ones = vec![1.0f32; d];
    let table = hf_tensors(&m, &layout)?;
    let tensors: Vec<(String, Vec<usize>, &[f32])> = table
        .iter()
        .map(|t| {
            let data = match t.at {
                Some(at) => &params[at..at + t.len()],
                None => &ones[..t.len()],
            };
            (t.name.clone(), t.shape.clone(), data)
        })
        .collect();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_tensors(&out.join("model.safetensors"), tensors)?;
    let mut config = json!({
        "architectures": [match arch {
            HfArch::Olmo => "OlmoForCausalLM",
            HfArch::Llama => "LlamaForCausalLM",
            HfArch::Olmo2 => "Olmo2ForCausalLM",
        }],
        "model_type": arch.model_type(),
        "hidden_size": d,
        "intermediate_size": h,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "num_hidden_layers": m.n_layers,
        "max_position_embeddings": cfg.model.max_sequence_length,
        "rope_theta": m.rope_theta,
        "vocab_size": m.embedding_size,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "tie_word_embeddings": m.weight_tying,
        "initializer_range": cfg.model.init_std,
        "pad_token_id": cfg.model.pad_token_id,
        "eos_token_id": cfg.model.eos_token_id,
        "bos_token_id": null,
        "torch_dtype": "float32",
        "use_cache": true,
    });
    match arch {
        HfArch::Llama => {
            config["rms_norm_eps"] = json!(m.eps);
            config["mlp_bias"] = json!(false);
            config["head_dim"] = json!(m.head_dim());
        }
        HfArch::Olmo2 => config["rms_norm_eps"] = json!(m.eps),
        HfArch::Olmo => config["clip_qkv"] = json!(m.clip_qkv),
    }
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    if let Some(t) = &cfg.tokenizer {
        std::fs::copy(&t.identifier, out.join("tokenizer.json"))
            .with_context(|| format!("cannot copy tokenizer {}", t.identifier))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_olmo2_shaped_models_export_as_olmo2() {
        let (_, base) = crate::gpu_check::variants(32, 100)[2];
        assert_eq!(HfArch::of(&base).unwrap(), HfArch::Olmo2);
        let refused = |m: ModelConfig, want: &str| {
            let e = HfArch::of(&m).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        let olmo2 = "this model has no transformers model class";
        refused(
            ModelConfig {
                norm_after: false,
                ..base
            },
            olmo2,
        );
        refused(
            ModelConfig {
                qk_norm: false,
                ..base
            },
            olmo2,
        );
        refused(
            ModelConfig {
                qk_norm_affine: false,
                ..base
            },
            olmo2,
        );
        refused(
            ModelConfig {
                norm: NormKind::LayerNorm,
                ..base
            },
            olmo2,
        );
        refused(
            ModelConfig {
                clip_qkv: Some(8.0),
                ..base
            },
            "Olmo2 has no clip_qkv",
        );
    }
}
