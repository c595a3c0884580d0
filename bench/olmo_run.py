"""Runs OLMo's own trainer (the `ai2-olmo` package, 0.6.0) on CPU, for bench/olmo_interop.sh.

    python olmo_run.py CONFIG.yaml METRICS.jsonl [--key=value ...]

OLMo's scripts/train.py insists on CUDA and NCCL; this is its main() with the device set to the
CPU, DDP or FSDP (`distributed_strategy`) over gloo (one rank, or as many as torchrun starts)
and no evaluators; a load_path
is restored as it does (the bolt-on LR warmup after reset_optimizer_state included). Everything that matters for a resume is OLMo's
code: its config loader, model, optimizer and param groups, scheduler, data loader (global
order and resume position), FullCheckpointer and Trainer.fit. Each step's metrics, as
Trainer.train_step returns them with fit's learning rates, go to METRICS.jsonl as one JSON line
(rank 0's: OLMo reduces the loss over the ranks there); each rank's data-indices to
save_folder/data-indices/rank{R}.tsv.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.nn.parallel import DistributedDataParallel as DDP

from olmo.config import CheckpointType, TrainConfig
from olmo.data import build_train_dataloader
from olmo.model import OLMo
from olmo.optim import BoltOnWarmupScheduler, build_optimizer, build_scheduler
from olmo.torch_util import seed_all
from olmo.train import Trainer
from olmo.util import clean_opt, prepare_cli_environment


def main() -> None:
    config, metrics_path, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    # OLMo 0.6.0 predates torch 2.6's weights_only default for torch.load, and its own
    # train.pt holds PosixPaths and NumPy RNG state, which that refuses: trust local files, as
    # it did. (olmo-train's exports load either way: no paths, no RNG states.)
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not torch.cuda.is_available():
        # OLMo's trainer state records the CUDA RNG unconditionally; without a GPU there is none.
        torch.cuda.get_rng_state = lambda *args, **kwargs: torch.zeros(0, dtype=torch.uint8)
        torch.cuda.set_rng_state = lambda *args, **kwargs: None
    dist.init_process_group(backend="gloo")
    prepare_cli_environment()
    cfg = TrainConfig.load(config, [clean_opt(s) for s in overrides])

    cfg.model.precision = cfg.precision
    cfg.device_train_batch_size = cfg.global_train_batch_size // dist.get_world_size()
    cfg.device_train_grad_accum = cfg.device_train_batch_size // cfg.device_train_microbatch_size
    seed_all(cfg.seed)
    train_loader = build_train_dataloader(cfg)
    model = OLMo(cfg.model)
    if cfg.distributed_strategy == "fsdp":
        # as scripts/train.py wraps it, on the CPU
        wrap_policy = model.get_fsdp_wrap_policy(cfg.fsdp.wrapping_strategy)
        dist_model = FSDP(
            model,
            sharding_strategy=cfg.fsdp.sharding_strategy,
            mixed_precision=cfg.fsdp_precision,
            auto_wrap_policy=wrap_policy,
            use_orig_params=cfg.fsdp.use_orig_params,
            limit_all_gathers=True,
            device_id=torch.device("cpu"),
        )
    else:
        dist_model = DDP(model)
    optim = build_optimizer(cfg, dist_model)
    scheduler = build_scheduler(cfg)

    rank = dist.get_rank()
    os.makedirs(os.path.join(cfg.save_folder, "data-indices"), exist_ok=True)
    indices = open(os.path.join(cfg.save_folder, "data-indices", f"rank{rank}.tsv"), "w")
    out = open(metrics_path if rank == 0 else os.devnull, "w")
    with Trainer(
        cfg=cfg,
        epoch=cfg.epoch,
        model=model,
        dist_model=dist_model,
        optim=optim,
        scheduler=scheduler,
        train_loader=train_loader,
        device=torch.device("cpu"),
        evaluators=[],
        indices_file=indices,
    ) as trainer:
        if cfg.load_path is not None:
            trainer.restore_checkpoint(
                cfg.load_path,
                load_optimizer_state=not cfg.reset_optimizer_state,
                load_trainer_state=not cfg.reset_trainer_state,
            )
            if cfg.reset_optimizer_state and not cfg.reset_trainer_state:
                trainer.scheduler = BoltOnWarmupScheduler.wrap(
                    trainer.scheduler, trainer.global_step, int(trainer.global_step + cfg.scheduler.t_warmup)
                )
        train_step = trainer.train_step

        def logged_step(batch, **kwargs):
            metrics = train_step(batch, **kwargs)
            # As fit's LRMonitor adds them: the rates this step's update used.
            metrics.update({f"optim/learning_rate_group{i}": g["lr"] for i, g in enumerate(optim.param_groups)})
            out.write(json.dumps({"step": trainer.global_step, **metrics}) + "\n")
            out.flush()
            return metrics

        trainer.train_step = logged_step
        trainer.fit()
        if cfg.save_interval_unsharded is not None and trainer.last_unsharded_checkpoint_step != trainer.global_step:
            trainer.save_checkpoint(checkpoint_type=CheckpointType.unsharded)
    indices.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
