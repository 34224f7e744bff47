# The README's two commands: `make demo` (the main job on the embedded benchmark) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/synth2real-demo
# `make gpu-wheels`: the wheels benchmarks/gpu_suite.sh installs with --no-index on the GPU machine (its Python).
GPU_PYTHON ?= 3.12
WHL        ?= .whl

.PHONY: setup demo test lint browser gpu-wheels clean

# torch==2.13.0 first: it is the CPU build, so pip never pulls a multi-GB CUDA build on a CPU machine.
# Each target installs the extras it uses: `make demo` the train extra, `make test` the test extra (all of them).
$(VENV)/.installed-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train]'
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-train

setup: $(VENV)/.installed-test

# Generate the synthetic benchmark, train source-only then BiDA, evaluate, export to ONNX, segment the samples.
demo: $(VENV)/.installed-train
	$(BIN)/dass-train synth2real_demo --name $(notdir $(RUN)) --exist-ok run.out=$(dir $(RUN))
	$(BIN)/dass-export $(RUN)/adapt/last.pt --name synth2real-demo --out $(RUN)/models --height 128 --width 256 --overwrite
	$(BIN)/dass-segment app/examples/*.png --model $(RUN)/models/synth2real-demo --out $(RUN)/segment --overwrite --legend

# Debian's Chromium drives the browser test of the web demo.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium >/dev/null)

test: $(VENV)/.installed-test browser
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The few wheels the GPU suite needs beyond a bare CUDA image (benchmarks/gpu/requirements.txt says which and why),
# for that machine's Python, without their dependencies (the image has them): carried along in .whl/.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform any -d $(WHL) -r benchmarks/gpu/requirements.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
