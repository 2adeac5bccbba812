# Two commands set everything up on a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run complexity test lint format clean-venv

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# The main job: train InceptionNeXt-A on the embedded digits set, then validate the best checkpoint.
# A finished run in output/digits is resumed (nothing left to do) and validated again; delete it to retrain.
run: $(STAMP)
	$(VENV)/bin/inceptionnext train --recipe digits --output output/digits
	$(VENV)/bin/inceptionnext validate --checkpoint output/digits/best.pth --output output/digits

complexity: $(STAMP)
	$(VENV)/bin/inceptionnext complexity --figure docs/figure3_flops.png

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
