"""promote — check a trained model against the champion and make it the served model (`make promote EXP=...`).

    python -m tools.promote EXP [--new-data] [--within-noise] [--latency-requests 200]

EXP: a DVC experiment's name, an MLflow run id, or models:/tudui-classifier/VERSION. Four checks, each
printed; any that fails refuses the promotion with one line per reason, and nothing is written:
  data      the same data/prepared (dvc.lock md5) as the champion; --new-data accepts a change (the test
            sets then differ, so accuracy is shown, not compared);
  accuracy  better than the champion beyond seed noise (tools.compare's verdict over each recipe's seeds:
            the runs with the same params but `seed`); within noise is refused unless --within-noise; with
            one seed on a side there is no verdict: not lower is accepted with a warning, lower is refused;
            a former champion (a rollback) is not compared;
  onnx      the served model.onnx within export.onnx_atol of PyTorch on test images (recomputed, and as
            export.json records it), and the same bytes as the experiment's commit exported;
  latency   p99 of one-image requests to the served app within serve.latency_p99_ms.
When all pass, MLflow's alias @champion and GTO's stage prod move to it in one step, with who and when
(docs/serving.md). A promotion cut short between the two registries is finished by the next call.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from stages.lib import faults
from stages.lib.errors import PipelineError, run
from stages.lib.params import load_params
from stages.lib.tracking import champion as C
from tools.compare import BETTER, NEEDS_SEEDS, NOISE, WORSE, verdict

USAGE = ("make promote EXP=<DVC experiment | MLflow run id | models:/NAME/VERSION> "
         "(make champion shows the best challenger)")


def check_data(candidate: C.Model, champion: C.Model | None, new_data: bool) -> C.Check:
    if champion is None:
        return C.Check("data", True, f"{candidate.data_label}: the first champion, nothing to compare")
    if candidate.same_data(champion):
        return C.Check("data", True, f"the champion's data ({candidate.data_label})")
    change = f"{candidate.data_label}; the champion's {champion.data_label}"
    if new_data:
        return C.Check("data", True, f"other data ({change}): a data change, accepted by --new-data")
    return C.Check("data", False, f"trained on other data ({change}); --new-data (NEW_DATA=1) accepts a data change")


def check_accuracy(registry: C.Registry, candidate: C.Model, champion: C.Model | None, new_data: bool,
                   within_noise: bool) -> tuple[C.Check, str]:
    """(the check, a warning or "")."""
    mine = C.accuracies(registry.seeds(candidate))
    if champion is None:
        return C.Check("accuracy", True, f"test accuracy {C.mean_sd(mine)}: the first champion"), ""
    if candidate.version is not None and "promoted_at" in candidate.version.tags:
        return C.Check("accuracy", True, f"{C.mean_sd(mine)}: version {candidate.version.version} was the champion "
                                         f"(promoted {candidate.version.tags['promoted_at']}): a rollback, not compared"), ""
    theirs = C.accuracies(registry.seeds(champion))
    if not candidate.same_data(champion):
        return C.Check("accuracy", True, f"{C.mean_sd(mine)} vs the champion's {C.mean_sd(theirs)}: other test data, "
                                         "not compared"), ""
    v = verdict(mine, theirs)
    said = f"{C.mean_sd(mine)} vs the champion's {C.mean_sd(theirs)}: {v}"
    if v.label == BETTER:
        return C.Check("accuracy", True, said), ""
    if v.label == WORSE:
        return C.Check("accuracy", False, f"worse than the champion: {said}"), ""
    if v.label == NOISE:
        if within_noise:
            return C.Check("accuracy", True, f"{said}; accepted by --within-noise"), ""
        return C.Check("accuracy", False, f"not better than the champion beyond seed noise: {said}; --within-noise "
                                          "(WITHIN_NOISE=1) accepts it"), ""
    assert v.label == NEEDS_SEEDS
    if v.diff < 0:
        return C.Check("accuracy", False, f"lower than the champion's with one seed on a side, no noise estimate: "
                                          f"{said}; train seeds of it for a verdict"), ""
    return C.Check("accuracy", True, said), ("warning: accuracy not lower, but without seeds this is no verdict: "
                                             "train more seeds of both to know (make sweep ... SEEDS=3)")


def run_checks(registry: C.Registry, params, candidate: C.Model, champion: C.Model | None, args, work: Path):
    checks, warnings = [check_data(candidate, champion, args.new_data)], []
    accuracy, warning = check_accuracy(registry, candidate, champion, args.new_data, args.within_noise)
    checks.append(accuracy)
    warnings += [warning] if warning else []
    model_dir = C.download_model(registry, candidate, work / "model")
    atol = params.export.onnx_atol
    checks.append(C.recorded_onnx_check(registry, candidate, atol, work)
                  or C.onnx_check(candidate, model_dir, atol, params.export.onnx_check_images, work))
    budget = params.serve.latency_p99_ms
    p99 = C.latency_p99_ms(model_dir, params.serve, args.latency_requests)
    checks.append(C.Check("latency", p99 <= budget, f"p99 {p99:.1f} ms of {args.latency_requests} one-image requests "
                                                    f"{'<=' if p99 <= budget else '>'} serve.latency_p99_ms={budget:g}"))
    return checks, warnings


def finish(registry: C.Registry, version, pending: dict, summary: str = "") -> str:
    """Both writes of a promotion whose version carries the PENDING tag: MLflow's alias, then GTO's stage,
    then the version's record of who and when; returns the GTO version."""
    registry.set_alias(version)
    faults.at("promote", 1)  # the tests cut a promotion short here: MLflow written, GTO not
    message = (f"promoted by {pending['by']} at {pending['at']}: MLflow {registry.name} version {version.version} "
               f"(run {version.run_id})")
    gto_version = C.gto_promote(registry.name, pending["commit"], f"v{version.version}.0.0", message)
    registry.set_tags(version, {"promoted_by": pending["by"], "promoted_at": pending["at"],
                                "promoted_over": str(pending.get("over", "")), "gto_version": gto_version,
                                **({"promotion_checks": summary[:4900]} if summary else {})})
    registry.done(version)
    return gto_version


def repair(registry: C.Registry, state: C.State) -> None:
    """Finish the promotion the PENDING tag names (cut short between the two registries)."""
    version = state.pending
    pending = json.loads(version.tags[C.PENDING])
    for other in registry.versions():
        if C.PENDING in other.tags and other.version != version.version:  # superseded: only the newest is finished
            registry.done(other)
    gto_version = finish(registry, version, pending)
    print(f"repaired a promotion cut short: version {version.version} ({version.tags.get('dvc_exp_name', version.run_id)}, "
          f"promoted by {pending['by']} at {pending['at']}) is now @{C.ALIAS} in MLflow and {gto_version} is "
          f"{C.STAGE} in GTO")


def main(args) -> None:
    C.check_latency_requests(args.latency_requests)
    params = load_params()
    registry = C.Registry(params.tracking)
    state = registry.state()
    if state.gto_error:
        raise PipelineError(state.gto_error)
    repaired = state.pending is not None
    if repaired:
        repair(registry, state)
        state = registry.state()
    if not args.exp:
        if repaired:
            return
        raise PipelineError(f"name the model to promote: {USAGE}")
    candidate = registry.resolve(args.exp)
    champion = state.champion
    candidate.commit = C.commit_of(candidate.run)
    if champion is not None and champion.run_id == candidate.run_id:
        if state.agree and state.gto_commit == candidate.commit:
            print(f"{candidate.label} is already the champion: version {champion.version.version} @{C.ALIAS} in MLflow, "
                  f"{state.gto_version} {C.STAGE} in GTO; nothing to do")
            return
        print(f"{candidate.label} is the champion in MLflow (version {champion.version.version}); GTO's {C.STAGE} "
              f"is {state.gto_version or 'unset'}: making GTO agree")
        champion = None  # the same model: nothing to compare with
    elif not state.agree and (champion is not None or state.gto_version):
        print(f"note: MLflow @{C.ALIAS} ({f'version {champion.version.version}' if champion else 'unset'}) and GTO "
              f"{C.STAGE} ({state.gto_version or 'unset'}) disagree; the checks compare with MLflow's, which is what "
              "make serve serves, and this promotion makes both agree")

    print(f"candidate {candidate.label}: run {candidate.run_id}, commit {candidate.commit[:7]}, test accuracy "
          f"{candidate.accuracy}")
    if champion is not None:
        print(f"champion  {champion.label}: version {champion.version.version}, run {champion.run_id}, test accuracy "
              f"{champion.accuracy}")
    with tempfile.TemporaryDirectory(prefix="promote-") as work:
        checks, warnings = run_checks(registry, params, candidate, champion, args, Path(work))
    for check in checks:
        print(f"  {'ok' if check.ok else 'FAIL':4}  {check.name:8}  {check.detail}", flush=True)
    for warning in warnings:
        print(warning, file=sys.stderr, flush=True)
    failed = [check for check in checks if not check.ok]
    if failed:
        raise PipelineError(f"not promoted: {'; '.join(f'{c.name}: {c.detail}' for c in failed)}")

    summary = "; ".join(f"{c.name}: {c.detail}" for c in checks)
    version = registry.ensure_version(candidate, C.version_tags(candidate))
    pending = {"commit": candidate.commit, "by": C.who(), "at": C.now(),
               "over": str(champion.version.version) if champion else ""}
    registry.set_tags(version, {C.PENDING: json.dumps(pending)})
    try:
        gto_version = finish(registry, version, pending, summary)
    except PipelineError as exc:
        raise PipelineError(f"promotion half done: {exc}; version {version.version} is tagged {C.PENDING}, and the next "
                            "`make promote` (no EXP needed) finishes it once that is fixed") from None
    print(f"promoted {candidate.label}: {registry.name} version {version.version} is @{C.ALIAS} in MLflow and "
          f"{gto_version} ({candidate.commit[:7]}) is {C.STAGE} in GTO, by {pending['by']} at {pending['at']}; "
          "make serve serves it (restart a running server)")


def add_arguments(parser) -> None:
    parser.add_argument("exp", nargs="?", default="", metavar="EXP",
                        help="a DVC experiment's name, an MLflow run id or models:/NAME/VERSION")
    parser.add_argument("--new-data", action="store_true",
                        help="accept a candidate trained on other data/prepared than the champion")
    parser.add_argument("--within-noise", action="store_true",
                        help="accept a candidate whose accuracy is within seed noise of the champion's")
    parser.add_argument("--latency-requests", type=int, default=200,
                        help="one-image requests timed for the p99")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
