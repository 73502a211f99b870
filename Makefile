# Tillwire — developer entry points.  Everything runs inside .venv.
#   make run      set up, build the native core, start the server (embedded default;
#                 ports from TILLWIRE_SERVER_PORT / TILLWIRE_ADMIN_PORT or a config file)
#   make load     install Locust and run the holiday scenarios against `make run`'s server
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
DATA   ?= data
PYTEST_ARGS ?=

.PHONY: install install-dev fuzz-deps redis-deps compile run load test bench fuzz clean distclean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip setuptools wheel

# The stamp files rebuild when the packaging or the native sources change.
$(VENV)/.installed: $(PY) pyproject.toml setup.py $(NATIVE)
	$(PIP) install "Cython>=3.0.10" "setuptools>=68" wheel
	$(PIP) install --no-build-isolation -e .
	@touch $@

$(VENV)/.installed-load: $(VENV)/.installed
	$(PIP) install --no-build-isolation -e ".[load]"
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
# and admin token once ($(DATA)/dev-secret, $(DATA)/dev-admin-token, readable
# by their owner only) unless TILLWIRE_SECRET / TILLWIRE_ADMIN_TOKEN are set.
# Production sets its own.  The server itself prints where it listens (its
# log line "ready: terminals on ..."): the ports come from the config
# (TILLWIRE_SERVER_PORT=7080 TILLWIRE_ADMIN_PORT=7081 make run, or
# TILLWIRE_CONFIG=tillwire.toml), not from this file.
run: install
	@mkdir -p $(DATA)
	@umask 077; [ -s $(DATA)/dev-secret ] || $(PY) -c "import secrets; print(secrets.token_urlsafe(32))" > $(DATA)/dev-secret
	@umask 077; [ -s $(DATA)/dev-admin-token ] || $(PY) -c "import secrets; print(secrets.token_urlsafe(24))" > $(DATA)/dev-admin-token
	@chmod 600 $(DATA)/dev-secret $(DATA)/dev-admin-token
	@echo "tillwire: dev secrets: export TILLWIRE_SECRET=\$$(cat $(DATA)/dev-secret) TILLWIRE_ADMIN_TOKEN=\$$(cat $(DATA)/dev-admin-token)"
	TILLWIRE_SECRET="$${TILLWIRE_SECRET:-$$(cat $(DATA)/dev-secret)}" \
	TILLWIRE_ADMIN_TOKEN="$${TILLWIRE_ADMIN_TOKEN:-$$(cat $(DATA)/dev-admin-token)}" \
	$(BIN)/tillwire serve --data-dir $(DATA) $(ARGS)

# Locust's holiday scenarios (bench/locustfile.py) against the server that
# `make run` started: same secret, same TILLWIRE_* ports.  USERS, RATE and
# TIME size a plain run; LOAD_SHAPE=holiday ramps 1x-30x and ends by itself
# (squeezed into TIME).  ARGS go to locust.
load: $(VENV)/.installed-load
	TILLWIRE_SECRET="$${TILLWIRE_SECRET:-$$(cat $(DATA)/dev-secret)}" \
	$(BIN)/locust -f bench/locustfile.py --headless --only-summary \
	    -u $(or $(USERS),200) -r $(or $(RATE),50) -t $(or $(TIME),60s) $(ARGS)

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
