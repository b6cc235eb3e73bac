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

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Until the rDPO demo lands (issue #8): the smoke setup through the real commands — SFT, then DPO
# initialized from the SFT run — and the Hugging Face round trip checked against transformers.
DEMO := demo_workdir
demo: $(STAMP)
	$(PY) -m data_prep.smoke --out=$(DEMO)/smoke
	$(PY) -m rdpo_jax.train --config=configs/smoke.py:dir=$(DEMO)/smoke,objective=sft --workdir=$(DEMO)/sft \
		--config.total_steps=20 --config.optim.learning_rate=3e-3
	$(PY) -m rdpo_jax.train --config=configs/smoke.py:dir=$(DEMO)/smoke --workdir=$(DEMO)/dpo \
		--config.init_from=$(DEMO)/sft --config.total_steps=20
	$(PY) -m rdpo_jax.demo --workdir=$(DEMO)/hf_round_trip

clean:
	rm -rf $(VENV) demo_workdir .pytest_cache
