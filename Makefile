# Two commands do everything on a fresh machine (each installs what it needs first):
#   make demo   the main job: fine-tune pretrained EfficientNet-Lite0 on Fashion-MNIST with FLoRA
#   make test   the test suite (every extra installed, so integration tests run too)
PY := .venv/bin/python

.PHONY: demo test test-slow setup setup-demo
setup-demo:
	bash tools/setup_env.sh demo
setup:
	bash tools/setup_env.sh all,dev

demo: setup-demo
	$(PY) tools/train_classifier.py --preset demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# tests marked @pytest.mark.slow (excluded from `make test`); exit status 5 means none are marked today
test-slow: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slow tests || [ $$? -eq 5 ]
