"""What both trainers share: accelerator, data order, per-step randomness, LR, checkpoints, logging.

Exact resume rests on two rules. (1) The data order and every random draw are pure functions of
(seed, process rank, micro-step), never of a generator's history, so a resumed run recomputes them.
(2) Everything else that evolves (weights, AdamW moments, EMA, the global RNGs) is in the checkpoint.

A checkpoint holds safetensors and JSON only (training/state.py), never a pickle, so resuming one runs no code;
and it is written only when the weights are finite, so a diverged run keeps its last good checkpoint.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, is_tensorboard_available
from tqdm.auto import tqdm

from latentdiff.data import DataError
from latentdiff.devices import cpu_only
from latentdiff.errors import TrainingError
from latentdiff.files import (atomic_write_text, os_error_cause, publish_dir, remove_leftovers, staging_dir,
                              writing)
from latentdiff.training.config import ConfigError, RunConfig
from latentdiff.training.state import StateError, load_module, load_state, save_module, save_state

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "ckpt-"
STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT = "latentdiff-trainer-2"  # safetensors + JSON; "-1" was accelerate's save_state (pickles)
MODEL_FILE = "model.safetensors"
NEVER = 2**62  # "no step" in the cross-process minimum of the first non-finite step


def make_accelerator(config: RunConfig) -> Accelerator:
    if config.mixed_precision == "fp16" and cpu_only():
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    accelerator = Accelerator(
        # with no GPU, `accelerate launch --multi_gpu --num_processes N` starts N CPU processes that
        # accelerate joins with gloo only when told the run is on the CPU (as latentdiff.devices does)
        cpu=cpu_only(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=config.output_dir,
    )
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        # their checkpoints are pickles that those engines load with code execution allowed
        raise ConfigError(f"{accelerator.distributed_type.value} is not supported: latentdiff's checkpoints (safetensors "
                          "and JSON, never pickles) cover one process and DDP; launch with --multi_gpu instead.")
    return accelerator


def together(accelerator: Accelerator, fn):
    """Run fn() on every process; if it raises on any, raise on all (a lone failure would leave the rest waiting
    at the next barrier). The process that failed re-raises its own exception, the others a TrainingError."""
    error = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 — re-raised below, after the others have heard of it
        error, result = e, None
    if accelerator.num_processes > 1:
        failures = [f for f in gather_object([None if error is None else str(error)]) if f is not None]
        if error is None and failures:
            raise TrainingError(failures[0])
    if error is not None:
        raise error
    return result


def prepare_output_dir(accelerator: Accelerator, config: RunConfig) -> Path:
    """Create output_dir (a ConfigError, exit 2, if that fails) and clear what killed or failed writes left there."""
    out = Path(config.output_dir)

    def prepare():
        if not accelerator.is_main_process:
            return
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test.{os.getpid()}.tmp"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to output_dir {out}: {os_error_cause(e)[1]}.") from None
        for folder in (out, checkpoints_dir(out), out / "validation", out / "latent_cache"):
            for path in remove_leftovers(folder):
                logger.info("removed %s, left by an interrupted write", path)

    together(accelerator, prepare)
    return out


def require_readable(dataset, data: str) -> None:
    """DataError unless at least one item of `dataset` can be read (a dataset of unreadable images trains nothing)."""
    for i in range(len(dataset)):
        if dataset[i] is not None:
            return
    raise DataError(f"none of the {len(dataset)} images in {data} can be read (see the warnings above); nothing to train on.")


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
        read_checkpoint(path)
        return path
    found = complete_checkpoints(config.output_dir)
    if found:
        read_checkpoint(found[-1])
    return found[-1] if found else None  # "latest" with nothing saved yet starts fresh


def read_checkpoint(path: Path) -> dict:
    """The trainer_state.json of a checkpoint; ConfigError (one sentence) unless it is this version's format."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot resume from {path}: cannot read {STATE_FILE} ({os_error_cause(e)[1]}).") from None
    except (ValueError, RecursionError):
        raise ConfigError(f"cannot resume from {path}: {STATE_FILE} is not valid JSON.") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        if isinstance(fmt, str) and fmt.startswith("latentdiff-trainer-"):
            raise ConfigError(f"cannot resume from {path}: it was written by an older latentdiff whose checkpoints hold "
                              "pickles, which can run code when loaded and are never loaded now; start the run afresh.")
        raise ConfigError(f"cannot resume from {path}: {STATE_FILE} is not a latentdiff checkpoint's (format {fmt!r}).")
    if not isinstance(state.get("step"), int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise ConfigError(f"cannot resume from {path}: {STATE_FILE} has no valid step.")
    return state


def _rng_state() -> dict:
    """The global RNGs of this process (nothing in latentdiff draws from them, but dropout or a user's code might)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def check_weights(step: int, tensors, what: str) -> None:
    """TrainingError unless every floating tensor is finite: NaN weights are never written anywhere."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    if flags and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        raise TrainingError(f"the weights became NaN/inf by step {step}, so {what} was not written; earlier "
                            "checkpoints are kept — lower --lr or set --max-grad-norm, then --resume from one.")


def save_checkpoint(accelerator: Accelerator, config: RunConfig, step: int, model, optimizer, ema=None) -> Path:
    """Everything that evolves, into ckpt-XXXXXX.tmp, then renamed; older ones pruned only after that.

    model.safetensors, optimizer.{json,safetensors}, ema.{…} and scaler.json (main process), rng-R.{…} (each
    process R), then trainer_state.json last: a folder with it is complete by construction. A failed save (full
    disk, NaN weights) removes the .tmp folder and leaves the earlier checkpoints as they were.
    """
    final = checkpoints_dir(config.output_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = staging_dir(final)  # one name for every process: each writes its own files into it
    main = accelerator.is_main_process
    trained = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]

    def prepare():
        check_weights(step, trained + (ema.shadow if ema is not None else []), f"checkpoint {final}")
        if main:
            with writing(final, "save checkpoint"):
                shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
                tmp.mkdir(parents=True)

    def write_parts():
        with writing(final, "save checkpoint"):
            if main:
                save_module(accelerator.unwrap_model(model), tmp / MODEL_FILE)
                save_state(tmp, "optimizer", optimizer.state_dict())
                if ema is not None:
                    save_state(tmp, "ema", ema.state_dict())
                if accelerator.scaler is not None:
                    save_state(tmp, "scaler", accelerator.scaler.state_dict())
            save_state(tmp, f"rng-{accelerator.process_index}", _rng_state())

    def publish():
        if not main:
            return
        with writing(final, "save checkpoint"):
            # written last: a folder with trainer_state.json is complete by construction
            state = {"step": step, "format": CHECKPOINT_FORMAT, "accelerator_step": accelerator.step,
                     "num_processes": accelerator.num_processes, "config": asdict(config)}
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2), durable=True)
            publish_dir(tmp, final)  # also replaces the same step saved by an earlier run
        for old in complete_checkpoints(config.output_dir)[: -config.keep_checkpoints]:
            try:
                shutil.rmtree(old)
            except OSError as e:
                logger.warning("could not remove the old checkpoint %s (%s)", old, os_error_cause(e)[1])

    try:
        for stage in (prepare, write_parts, publish):
            together(accelerator, stage)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_optimizer_state(optimizer, state) -> None:
    """ValueError unless every per-parameter tensor (AdamW's moments) has its parameter's shape: torch's
    load_state_dict does not look, and a mismatch would only fail at the next optimiser step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = state["state"] if isinstance(state, dict) and isinstance(state.get("state"), dict) else None
    if saved is None:
        raise ValueError("the optimizer state has no per-parameter entries")
    for index, entry in saved.items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise ValueError(f"its optimizer has state for more parameters than the {len(params)} this run trains; "
                             "were --train-text-encoder or the LoRA options different?")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise ValueError(f"the optimizer's {name} of parameter {index} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(params[index].shape)}")


def load_checkpoint(accelerator: Accelerator, path: Path, model, optimizer, ema=None) -> int:
    """Restore weights, optimiser, EMA, scaler and RNGs (no pickle is read); returns the optimiser step to go on from.

    A damaged or foreign checkpoint is a ConfigError naming the file.
    """
    info = read_checkpoint(path)
    try:
        load_module(accelerator.unwrap_model(model), path / MODEL_FILE)
        optimizer_state = load_state(path, "optimizer")
        _check_optimizer_state(optimizer, optimizer_state)
        optimizer.load_state_dict(optimizer_state)
        if ema is not None:
            ema.load_state_dict(load_state(path, "ema", device=accelerator.device))
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(load_state(path, "scaler"))
        rng = path / f"rng-{accelerator.process_index}.json"
        if rng.is_file():
            _set_rng_state(load_state(path, rng.stem))
        else:
            logger.warning("%s has no random state for process %d (saved by %s processes)", path,
                           accelerator.process_index, info.get("num_processes"))
    except StateError as e:
        raise ConfigError(f"cannot resume from {path}: {e}.") from None
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, RuntimeError) as e:
        what = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"cannot resume from {path}: its state does not fit this run ({what}).") from None
    accelerator.step = info.get("accelerator_step", 0) if isinstance(info.get("accelerator_step"), int) else 0
    return info["step"]


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
        """Keep the rows up to `step`; a torn line (what a kill or a full disk leaves mid-write) is dropped."""
        if not self.path.exists():
            return
        with writing(self.path, "rewrite"):
            kept = [line for line in self.path.read_text(errors="replace").splitlines() if _row_step(line) <= step]
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
        with writing(self.path, "write"), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{ips:.1f}")
        self.accelerator.log(row, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _row_step(line: str) -> float:
    """The step of a log.jsonl line; +inf (never kept) for a torn or foreign line."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


def log_indices(config: RunConfig, rank: int, step: int, indices: list[int]) -> None:
    path = Path(config.output_dir) / f"data-rank{rank}.jsonl"
    with writing(path, "write"), open(path, "a") as f:
        f.write(json.dumps({"step": step, "indices": indices}) + "\n")


# ---------------------------------------------------------------------------------------------
# the loop


def train_loop(accelerator: Accelerator, config: RunConfig, model, optimizer, params, sampler: ShardedEpochSampler,
               loader, start_step: int, loss_fn, on_step, name: str, ema=None) -> list[int]:
    """Optimiser steps start_step+1 … max_steps; returns the dataset indices that were unreadable.

    loss_fn(batch, generator) → scalar loss; on_step(step) runs after every optimiser update (EMA,
    validation); checkpoints follow it, so a checkpoint holds the step's EMA and validation state.

    A NaN/inf loss (or gradient norm, without fp16's scaler, which skips such steps itself) stops the run with
    a TrainingError naming the first such step. The values are kept on the device and looked at only on the
    steps that already synchronise (log, validation, checkpoint, last), always before anything is saved.
    """
    if start_step >= config.max_steps:  # resumed from the final checkpoint: nothing left to train
        return []
    images_per_step = config.batch_size * config.gradient_accumulation * accelerator.num_processes
    log = RunLog(accelerator, config, start_step, images_per_step, name)
    rank, step = accelerator.process_index, start_step
    micro = start_step * config.gradient_accumulation
    _set_lr(optimizer, lr_at(step, config))
    pending, missing = [], set()
    first_bad = torch.full((), NEVER, dtype=torch.int64, device=accelerator.device)  # first NaN/inf step, on the device
    validation_every = getattr(config, "validation_every", 0)
    try:
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
                    first_bad = _watch(first_bad, loss.detach(), step + 1)
                if accelerator.sync_gradients and config.max_grad_norm:
                    norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    if norm is not None and accelerator.scaler is None:
                        first_bad = _watch(first_bad, norm.detach(), step + 1)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            _set_lr(optimizer, lr_at(step, config))
            write = step % config.log_every == 0 or step == config.max_steps
            checkpoint = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            validation = bool(validation_every) and step % validation_every == 0
            if write or checkpoint or validation or step >= config.max_steps:
                _stop_if_diverged(accelerator, config, first_bad)
            metrics = {}
            if write:
                mean = torch.stack(pending).mean() if pending else torch.tensor(float("nan"), device=accelerator.device)
                metrics = {"loss": accelerator.reduce(mean, "mean").item(), "lr": lr_at(step - 1, config)}
                pending = []
            log.step(step, metrics, write)
            on_step(step)
            if checkpoint:
                save_checkpoint(accelerator, config, step, model, optimizer, ema)
            if step >= config.max_steps:
                break
    finally:
        log.close()  # also when the run fails: the bar's last line must not come after the error
    return sorted(set().union(*gather_object([missing])))


def _watch(first_bad: torch.Tensor, value: torch.Tensor, step: int) -> torch.Tensor:
    """min(first_bad, step if `value` is NaN/inf): device work only, no host synchronisation."""
    return torch.minimum(first_bad, torch.where(torch.isfinite(value.reshape(()).to(first_bad.device)), NEVER, step))


def _stop_if_diverged(accelerator: Accelerator, config: RunConfig, first_bad: torch.Tensor) -> None:
    """TrainingError naming the first step (over all processes) whose loss or gradient norm was NaN/inf."""
    if accelerator.num_processes > 1:
        first_bad = accelerator.gather(first_bad.reshape(1))
    bad = int(first_bad.min().item())
    if bad == NEVER:
        return
    found = complete_checkpoints(config.output_dir)
    kept = (f"the last good checkpoint, {found[-1]}, is kept — lower --lr (now {config.lr:g}) and --resume it" if found
            else f"no checkpoint had been saved yet — lower --lr (now {config.lr:g}) and start again")
    raise TrainingError(f"the loss or its gradient became NaN/inf at step {bad}, so training stopped without saving; {kept}.")


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def summary(config: RunConfig, items, missing: list[int], out: Path) -> None:
    """End-of-run lines: what was saved, and every unreadable image that was skipped."""
    print(f"trained {config.max_steps} steps; saved {out}")
    if missing:
        names = ", ".join(str(items[i][0]) for i in missing[:10]) + (" …" if len(missing) > 10 else "")
        print(f"skipped {len(missing)} unreadable image(s): {names}")
