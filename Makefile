# Two commands do all the set-up on a fresh clone:
#   make serve   run the lock server on the embedded file store
#   make test    run the whole test suite, with lint and type checks
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck unit serve bench safety clean

$(STAMP): pyproject.toml constraints.txt
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[server,redis]" pytest pytest-asyncio pytest-timeout pytest-xdist hypothesis ruff mypy
	touch $(STAMP)

test: $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Two workers, a test file each at a time: most of the suite waits on leases and timeouts,
# so two files run side by side in about half the time on two cores.
unit: $(STAMP)
	$(VENV)/bin/pytest -n 2 --dist loadfile

serve: $(STAMP)
	$(VENV)/bin/lockd serve $(SERVE_ARGS)

# Longer campaigns than make test: 100,000 one-off lock names on every store.
safety: $(STAMP)
	LOCKD_GROWTH_NAMES=100000 $(VENV)/bin/pytest --timeout 1800 tests/test_growth.py tests/redis/test_growth.py

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[server,redis,bench]"
	$(PY) bench/http_bench.py
	$(PY) bench/redis_bench.py
	$(PY) bench/holds_bench.py
	$(PY) bench/session_holds_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
