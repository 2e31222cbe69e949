# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test bench clean diffusion-eval

$(BIN)/ncpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/ncpipe
	$(BIN)/ncpipe demo

test: $(BIN)/ncpipe
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache

# The diffusion decoders' evaluation (the tables, gains and plots of docs/nc-diffusion.md and docs/corrdiff.md)
# in one command: every quality of the codec; NC-Diffusion at K = 1, 2, 4, 8 with and without guidance, its
# AFFM ablation and the Gaussian-start baseline; CorrDiff along the perception knob.
#   make diffusion-eval KODAK=path/to/kodak [MAX_IMAGES=2] [REFINER=... NO_AFFM=... GAUSSIAN=... CORRDIFF=...]
KODAK ?= $(NCPIPE_EVAL_IMAGES)
DIFFUSION_CODEC ?= mbt2018-mean-vbr-small
REFINER ?= runs/train-refiner/refiner.pt
NO_AFFM ?= runs/train-refiner-no-affm/refiner.pt
GAUSSIAN ?= runs/train-refiner-gaussian/refiner.pt
CORRDIFF ?= runs/train-corrdiff/corrdiff.pt
MAX_IMAGES ?= 0
DIFFUSION_OUT ?= out/diffusion-eval

diffusion-eval: $(BIN)/ncpipe
	$(BIN)/ncpipe evaluate-refiner --codec $(DIFFUSION_CODEC) --refiner nc-diffusion=$(REFINER) \
	  --refiner nc-diffusion-no-affm=$(NO_AFFM) --refiner gaussian-start=$(GAUSSIAN) --guidance 0.5 \
	  --guided nc-diffusion --refiner-steps 1,2,4,8 --images $(KODAK) --max-images $(MAX_IMAGES) \
	  -o $(DIFFUSION_OUT)/nc-diffusion
	$(BIN)/ncpipe evaluate-corrdiff --codec $(DIFFUSION_CODEC) --corrdiff $(CORRDIFF) \
	  --refiner nc-diffusion=$(REFINER) --images $(KODAK) --max-images $(MAX_IMAGES) -o $(DIFFUSION_OUT)/corrdiff
