# make run   — set up .venv and the data mirror, then rebuild the whole pipeline with `dvc repro`
# make test  — the test suite (what CI runs), a worker per core; make test-fast — the edit loop's tests (≤ 2 min)
# make bench — the tutorial's loop vs the train stage vs the fast recipes, 3 seeds, then the served model
#              (benchmarks/results/); make bench DEVICE=cuda: the same on a GPU, plus CIFAR-10
# make fast-recipe — the fast recipe (benchmarks/fast_recipe.yaml) as a DVC experiment, by dvc exp run -S
# make reproduce — rebuild everything from scratch and compare with the committed run
# make plots — the plots, offline: dvc_plots/index.html (dvc plots show) and dvc_plots/offline/ (SVG, PNG and a
#              page without scripts); REVS="HEAD fast-recipe" compares revisions or experiments
# make screenshots — pictures of the MLflow runs view and of the plots for docs/images/ (needs chromium)
# make docs — rewrite the figures in README.md and docs/ from the results files (metrics/, benchmarks/results/)
# make serve — the champion (models:/tudui-classifier@champion) over HTTP on 127.0.0.1:$(SERVE_PORT) (Ctrl-C stops it)
# make promote EXP=name — check an experiment against the champion (data, accuracy beyond seed noise, ONNX, latency),
#              then make it the champion in MLflow and GTO; EXP=models:/tudui-classifier/N rolls back (docs/serving.md)
# make champion — the champion and the best challenger of the last sweep side by side, from MLflow and GTO
# make mlflow-server — a shared MLflow tracking server with logins, on PostgreSQL (Ctrl-C stops it)
# make mlflow-user NAME=alice — a teammate's login on that server (READ_ONLY=1: may only read; PROMOTER=1: may move @champion)
# make lock — re-resolve uv.lock after editing pyproject.toml's dependencies; make lock-check: do they agree?
# make bench-serve — the served model's latency, throughput and memory (benchmarks/results/serving.md)
# make tensorboard — TensorBoard on logs/; make ui — the MLflow UI on this project's runs (127.0.0.1:$(UI_PORT))
# make setup — only the venv (exactly uv.lock) and the data mirror (make data-mirror); make clean-venv — remove the venv
# make sweep GRID="train.lr=0.01,0.02" SEEDS=3 — every setting × seed as a named DVC experiment, queued and run
#              JOBS=1 at a time (SET="train.epochs=2": params for all), then make compare (docs/experiments.md)
# make compare — experiments grouped by params, seed aside: n, mean ± sd, worst seed, verdict against the committed
#              params (BASELINE=exp-name picks another); reports/compare.md and MLflow's group/ metrics
# make flips A=exp-a B=exp-b — the test images two experiments classify differently: counts and reports/flips-A-vs-B.html
# make help — this list
VENV := .venv
PY := $(VENV)/bin/python
# DVC stages call `python -m stages.X`: make them find the venv's python.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

PLOTS_TEMPLATE := .dvc/tmp/plots_offline.html
UI_PORT ?= 5000
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5001
SERVE_PORT ?= 5002
MODEL_URI ?=
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: help run test test-fast bench bench-serve fast-recipe reproduce plots screenshots setup data-mirror tensorboard ui mlflow-server mlflow-user serve promote champion clean-venv lock lock-check docs sweep compare flips

help:
	@sed -n 's/^# make /make /p; s/^#              /               /p' $(firstword $(MAKEFILE_LIST))

run: setup $(PLOTS_TEMPLATE)
	$(PY) -m tools.check
	dvc repro
	@echo
	dvc metrics show
	@echo
	@echo "Results: models/model.pt (model), models/export/ (state_dict, ONNX, model card),"
	@echo "         metrics/*.json (dvc metrics show), metrics/*.csv (dvc plots show), logs/ (make tensorboard)."
	@echo "Classify an image: $(PY) -m tools.predict IMAGE"
	@echo "Compare runs in MLflow: make ui"

# pytest-xdist: a worker per core (TEST_JOBS=1 runs them one at a time; 3 workers on 2 cores ran slower), a test
# file per worker so that its module fixtures are built once, the files in tests/conftest.py's order (longest
# first); the 15 slowest tests are listed at the end. The tests' folders (DVC repositories, caches, MLflow
# stores, which otherwise wait on the disk) go to memory, a folder of this make's own in /dev/shm where it has
# 8 GiB free, removed when pytest ends, passed, failed or stopped by Ctrl-C; TEST_SHM=0 leaves them to pytest
# under /tmp, where the last three runs' folders stay to look at.
TEST_JOBS ?= auto
TEST_SHM ?= 1
TEST_RUN := $(shell echo $$PPID)
TEST_TMP = $(if $(filter 1,$(TEST_SHM)),$(shell df -Pk /dev/shm 2>/dev/null | \
	awk 'NR == 2 && $$4 > 8 * 1024 * 1024 {print "/dev/shm/tudui-tests-$(TEST_RUN)"}'))
TEST_ARGS = -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --timeout 1200 $(if $(TEST_TMP),--basetemp $(TEST_TMP))
# the shell removes the folder as it exits (pytest's exit status stays its own), also after Ctrl-C or a kill
TEST_CLEANUP = $(if $(TEST_TMP),trap 'rm -rf $(TEST_TMP)' EXIT; trap 'exit 130' INT; trap 'exit 143' TERM HUP;)
test: setup $(PLOTS_TEMPLATE)
	$(TEST_CLEANUP) $(PY) -m pytest $(TEST_ARGS) --durations=15

# Unit tests and one small end-to-end run (download -> export on 600 images), without servers or DVC repos.
FAST_TESTS := tests/test_params.py tests/test_stage_deps.py tests/test_engine.py tests/test_models.py \
	tests/test_archives.py tests/test_train.py tests/test_evaluate_export.py
test-fast: setup
	$(TEST_CLEANUP) $(PY) -m pytest $(TEST_ARGS) -m "not slow" --durations=5 $(FAST_TESTS)

# The tutorial's loop vs the train stage vs the fast recipes, 3 seeds each, in one run, into
# benchmarks/results/<machine kind>/ (cpu-bf16-2core, cpu-avx2-2core, gpu-h200: each kind keeps its own), every
# goal printed against its figure, met or MISSED; DEVICE=cuda runs every route on the GPU and adds the CIFAR-10
# route (data.mirrors); BENCH_ARGS="--seeds 1 --epochs 2" shortens it, "--interleave" runs seed by seed across
# the routes (on a shared machine a passing load then slows every route alike).
DEVICE ?= auto
bench: setup
	dvc repro download
	$(PY) benchmarks/bench.py --device $(DEVICE) $(BENCH_ARGS)
	$(MAKE) bench-serve

# The served model over HTTP, ONNX Runtime and PyTorch inside the pyfunc: latency of one image, throughput
# of 256 a request, 20 clients at once for 10 s, the server's memory over large requests and at the serve:
# limits (benchmarks/results/serving.md). Needs the trained model: runs the pipeline first.
bench-serve: setup
	dvc repro export
	$(PY) benchmarks/serve_bench.py $(SERVE_BENCH_ARGS)

# The fast recipe for this machine kind as a DVC experiment in the workspace (benchmarks/fast_recipe.yaml, or
# fast_recipe.<kind>.yaml where another was measured best on that kind; the line before the run names the file
# and the CPU flags it was chosen by): each of its lines one
# `-S key=value`, DVC's own params override (docs/libraries.md: why not Hydra composition); FAST_EPOCHS=24
# trains longer (the 94% recipe on a GPU, docs/benchmarks.md).
fast-recipe: setup
	dvc exp run -f -n fast-recipe $$($(PY) benchmarks/bench.py --print-recipe $(if $(FAST_EPOCHS),--fast-epochs $(FAST_EPOCHS)))

# Rebuild every stage from scratch and show what differs from the committed run (docs/reproducibility.md).
reproduce: setup
	$(PY) -m tools.check
	dvc repro --force
	@echo
	dvc metrics diff
	@echo
	git diff --stat -- dvc.lock

setup: $(VENV)/.installed data-mirror

# dvc plots show without the internet: Vega, Vega-Lite and vega-embed from vl-convert-python's wheel, inlined
# into DVC's page template (tools/offline_plots.py). Only the targets that draw plots wait for it.
$(PLOTS_TEMPLATE): tools/offline_plots.py $(VENV)/.installed
	$(PY) tools/offline_plots.py

# DVC's interactive page (drawn by the browser), then every plot drawn by vl-convert as SVG and PNG, with a
# page that runs no script (dvc_plots/offline/index.html); REVS="HEAD exp-name" compares them.
plots: setup $(PLOTS_TEMPLATE)
	dvc plots $(if $(REVS),diff $(REVS),show)
	$(PY) tools/offline_plots.py --render dvc_plots/offline $(REVS)

# The docs' pictures, from this checkout's runs: MLflow's runs view and dvc plots diff of the experiments.
screenshots: setup $(PLOTS_TEMPLATE)
	$(PY) tools/screenshots.py $(REVS)

# Every figure in README.md and docs/*.md is a marked region written from its results file; tests/test_docs.py
# fails when one differs. Run after make run, make bench or make bench-serve.
docs:
	$(PY) -m tools.docs_numbers

# Sweeps, verdicts and flips (docs/experiments.md). Values reach the shell through the environment, unexpanded.
sweep compare flips: export EXP_GRID = $(value GRID)
sweep compare flips: export EXP_SET = $(value SET)
sweep compare flips: export EXP_BASELINE = $(value BASELINE)
sweep compare flips: export EXP_A = $(value A)
sweep compare flips: export EXP_B = $(value B)
SEEDS ?= 3
JOBS ?= 1
sweep: setup
	@test -n "$$EXP_GRID" || { echo 'error: name the grid: make sweep GRID="train.lr=0.01,0.02,0.05" [SEEDS=3] [JOBS=2] [SET="train.epochs=2"]' >&2; exit 2; }
	dvc repro download
	$(PY) -m tools.sweep --grid="$$EXP_GRID" --seeds=$(SEEDS) --jobs=$(JOBS) --set="$$EXP_SET"$(if $(FORCE), --force)

compare: setup
	$(PY) -m tools.compare --baseline="$$EXP_BASELINE"

flips: setup
	@test -n "$$EXP_A" -a -n "$$EXP_B" || { echo 'error: name two experiments: make flips A=exp-a B=exp-b' >&2; exit 2; }
	$(PY) -m tools.flips "$$EXP_A" "$$EXP_B"

# The venv holds exactly uv.lock (docs/install.md): uv sync --locked stops if pyproject.toml and the lock
# disagree, installs the locked versions, removes anything else, and installs the project editable.
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
UV_FLAGS := --no-python-downloads
UV_BOOTSTRAP = test -x $(PY) || python3 -m venv $(VENV); \
	$(UV) --version 2>/dev/null | grep -qxF 'uv $(UV_VERSION)' || $(PY) -m pip install -q uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml uv.lock
	$(UV_BOOTSTRAP)
	$(UV) sync $(UV_FLAGS) --locked --extra dev
	touch $@

lock:
	$(UV_BOOTSTRAP)
	$(UV) lock $(UV_FLAGS)

lock-check:
	$(UV_BOOTSTRAP)
	$(UV) lock $(UV_FLAGS) --check

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
	$(PY) -m stages.lib.tracking.runs --port $(UI_PORT)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# Tracking server for the team: runs in PostgreSQL (mlserver/pgdata), artifacts served from
# mlserver/artifacts, logins by MLflow's basic-auth app with tools/mlflow_auth.py's roles and login
# throttle (admin password in mlserver/admin_password). Needs Debian's postgresql package. Log to it with
# tracking.uri=http://HOST:PORT and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
# The values reach the shell through the environment, unexpanded ($(value)): a name is never shell code.
mlflow-server mlflow-user: export MLFLOW_SERVER_HOST = $(value SERVER_HOST)
mlflow-server mlflow-user: export MLFLOW_SERVER_PORT = $(value SERVER_PORT)
mlflow-server: setup
	$(PY) tools/mlflow_server.py --host="$$MLFLOW_SERVER_HOST" --port="$$MLFLOW_SERVER_PORT"

# A login on the running server; the password is asked for (or read from stdin). READ_ONLY=1: may read
# and create nothing; PROMOTER=1: may also move aliases (@champion) and set model-version tags.
mlflow-user: export MLFLOW_NEW_USER = $(value NAME)
mlflow-user: setup
	@test -n "$$MLFLOW_NEW_USER" || { echo "error: name the user: make mlflow-user NAME=alice [READ_ONLY=1 | PROMOTER=1]" >&2; exit 2; }
	$(PY) tools/mlflow_server.py --add-user="$$MLFLOW_NEW_USER" --host="$$MLFLOW_SERVER_HOST" --port="$$MLFLOW_SERVER_PORT" $(if $(value READ_ONLY),--read-only) $(if $(value PROMOTER),--promoter)

# The classifier over HTTP: MLflow's scoring app under uvicorn in this venv (offline), with params.yaml's serve:
# limits, of tracking.registered_model's @champion (make promote), or MODEL_URI (e.g. models:/tudui-classifier/3).
# SIGTERM or Ctrl-C stops it within serve.shutdown_s (+ 10 s at most). docs/serving.md.
serve: setup
	$(PY) -m tools.serve --port $(SERVE_PORT)$(if $(MODEL_URI), --model-uri '$(MODEL_URI)')

# The values reach the command through the environment, unexpanded ($(value)): a name is never shell code.
# NEW_DATA=1 accepts a data change, WITHIN_NOISE=1 an accuracy within seed noise of the champion's.
promote: export PROMOTE_EXP = $(value EXP)
promote: setup
	$(PY) -m tools.promote "$$PROMOTE_EXP" $(if $(value NEW_DATA),--new-data) $(if $(value WITHIN_NOISE),--within-noise)

champion: setup
	$(PY) -m tools.champion

clean-venv:
	rm -rf $(VENV)
