"""Writes views.pt, the torch_file reader's fixture: tensors as views of shared storages.

Run with any torch: python make_views.py (the committed file was written by torch 2.15).
"""
import collections

import torch

sd = collections.OrderedDict()
sd["a.weight"] = torch.arange(6, dtype=torch.float32).reshape(2, 3)
sd["b"] = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t()
sd["c"] = sd["a.weight"][1]
torch.save(sd, "views.pt")
