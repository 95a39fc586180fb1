# The README's two commands, and `make fuzz` (its Tests section). Each builds its own
# virtual environment from a fresh clone (nothing preinstalled) and is a no-op to reinstall
# when pyproject.toml is unchanged.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip -q --disable-pip-version-check
PY      = $(VENV)/bin/python
# pytest-xdist workers of `make test`; whole test files go to one worker (--dist
# loadfile), so a module's shared compiles stay shared. 2: CI's 2-core machine.
TEST_WORKERS ?= 2

.PHONY: demo test fuzz clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[cli,video,eval]"
	touch $@

$(VENV)/.test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[all,test,parity]"
	touch $@

demo: $(VENV)/.demo
	$(PY) -m adaspa_jax.experiments.generate --output_dir=outputs/demo

test: $(VENV)/.test
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The kernels' property-based sweep with 200 cases per implementation and op (make test: 4).
fuzz: $(VENV)/.test
	ADASPA_FUZZ_EXAMPLES=200 $(PY) -m pytest -q tests/pallas_kernels/test_fuzz.py

clean:
	rm -rf $(VENV) .pytest_cache
