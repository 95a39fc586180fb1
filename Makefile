# The README's two commands. Each builds its own virtual environment from a fresh
# clone (nothing preinstalled) and is a no-op to reinstall when pyproject.toml is unchanged.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip -q --disable-pip-version-check
PY      = $(VENV)/bin/python

.PHONY: demo test clean

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
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
