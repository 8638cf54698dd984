# vfio-multifd: the two commands a fresh machine needs are `make run` and `make test`.
# Everything they need (crates, Debian packages for the VM test) is fetched on first use.

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all run test test-unit lint fmt clippy doc bench bench-quick check-tools clean help fuzz

all: test

help:
	@echo "make run        loopback migration of simulated devices (2 x 1 GiB, 4 channels), verified byte for byte"
	@echo "make test       lint + every test (unit, integration, CLI, VM with a real mtty VFIO device)"
	@echo "make test-unit  lint + every cargo test, without the VM"
	@echo "make lint       rustfmt check + clippy -D warnings (undocumented unsafe is an error)"
	@echo "make bench      the benchmark suite (writes bench-results/)"
	@echo "make bench-quick  the same in under a minute"
	@echo "make vm-test    real VFIO migration (mtty) inside a QEMU TCG guest"
	@echo "make doc        rustdoc with warnings as errors"
	@echo "make fuzz       the cargo-fuzz targets (wire decoder, reassembly), FUZZ_SECONDS each (default 60)"

check-tools:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup)"; exit 1; }

run: check-tools
	$(CARGO) run --release -p vfio-multifd-cli --bin vfio-multifd -- loopback

fmt:
	$(CARGO) fmt --all

lint: check-tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings -D clippy::undocumented_unsafe_blocks

clippy: lint

doc: check-tools
	@# rustdoc's own warnings fail through -D warnings; cargo's (e.g. an output filename
	@# collision) only print, so they are caught from the log.
	@mkdir -p target
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps >target/doc.log 2>&1 || { cat target/doc.log; exit 1; }
	@cat target/doc.log; ! grep -n '^warning' target/doc.log

test-unit: lint
	$(CARGO) test --workspace

test: test-unit doc vm-test

# The same cases on both engine backends against real-fd quirks (EAGAIN, EINTR, short I/O).
.PHONY: conformance
conformance: check-tools
	$(CARGO) test -p vfio-multifd-tests --test conformance

# Fuzzing: each cargo-fuzz target in fuzz/ for FUZZ_SECONDS (nightly toolchain; cargo-fuzz is
# installed from crates.io when missing). Corpora and crashes stay in fuzz/corpus, fuzz/artifacts.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := wire_decoder reassembly
fuzz: check-tools
	@rustup toolchain list 2>/dev/null | grep -q '^nightly' || { echo "make fuzz needs the nightly toolchain: rustup toolchain install nightly"; exit 1; }
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@for t in $(FUZZ_TARGETS); do \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	  mkdir -p fuzz/corpus/$$t; \
	  $(CARGO) +nightly fuzz run $$t fuzz/corpus/$$t fuzz/seeds/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 || exit 1; \
	done

bench: check-tools
	$(CARGO) run --release -p vfio-multifd-cli --bin vfio-multifd -- bench

bench-quick: check-tools
	$(CARGO) run --release -p vfio-multifd-cli --bin vfio-multifd -- bench --quick

clean:
	$(CARGO) clean

include vm/vm.mk
