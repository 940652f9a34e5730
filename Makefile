# The two commands: `make run` and `make test`. Everything else they need is set up here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench images clean chromium

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/jobsite serve

test: $(STAMP) chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

images: $(STAMP)
	$(BIN)/python -m tests.images

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
