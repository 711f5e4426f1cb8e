# blazesym-c: the Rust symbolizer apptrace loads through cffi (apptrace/symbolize.py).
#
# No distro ships a usable build, so we compile the published crate with the
# machine's cargo (rustup, MSRV 1.88). The crate tarball carries its own
# Cargo.lock and include/blazesym.h, which makes `--locked` reproducible.
#
# Outputs:  $(BLAZESYM_DIR)/libblazesym_c.so
#           $(BLAZESYM_DIR)/include/blazesym.h
#
# The library file is the stamp: a second `make blazesym` is a no-op. Changing
# BLAZESYM_VERSION switches to a new version marker, which triggers a rebuild.

BLAZESYM_VERSION := 0.1.10
BLAZESYM_DIR := $(BUILD)/blazesym
BLAZESYM_LIB := $(BLAZESYM_DIR)/libblazesym_c.so
BLAZESYM_HDR := $(BLAZESYM_DIR)/include/blazesym.h
BLAZESYM_MARK := $(BLAZESYM_DIR)/.version-$(BLAZESYM_VERSION)
# Scratch space: a throwaway project used only to make cargo download the
# crate, and the copy of the crate we build (its target/ is kept so a rebuild
# after a version bump or `rm libblazesym_c.so` is incremental).
BLAZESYM_FETCH := $(BLAZESYM_DIR)/fetch
BLAZESYM_SRC := $(BLAZESYM_DIR)/blazesym-c-$(BLAZESYM_VERSION)

.PHONY: blazesym
blazesym: $(BLAZESYM_LIB) $(BLAZESYM_HDR)

# One marker per version; stale markers are removed so a downgrade also rebuilds.
$(BLAZESYM_MARK):
	@mkdir -p $(@D)
	@rm -f $(BLAZESYM_DIR)/.version-*
	@touch $@

$(BLAZESYM_LIB): $(BLAZESYM_MARK)
	@set -euo pipefail; \
	cargo=$$(command -v cargo 2>/dev/null || true); \
	if [ -z "$$cargo" ] && [ -x "$$HOME/.cargo/bin/cargo" ]; then cargo="$$HOME/.cargo/bin/cargo"; fi; \
	if [ -z "$$cargo" ]; then \
	  echo "blazesym: cargo not found on PATH or in \$$HOME/.cargo/bin; install Rust >= 1.88 (rustup)" >&2; \
	  exit 1; \
	fi; \
	export PATH="$$(dirname "$$cargo"):$$PATH"; \
	echo "blazesym: building blazesym-c $(BLAZESYM_VERSION) with $$("$$cargo" --version)"; \
	mkdir -p $(BLAZESYM_FETCH)/src; \
	printf '%s\n' '[package]' 'name = "apptrace-blazesym-fetch"' 'version = "0.0.0"' \
	  'edition = "2021"' 'publish = false' '' '[lib]' 'path = "src/lib.rs"' '' \
	  '[dependencies]' 'blazesym-c = "=$(BLAZESYM_VERSION)"' > $(BLAZESYM_FETCH)/Cargo.toml; \
	: > $(BLAZESYM_FETCH)/src/lib.rs; \
	"$$cargo" fetch -q --manifest-path $(BLAZESYM_FETCH)/Cargo.toml; \
	registry="$${CARGO_HOME:-$$HOME/.cargo}/registry/src"; \
	crate=$$(ls -d "$$registry"/*/blazesym-c-$(BLAZESYM_VERSION) 2>/dev/null | head -n 1); \
	if [ -z "$$crate" ]; then \
	  echo "blazesym: blazesym-c-$(BLAZESYM_VERSION) not found under $$registry after cargo fetch" >&2; \
	  exit 1; \
	fi; \
	if [ ! -f $(BLAZESYM_SRC)/Cargo.toml ]; then \
	  rm -rf $(BLAZESYM_SRC); cp -r "$$crate" $(BLAZESYM_SRC); \
	fi; \
	"$$cargo" build -q --release --locked --manifest-path $(BLAZESYM_SRC)/Cargo.toml; \
	install -m 0755 $(BLAZESYM_SRC)/target/release/libblazesym_c.so $@.tmp; \
	mv -f $@.tmp $@; \
	install -D -m 0644 $(BLAZESYM_SRC)/include/blazesym.h $(BLAZESYM_HDR); \
	echo "blazesym: $@ ready"

# Built by the rule above; this only catches a header deleted on its own.
$(BLAZESYM_HDR): $(BLAZESYM_LIB)
	@test -f $@ || install -D -m 0644 $(BLAZESYM_SRC)/include/blazesym.h $@
