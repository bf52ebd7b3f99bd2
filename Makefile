# The two commands of the README:
#   make demo   installs, then trains the shapes autoencoder and latent diffusion model, samples a
#               grid and prints the prompt-adherence table (about 10 minutes on a 2-core CPU)
#   make test   installs, then runs the whole test suite (8 simulated CPU devices, two pytest
#               workers: the suite is bound by single-threaded XLA compilation)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNS ?= runs/shapes
export WANDB_MODE ?= offline
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	# torch-fidelity: the independent FID Inception of tests/test_inception.py. --no-deps: it
	# requires torchvision, whose PyPI wheel is built for CUDA torch and does not load here.
	$(BIN)/pip install --quiet --no-deps torch-fidelity==0.4.0
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# glibc's malloc backs its large blocks with transparent huge pages (glibc >= 2.35; ignored by
# older ones): XLA:CPU allocates a step's buffers anew each step, and they then fault in 2 MB at a
# time instead of 4 kB (README, "Results").
demo: export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
demo: install
	$(BIN)/ldm-jax train --config configs/shapes.py:autoencoder --workdir $(RUNS)/autoencoder
	$(BIN)/ldm-jax train --config configs/shapes.py:ldm --workdir $(RUNS)/ldm \
		--config.autoencoder_workdir=$(RUNS)/autoencoder
	$(BIN)/ldm-jax sample --workdir $(RUNS)/ldm --out $(RUNS)/samples --num-images 4 \
		--guidance-scale 4 --steps 25 --sampler ddim --seed 0 \
		--prompt "a red circle" --prompt "a green square" --prompt "a blue triangle" \
		--prompt "a yellow circle" --prompt "a purple square" --prompt "a cyan triangle" \
		--prompt "a large orange circle on a white background at the left" \
		--prompt "a small magenta triangle on a black background at the top"
	$(BIN)/ldm-jax eval adherence --workdir $(RUNS)/ldm --guidance-scales 0 4 --steps 25

test: install-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(RUNS)
