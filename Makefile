# The README's first two commands: `make demo` and `make test`. Both install what they need through `make setup`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done

.PHONY: setup test test-fast lint demo bench upload clean fresh-root-check kernel-check

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml scripts/setup-dev.sh bootstrap/install-criu.sh $(wildcard bootstrap/patches/*/*.patch)
	bash scripts/setup-dev.sh
	touch $@

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm" tests

lint: setup
	$(VENV)/bin/ruff check ckpt_agent ckpt_dev tests bench
	shellcheck bootstrap/*.sh scripts/*.sh .ci/run

# `make setup` from this checkout in a clean Debian 12 root (as root; no venv or setup needed on this machine).
fresh-root-check:
	bash scripts/fresh-root-check.sh

# The dirty-tracking tests on a kernel with soft-dirty (Debian 12's 6.1, in a virtual machine; run as root)
kernel-check: setup
	bash scripts/kernel-vm-check.sh

demo: setup
	$(PY) -m ckpt_dev.demo

# BIG_JOB_GIB: the big-job bench's job size (issue 14: 12 GiB on a 24 GiB machine); 0 skips it. It skips itself, with
# a line saying so, when the machine lacks the memory.
BIG_JOB_GIB ?= 12

bench: setup
	$(PY) bench/checkpoint_bench.py
	$(PY) bench/checkpoint_bench.py --sizes 1 --kinds random,text --no-profile --stream always --repeat 3
	$(PY) bench/notice_bench.py
	$(PY) bench/verify_bench.py
	$(PY) bench/codec_bench.py
	$(PY) bench/big_job_bench.py --gib $(BIG_JOB_GIB)
	$(PY) bench/memory_bench.py

upload: setup
	@test -n "$(SITE)" || { echo "usage: make upload SITE=cluster-configs/site.yaml" >&2; exit 2; }
	$(VENV)/bin/ckpt upload $(SITE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
