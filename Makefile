# cidboot — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
export CIDBOOT_TOOLS ?= $(HOME)/.cache/cidboot/bin
PYTEST_ARGS ?=

.PHONY: setup demo demo-software test bench lint clean

setup: ## install Debian packages, Python deps and the pinned Go tools (Kubo, gateway-conformance)
	bash .ci/setup.sh

demo: setup ## boot the hello flow on a QEMU device from power-on, appraise it: out/demo/report.json
	$(PYTHON) -m qemu.harness demo --out out/demo

demo-software: setup ## the same pipeline without QEMU (DICE layers derived in one process)
	$(PYTHON) -m examples.demo --out out/demo-software

test: setup lint ## the whole test suite, as CI runs it
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: setup ## benchmarks; figures land in out/bench/*.json
	$(PYTHON) -m bench.run_all --out out/bench

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy cidboot imagebuilder bootstrap agent firmware qemu/harness bench examples

clean:
	rm -rf out build *.egg-info
