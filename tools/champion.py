"""champion — the served model and the best challenger of the last sweep, side by side (`make champion`).

    python -m tools.champion [--latency-requests 200]

Reads both registries: MLflow's @champion (what `make serve` serves) and GTO's prod (git tags), and flags
any disagreement between them, or a promotion cut short (`make promote` finishes it). The challenger is
the best recipe (params but the seed) of the last sweep, the DVC experiments on the newest experiments'
baseline commit, by mean test accuracy over its seeds; the run shown is its best seed, the one to promote.
Accuracy is mean ± sd over each recipe's seeds; latency is the p99 of one-image requests to the served
app, measured now on this machine, as `make promote` measures it.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from stages.lib.errors import PipelineError, run
from stages.lib.params import load_params
from stages.lib.tracking import champion as C
from tools.compare import verdict


def last_sweep(registry: C.Registry) -> list:
    """The runs of the newest DVC experiments' baseline commit (all runs when none is an experiment)."""
    runs = registry.runs()
    baselines = [run.data.tags.get("dvc_exp_baseline_rev") for run in runs if run.data.tags.get("dvc_exp_baseline_rev")]
    return [run for run in runs if run.data.tags.get("dvc_exp_baseline_rev") == baselines[0]] if baselines else runs


def best_challenger(registry: C.Registry, champion: C.Model | None) -> tuple[C.Model | None, list]:
    """(the best seed of the best recipe in the last sweep that is not the champion's, that recipe's runs)."""
    groups: dict = {}
    champion_key = C.recipe(champion.run.data.params) if champion else None
    for run in last_sweep(registry):
        key = C.recipe(run.data.params)
        if key != champion_key:
            groups.setdefault(repr(sorted(key.items())), []).append(run)
    if not groups:
        return None, []
    runs = max(groups.values(), key=lambda g: (statistics.fmean(C.accuracies(g)), len(g)))
    best = max(runs, key=lambda run: run.data.metrics["test_accuracy"])
    version = next((v for v in registry.versions() if v.run_id == best.info.run_id), None)
    model = C.Model(best, registry.logged_model_uri(best), version)
    try:
        model.commit = C.commit_of(best)
    except PipelineError:
        pass  # shown as data/prepared only
    return model, runs


def latency(registry: C.Registry, model: C.Model, serve, requests: int) -> str:
    with tempfile.TemporaryDirectory(prefix="champion-") as work:
        try:
            return f"{C.latency_p99_ms(C.download_model(registry, model, Path(work)), serve, requests):.1f} ms"
        except PipelineError as exc:
            return f"not measured: {exc}"


def differences(a: dict, b: dict) -> str:
    keys = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
    return ", ".join(f"{key}={b.get(key, '-')}" for key in keys) or "the same params (other seeds)"


def main(args) -> None:
    C.check_latency_requests(args.latency_requests)
    params = load_params()
    registry = C.Registry(params.tracking)
    state = registry.state()
    champion = state.champion
    challenger, challenger_runs = best_challenger(registry, champion)
    print(f"{registry.name} in {registry.uri} and GTO (git tags of {C.project_root()})")
    rows = [("", "champion", "challenger (best of the last sweep)")]
    models = (champion, challenger)

    def cells(fn, missing="-"):
        return [fn(model) if model is not None else missing for model in models]

    def gto_of(model):
        if model is champion and state.gto_version:
            same = model.version.tags.get("git_commit") == state.gto_commit
            return f"{state.gto_version} {C.STAGE} ({state.gto_commit[:7]})" + ("" if same else " DISAGREES")
        return "-"

    champion_runs = registry.seeds(champion) if champion else []
    rows += [
        ("experiment", *cells(lambda m: m.label, "none: make promote EXP=...")),
        ("run", *cells(lambda m: m.run_id)),
        ("MLflow", *cells(lambda m: f"version {m.version.version}" + (f" @{C.ALIAS}" if m is champion else "")
                          if m.version is not None else "not registered")),
        ("GTO", *cells(gto_of)),
        ("recipe", *cells(lambda m: "" if m is champion else differences(
            C.recipe(champion.run.data.params) if champion else {}, C.recipe(m.run.data.params)))),
        ("accuracy", *cells(lambda m: C.mean_sd(C.accuracies(champion_runs if m is champion else challenger_runs)))),
        ("this run", *cells(lambda m: f"{m.accuracy:.4f} (seed {m.run.data.params.get('seed', '?')})")),
        ("p99 latency", *cells(lambda m: latency(registry, m, params.serve, args.latency_requests))),
        ("data", *cells(lambda m: m.data_label)),
        ("promoted", *cells(lambda m: f"by {m.version.tags.get('promoted_by')} at {m.version.tags.get('promoted_at')}"
                            if m.version is not None and "promoted_at" in m.version.tags else "-")),
    ]
    width = max(len(row[1]) for row in rows) + 2
    for row in rows:
        print(f"  {row[0]:12} {row[1]:{width}} {row[2]}".rstrip())
    print(f"  latency budget: serve.latency_p99_ms={params.serve.latency_p99_ms:g}")
    if champion and challenger:
        same_data = challenger.same_data(champion)
        v = verdict(C.accuracies(challenger_runs), C.accuracies(champion_runs))
        print(f"challenger vs champion: {v}" if same_data else "challenger vs champion: other data, not compared")

    problems = []
    if state.gto_error:
        problems.append(state.gto_error)
    if state.pending is not None:
        problems.append(f"a promotion was cut short: version {state.pending.version} is tagged {C.PENDING}; "
                        "`make promote` (no EXP needed) finishes it")
    elif champion is not None and not state.gto_version:
        problems.append(f"MLflow @{C.ALIAS} is version {champion.version.version} but GTO has nothing in {C.STAGE}")
    elif champion is None and state.gto_version:
        problems.append(f"GTO {C.STAGE} is {state.gto_version} ({state.gto_commit[:7]}) but MLflow has no @{C.ALIAS}")
    elif champion is not None and champion.version.tags.get("git_commit") != state.gto_commit:
        problems.append(f"MLflow @{C.ALIAS} is version {champion.version.version} (commit "
                        f"{champion.version.tags.get('git_commit', '?')[:7]}) but GTO {C.STAGE} is {state.gto_version} "
                        f"(commit {state.gto_commit[:7]})")
    for problem in problems:
        print(f"DISAGREE: {problem}")
    if champion is not None and not problems:
        print(f"agree: MLflow @{C.ALIAS} = version {champion.version.version} = GTO {state.gto_version} {C.STAGE} "
              f"= commit {state.gto_commit[:7]}")
    if problems and champion is not None and state.pending is None:
        print(f"  make promote EXP=models:/{registry.name}/{champion.version.version} makes GTO agree with MLflow")
    if challenger is not None:
        print(f"next: make promote EXP={challenger.label}")


def add_arguments(parser) -> None:
    parser.add_argument("--latency-requests", type=int, default=200, help="one-image requests timed per model")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
