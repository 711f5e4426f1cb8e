# apptrace: every target installs what it needs; `make setup` is idempotent.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
STAMPS := $(BUILD)/stamps

.PHONY: setup system venv fixtures blazesym test test-unit demo bench lint clean

setup: system venv fixtures blazesym

system:
	@bash scripts/setup-system.sh

# The venv sees Debian's bcc through a symlink to that one package, not the
# whole dist-packages directory.
$(STAMPS)/venv: pyproject.toml Makefile | $(STAMPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  if [ -d /usr/lib/python3/dist-packages/bcc ]; then ln -sfn /usr/lib/python3/dist-packages/bcc $$site/bcc; fi
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' \
	    --config-settings editable_mode=compat  # a .pth path: no import hook at start-up
	@touch $@

venv: system $(STAMPS)/venv

$(STAMPS):
	@mkdir -p $@

fixtures:
	@$(MAKE) -s -C fixtures/c

include mk/blazesym.mk

test: setup
	$(PY) -m pytest -q -ra tests

test-unit: venv
	$(PY) -m pytest -q -ra tests/unit

demo: setup
	@bash scripts/demo.sh

bench: setup
	$(PY) bench/run.py

lint: venv
	$(VENV)/bin/ruff check apptrace tests bench
	$(VENV)/bin/mypy apptrace

clean:
	rm -rf $(BUILD) $(VENV)
	@$(MAKE) -s -C fixtures/c clean
