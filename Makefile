# The two commands: `make run` and `make test`. Everything else they need is set up here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `make run` needs the runtime dependencies only; `make test` adds the test extras
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test
BENCHING := $(VENV)/.installed-bench

.PHONY: run test lint format bench images clean chromium

$(RUNTIME): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

$(TESTING): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(TESTING)

$(BENCHING): $(TESTING)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCHING)

run: $(RUNTIME)
	$(BIN)/jobsite serve

# pytest (not `python -m pytest`): the checkout itself is not on sys.path, so every test
# imports the installed package as `jobsite.<name>`. pytest's settings in pyproject.toml
# measure the package's branch coverage and print it; CI adds a floor through PYTEST_ARGS.
test: $(TESTING) chromium lint
	$(BIN)/pytest $(PYTEST_ARGS)

# The browser tests drive Debian's chromium (never a browser downloaded by Playwright).
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "Installing Debian's chromium for the browser tests"; \
	        apt-get install -y -q chromium >/dev/null 2>&1 \
	            || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
	            || echo "make: could not install chromium with apt-get; the browser tests will not run"; \
	    else \
	        echo "make: $(CHROMIUM) is missing, so the browser tests will be skipped"; \
	        echo "      (or fail with JOBSITE_REQUIRE_DOCKER=1). Install it: sudo apt-get install -y chromium"; \
	    fi; \
	fi

lint: $(TESTING)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TESTING)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

images: $(TESTING)
	$(BIN)/python tests/images.py

# one table of medians against baselines measured in the same run, kept in bench/RESULTS.md
bench: $(BENCHING)
	$(BIN)/python bench/table.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .coverage
