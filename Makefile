# apptrace: every target installs what it needs; `make setup` is idempotent.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# Our build outputs. Not `build/`: through the editable install the checkout
# is on sys.path, where a build/ directory would shadow PyPI's `build` tool.
BUILD := .build
STAMPS := $(BUILD)/stamps
# The editable install also compiles libblazesym_c.so into apptrace/ (setup.py).
PIP_EDITABLE = $(PY) -m pip install -q --disable-pip-version-check -e '.[test]' \
	--config-settings editable_mode=compat  # a .pth path: no import hook at start-up

.PHONY: setup system venv fixtures blazesym prepare wheel test test-unit demo bench lint clean blazepack mutate

setup: system venv fixtures blazesym blazepack prepare

# The generic BPF programs compiled into the compile cache (~10 s once; then a
# no-op): a first trace of any probe strings then starts without clang.
prepare: venv
	@$(VENV)/bin/apptrace prepare -q

system:
	@bash scripts/setup-system.sh

# Debian's bcc needs no link into the venv: apptrace finds it by itself
# (apptrace/bpf.py import_bcc). A link an older Makefile made is removed.
$(STAMPS)/venv: pyproject.toml setup.py mk/blazesym.mk Makefile | $(STAMPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  if [ -L "$$site/bcc" ]; then rm -f "$$site/bcc"; fi
	$(PIP_EDITABLE)
	@touch $@

venv: system $(STAMPS)/venv

$(STAMPS):
	@mkdir -p $@

fixtures:
	@$(MAKE) -s -C fixtures/c
	@$(MAKE) -s -C fixtures/java

include mk/blazesym.mk

# The compiled reader of blazesym results (cffi API mode) and the C frame
# builder (apptrace/_frames.c), both made by apptrace/_blazepack_build.py.
# Without them apptrace.symbolize reads results in cffi's ABI mode and builds
# frames in Python: the same frames, several times slower.
BLAZEPACK := apptrace/_blazepack$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
blazepack: $(BLAZEPACK)
$(BLAZEPACK): apptrace/_blazepack_build.py apptrace/_frames.c apptrace/symbolize.py | $(STAMPS)/venv
	@$(PY) apptrace/_blazepack_build.py

# Mutation testing (not in CI): mutmut over the engine modules with the fast
# tests ([tool.mutmut] in pyproject.toml), in a copy of the tree so the
# working tree is never touched. `make mutate MUTANTS='apptrace.ringbuf.*'`
# runs one module's mutants.
MUTATE_DIR := $(BUILD)/mutate
MUTANTS ?=
mutate: setup
	$(PY) -m pip install -q --disable-pip-version-check 'mutmut==3.8.1'
	@rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)
	@cp -a apptrace tests fixtures pyproject.toml $(MUTATE_DIR)/
	@mkdir -p $(MUTATE_DIR)/mutants && ln -s $(abspath $(VENV)) $(MUTATE_DIR)/mutants/.venv
	lib=$$($(PY) -c 'from apptrace.symbolize import library_path; print(library_path())') && \
	    cd $(MUTATE_DIR) && APPTRACE_BLAZESYM=$$lib $(abspath $(PY)) -m mutmut run \
	    --max-children 2 $(MUTANTS); $(abspath $(PY)) -m mutmut results

# A wheel that carries libblazesym_c.so, in dist/ (cargo's build is shared
# with the editable install, so this is quick once `make setup` ran).
wheel: venv
	@rm -f dist/apptrace-*.whl
	$(PY) -m build --wheel --outdir dist .

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
	rm -rf $(BUILD) $(VENV) dist apptrace/libblazesym_c.so apptrace/LICENSE.blazesym apptrace/_blazepack*.so apptrace/_frames*.so
	@$(MAKE) -s -C fixtures/c clean
	@$(MAKE) -s -C fixtures/java clean
