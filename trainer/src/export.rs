//! `export-hf`: a checkpoint as a Hugging Face transformers model folder (`config.json` +
//! `model.safetensors`, plus the tokenizer when the config names one). OLMo-1 blocks
//! (non-parametric LayerNorm) become `OlmoForCausalLM`; RMSNorm blocks are exactly Llama's
//! (pre-norm RMSNorm, SwiGLU, rotate-half RoPE, no biases) and become `LlamaForCausalLM`.
//! Weight splits follow OLMo's own conversion script: `att_proj` rows are q, k, v; `ff_proj`
//! rows are up (the value half) then gate.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::checkpoint::{read_model, write_tensors};
use crate::config::TrainConfig;
use crate::model::Layout;
use crate::ops::NormKind;

pub fn export_hf(checkpoint: &Path, out: &Path) -> Result<()> {
    let (cfg, _) = TrainConfig::load(&checkpoint.join("config.yaml"))?;
    let (m, _) = cfg.model_config()?;
    let layout = Layout::new(&m);
    let params = read_model(&checkpoint.join("model.safetensors"), &layout)?;
    let (d, h) = (m.d_model, m.mlp_hidden);
    let llama = match (m.norm, m.norm_affine) {
        (NormKind::LayerNorm, false) => false,
        (NormKind::Rms, _) => true,
        (NormKind::LayerNorm, true) => bail!(
            "a LayerNorm with a weight but no bias has no transformers model class: export needs non-parametric LayerNorm (OLMo) or RMSNorm (Llama)"
        ),
    };
    let ones = vec![1.0f32; d];
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    let emb = m.embedding_size;
    tensors.push((
        "model.embed_tokens.weight".into(),
        vec![emb, d],
        &params[layout.wte..layout.wte + emb * d],
    ));
    for (i, l) in layout.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let at = l.att_proj + j * d * d;
            tensors.push((
                format!("{p}.self_attn.{name}.weight"),
                vec![d, d],
                &params[at..at + d * d],
            ));
        }
        tensors.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, d],
            &params[l.attn_out..l.attn_out + d * d],
        ));
        tensors.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![h, d],
            &params[l.ff_proj..l.ff_proj + h * d],
        ));
        tensors.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![h, d],
            &params[l.ff_proj + h * d..l.ff_proj + 2 * h * d],
        ));
        tensors.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![d, h],
            &params[l.ff_out..l.ff_out + d * h],
        ));
        if llama {
            let w = |at: Option<usize>| at.map_or(&ones[..], |o| &params[o..o + d]);
            tensors.push((
                format!("{p}.input_layernorm.weight"),
                vec![d],
                w(l.attn_norm),
            ));
            tensors.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![d],
                w(l.ff_norm),
            ));
        }
    }
    if llama {
        let w = layout.ln_f.map_or(&ones[..], |o| &params[o..o + d]);
        tensors.push(("model.norm.weight".into(), vec![d], w));
    }
    let head = layout.head.unwrap_or(layout.wte);
    tensors.push((
        "lm_head.weight".into(),
        vec![emb, d],
        &params[head..head + emb * d],
    ));
    if m.weight_tying {
        // tied: transformers re-ties lm_head to the embedding; storing it too is harmless
        tensors.pop();
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_tensors(&out.join("model.safetensors"), tensors)?;
    let mut config = json!({
        "architectures": [if llama { "LlamaForCausalLM" } else { "OlmoForCausalLM" }],
        "model_type": if llama { "llama" } else { "olmo" },
        "hidden_size": d,
        "intermediate_size": h,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "num_hidden_layers": m.n_layers,
        "max_position_embeddings": cfg.model.max_sequence_length,
        "rope_theta": m.rope_theta,
        "vocab_size": emb,
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
    if llama {
        config["rms_norm_eps"] = json!(m.eps);
        config["mlp_bias"] = json!(false);
        config["head_dim"] = json!(m.head_dim());
    } else {
        config["clip_qkv"] = json!(null);
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
