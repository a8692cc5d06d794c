"""Data-parallel sweeps: `accelerate launch` with 2 CPU processes (gloo) gives exactly the one-process result."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from distributed_sweep import run_sweep
from tiny import tiny_model

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sweep_equals_single_process_sweep(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # accelerate's --cpu launcher spawns several processes only through MPI; --multi_gpu spawns them with
    # torch.distributed's launcher, and on a machine without GPUs each process then joins over gloo
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(HERE / "distributed_sweep.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["world_size"], r["backend"]) for r in ranks] == [(2, "gloo"), (2, "gloo")]
    assert ranks[0]["units"] == [0, 1] and ranks[1]["units"] == [2]  # datasets' contiguous shards of 3 units
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs
    try:
        single = run_sweep(tiny_model("llama", seed=8))
    finally:
        torch.set_num_threads(threads)
    split = load_file(str(tmp_path / "sweep.safetensors"))
    assert torch.equal(split["top_ids"], single.top_ids)
    assert torch.equal(split["top_probs"], single.top_probs)
    assert torch.equal(split["logits"], single.logits)  # bit for bit, not merely close
    assert ranks[0]["generations"] == ranks[1]["generations"] == single.generations
