# Tillwire — developer entry points.  Everything runs inside .venv.
#   make run      set up, build the native core, start the server (embedded default)
#   make test     set up with dev extras, start what tests need, run the whole suite
#   make install  set up .venv and build only
#   make compile  rebuild the Cython extensions in place after editing core/*.pyx
#   make bench    pytest-benchmark micro-benchmarks + every `python -m bench` --quick run

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
NATIVE := $(wildcard core/*.pyx core/*.pxd)
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install install-dev compile run test bench clean distclean

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

compile: $(PY)
	$(PY) setup.py -q build_ext --inplace

run: install
	$(BIN)/tillwire serve $(ARGS)

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install-dev
	$(PY) -m pytest bench/micro -q --benchmark-only $(PYTEST_ARGS)
	$(PY) -m bench all --quick

clean:
	rm -rf build core/*.c core/*.so *.egg-info src/*.egg-info .pytest_cache

distclean: clean
	rm -rf $(VENV)
