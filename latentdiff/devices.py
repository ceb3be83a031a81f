"""Where this process runs: accelerate's process state and the device it assigns."""
from __future__ import annotations

import torch


def cpu_only() -> bool:
    """True without a GPU, or when ACCELERATE_USE_CPU is set (accelerate's own switch; the test suite sets it)."""
    from accelerate.utils import parse_flag_from_env

    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def process_state():
    """accelerate's view of this process (rank, world size, device: one GPU per process under `accelerate launch`).

    With no GPU, `accelerate launch --multi_gpu --num_processes N` starts N CPU processes; accelerate joins them
    with gloo only when told the run is on the CPU, hence `cpu=`.
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def default_device() -> torch.device:
    return process_state().device
