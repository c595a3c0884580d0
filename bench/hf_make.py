#!/usr/bin/env python3
"""A randomly initialised transformers model for an olmo-train config, saved with
save_pretrained: what `olmo-train import-hf` must read as transformers writes it.

  hf_make.py CONFIG ARCH OUT_DIR [--dtype float32|bfloat16]

ARCH is olmo, llama or olmo2. Every weight, norms included, is drawn at random (std 0.05 around
its init), so a misplaced tensor changes the scores. Needs torch, transformers, pyyaml.
"""
import argparse

import torch
import yaml


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("arch", choices=["olmo", "llama", "olmo2"])
    p.add_argument("out")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    m = yaml.safe_load(open(a.config))["model"]
    d = m["d_model"]
    hidden = (m.get("mlp_hidden_size") or m.get("mlp_ratio", 4) * d) // 2
    vocab = m.get("embedding_size") or (m["vocab_size"] + 127) // 128 * 128
    common = dict(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=hidden,
        num_attention_heads=m["n_heads"],
        num_key_value_heads=m.get("n_kv_heads") or (1 if m.get("multi_query_attention") else m["n_heads"]),
        num_hidden_layers=m["n_layers"],
        max_position_embeddings=m["max_sequence_length"],
        rope_theta=float(m.get("rope_theta", 10000)),
        tie_word_embeddings=bool(m.get("weight_tying", True)),
        attention_bias=False,
        pad_token_id=m.get("pad_token_id"),
        eos_token_id=m.get("eos_token_id"),
        bos_token_id=None,
    )
    import transformers as tf

    torch.manual_seed(0)  # transformers' init and the noise below: the same model every run
    if a.arch == "olmo":
        cfg = tf.OlmoConfig(**common, clip_qkv=m.get("clip_qkv"))
        model = tf.OlmoForCausalLM(cfg)
    elif a.arch == "llama":
        cfg = tf.LlamaConfig(**common, rms_norm_eps=float(m.get("layer_norm_eps", 1e-5)), mlp_bias=False)
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.Olmo2Config(**common, rms_norm_eps=float(m.get("layer_norm_eps", 1e-5)))
        model = tf.Olmo2ForCausalLM(cfg)
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.add_(0.05 * torch.randn_like(t))
    model.to(getattr(torch, a.dtype)).save_pretrained(a.out, safe_serialization=True)
    print(f"{type(model).__name__}: {sum(t.numel() for t in model.parameters())} parameters in {a.out} ({a.dtype})")


if __name__ == "__main__":
    main()
