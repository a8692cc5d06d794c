"""The API reference (`make docs`) is generated from the docstrings by pdoc, for every module."""
from __future__ import annotations

import pkgutil

import pdoc
import pdoc.render

import pyvene_patchscopes


def test_pdoc_writes_a_page_for_every_module_with_its_docstrings(tmp_path):
    pdoc.render.configure(docformat="markdown")
    modules = [m.name for m in pkgutil.walk_packages(pyvene_patchscopes.__path__, "pyvene_patchscopes.")]
    pdoc.pdoc("pyvene_patchscopes", *modules, output_directory=tmp_path)  # as `make docs` lists them
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    assert {"pyvene_patchscopes/execution/engine.html", "pyvene_patchscopes/jacobian/engine.html"} <= pages
    assert all(f"{name.replace('.', '/')}.html" in pages for name in modules), sorted(pages)
    spec = (tmp_path / "pyvene_patchscopes" / "spec" / "patchscope.html").read_text()
    assert "validated on construction" in spec and "A copy with some fields changed" in spec  # Patchscope.replace
