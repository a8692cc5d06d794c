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
from distributed_sweep import run_sweep
from safetensors.torch import load_file
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
    command = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(HERE / "distributed_sweep.py"),
        str(tmp_path),
    ]
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


def _launch(processes: int, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The README's `accelerate launch ... -m pyvene_patchscopes.cli` on `processes` CPU processes (gloo)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "pyvene_patchscopes.cli",
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_eight_processes_on_two_prompts_equal_one_process_in_memory_and_written_to_a_folder(tmp_path):
    """More processes than units: 6 of 8 have nothing to do, in memory (gathered) and with --out (each process
    writes its own units' shards, nothing gathered); both equal one process."""
    handle = tiny_model("llama", seed=4)
    handle.model.save_pretrained(tmp_path / "tiny")
    handle.tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "prompts.txt").write_text("The city of Paris is large\nHere is a word: dog\n")
    argv = [
        "sweep",
        "--device",
        "auto",
        "--prompts",
        "prompts.txt",
        "--target-layers",
        "same",
        "--json",
        "--model",
        "./tiny",
        "--batch-size",
        "1",
    ]
    single = subprocess.run(
        [sys.executable, "-m", "pyvene_patchscopes.cli", *argv],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads(single.stdout)["cells"]
    assert len(alone) == 2 * handle.n_layers
    split = _launch(8, argv, tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    assert json.loads(split.stdout)["cells"] == alone  # only the main process prints
    written = _launch(8, [*argv, "--out", "folder"], tmp_path)
    assert written.returncode == 0, written.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "folder").glob("unit-*.parquet")) == [
        "unit-000000.parquet",
        "unit-000001.parquet",
    ]
    from pyvene_patchscopes import load_sweep

    assert load_sweep(tmp_path / "folder").to_records() == alone
