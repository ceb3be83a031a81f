"""What both trainers share: accelerator, data order, per-step randomness, LR, checkpoints, logging.

Exact resume rests on two rules. (1) The data order and every random draw are pure functions of
(seed, process rank, micro-step), never of a generator's history, so a resumed run recomputes them.
(2) Everything else that evolves (weights, AdamW moments, EMA) is in the accelerate checkpoint.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, is_tensorboard_available
from tqdm.auto import tqdm

from latentdiff.devices import cpu_only
from latentdiff.files import atomic_write_text, publish_dir, staging_dir
from latentdiff.training.config import ConfigError, RunConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "ckpt-"
STATE_FILE = "trainer_state.json"


def make_accelerator(config: RunConfig) -> Accelerator:
    if config.mixed_precision == "fp16" and cpu_only():
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    return Accelerator(
        # with no GPU, `accelerate launch --multi_gpu --num_processes N` starts N CPU processes that
        # accelerate joins with gloo only when told the run is on the CPU (as latentdiff.devices does)
        cpu=cpu_only(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=config.output_dir,
    )


# ---------------------------------------------------------------------------------------------
# data order and randomness


class ShardedEpochSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for one process, from micro-step `start` on.

    Epoch e is one permutation seeded by (seed, e), cut to a multiple of world·batch (drop_last)
    and dealt round-robin, so processes see disjoint shards and the i-th batch of any run is the same.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.steps_per_epoch = n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the dataset has {n} images, fewer than one global batch of {batch_size * world} "
                              f"(batch_size {batch_size} × {world} processes); lower --batch-size.")

    @functools.lru_cache(maxsize=2)
    def _shard(self, epoch: int) -> torch.Tensor:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return perm[: self.steps_per_epoch * self.batch_size * self.world][self.rank :: self.world]

    def batch(self, micro_step: int) -> list[int]:
        epoch, i = divmod(micro_step, self.steps_per_epoch)
        return self._shard(epoch)[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def __iter__(self):  # endless; the trainer stops at max_steps
        step = self.start
        while True:
            epoch = step // self.steps_per_epoch
            yield [(i, epoch) for i in self.batch(step)]
            step += 1


class EpochKeyed(torch.utils.data.Dataset):
    """Items fetched by (index, epoch): per-epoch augmentation right in every DataLoader worker's copy."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


def make_loader(dataset, sampler: ShardedEpochSampler, num_workers: int, collate_fn):
    return torch.utils.data.DataLoader(EpochKeyed(dataset), batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_fn, generator=torch.Generator().manual_seed(0))


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """A CPU generator for one micro-step's noise, timesteps and dropout: a function of its key only."""
    key = np.random.SeedSequence([seed, rank, micro_step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))


def lr_at(step: int, config: RunConfig) -> float:
    """Linear warmup over warmup_steps, then constant or cosine: lr·(m + (1 − m)·½(1 + cos(π·p)))."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    m = config.min_lr_ratio
    return config.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(params, config: RunConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr_at(0, config), betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.weight_decay, eps=config.adam_epsilon)


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoints_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir) -> list[Path]:
    """Finished checkpoints, oldest first; a `.tmp` (or `.old`) folder is a save that never completed."""
    folder = checkpoints_dir(output_dir)
    found = [p for p in folder.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()
             and (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(config: RunConfig) -> Path | None:
    """The checkpoint to continue from; a fresh run refuses a folder that already holds checkpoints."""
    if config.resume is None:
        if complete_checkpoints(config.output_dir):
            raise ConfigError(f"{config.output_dir} already holds checkpoints of an earlier run; pass --resume latest "
                              "to continue it, or choose another --output-dir.")
        return None
    if config.resume != "latest":
        path = Path(config.resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"--resume {path} is not a complete checkpoint (it has no {STATE_FILE}).")
        return path
    found = complete_checkpoints(config.output_dir)
    return found[-1] if found else None  # "latest" with nothing saved yet starts fresh


def save_checkpoint(accelerator: Accelerator, config: RunConfig, step: int) -> Path:
    """accelerate save_state into ckpt-XXXXXX.tmp, then rename; older ones pruned only after that."""
    final = checkpoints_dir(config.output_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = staging_dir(final)  # one name for every process: each writes its own files into it
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a killed save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # written last: a folder with trainer_state.json is complete by construction
        state = {"step": step, "config": asdict(config), "format": "latentdiff-trainer-1"}
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2), durable=True)
        publish_dir(tmp, final)  # also replaces the same step saved by an earlier run
        for old in complete_checkpoints(config.output_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restore models, optimiser and registered objects; returns the optimiser step to go on from."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())["step"]


# ---------------------------------------------------------------------------------------------
# logging


class RunLog:
    """log.jsonl (step, loss, lr, images/s, …) + tqdm bar + TensorBoard through accelerate when installed."""

    def __init__(self, accelerator: Accelerator, config: RunConfig, start_step: int, images_per_step: int, name: str):
        self.accelerator = accelerator
        self.path = Path(config.output_dir) / "log.jsonl"
        self.images_per_step = images_per_step
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.bar = None
        if accelerator.is_main_process:
            self._truncate_after(start_step)  # a killed run may have logged steps past its last checkpoint
            self.bar = tqdm(total=config.max_steps, initial=start_step, desc=name, dynamic_ncols=True)
        if accelerator.log_with:
            accelerator.init_trackers(name, config={k: str(v) for k, v in asdict(config).items()})

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def step(self, step: int, metrics: dict, write: bool) -> None:
        """Advance the bar by one step; on `write` steps also append a JSONL line and log to trackers."""
        if not self.accelerator.is_main_process:
            return
        self.bar.update(1)
        if not write:
            return
        now = time.perf_counter()
        ips = self.images_per_step * (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        row = {"step": step, **metrics, "images_per_s": round(ips, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{ips:.1f}")
        self.accelerator.log(row, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log_indices(config: RunConfig, rank: int, step: int, indices: list[int]) -> None:
    with open(Path(config.output_dir) / f"data-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "indices": indices}) + "\n")


# ---------------------------------------------------------------------------------------------
# the loop


def train_loop(accelerator: Accelerator, config: RunConfig, model, optimizer, params, sampler: ShardedEpochSampler,
               loader, start_step: int, loss_fn, on_step, name: str) -> list[int]:
    """Optimiser steps start_step+1 … max_steps; returns the dataset indices that were unreadable.

    loss_fn(batch, generator) → scalar loss; on_step(step) runs after every optimiser update (EMA,
    validation); checkpoints follow it, so a checkpoint holds the step's EMA and validation state.
    """
    if start_step >= config.max_steps:  # resumed from the final checkpoint: nothing left to train
        return []
    images_per_step = config.batch_size * config.gradient_accumulation * accelerator.num_processes
    log = RunLog(accelerator, config, start_step, images_per_step, name)
    rank, step = accelerator.process_index, start_step
    micro = start_step * config.gradient_accumulation
    _set_lr(optimizer, lr_at(step, config))
    pending, missing = [], set()
    for batch in loader:
        requested = sampler.batch(micro)
        missing.update(set(requested) - set(batch["index"] if batch is not None else []))
        if config.log_indices:
            log_indices(config, rank, step + 1, batch["index"] if batch is not None else [])
        with accelerator.accumulate(model):
            if batch is not None:  # None: every image of this micro-batch was unreadable (warned by the dataset)
                with accelerator.autocast():
                    loss = loss_fn(batch, step_generator(config.seed, rank, micro))
                accelerator.backward(loss)
                pending.append(loss.detach())
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        _set_lr(optimizer, lr_at(step, config))
        write = step % config.log_every == 0 or step == config.max_steps
        metrics = {}
        if write:
            mean = torch.stack(pending).mean() if pending else torch.tensor(float("nan"), device=accelerator.device)
            metrics = {"loss": accelerator.reduce(mean, "mean").item(), "lr": lr_at(step - 1, config)}
            pending = []
        log.step(step, metrics, write)
        on_step(step)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(accelerator, config, step)
        if step >= config.max_steps:
            break
    log.close()
    return sorted(set().union(*gather_object([missing])))


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def summary(config: RunConfig, items, missing: list[int], out: Path) -> None:
    """End-of-run lines: what was saved, and every unreadable image that was skipped."""
    print(f"trained {config.max_steps} steps; saved {out}")
    if missing:
        names = ", ".join(str(items[i][0]) for i in missing[:10]) + (" …" if len(missing) > 10 else "")
        print(f"skipped {len(missing)} unreadable image(s): {names}")
