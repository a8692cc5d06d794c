"""Hostile and malformed saved specs: loading only ever raises the library's documented errors (SpecError and
its subclasses), runs no code, reads nothing outside the folder; valid specs round-trip exactly."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from safetensors.torch import save_file
from tiny import tiny_model

from pyvene_patchscopes import Affine, Patchscope, Source, SpecError, Target, load_patchscope, run, save_patchscope
from pyvene_patchscopes.resolve import resolve

HANDLE = tiny_model("llama", seed=21)
MODELS = {HANDLE.name: HANDLE}
BASE = Patchscope(
    Source("The city of Paris is large", "Paris", 1, HANDLE.name),
    Target("The capital of x is", "x", 2),
    mapping=Affine.from_weights(torch.eye(64) * 0.5, torch.zeros(64)),
    max_new_tokens=2,
)
SENTINEL = Path(tempfile.gettempdir()) / "pyvene-patchscopes-fuzz-sentinel"

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            "../../etc/passwd",
            "..",
            "/tmp/x.safetensors",
            "identity",
            "affine",
            "x",
            "Paris",
            "__import__('os')",
            "mapping.safetensors",
            "nope",
        ]
    ),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
PATHS = [
    ("version",),
    ("format",),
    ("source",),
    ("target",),
    ("mapping",),
    ("max_new_tokens",),
    ("reroute",),
    ("models",),
    ("description",),
    ("source", "prompt"),
    ("source", "position"),
    ("source", "layer"),
    ("source", "model"),
    ("target", "prompt"),
    ("target", "position"),
    ("target", "layer"),
    ("target", "model"),
    ("mapping", "name"),
    ("mapping", "args"),
    ("mapping", "weights"),
    ("models", HANDLE.name),
    ("models", HANDLE.name, "hidden_size"),
    ("extra",),
    ("source", "extra"),
]


def _saved_config() -> dict:
    folder = Path(tempfile.mkdtemp())
    save_patchscope(BASE, folder, models=HANDLE)
    config = json.loads((folder / "config.json").read_text())
    shutil.rmtree(folder)
    return config


CONFIG = _saved_config()


def _set(data: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    data[path[-1]] = value


def _delete(data: dict, path: tuple) -> None:
    for key in path[:-1]:
        data = data.get(key) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            return
    data.pop(path[-1], None)


weights_files = st.one_of(
    st.just("valid"),
    st.just("missing"),
    st.binary(max_size=64).map(lambda b: ("raw", b)),
    st.integers(min_value=1, max_value=200).map(lambda n: ("truncated", n)),
    st.tuples(st.integers(1, 80), st.integers(1, 80)).map(lambda s: ("shape", s)),
    st.just("extra-key"),
    st.just("int-dtype"),
    st.just("pickle"),
)


class _Payload:
    """Unpickling this would create the sentinel file: proof that code ran."""

    def __reduce__(self):
        return (Path.touch, (SENTINEL,))


edits = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(PATHS), json_value),
        st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
    ),
    max_size=4,
)


def _write_weights(folder: Path, kind) -> None:
    path = folder / "mapping.safetensors"
    if kind == "missing":
        path.unlink()
    elif kind == "extra-key":
        save_file({"weight": torch.eye(64), "bias": torch.zeros(64), "evil": torch.zeros(1)}, str(path))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": _Payload()}))
    elif kind == "int-dtype":
        save_file(
            {"weight": torch.ones(64, 64, dtype=torch.int64), "bias": torch.zeros(64, dtype=torch.int64)}, str(path)
        )
    elif isinstance(kind, tuple) and kind[0] == "raw":
        path.write_bytes(kind[1])
    elif isinstance(kind, tuple) and kind[0] == "truncated":
        path.write_bytes(path.read_bytes()[: kind[1]])
    elif isinstance(kind, tuple) and kind[0] == "shape":
        save_file({"weight": torch.zeros(*kind[1]), "bias": torch.zeros(kind[1][0])}, str(path))


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=edits, weights=weights_files, raw_text=st.one_of(st.none(), st.none(), st.none(), st.text(max_size=40)))
def test_fuzzed_spec_folders_raise_only_documented_errors(edits, weights, raw_text):
    folder = Path(tempfile.mkdtemp())
    try:
        save_patchscope(BASE, folder, models=HANDLE)
        config = copy.deepcopy(CONFIG)
        for op, path, value in edits:
            _set(config, path, value) if op == "set" else _delete(config, path)
        text = raw_text if raw_text is not None else json.dumps(config)
        (folder / "config.json").write_text(text)
        _write_weights(folder, weights)
        try:
            scope = load_patchscope(folder, models=HANDLE)
            resolve(scope, MODELS)
            event("loaded")
        except SpecError as err:
            assert str(err)  # a message, naming what was wrong
            event(f"{type(err).__name__}: {' '.join(str(err).split()[:2])}")
        assert not SENTINEL.exists()  # nothing ran
    finally:
        shutil.rmtree(folder)


prompts = st.sampled_from(["The city of Paris is large", "A cat sat on the mat", "hello world the cat"])


@st.composite
def valid_specs(draw):
    source = Source(
        draw(prompts), draw(st.sampled_from([-1, -2, 2, "the", "cat"])), draw(st.integers(-4, 3)), HANDLE.name
    )
    target = Target(draw(prompts), draw(st.sampled_from([-1, 3, "the"])), draw(st.integers(-4, 3)))
    mapping = draw(st.sampled_from(["identity", "affine"]))
    if mapping == "affine":
        seed = draw(st.integers(0, 1000))
        generator = torch.Generator().manual_seed(seed)
        mapping = Affine.from_weights(
            torch.randn(64, 64, generator=generator) / 8, torch.randn(64, generator=generator)
        )
    return Patchscope(source, target, mapping=mapping, max_new_tokens=draw(st.integers(0, 2)))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(scope=valid_specs())
def test_random_valid_specs_round_trip_with_identical_outputs(scope):
    try:
        resolve(scope, MODELS)
    except SpecError:
        event("position not in prompt")
        return  # a substring position not in the prompt: not a valid spec for this model
    folder = Path(tempfile.mkdtemp())
    try:
        save_patchscope(scope, folder, models=HANDLE)
        loaded = load_patchscope(folder, models=HANDLE)
        assert loaded == scope
        before, after = run(scope, HANDLE)[0], run(loaded, HANDLE)[0]
        assert torch.equal(before.logits, after.logits) and before.generation == after.generation
    finally:
        shutil.rmtree(folder)
