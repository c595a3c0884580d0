"""Checks with torch what `olmo-train export-olmo` wrote against the checkpoint it came from:

    olmo-train export-olmo step2 /tmp/out/step2-unsharded
    python check_export.py step2 /tmp/out/step2-unsharded

torch.load reads each file with weights_only=True (the default since torch 2.6) and with
mmap=True (aligned storages); the tensors equal the safetensors ones bit for bit; optim.pt is
FSDP's full optimizer state dict (keyed by name, `sharded`) or, exported with
`--distributed_strategy ddp`, a plain one (keyed by index, `param_names` through DDP's
`module.`), with OLMo's two param groups, and an AdamW built over the same parameters loads it; train.pt has the fields OLMo's load_trainer_state_dict reads.
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import load_file

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
model = load_file(src / "model.safetensors")
for mmap in (False, True):
    sd = torch.load(out / "model.pt", weights_only=True, mmap=mmap)
    assert sorted(sd) == sorted(model), (list(sd), list(model))
    for k, v in model.items():
        assert torch.equal(sd[k], v), k

state = json.loads((src / "train.json").read_text())
if (src / "optim.safetensors").exists():
    optim = load_file(src / "optim.safetensors")
    o = torch.load(out / "optim.pt", weights_only=True)
    groups = o["param_groups"]
    names = [n.removeprefix("module.") for g in groups for n in g["param_names"]]
    ddp = isinstance(groups[0]["params"][0], int)
    if ddp:
        assert sum((g["params"] for g in groups), []) == list(range(len(names)))
        assert all(n.startswith("module.") for g in groups for n in g["param_names"])
        by_name = {names[i]: s for i, s in o["state"].items()}
    else:
        assert sum((g["params"] for g in groups), []) == names
        by_name = o["state"]
    assert all(g["sharded"] != ddp for g in groups)
    for k in model:
        s = by_name[k]
        assert torch.equal(s["exp_avg"], optim[f"{k}.exp_avg"]), k
        assert torch.equal(s["exp_avg_sq"], optim[f"{k}.exp_avg_sq"]), k
        assert s["step"].item() == state["optimizer_steps"], k
    assert sorted(names) == sorted(model)
    assert groups[-1]["weight_decay"] == 0.0
    # a plain AdamW over the same parameters, keyed by index, takes the state
    params = {k: torch.nn.Parameter(v.clone()) for k, v in model.items()}
    ids = {n: i for i, n in enumerate(names)}
    group_names = [[n.removeprefix("module.") for n in g["param_names"]] for g in groups]
    adam = torch.optim.AdamW([{"params": [params[n] for n in g]} for g in group_names])
    plain = {
        "state": {ids[n]: s for n, s in by_name.items()},
        "param_groups": [{**g, "params": [ids[n] for n in gn]} for g, gn in zip(groups, group_names)],
    }
    adam.load_state_dict(plain)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    adam.step()
    print(f"optim.pt ({'DDP' if ddp else 'FSDP'} form): AdamW loaded it and stepped")

t = torch.load(out / "train.pt", weights_only=True)
assert t["global_step"] == state["step"]
assert t["global_train_examples_seen_this_epoch"] == state["global_train_examples_seen_this_epoch"]
assert t["global_train_tokens_seen"] == state["global_train_tokens_seen"]
assert t["checkpoints"] == [] and t["unsharded_checkpoints"] == []
print(f"{out}: model.pt, optim.pt and train.pt read by torch {torch.__version__} as written")
