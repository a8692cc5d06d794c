"""Shared fixtures: tiny random models for unit tests, the real SmolLM2 once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from browser import chromium, driver  # noqa: E402,F401  (headless Chromium for tests/test_browser.py)
from tiny import tiny_model  # noqa: E402


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_folder(tmp_path):
    """The tiny Llama saved as a local HF folder (a base model for the adapter tests)."""
    base = tiny_model("llama", seed=5)
    base.model.save_pretrained(tmp_path / "tiny")
    base.tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture(scope="session")
def smollm2():
    from pyvene_patchscopes import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    from pyvene_patchscopes import load_model

    return load_model("gemma3-270m")
