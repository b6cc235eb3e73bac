# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests and the demo run on 8 simulated CPU devices unless the caller chose otherwise.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Test files run in PYTEST_WORKERS processes (pytest-xdist; 0 = in this process). Two workers on two cores
# cut the suite by a fifth: much of it waits on subprocesses, imports and single-threaded compiles. Files
# are handed out in collection order (tests/conftest.py puts the longest first), not by test count.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The whole rDPO loop on this machine's CPU (see README): world → rubrics → SFT → on-policy round →
# three DPO arms → held-out evaluation → results.md and report.html in demo_workdir. Finished stages are
# reused on a re-run; DEMO_ARGS=--fresh starts over.
DEMO := demo_workdir
demo: $(STAMP)
	$(PY) -m rdpo_jax.demo --workdir=$(DEMO) $(DEMO_ARGS)

clean:
	rm -rf $(VENV) demo_workdir .pytest_cache
