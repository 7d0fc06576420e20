# The two commands of the README: `make demo` and `make test`. Everything else is optional.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
SERVE_STAMP := $(VENV)/.serve-installed
DEV_STAMP   := $(VENV)/.dev-installed
ARGS   ?=

.PHONY: demo test train-default refinement-report bench serve clean-venv

$(PY):
	python3 -m venv $(VENV)

# Serving install: no torch.
$(SERVE_STAMP): pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

# Training + tests. torch is pinned to the CPU build first so the range in pyproject is already met.
$(DEV_STAMP): pyproject.toml | $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[train,dev]"
	touch $@ $(SERVE_STAMP)

demo: $(SERVE_STAMP)
	$(PY) -m scripts.cli demo $(ARGS)

test: $(DEV_STAMP)
	$(PY) -m pytest -q -ra $(ARGS)

# Reproduces service/default_bundle: encoder (stage 1) then NFormer (stage 2), both resumable; export (each
# graph checked against ONNX Runtime); evaluation of the encoder and of every refinement mode.
train-default: $(DEV_STAMP)
	$(PY) -m scripts.cli train --method nformer --run-dir runs/default
	$(PY) -m scripts.cli export --checkpoint runs/default/last.pt --nformer runs/default/nformer.pt \
		--out service/default_bundle --name reid-default
	$(PY) -m scripts.cli evaluate --bundle service/default_bundle --data cuhk03 prid450s prid2011 \
		--write-card --json runs/default/evaluation.json --plot docs/cmc-default.png
	$(MAKE) refinement-report

# The refinement table of the README: every mode on the split-0 protocols, latency, joint cost at N=20,000.
refinement-report: $(DEV_STAMP)
	$(PY) -m scripts.cli evaluate --bundle service/default_bundle --data cuhk03 prid450s prid2011 \
		--refine none joint local kreciprocal --candidates 50 100 200 500 \
		--latency-sizes 1000 10000 100000 --joint-cost 20000 \
		--markdown docs/refinement-default.md --json runs/default/refinement.json --write-card

bench: $(DEV_STAMP)
	$(PY) -m scripts.cli bench $(ARGS)

serve: $(SERVE_STAMP)
	$(PY) -m scripts.cli serve $(ARGS)

clean-venv:
	rm -rf $(VENV)
