# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# A CPU build by default (on disk on the project's machines); GPU users: make TORCH_SPEC="torch==2.13.0" TORCH_INDEX=...
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DIST ?= dist

.PHONY: install demo test dist examples bench bench-dataplane gpu-check bench-scale soak cluster-demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip >/dev/null 2>&1 || true
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install actorgrad with its test extras

demo: $(STAMP)  ## run the quickstart on an embedded local Ray
	$(PY) examples/quickstart.py

test: $(STAMP)  ## run the whole test suite
	$(PY) -m pytest -q --durations=25 tests

# --no-isolation: built with .venv's setuptools (the test extra), no download. Without
# PYTHONDONTWRITEBYTECODE, which makes setuptools warn that it does not byte-compile.
dist: $(STAMP)  ## build the sdist and the wheel into dist/ and check them (twine check --strict)
	rm -rf $(DIST)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m build -q --no-isolation --outdir $(DIST) .
	$(PY) -m twine check --strict $(DIST)/*

bench: $(STAMP)  ## actorgrad vs plain PyTorch and torch.distributed.rpc; writes bench/results.md (and bench/dataplane.md)
	$(PY) -m bench.bench
	$(MAKE) bench-dataplane

bench-dataplane: $(STAMP)  ## the gloo data plane vs the channel: large chain and a payload sweep; writes bench/dataplane.md
	$(PY) -m bench.dataplane --out bench/dataplane.md

gpu-check: $(STAMP)  ## GPU workers (4 x d=4096) exact vs one-GPU PyTorch; NCCL vs host copy vs plain; skips without CUDA
	$(PY) -m bench.gpu_check

bench-scale: $(STAMP)  ## N = 8, 32, 64 workers (chain, fan-out; one process each and 8 per process): start-up, step, CPU and memory per worker; writes bench/scale.md
	$(PY) -m bench.scale --n 8 32 64 --shape chain fan --workers-per-process 1 8 --out bench/scale.md
	$(PY) -m bench.scale --breakdown --out bench/scale_breakdown.md

soak: $(STAMP)  ## 20000 small steps on Ray; every worker's memory must stay flat; writes bench/soak.md
	$(PY) -m bench.soak --steps 20000 --backend ray --out bench/soak.md

cluster-demo: dist  ## a real 2-node Ray cluster on this machine; a job that ships dist/'s wheel; checks placement
	PY=$(PY) SHIP=wheel WHEEL="$$(ls $(DIST)/actorgrad-*.whl)" bash cluster/demo.sh

examples: $(STAMP)  ## run every example; the real-data ones write examples/results/ (table and plots)
	$(PY) examples/quickstart.py
	$(PY) examples/rnn_bptt.py
	$(PY) examples/digits.py
	$(PY) examples/mnist1d_compare.py

clean:
	rm -rf $(VENV) build $(DIST) *.egg-info .pytest_cache
