# The one test command (README.md, .ci/run): lint, unit and end-to-end tests, the official SDKs
# against the real binary, the README quick start itself, and the supply-chain check.

CARGO ?= cargo
VENV  ?= .venv
PY    := $(VENV)/bin/python

.PHONY: test lint build rust-tests rules-test sdk-tests quickstart deny venv bench install uninstall clean

test: lint rust-tests rules-test sdk-tests quickstart deny

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

build:
	$(CARGO) build --workspace --locked

rust-tests: build
	$(CARGO) test --workspace --locked

# The example rule scripts against their own cases.
rules-test: build
	$(CARGO) run --locked -q -- rules test rules/

$(PY): tests/python/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
	touch $(PY)

venv: $(PY)

sdk-tests: build $(PY)
	$(PY) -m pytest -q tests/python

quickstart: build
	tests/quickstart.sh

deny:
	.ci/deny.sh

install:
	systemd/install.sh

uninstall:
	systemd/install.sh --uninstall

# orproxy against a direct call to the fake upstream (BENCHMARKS.md); the bench finds the
# daemon and the fake next to itself. Extra flags: make bench BENCH_ARGS="--duration 5".
bench:
	$(CARGO) build --release --locked -p orproxy -p orproxy-testkit
	$(or $(CARGO_TARGET_DIR),target)/release/orproxy-bench $(BENCH_ARGS)
	$(CARGO) bench --locked -p orproxy-rules
	$(CARGO) bench --locked -p orproxy-ledger --bench writer

clean:
	$(CARGO) clean
	rm -rf $(VENV)
