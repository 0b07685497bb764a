# Two commands from a fresh clone (README, "Quick start"):
#   make demo   set up .venv if needed, train configs/tiny.py:all, sample, evaluate
#   make test   the same set-up, then the README's test command
# The set-up: a virtual environment made with $(PYTHON) (python3), then the pinned
# versions of constraints.txt. Another environment: make test VENV=/tmp/venv.

PYTHON ?= python3
VENV ?= .venv

# The recipes run `python` and `pip` of the virtual environment, as after
# `source $(VENV)/bin/activate`, so they read as the README's commands.
SHELL := /bin/bash
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)

.PHONY: demo test install

demo: $(VENV)/.installed
	python train.py --config configs/tiny.py:all
	python sample.py
	python -m tokcom_jax.evaluate --workdir runs/tiny/diffusion
	@echo
	@echo 'Results: runs/tiny/vae (stage 1) and runs/tiny/diffusion (stage 2, its flow-matching teacher in teacher/):'
	@echo '         metrics.jsonl, samples.jsonl, checkpoints/;'
	@echo '         runs/tiny/diffusion/eval.json and runs/tiny/diffusion/plots/*.png (the evaluation printed above).'

test: $(VENV)/.installed
	python -m pytest -q tests

install: $(VENV)/.installed

# Re-installed when the requirements change. `import tokcom_jax` (before anything is
# installed) stops with one line on a Python that is too old.
$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -c 'import tokcom_jax'
	test -x $(VENV)/bin/pip || $(PYTHON) -m venv $(VENV)
	pip install -r requirements.txt -c constraints.txt && pip install -c constraints.txt -e '.[serve]'
	touch $@
