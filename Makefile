# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both first run tools/install.sh (idempotent: seconds when nothing changed).
PY := .venv/bin/python
DEMO_DATA := data/demo_coco
WORK := work_dirs/demo

.PHONY: install lint test test-fast demo data clean

install:
	bash tools/install.sh

# ruff, pinned in requirements/pins.txt, with the settings in pyproject.toml
lint: install
	.venv/bin/ruff check mmsparse tools tests configs

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

data: install
	$(PY) tools/make_demo_data.py --out $(DEMO_DATA)

# train dense → MaxQ 1:16 fine-tune → COCO mAP → fold → verify → ONNX Runtime
demo: data
	bash tools/run_demo.sh

# only what the demo made: its work dir and its generated dataset (other work_dirs/ runs stay)
clean:
	rm -rf $(WORK) $(DEMO_DATA)
