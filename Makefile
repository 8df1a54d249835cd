# Set-up and the everyday commands. `make sweep` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch to install when the environment has none. On a machine without an NVIDIA
# GPU it is a CPU build (this pin is the CPU wheel our CI image carries; elsewhere pass
# TORCH_INDEX=<PyTorch's CPU wheel index> to take a CPU build from there). With a GPU,
# pip's default CUDA build. A torch already installed in $(VENV) is always kept.
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.5
TORCH_INDEX ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup sweep test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install "$(TORCH_GPU)"; \
	else \
		$(BIN)/pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install -e ".[test,postgres,grpc,onnx,cluster,hf]"
	touch $@

sweep: setup
	$(BIN)/qkv sweep $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/trial_speed.py
	$(BIN)/python benchmarks/decoder_step.py
	$(BIN)/python benchmarks/workers.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/threads.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf $(VENV) build *.egg-info
