# blazesym-c: the Rust symbolizer apptrace loads through cffi (apptrace/symbolize.py).
#
# No distro ships a usable build, so setup.py has setuptools-rust compile the
# published crate pinned here with the machine's cargo (rustup, MSRV 1.88).
# cargo downloads the crate, which carries its own Cargo.lock (built with
# `--locked`, so the build is reproducible) and include/blazesym.h.
#
# Outputs:  apptrace/libblazesym_c.so   in the package, as in every wheel
#           $(BLAZESYM_DIR)/include/blazesym.h   for the cffi layout test
#           $(BLAZESYM_DIR)/target/   cargo's incremental build
#
# The editable install in the venv rule builds them; changing BLAZESYM_VERSION
# re-runs that rule (its stamp depends on this file), which rebuilds.

BLAZESYM_VERSION := 0.1.10
BLAZESYM_DIR := $(BUILD)/blazesym
BLAZESYM_LIB := apptrace/libblazesym_c.so
BLAZESYM_HDR := $(BLAZESYM_DIR)/include/blazesym.h

.PHONY: blazesym
blazesym: venv
	@if [ ! -f $(BLAZESYM_LIB) ] || [ ! -f $(BLAZESYM_HDR) ]; then $(PIP_EDITABLE); fi
