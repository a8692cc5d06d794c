"""Data-parallel runs with `accelerate launch`: units of work split over processes, results gathered (or, for a
sweep written to a folder, each process's units written by it, with nothing gathered).

The split uses `datasets` sharding (`split_dataset_by_node`, contiguous shards; with fewer units than
processes, one unit each to the first ones and none to the rest) and the gather uses
torch.distributed through accelerate (gloo on CPUs, NCCL on GPUs). Units are planned before the
split, so each one is computed exactly as it would be in a single process.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def world_size() -> int:
    """How many processes `accelerate launch` / torchrun started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def state():
    """accelerate's process state; on machines without a GPU, processes talk over gloo (MULTI_CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def my_units(n_units: int, distributed: bool | None = None) -> list[int]:
    """The unit indices this process computes: all of them unless running under several processes."""
    if not (world_size() > 1 if distributed is None else distributed):
        return list(range(n_units))
    import datasets
    from datasets.distributed import split_dataset_by_node

    process = state()
    rank, size = process.process_index, process.num_processes
    if n_units < size:  # datasets refuses a shard past the last row; the processes beyond it have no work
        return [rank] if rank < n_units else []
    units = datasets.Dataset.from_dict({"unit": list(range(n_units))})
    return list(split_dataset_by_node(units, rank=rank, world_size=size)["unit"])


def process_slot(distributed: bool | None = None) -> tuple[int, int, Callable[[], None], bool]:
    """(this process's rank, the number of processes, a barrier, whether it is the main process).

    A streamed sweep (``out=folder``) deals unit u to rank u mod size as the input is read, so its length
    need not be known, and more processes than units leaves the extra ones idle.
    """
    if not (world_size() > 1 if distributed is None else distributed):
        return 0, 1, lambda: None, True
    process = state()
    return process.process_index, process.num_processes, process.wait_for_everyone, process.is_main_process


def gather_units(parts: dict[int, Any], distributed: bool | None = None) -> dict[int, Any]:
    """Every process's {unit: result}, merged, on every process."""
    if not (world_size() > 1 if distributed is None else distributed):
        return parts
    from accelerate.utils import gather_object

    merged: dict[int, Any] = {}
    for piece in gather_object([parts]):
        merged.update(piece)
    return merged


def device() -> str:
    """The device this process should load its model on (its own GPU under accelerate, else the CPU)."""
    if world_size() > 1:
        return str(state().device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["my_units", "process_slot", "gather_units", "world_size", "device", "state"]
