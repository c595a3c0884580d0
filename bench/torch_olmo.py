#!/usr/bin/env python3
"""The olmo-train model rebuilt in plain PyTorch, for side-by-side checks.

  torch_olmo.py bench CONFIG [--threads N] [--steps N] [--device cuda --amp-bf16]
                    [--batch B --micro M --seq T]
      training tokens/s of the same model, batch, micro-batch and optimizer (fp32 on CPU;
      on a GPU optionally under bf16 autocast, as OLMo's amp_bf16), forward + backward + AdamW,
      timed after two warm-up steps; on a GPU also MFU against the H100/H200 bf16 peak.
  torch_olmo.py check CONFIG CHECKPOINT_DIR TOKENS.npy [--hf HF_DIR]
      loads olmo-train's model.safetensors into the PyTorch twin and prints the mean
      cross-entropy over the file's windows (and the same through transformers when --hf
      names an `olmo-train export-hf` folder), to compare with olmo-train's own eval metric.

Needs torch, numpy, pyyaml, safetensors (and transformers for --hf).
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

try:
    import yaml
except ImportError:  # a GPU machine's torch venv may lack pyyaml: read our simple configs
    yaml = None


def parse_simple_yaml(text):
    """Block mappings, scalars and one-line flow lists: enough for trainer/configs/*.yaml."""
    root, stack = {}, [(-1, None)]
    stack[0] = (-1, root)

    def scalar(v):
        v = v.strip()
        if v.startswith("[") and v.endswith("]"):
            return [scalar(x) for x in v[1:-1].split(",") if x.strip()]
        if v in ("true", "false"):
            return v == "true"
        if v in ("null", "~", ""):
            return None
        for cast in (int, float):
            try:
                return cast(v.replace("_", ""))
            except ValueError:
                pass
        return v.strip("'\"")

    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip()
        if not line.strip() or line.strip().startswith("#") or line.strip().startswith("- "):
            continue
        indent = len(line) - len(line.lstrip())
        key, _, val = line.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if val.strip():
            parent[key] = scalar(val)
        else:
            parent[key] = {}
            stack.append((indent, parent[key]))
    return root


class Norm(nn.Module):
    def __init__(self, d, kind, affine, eps):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d)) if affine else None

    def forward(self, x):
        if self.kind == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return x * self.weight if self.weight is not None else x
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, h = c["d"], c["hidden"]
        kvd = d // c["heads"] * c["kv_heads"]
        self.c = c
        self.attn_norm = Norm(d, c["norm"], c["affine"], c["eps"])
        self.att_proj = nn.Linear(d, d + 2 * kvd, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = Norm(d, c["norm"], c["affine"], c["eps"])
        self.ff_proj = nn.Linear(d, 2 * h, bias=False)
        self.ff_out = nn.Linear(h, d, bias=False)
        if c["qk_norm"]:
            self.q_norm = Norm(d, c["norm"], c["qk_affine"], c["eps"])
            self.k_norm = Norm(kvd, c["norm"], c["qk_affine"], c["eps"])

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        nh, nkv = self.c["heads"], self.c["kv_heads"]
        hd = d // nh
        after = self.c["norm_after"]
        qkv = self.att_proj(x if after else self.attn_norm(x))
        if self.c["clip_qkv"] is not None:
            qkv = qkv.clamp(-self.c["clip_qkv"], self.c["clip_qkv"])
        q, k, v = qkv.split((d, nkv * hd, nkv * hd), dim=-1)
        if self.c["qk_norm"]:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, nh, hd).transpose(1, 2)
        # grouped-query attention as OLMo does it: each kv head repeated for its q heads
        k, v = (
            z.view(b, t, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
            for z in (k, v)
        )

        def rope(z):
            z1, z2 = z.chunk(2, dim=-1)
            return z * cos + torch.cat((-z2, z1), dim=-1) * sin

        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        a = self.attn_out(a.transpose(1, 2).reshape(b, t, d))
        x = x + (self.attn_norm(a) if after else a)
        val, gate = self.ff_proj(x if after else self.ff_norm(x)).chunk(2, dim=-1)
        f = self.ff_out(F.silu(gate) * val)
        return x + (self.ff_norm(f) if after else f)


class Olmo(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(c["emb"], c["d"])
        self.transformer.blocks = nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.transformer.ln_f = Norm(c["d"], c["norm"], c["affine"], c["eps"])
        if not c["tying"]:
            self.transformer.ff_out = nn.Linear(c["d"], c["emb"], bias=False)
        hd = c["d"] // c["heads"]
        inv = 1.0 / (c["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        f = torch.outer(torch.arange(c["seq"], dtype=torch.float), inv)
        emb = torch.cat((f, f), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.transformer.wte(ids)
        for blk in self.transformer.blocks:
            x = blk(x, self.cos[:t], self.sin[:t])
        x = self.transformer.ln_f(x)
        w = self.transformer.wte.weight if self.c["tying"] else self.transformer.ff_out.weight
        return F.linear(x, w)


def load_config(path):
    text = open(path).read()
    y = yaml.safe_load(text) if yaml else parse_simple_yaml(text)
    m = y["model"]
    d = m["d_model"]
    hidden = m.get("mlp_hidden_size") or m.get("mlp_ratio", 4) * d
    vocab = m["vocab_size"]
    c = dict(
        d=d,
        heads=m["n_heads"],
        kv_heads=m.get("n_kv_heads") or (1 if m.get("multi_query_attention") else m["n_heads"]),
        layers=m["n_layers"],
        hidden=hidden // 2,
        vocab=vocab,
        emb=m.get("embedding_size") or (vocab + 127) // 128 * 128,
        seq=m["max_sequence_length"],
        theta=float(m.get("rope_theta", 10000)),
        eps=float(m.get("layer_norm_eps", 1e-5)),
        norm="rms" if m.get("layer_norm_type") == "rms" else "default",
        # absent keys take OLMo's defaults, as olmo-train reads them
        affine=bool(m.get("layer_norm_with_affine", True)),
        tying=bool(m.get("weight_tying", True)),
        clip_qkv=m.get("clip_qkv"),
        # OLMo 2 blocks: norms after each branch, QK-norm
        norm_after=bool(m.get("norm_after", False)),
        qk_norm=bool(m.get("attention_layer_norm", False)),
        qk_affine=bool(m.get("attention_layer_norm_with_affine", True)),
    )
    return c, y


def loss_fn(model, windows, z_mult):
    logits = model(windows[:, :-1])
    flat = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, windows[:, 1:].reshape(-1))
    z = z_mult * torch.logsumexp(flat, dim=-1).pow(2).mean() if z_mult else 0.0
    return ce + z


def flops_per_token(c, params_total, seq):
    emb = c["emb"] * c["d"] * (1 if c["tying"] else 2)
    attn = c["layers"] * c["d"] * seq
    return 2 * (params_total - emb) + 4 * attn + 4 * params_total + 8 * attn


def sdpa_backend(c, micro, dev):
    """The attention kernel PyTorch's SDPA picks for the model's bf16 q, k, v (flash,
    memory-efficient, cuDNN, ...), to read the comparison by; a private API, so best effort."""
    try:
        from torch.nn.attention import SDPBackend

        q = torch.zeros(micro, c["heads"], c["seq"], c["d"] // c["heads"], device=dev, dtype=torch.bfloat16)
        choice = int(torch._fused_sdp_choice(q, q, q, None, 0.0, True))
        names = {int(v): k for k, v in SDPBackend.__members__.items()}
        return names.get(choice, str(choice))
    except Exception as e:  # noqa: BLE001 - only a label
        return f"unknown ({type(e).__name__})"


def bench(args):
    torch.set_num_threads(args.threads)
    c, y = load_config(args.config)
    if args.seq:
        c["seq"] = args.seq
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = Olmo(c).to(dev)
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=0.02)
    opt_cfg = y.get("optimizer", {})
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "wte" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "wte" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": rest, "weight_decay": 0.0}],
        lr=float(opt_cfg.get("learning_rate", 1e-4)),
        betas=tuple(opt_cfg.get("betas", (0.9, 0.95))),
        eps=float(opt_cfg.get("eps", 1e-5)),
        weight_decay=float(opt_cfg.get("weight_decay", 0.01)),
        foreach=True,
    )
    batch = args.batch or y["global_train_batch_size"]
    micro = args.micro or y.get("device_train_microbatch_size") or batch
    z_mult = float(y.get("auxiliary_loss_multiplier", 1e-4)) if y.get("softmax_auxiliary_loss") else 0.0
    gen = torch.Generator().manual_seed(1)
    # seq + 1 tokens a row: the model sees seq positions, as olmo-train's windows of seq
    data = torch.randint(0, c["vocab"], (args.steps + 2, batch, c["seq"] + 1), generator=gen)
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.amp_bf16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(args.steps + 2):
        if i == 2:
            sync()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for mb in data[i].to(dev).split(micro):
            with amp:
                loss = loss_fn(model, mb, z_mult) * (mb.shape[0] / batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    sync()
    secs = time.perf_counter() - start
    tps = args.steps * batch * c["seq"] / secs
    params = sum(p.numel() for p in model.parameters())
    where = f"{args.threads} threads" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    line = (f"pytorch {torch.__version__} ({where}{', bf16 autocast' if args.amp_bf16 else ''}): "
            f"{params} parameters, {args.steps} steps of {batch}x{c['seq']} (micro {micro}): {tps:.0f} tokens/s")
    if dev.type == "cuda":
        flops = flops_per_token(c, params, c["seq"]) * tps
        line += f", {flops / 1e12:.1f} TFLOP/s, MFU {100 * flops / 989.4e12:.1f}%"
        line += f", peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB"
        line += f", SDPA {sdpa_backend(c, micro, dev)}"
    print(line)


def windows_of(path, seq, dtype):
    import numpy as np

    tokens = np.fromfile(path, dtype=dtype)
    n = len(tokens) // seq
    return torch.from_numpy(tokens[: n * seq].astype(np.int64).reshape(n, seq))


@torch.no_grad()
def mean_ce(forward, windows, batch=64):
    total, count = 0.0, 0
    for w in windows.split(batch):
        logits = forward(w[:, :-1]).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
        total += ce.item()
        count += w[:, 1:].numel()
    return total / count


def check(args):
    from safetensors.torch import load_file

    c, y = load_config(args.config)
    model = Olmo(c)
    state = load_file(f"{args.checkpoint}/model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("ff_out.weight") or "blocks" in m]
    assert not missing and not unexpected, (missing, unexpected)
    import numpy as np

    dtype = np.uint32 if y.get("data", {}).get("memmap_dtype") == "uint32" else np.uint16
    windows = windows_of(args.tokens, c["seq"], dtype)
    print(f"pytorch twin: mean cross-entropy {mean_ce(model, windows):.6f} over {len(windows)} windows")
    if args.hf:
        from transformers import AutoModelForCausalLM

        try:  # `dtype` since transformers 4.56, `torch_dtype` before
            hf = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
        except TypeError:
            hf = AutoModelForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32)
        hf.eval()
        ce = mean_ce(lambda ids: hf(input_ids=ids).logits, windows)
        print(f"transformers {type(hf).__name__}: mean cross-entropy {ce:.6f}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("config")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--device", default="cpu")
    b.add_argument("--amp-bf16", action="store_true")
    b.add_argument("--batch", type=int)
    b.add_argument("--micro", type=int)
    b.add_argument("--seq", type=int)
    k = sub.add_parser("check")
    k.add_argument("config")
    k.add_argument("checkpoint")
    k.add_argument("tokens")
    k.add_argument("--hf")
    args = p.parse_args()
    bench(args) if args.cmd == "bench" else check(args)


if __name__ == "__main__":
    main()
