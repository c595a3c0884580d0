"""Writes OLMo's unsharded checkpoint (step{N}-unsharded/) of one of olmo-train's checkpoints,
as OLMo's FullCheckpointer would save the same state: the test fixture for reading OLMo's
checkpoints (tests/train.rs compares a run continued from each).

    python make_unsharded.py step2 step2-unsharded

model.pt: the model's state dict; optim.pt: FSDP's full optimizer state dict (state keyed by
parameter name, AdamW's step/exp_avg/exp_avg_sq, two param groups as OLMo's get_param_groups
makes); optim-by-index.pt: the same keyed by index, as a plain optimizer's state_dict() with
OLMo's param_names; train.pt: OLMo's trainer_state_dict(), RNG states included.
"""
import collections
import json
import pathlib
import random
import sys

import numpy as np
import torch
from safetensors.torch import load_file

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
model = load_file(src / "model.safetensors")
optim = load_file(src / "optim.safetensors")
state = json.loads((src / "train.json").read_text())

torch.save(collections.OrderedDict((k, model[k].clone()) for k in model), out / "model.pt")

names = list(model)
decay = [n for n in names if not n.endswith("wte.weight") and "norm" not in n]
no_decay = [n for n in names if n not in decay]
step = float(state["optimizer_steps"])
per_param = {
    n: {
        "step": torch.tensor(step),
        "exp_avg": optim[f"{n}.exp_avg"].clone(),
        "exp_avg_sq": optim[f"{n}.exp_avg_sq"].clone(),
    }
    for n in names
}


def group(params, weight_decay, ids):
    return {
        "lr": 7e-3,
        "betas": (0.9, 0.95),
        "eps": 1e-5,
        "weight_decay": weight_decay,
        "amsgrad": False,
        "foreach": None,
        "maximize": False,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "initial_lr": 1e-2,
        "param_names": params,
        "params": ids,
    }


torch.save(
    {"state": per_param, "param_groups": [group(decay, 0.1, decay), group(no_decay, 0.0, no_decay)]},
    out / "optim.pt",
)
order = decay + no_decay
torch.save(
    {
        "state": {i: per_param[n] for i, n in enumerate(order)},
        "param_groups": [
            group(decay, 0.1, list(range(len(decay)))),
            group(no_decay, 0.0, list(range(len(decay), len(order)))),
        ],
    },
    out / "optim-by-index.pt",
)
torch.save(
    {
        "epoch": state["epoch"],
        "global_step": state["step"],
        "global_train_examples_seen_this_epoch": state["global_train_examples_seen_this_epoch"],
        "global_train_tokens_seen": state["global_train_tokens_seen"],
        "world_size": state["world_size"],
        "checkpoints": [],
        "unsharded_checkpoints": [pathlib.Path("run") / out.name],
        "ephemeral_checkpoints": [],
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.random.get_rng_state(),
            "cuda": torch.zeros(16, dtype=torch.uint8),
        },
    },
    out / "train.pt",
)
# OLMo's saved config spells out every field; the data order's seed is the one read here
config = (src / "config.yaml").read_text()
if "\nseed:" not in config:
    config += "seed: 6198\n"
(out / "config.yaml").write_text(config)
