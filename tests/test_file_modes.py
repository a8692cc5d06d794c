"""Saved files keep the mode the user's umask gives (issue 36, finding 6): weights were 0600 beside a 0644 config.

safetensors' ``save_file`` writes a temporary file of its own (0600) and renames it; ``mkstemp`` and ``mkdtemp`` make
0600 and 0700. Every file the library saves, under umask 022, 002 and 077, must have the mode ``open()`` gives a new
file (0666 & ~umask) and every folder it makes the mode ``mkdir`` gives (0777 & ~umask), as ``config.json`` does.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import pyvene as pv
import torch
from safetensors.torch import save_file
from test_interventions import Scaled, random_affine
from tiny import tiny_model

from pyvene_patchscopes import (
    Patchscope,
    Source,
    Target,
    VectorSource,
    compat,
    save_intervenable,
    save_patchscope,
    sweep,
)
from pyvene_patchscopes.core import outputs
from pyvene_patchscopes.core.outputs import umask_modes
from pyvene_patchscopes.evaluate.report import Report
from pyvene_patchscopes.interventions import MappingIntervention
from pyvene_patchscopes.jlens import JacobianLens
from pyvene_patchscopes.jlens.fit import write_checkpoint
from pyvene_patchscopes.models import loading

MASKS = [0o022, 0o002, 0o077]


@pytest.fixture(params=MASKS, ids=lambda mask: f"umask {mask:03o}")
def umask(request):
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def modes(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (itself excluded) with its permission bits, in octal."""
    return {str(path.relative_to(root)): oct(stat.S_IMODE(path.stat().st_mode)) for path in sorted(root.rglob("*"))}


def expected(root: Path, mask: int) -> dict[str, str]:
    return {
        str(path.relative_to(root)): oct((0o777 if path.is_dir() else 0o666) & ~mask)
        for path in sorted(root.rglob("*"))
    }


def test_spec_folders_and_json_files_keep_the_umask_mode(umask, tiny_llama, tmp_path):
    scope = Patchscope(
        Source("The city of Paris is large", "Paris", 1, tiny_llama.name),
        Target("The capital of x is", "x", 2),
        mapping=random_affine(64, 64),
    )
    save_patchscope(scope, tmp_path / "affine", models=tiny_llama)
    vector = Patchscope(VectorSource(torch.randn(64), 1, tiny_llama.name), Target("The capital of x is", "x", 2))
    save_patchscope(vector, tmp_path / "vector")
    scope.replace(mapping="identity").save_json(tmp_path / "spec.json")
    saved = modes(tmp_path)
    assert {"affine/mapping.safetensors", "vector/vector.safetensors", "spec.json"} <= set(saved)
    assert saved == expected(tmp_path, umask)


def test_pyvene_folders_keep_the_umask_mode(umask, tmp_path):
    handle = tiny_model("llama", seed=11)
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=1,
                component="block_output",
                unit="pos",
                max_number_of_units=1,
                intervention=MappingIntervention(mapping=Scaled(64, 64, alpha=0.5), embed_dim=64),
            )
        ]
    )
    with compat.pyvene_guard(handle.model):
        pvm = compat.intervenable(config, handle.model)
        save_intervenable(pvm, tmp_path / "pyvene", include_model=True)
    saved = modes(tmp_path)
    assert {"pyvene/config.json", "pyvene/model.safetensors", "pyvene/pytorch_model.bin"} <= set(saved) and any(
        name.endswith(".safetensors") and "intkey_" in name for name in saved
    )
    assert saved == expected(tmp_path, umask)


def test_sweep_shards_lenses_checkpoints_and_reports_keep_the_umask_mode(umask, tiny_llama, tmp_path):
    sweep(
        ["The city of Paris is large", "Here is a word: dog"],
        tiny_llama,
        source_layers=[1],
        target_layers=[1],
        batch_size=1,
        out=tmp_path / "sweep",
        progress=False,
    )
    lens = JacobianLens({0: torch.eye(8), 2: torch.eye(8)}, n_prompts=1)
    lens.to_file(tmp_path / "lens.pt")
    write_checkpoint(
        tmp_path / "checkpoint.pt",
        {"jacobian_sum": {0: torch.eye(8)}, "n_done": 1, "next_idx": 1},
        {"source_layers": [0], "target_layer": 3, "skip_first": 1},
    )
    Report(task="t", title="t", model="m", command="", settings={}, summary={}).write(tmp_path / "report")
    saved = modes(tmp_path)
    assert {
        "sweep/manifest.json",
        "sweep/unit-000000.parquet",
        "sweep/unit-000001.parquet",
        "lens.pt",
        "checkpoint.pt",
        "report/report.json",
    } <= set(saved), sorted(saved)
    assert saved == expected(tmp_path, umask)


def test_a_folder_written_whole_elsewhere_gets_the_umask_modes(umask, tmp_path):
    """The model cache: ``mkdtemp`` (0700) filled by HF's ``save_pretrained`` (safetensors: 0600), then renamed."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "sub").mkdir(mode=0o700)
    save_file({"w": torch.zeros(2)}, str(folder / "sub" / "model.safetensors"))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    umask_modes(folder)
    assert modes(tmp_path) == expected(tmp_path, umask)


def test_a_file_the_save_replaces_keeps_its_mode(umask, tiny_llama, tmp_path):
    """The README: a file it replaces keeps its mode (a user's chmod is not undone by saving again)."""
    scope = Patchscope(
        Source("The city of Paris is large", "Paris", 1, tiny_llama.name),
        Target("The capital of x is", "x", 2),
        mapping=random_affine(64, 64),
    )
    save_patchscope(scope, tmp_path / "affine", models=tiny_llama)
    os.chmod(tmp_path / "affine" / "mapping.safetensors", 0o640)
    os.chmod(tmp_path / "affine" / "config.json", 0o600)
    save_patchscope(scope.replace(mapping=random_affine(64, 64)), tmp_path / "affine", models=tiny_llama)
    saved = modes(tmp_path)
    assert saved["affine/mapping.safetensors"] == oct(0o640) and saved["affine/config.json"] == oct(0o600)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux states the umask in /proc/self/status")
def test_the_umask_is_read_without_setting_it(umask, tiny_llama, tmp_path, monkeypatch):
    """Setting the umask to read it, even for a moment, gives a file another thread creates then (the explorer's
    worker) the temporary umask's mode: on Linux the library reads it and never sets it (issue 36 review)."""
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    save_patchscope(
        Patchscope(
            Source("The city of Paris is large", "Paris", 1, tiny_llama.name),
            Target("The capital of x is", "x", 2),
            mapping=random_affine(64, 64),
        ),
        tmp_path / "affine",
        models=tiny_llama,
    )
    umask_modes(tmp_path / "affine")
    monkeypatch.undo()
    assert calls == [] and modes(tmp_path) == expected(tmp_path, umask)


def test_without_proc_the_umask_is_set_and_put_back(umask, tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_STATUS", tmp_path / "no-such-status")  # another system: the old way
    assert outputs._umask() == umask
    assert os.umask(umask) == umask  # put back as it was


def test_the_converted_model_cache_gets_the_umask_modes(umask, tmp_path, monkeypatch):
    """`_converted_dir` itself (a GGUF converted once into the cache), with the conversion stubbed: HF's
    ``save_pretrained`` writes safetensors 0600 into ``mkdtemp``'s 0700 folder; the cache must come out as the
    umask gives, as the user's group may share it."""

    class Converted:
        """What HF's from_pretrained(gguf_file=...) gives, as far as `_converted_dir` uses it."""

        def __init__(self, name: str, *args, **kwargs):
            self.name, self.config, self.hf_quantizer = name, SimpleNamespace(), object()

        def save_pretrained(self, folder):
            (Path(folder) / self.name).mkdir(mode=0o700)
            save_file({"w": torch.zeros(2)}, str(Path(folder) / self.name / "model.safetensors"))

    monkeypatch.setattr(loading, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: Converted("tok")))
    monkeypatch.setattr(
        loading, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=lambda *a, **k: Converted("weights"))
    )
    monkeypatch.setenv("PATCHSCOPES_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "gguf" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    folder = loading._converted_dir("tiny", gguf)
    assert folder.parent == tmp_path / "cache" and (folder / "weights" / "model.safetensors").is_file()
    assert modes(tmp_path / "cache") == expected(tmp_path / "cache", umask)
