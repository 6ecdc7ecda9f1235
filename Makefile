# cidboot — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
export CIDBOOT_TOOLS ?= $(HOME)/.cache/cidboot/bin
PYTEST_ARGS ?=
UNIT_ARGS ?= -q -n 4  # the unit tier mostly waits on sockets and subprocesses: 4 workers on 2 cores pay

.PHONY: setup demo demo-software check test test-unit test-integration test-e2e bench lint clean

setup: ## install Debian packages, Python deps and the pinned Go tools (Kubo, IPFS Cluster)
	bash .ci/setup.sh

demo: setup ## boot the hello flow on a QEMU device from power-on, appraise it: out/demo/report.json
	$(PYTHON) -m qemu.harness demo --out out/demo

demo-software: setup ## the same pipeline without QEMU (DICE layers derived in one process)
	$(PYTHON) -m examples.demo --out out/demo-software

check: lint test-unit ## the fast loop: ruff + mypy + the unit tier (no root, network, QEMU, Kubo or downloads)

test: setup lint ## the whole test suite, as CI runs it: unit (parallel), then integration and e2e (one at a time: they share a namespace layout)
	$(PYTHON) -m pytest tests/unit -n 4 $(PYTEST_ARGS)
	$(PYTHON) -m pytest tests/integration tests/e2e --durations=25 $(PYTEST_ARGS)

test-unit: ## tests/unit only
	$(PYTHON) -m pytest tests/unit $(UNIT_ARGS) $(PYTEST_ARGS)

test-integration: setup ## tests/integration: network namespaces (root), Kubo, image builds
	$(PYTHON) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: setup ## tests/e2e: QEMU guests from power-on
	$(PYTHON) -m pytest tests/e2e $(PYTEST_ARGS)

bench: setup ## benchmarks: out/bench/*.json, one table of every ratio vs its goal, out/bench/summary.json (BENCH_ARGS=--quick skips the slow ones)
	$(PYTHON) -m bench.run_all --out out/bench $(BENCH_ARGS)

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy cidboot imagebuilder bootstrap agent firmware qemu/harness bench examples tests

clean:
	rm -rf out build *.egg-info
