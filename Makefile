# Tillwire — developer entry points.  Everything runs inside .venv.
#   make run      set up, build the native core, start the server (embedded default)
#   make test     set up with dev extras, start what tests need, run the whole suite
#   make install  set up .venv and build only
#   make compile  rebuild the Cython extensions in place after editing core/*.pyx
#   make bench    pytest-benchmark micro-benchmarks + every `python -m bench` --quick run
#   make fuzz     coverage-guided fuzzing of the native core (fuzz/, SECONDS=300 by default)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
NATIVE := $(wildcard core/*.pyx core/*.pxd)
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install install-dev fuzz-deps redis-deps compile run test bench fuzz clean distclean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip setuptools wheel

# The stamp files rebuild when the packaging or the native sources change.
$(VENV)/.installed: $(PY) pyproject.toml setup.py $(NATIVE)
	$(PIP) install "Cython>=3.0.10" "setuptools>=68" wheel
	$(PIP) install --no-build-isolation -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --no-build-isolation -e ".[dev,load]"
	@touch $@

install: $(VENV)/.installed
	@$(PY) -c "import tillwire.core.codec as c; print('tillwire installed; codec:', c.IMPLEMENTATION)"

install-dev: $(VENV)/.installed-dev

# clang and ASan's static runtime build the instrumented core that
# tests/test_fuzz.py fuzzes with atheris (Debian's packages; CI runs as root).
fuzz-deps:
	@dpkg -s clang libclang-rt-14-dev >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  clang libclang-rt-14-dev; }

# The Redis backends' contract suites run against a real redis-server
# (Debian's 7.0; tests/redis_server.py starts one per test session).
redis-deps:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  redis-server; }

compile: $(PY)
	$(PY) setup.py -q build_ext --inplace

# A fresh machine has no secret: `make run` makes a local development secret
# and admin token once (data/dev-secret, data/dev-admin-token) unless
# TILLWIRE_SECRET / TILLWIRE_ADMIN_TOKEN are set.  Production sets its own.
run: install
	@mkdir -p data
	@[ -s data/dev-secret ] || $(PY) -c "import secrets; print(secrets.token_urlsafe(32))" > data/dev-secret
	@[ -s data/dev-admin-token ] || $(PY) -c "import secrets; print(secrets.token_urlsafe(24))" > data/dev-admin-token
	@echo "tillwire: embedded default: one process, SQLite store in ./data, terminals on 127.0.0.1:7070, admin API on 127.0.0.1:7071"
	@echo "tillwire: dev secrets: export TILLWIRE_SECRET=\$$(cat data/dev-secret) TILLWIRE_ADMIN_TOKEN=\$$(cat data/dev-admin-token)"
	TILLWIRE_SECRET="$${TILLWIRE_SECRET:-$$(cat data/dev-secret)}" \
	TILLWIRE_ADMIN_TOKEN="$${TILLWIRE_ADMIN_TOKEN:-$$(cat data/dev-admin-token)}" \
	$(BIN)/tillwire serve --data-dir data $(ARGS)

test: install-dev fuzz-deps redis-deps
	FUZZ_REQUIRE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: install-dev
	$(PY) -m pytest bench/micro -q --benchmark-only $(PYTEST_ARGS)
	$(PY) -m bench all --quick

fuzz: install-dev fuzz-deps
	$(PY) -m fuzz run all --seconds $(or $(SECONDS),300)

clean:
	rm -rf build core/*.c core/*.so *.egg-info src/*.egg-info .pytest_cache

distclean: clean
	rm -rf $(VENV)
