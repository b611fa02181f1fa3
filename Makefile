# Two entry points for a fresh machine (see README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install data demo test test-slow clean

install: $(VENV)/.installed

# torch and torchvision first, as the matching pair (see pyproject.toml), then the package.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Fashion-MNIST from Debian's package when apt is available (no download at run time).
data:
	@if [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) >/dev/null || echo "warning: could not install dataset-fashion-mnist"; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  (sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist) >/dev/null || echo "warning: could not install dataset-fashion-mnist"; \
	else echo "note: Fashion-MNIST not installed; install dataset-fashion-mnist or pass --data.root DIR"; fi

demo: install data
	$(PY) -m dafl fit $(ARGS)

test: install data
	$(PY) -m pytest

test-slow: install data
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
