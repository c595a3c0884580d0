"""Writes step2-unsharded-st/, the fixture's unsharded checkpoint as OLMo's
`unshard.py --safe-tensors` writes one: model.safetensors and optim.safetensors with OLMo's
key encoding (olmo/safetensors_util.py: each key the URL-safe base64 of the pickled
(keys, value_is_pickled); values that are not tensors stored as uint8 tensors of their
pickle), train.pt and config.yaml as they are:

    python make_unsharded_safetensors.py step2-unsharded step2-unsharded-st
"""
import base64
import pathlib
import pickle
import shutil
import sys

import safetensors.torch
import torch

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)


def encode_key(keys, value_is_pickled):
    return str(base64.urlsafe_b64encode(pickle.dumps((keys, value_is_pickled))), "ASCII")


def flatten(d, prefix=()):
    result = {}
    for key, value in d.items():
        if isinstance(value, torch.Tensor):
            result[encode_key(prefix + (key,), False)] = value
        elif isinstance(value, dict):
            result.update(flatten(value, prefix + (key,)))
        else:
            pickled = bytearray(pickle.dumps(value))
            result[encode_key(prefix + (key,), True)] = torch.frombuffer(pickled, dtype=torch.uint8)
    return result


for stem in ["model", "optim"]:
    state = torch.load(src / f"{stem}.pt", weights_only=True)
    safetensors.torch.save_file(flatten(state), out / f"{stem}.safetensors")
for name in ["train.pt", "config.yaml"]:
    shutil.copy(src / name, out / name)
