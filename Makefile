# Two commands matter: `make quickstart` and `make test` (both set up first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bigray-installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup system-packages quickstart lint test test-fast bench gpu-wheels clean

setup: $(STAMP) system-packages

# Re-install only when the dependency list or the lock file changes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package; elsewhere torchvision's downloader is used instead.
system-packages:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	else \
		echo "apt-get not available (or not root): skipping dataset-fashion-mnist; Fashion-MNIST will be downloaded by torchvision"; \
	fi

quickstart: setup
	$(VENV)/bin/bigray quickstart

# ruff's linter and formatter, configured in pyproject.toml (`ruff format .` rewrites what --check finds).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(VENV)/bin/bigray bench gpt_ray_overhead zero_memory gpt_cpu resnet_ray_overhead resnet_accuracy

# The wheels bench/gpu_check.sh installs on a GPU box that has only torch (carried as .whl/).
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps -d .whl -c constraints.txt transformers tokenizers safetensors huggingface-hub \
		regex tqdm filelock packaging pyyaml requests charset-normalizer idna urllib3 certifi fsspec hf-xet typing-extensions

clean:
	rm -rf runs .pytest_cache
