"""Writes OLMo's sharded checkpoint (its `torch_new` checkpointer's step{N}/: model_and_optim/
as torch.distributed.checkpoint saves it, train/rank{R}.pt, config.yaml) of one of
olmo-train's checkpoints, from two ranks, so that each tensor is stored in two chunks along
its first dimension as FSDP's sharded state dicts store it (the second moments along their
last, as tensor parallelism would, to check chunks placed in any dimension):

    python make_sharded.py step2 step2-sharded
"""
import json
import os
import pathlib
import shutil
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh


def save(rank, src, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    model = load_file(src / "model.safetensors")
    optim = load_file(src / "optim.safetensors")
    state = json.loads((src / "train.json").read_text())
    shard = lambda t, dim=0: distribute_tensor(t, mesh, [Shard(dim)])
    names = list(model)
    decay = sorted(n for n in names if not n.endswith("wte.weight"))
    no_decay = sorted(n for n in names if n not in decay)
    group = lambda params, wd: {
        "lr": 7e-3, "betas": (0.9, 0.95), "eps": 1e-5, "weight_decay": wd, "initial_lr": 1e-2,
        "param_names": params, "params": params,
    }
    sd = {
        "model": {n: shard(model[n]) for n in names},
        "optim": {
            "state": {
                n: {
                    "step": torch.tensor(float(state["optimizer_steps"])),
                    "exp_avg": shard(optim[f"{n}.exp_avg"]),
                    "exp_avg_sq": shard(optim[f"{n}.exp_avg_sq"], -1),
                }
                for n in names
            },
            "param_groups": [group(decay, 0.1), group(no_decay, 0.0)],
        },
    }
    dcp.save(sd, checkpoint_id=out / "model_and_optim")
    (out / "train").mkdir(exist_ok=True)
    torch.save(
        {
            "epoch": state["epoch"],
            "global_step": state["step"],
            "global_train_examples_seen_this_epoch": state["global_train_examples_seen_this_epoch"],
            "global_train_tokens_seen": state["global_train_tokens_seen"],
            "world_size": 2,
            "checkpoints": [pathlib.Path("run") / out.name],
            "unsharded_checkpoints": [],
            "ephemeral_checkpoints": [],
            "rng": {"python": None, "numpy": None, "torch": torch.random.get_rng_state(), "cuda": None},
        },
        out / "train" / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(save, args=(src, out), nprocs=2)
    config = (src / "config.yaml").read_text()
    if "\nseed:" not in config:
        config += "seed: 6198\n"
    (out / "config.yaml").write_text(config)
