PY ?= .venv/bin/python
TORCH ?= torch==2.13.0

.PHONY: install test test-all bench parity-report demo demo-model

# A virtual environment with the CPU build of torch (from local disk here) installed before the project,
# so the project's `torch>=2.1` is already satisfied and no CUDA wheel is fetched.
install:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'

# two workers, one torch thread each: the tiny test models run faster that way than one process on two threads
test:
	$(PY) -m pytest -q -n 2

test-all:
	$(PY) -m pytest -q -n 2 -m ''

bench:
	$(PY) -m ldm_inpaint.bench

# the measured parity table of docs/parity.md
parity-report:
	rm -f parity.tsv
	PARITY_REPORT=$(CURDIR)/parity.tsv $(PY) -m pytest -q -n 2 tests/test_unet.py tests/test_vae.py tests/test_clip.py \
		tests/test_pipeline.py tests/test_sdxl.py tests/test_pipeline_schedulers.py tests/test_open_pipeline.py
	$(PY) tests/parity.py parity.tsv  # the table to paste into docs/parity.md
	rm parity.tsv

# set-up on a fresh machine, then one inpainting run with the demo model that ships with the package
demo: install
	$(PY) -m ldm_inpaint.sample --image ldm_inpaint/demo/image.png --mask ldm_inpaint/demo/mask.png \
		--prompt "a red circle on a white background" --steps 30 --seed 1 --out demo.png --overwrite
	@echo "make demo: wrote demo.png (the white square of ldm_inpaint/demo/mask.png repainted)"

# the demo model, trained from scratch by ldm_inpaint.train (docs/training.md); work files in ldm_inpaint/demo/work/
demo-model:
	$(PY) -m ldm_inpaint.train.demo --out ldm_inpaint/demo
