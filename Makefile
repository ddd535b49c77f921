# make run   — set up .venv and the data mirror, then rebuild the whole pipeline with `dvc repro`
# make test  — the test suite (what CI runs)
# make bench — the tutorial's loop vs the train stage vs the fast recipes, 3 seeds (benchmarks/results/);
#              make bench DEVICE=cuda: the same on a GPU, plus CIFAR-10
# make fast-recipe — the fast recipe as a DVC experiment
# make reproduce — rebuild everything from scratch and compare with the committed run
# make mlflow-server — a shared MLflow tracking server on PostgreSQL (Ctrl-C stops it)
VENV := .venv
PY := $(VENV)/bin/python
# DVC stages call `python -m stages.X`: make them find the venv's python.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

UI_PORT ?= 5000
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5001
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test bench fast-recipe reproduce setup data-mirror tensorboard ui mlflow-server clean-venv

run: setup
	dvc repro
	@echo
	dvc metrics show
	@echo
	@echo "Results: models/model.pt (model), models/export/ (state_dict, ONNX, model card),"
	@echo "         metrics/*.json (dvc metrics show), metrics/*.csv (dvc plots show), logs/ (make tensorboard)."
	@echo "Classify an image: $(PY) -m stages.predict IMAGE"
	@echo "Compare runs in MLflow: make ui"

test: setup
	$(PY) -m pytest -q

# The tutorial's loop vs the train stage vs the fast recipes, 3 seeds each, in one run; DEVICE=cuda runs every
# route on the GPU and adds the CIFAR-10 route (data.mirrors); BENCH_ARGS="--seeds 1 --epochs 2" shortens it.
DEVICE ?= auto
bench: setup
	dvc repro download
	$(PY) benchmarks/bench.py --device $(DEVICE) $(BENCH_ARGS)

# The fast recipe (benchmarks/fast_recipe.yaml) as a DVC experiment in the workspace.
fast-recipe: setup
	dvc exp run -f -n fast-recipe $$($(PY) benchmarks/bench.py --print-recipe)

# Rebuild every stage from scratch and show what differs from the committed run (README: Reproducing a run).
reproduce: setup
	dvc repro --force
	@echo
	dvc metrics diff
	@echo
	git diff --stat -- dvc.lock

setup: $(VENV)/.installed data-mirror

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The offline copy of Fashion-MNIST: Debian's dataset-fashion-mnist, installed when apt is usable.
data-mirror:
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else echo "note: dataset-fashion-mnist is not installed and apt is not usable here;" \
		"the download stage will try data.mirrors in params.yaml, then the official mirrors"; fi

tensorboard: setup
	tensorboard --logdir logs --host 127.0.0.1

# MLflow UI on loopback against the project's store (sqlite:///<repo>/mlflow.db, artifacts in mlartifacts/).
ui: setup
	$(PY) -m stages.lib.tracking --port $(UI_PORT)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# Tracking server for the team: runs in PostgreSQL (mlserver/pgdata), artifacts served from
# mlserver/artifacts. Needs Debian's postgresql package. Log to it with tracking.uri=http://HOST:PORT.
mlflow-server: setup
	$(PY) scripts/mlflow_server.py --host $(SERVER_HOST) --port $(SERVER_PORT)

clean-venv:
	rm -rf $(VENV)
