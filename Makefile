# `make test` and `make demo` each create or update .venv, install what they need, then run.
# GPU users: `make demo TORCH="torch"` (or any pip spec) installs the CUDA build instead of the CPU one.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

COMPAT_VENV ?= .venv-compat
# The lowest versions requirements.txt admits for the packages whose lower bounds matter most, read from it.
COMPAT_PINS := $(shell sed -n -E 's/^(torch|transformers|accelerate|datasets|huggingface-hub|albumentations)>=([^ ,;]+).*/\1==\2/p' requirements.txt)

.PHONY: install test test-compat lint demo clean

$(STAMP): requirements.txt requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# A second venv with the lowest admitted versions, and the whole pipeline run there (tests/compat).
test-compat:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install --quiet $(COMPAT_PINS) -r requirements.txt pytest
	$(COMPAT_VENV)/bin/python -m pip check
	ROADSEG_COMPAT=1 OMP_NUM_THREADS=1 $(COMPAT_VENV)/bin/python -m pytest -q tests/compat

# The whole pipeline on synthetic scenes, as a user starts from a Cityscapes checkpoint: generate, select, fine-tune
# the packaged pretrained tiny-cityscapes (encoder and pixel decoder frozen, class head mapped from its Cityscapes
# classes), evaluate on the held-out test split. Crops and scale jitter suit the small 360x640 frames; the tiny
# decoder takes a higher learning rate than a Swin checkpoint (README: recommended settings).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) -m roadseg_utils.synthetic --output_dir $(DEMO_DIR)/data --num_images 300 --num_sequences 12 --seed 0
	$(PY) run_selection.py --data_dir $(DEMO_DIR)/data --num_images 200 --output_dir $(DEMO_DIR)/selection
	$(PY) run_finetune.py --model_name_or_path tiny-cityscapes \
		--data_dir $(DEMO_DIR)/data \
		--selection_manifest $(DEMO_DIR)/selection/manifest.json --output_dir $(DEMO_DIR)/finetune \
		--max_steps 300 --per_device_train_batch_size 8 --crop_size 192x320 --min_scale 0.75 --max_scale 1.25 \
		--eval_shortest_edge 192 --learning_rate 3e-3 --eval_strategy no --save_strategy steps --save_steps 100 \
		--save_total_limit 1 --do_predict False --disable_tqdm True
	$(PY) run_eval.py --model_name_or_path $(DEMO_DIR)/finetune --data_dir $(DEMO_DIR)/data \
		--output_dir $(DEMO_DIR)/eval --num_overlays 4
	@echo "selection report and plots: $(DEMO_DIR)/selection/report.md, $(DEMO_DIR)/selection/*.png"

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs
