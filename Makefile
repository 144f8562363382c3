# The two commands a new user runs on a fresh machine (see README):
#   make bench   — set up .venv, build, run the clip benchmark against the dense implementation
#   make test    — set up .venv, build, run the test suite
# Each target does its own set-up; a second run reuses the environment and rebuilds only on change.

PYTHON     ?= python3
VENV       ?= .venv
# Pinned for the dev environment: the CPU wheel installs in seconds here; an unpinned torch pulls
# several GB of CUDA packages. On a GPU machine pass e.g. TORCH_SPEC="torch==2.11.0".
TORCH_SPEC ?= torch==2.13.0
# The torchvision built against TORCH_SPEC, for open_clip's trainer (tests/test_open_clip_trainer.py).
TORCHVISION_SPEC ?= torchvision==0.28.0
TRAINER_SITE     := $(VENV)/open_clip_trainer
MAX_JOBS   ?= 2
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.ck-installed
NATIVE_SRC := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*)

BENCH_ARGS  ?=
PYTEST_ARGS ?=

.PHONY: setup bench test info cuda-check triton-check gpu-dry-run gpu-wheels clean

$(STAMP): $(NATIVE_SRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy setuptools wheel ninja
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation -e ".[test,bench,experiments]"
	@# open_clip is used through its loss.py (parity tests, the open_clip providers) and its trainer;
	@# --no-deps keeps a second torch out. Installed last: pip's resolver would otherwise print a
	@# (harmless) ERROR about open_clip's missing torchvision at every later install.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	@# The trainer's own imports go to a directory of their own, on the path of the trainer test's
	@# subprocesses only: the torchvision wheel on offer for a CPU torch here is a CUDA build that
	@# fails to import, and transformers (sentence-transformers) imports any torchvision it sees.
	$(PY) -m pip install -q --no-deps --target $(TRAINER_SITE) "$(TORCHVISION_SPEC)" ftfy wcwidth \
		braceexpand webdataset
	touch $(STAMP)

setup: $(STAMP)

bench: setup
	$(PY) -m contrastive_kernels bench $(BENCH_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

info: setup
	$(PY) -m contrastive_kernels info

# Compile-only check of every CUDA source with the machine's nvcc (sm_80 and sm_90), and a syntax
# check of the torch binding against the venv's torch headers.
cuda-check: setup
	TORCH_PYTHON=$(PY) bash tools/compile_cuda.sh

# Offline compile of every Triton launch for sm_90 (no GPU): registers, spills, shared memory.
# TRITON_CHECK_ARGS="--quick --strict" is what CI runs; without it, the full matrix (169 kernels, 2–3 min on 2 cores).
TRITON_CHECK_ARGS ?=
triton-check: setup
	$(PY) tools/triton_offline_compile.py $(TRITON_CHECK_ARGS)

# The GPU kit's CPU dry run (every step at tiny sizes; CI runs it): files in $(GPU_OUT).
GPU_OUT ?= results_local/gpu-dry-run
gpu-dry-run: setup
	CK_GPU_DRY_RUN=1 PYTHON=$(PY) OUT=$(GPU_OUT) bash benchmarks/run_gpu.sh

# Wheels the GPU machine lacks (it has no network): bring .whl/ along to the GPU run.
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps -d .whl inf-cl==1.2.1 open-clip-torch==3.3.0

clean:
	rm -rf build *.egg-info contrastive_kernels/*.so $(STAMP)
