# Two commands do everything on a fresh machine (each installs what it needs first):
#   make demo   the main job: fine-tune pretrained EfficientNet-Lite0 on Fashion-MNIST with FLoRA
#   make test   the test suite (every extra installed, so integration tests run too)
PY := .venv/bin/python
BIN := .venv/bin

.PHONY: demo test test-slow bench setup setup-demo
setup-demo:
	bash tools/setup_env.sh demo
setup:
	bash tools/setup_env.sh all,dev

demo: setup-demo
	$(BIN)/visadapt-train-classifier --preset demo

# ruff first (seconds), then every test
test: setup
	$(BIN)/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider tests

# tests marked @pytest.mark.slow (excluded from `make test`); exit status 5 means none are marked today
test-slow: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slow tests || [ $$? -eq 5 ]

# the benchmark (docs/bench.md): every method vs the frozen base, PEFT LoRA and LyCORIS on five models, with the
# FLoRA / weight-grad-limit profile and the path-cost refit; under 15 minutes on 2 idle CPU cores.
# BENCH_OUT=docs/assets/bench rewrites the committed results.
BENCH_OUT ?= out/bench
bench: setup
	$(BIN)/visadapt-bench --models convnext_tiny@4x96,efficientnet_lite0@8x96,vit_small@4x96,unet_down@1x64,convnext_atto@8x96 \
		--rank 8 --warmup 1 --steps 10 --layer-time 0.1 --profile FLoRA,limit --refit --out $(BENCH_OUT)

# eager vs torch.compile (inductor) on ConvNeXt-atto: frozen base, weight-grad limit, PEFT LoRA, FLoRA (docs/bench.md)
BENCH_COMPILE_OUT ?= out/bench_compile
.PHONY: bench-compile
bench-compile: setup
	$(BIN)/visadapt-bench --models convnext_atto@8x96 --methods base,limit,peft,FLoRA --on-peft-layers '' \
		--rank 8 --warmup 1 --steps 10 --no-path-choice --compile --out $(BENCH_COMPILE_OUT)

# the method comparison study (docs/compare.md): every setting of visadapt/apps/compare/study.py, about 70 minutes on 2
# idle CPU cores; resumable (after an interruption run it again: finished runs are reused). Then
# `$(BIN)/visadapt-compare docs $(STUDY_OUT)` writes its tables and claim lines into README.md and docs/compare.md.
STUDY_OUT ?= runs/study
STUDY_CAPTIONS ?= runs/clipart-captions
.PHONY: study
study: setup
	test -f $(STUDY_CAPTIONS)/captions.jsonl || $(PY) tools/make_clipart_captions.py --output_dir $(STUDY_CAPTIONS) \
		--num_images 3000 --resolution 96
	$(BIN)/visadapt-compare study --captions $(STUDY_CAPTIONS)/captions.jsonl --output-dir $(STUDY_OUT)
