"""flips — which test images two experiments classify differently, as counts and an offline page.

    python -m tools.flips A B [--out reports/flips-A-vs-B.html]

A and B: DVC experiment names, git revisions, or `workspace`. Each one's metrics/predictions.csv (written
by evaluate) is read from git; both must have evaluated the same data/prepared (dvc.lock) as the one
here, whose test images the page shows. Counts: fixed (A wrong, B right), broken (A right, B wrong),
both wrong but changed, unchanged. The table also goes to B's MLflow run (log_table) when tracking is on.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import subprocess
from pathlib import Path

from stages.lib.errors import PipelineError, run

PREDICTIONS, LOCK = "metrics/predictions.csv", "dvc.lock"
KINDS = ("fixed", "broken", "both wrong, changed")


def exp_ref(name: str) -> str | None:
    """The ref of DVC experiment `name`, preferring one whose baseline is HEAD."""
    refs = [line for line in git("for-each-ref", "--format=%(refname)", "refs/exps/").splitlines()
            if line.rsplit("/", 1)[-1] == name and "/exec/" not in line]
    head = git("rev-parse", "HEAD", check=False).strip()
    on_head = [ref for ref in refs if ref.split("/")[2] + ref.split("/")[3] == head]
    if len(on_head or refs) > 1:
        raise PipelineError(f"{name} names experiments of {len(refs)} commits: give its commit (dvc exp show --all-commits)")
    return (on_head or refs or [None])[0]


def git(*args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise PipelineError(f"git {' '.join(args)}: {' '.join(result.stderr.split())[:300]}")
    return result.stdout


def resolve(rev: str) -> str | None:
    """None for the workspace, else a git object name (an experiment's ref or a commit)."""
    if rev == "workspace":
        return None
    ref = exp_ref(rev)
    if ref:
        return ref
    if subprocess.run(["git", "rev-parse", "--verify", "-q", f"{rev}^{{commit}}"], capture_output=True).returncode:
        raise PipelineError(f"{rev} is neither an experiment (dvc exp list) nor a git revision nor 'workspace'")
    return rev


def read_at(rev: str, ref: str | None, path: str) -> str:
    if ref is None:
        if not Path(path).is_file():
            raise PipelineError(f"{path} not found in the workspace: run evaluate (dvc repro evaluate)")
        return Path(path).read_text()
    shown = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise PipelineError(f"{rev} has no {path} (made before evaluate wrote it? rerun it)")
    return shown.stdout


def prepared_md5(lock_text: str) -> str:
    from ruamel.yaml import YAML

    try:
        for out in YAML(typ="safe", pure=True).load(lock_text)["stages"]["preprocess"]["outs"]:
            if out["path"] == "data/prepared":
                return out["md5"]
    except (KeyError, TypeError):
        pass
    return ""


def local_prepared_md5() -> str:
    """DVC's md5 of the data/prepared folder here, as dvc.lock would record it."""
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build

    if not Path("data/prepared").is_dir():
        raise PipelineError("data/prepared is missing here: dvc checkout (or dvc repro preprocess)")
    repo = Repo(".")
    try:
        return build(repo.cache.local, "data/prepared", repo.fs, "md5", ignore=repo.dvcignore, dry_run=True)[2].hash_info.value
    finally:
        repo.close()


def flips(a: list[dict], b: list[dict]) -> tuple[dict, list[dict]]:
    """(counts per kind, the changed rows) of two predictions files' rows, image by image."""
    if len(a) != len(b) or any(x["index"] != y["index"] or x["actual"] != y["actual"] for x, y in zip(a, b)):
        raise PipelineError("the two predictions files do not list the same test images")
    counts, changed = dict.fromkeys((*KINDS, "unchanged"), 0), []
    for x, y in zip(a, b):
        right_a, right_b = x["predicted"] == x["actual"], y["predicted"] == y["actual"]
        kind = ("unchanged" if x["predicted"] == y["predicted"] else "fixed" if right_b
                else "broken" if right_a else "both wrong, changed")
        counts[kind] += 1
        if kind != "unchanged":
            changed.append({"index": int(x["index"]), "actual": x["actual"], "kind": kind,
                            "a_predicted": x["predicted"], "a_probability": float(x["probability"]),
                            "b_predicted": y["predicted"], "b_probability": float(y["probability"])})
    return counts, changed


def png_base64(image) -> str:
    """A uint8 C×H×W tensor as a base64 PNG."""
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table.counts td,table.counts th{padding:.2em .8em;text-align:right}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:150px;border:1px solid #ccc;border-radius:4px;padding:6px;font-size:12px}
.card img{width:112px;height:112px;image-rendering:pixelated;display:block;margin:0 auto 4px}
.fixed{border-color:#2a2;background:#efe}.broken{border-color:#c22;background:#fee}.right{color:#070}.wrong{color:#b00}"""


def page(a: str, b: str, counts: dict, changed: list[dict], images) -> str:
    def line(who: str, predicted: str, probability: float, actual: str) -> str:
        return (f'<div class="{"right" if predicted == actual else "wrong"}">{who}: {html.escape(predicted)} '
                f"{probability:.0%}</div>")

    cards = "".join(
        f'<div class="card {row["kind"].split(",")[0].replace(" ", "-")}" title="{row["kind"]}">'
        f'<img alt="test image {row["index"]}" src="data:image/png;base64,{png_base64(images[row["index"]])}">'
        f'<div>#{row["index"]} <b>{html.escape(row["actual"])}</b></div>'
        f'{line("A", row["a_predicted"], row["a_probability"], row["actual"])}'
        f'{line("B", row["b_predicted"], row["b_probability"], row["actual"])}</div>'
        for row in sorted(changed, key=lambda r: (KINDS.index(r["kind"]), r["index"])))
    total = sum(counts.values())
    head = "".join(f"<tr><th>{k}</th><td>{n}</td></tr>" for k, n in counts.items())
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>flips: {html.escape(a)} → {html.escape(b)}</title>'
            f"<style>{STYLE}</style></head><body><h1>Test images {html.escape(a)} (A) and {html.escape(b)} (B) "
            f"classify differently</h1><p>{total} test images; each card: the true label, then each one's "
            f"prediction and its probability (green: right, red: wrong).</p><table class=counts>{head}</table>"
            f'<div class="grid">{cards}</div></body></html>\n')


def log_to_b(b: str, ref: str | None, changed: list[dict]) -> str:
    """The changed images as a table in B's MLflow run (by its dvc_exp_name tag, or the workspace's run file)."""
    import json

    from stages.lib.params import load_params
    from tools.compare import mlflow_client, runs_by_exp_name

    try:
        tracking = load_params().tracking
        client = mlflow_client(tracking)
        if client is None:
            return "MLflow: tracking.enabled is false, nothing logged"
        if ref is None:
            run_id = json.loads(Path("models/mlflow_run.json").read_text()).get("run_id")
        else:
            experiment = client.get_experiment_by_name(tracking.experiment)
            found = runs_by_exp_name(client, experiment.experiment_id, {b}) if experiment else {}
            run_id = found[b].info.run_id if b in found else None
        if not run_id:
            return f"MLflow: no run of {b} found (tag dvc_exp_name), nothing logged"
        columns = ("index", "actual", "kind", "a_predicted", "a_probability", "b_predicted", "b_probability")
        client.log_table(run_id, data={c: [row[c] for row in changed] for c in columns}, artifact_file="flips/flips.json")
        return f"MLflow: table flips/flips.json in {b}'s run {run_id}"
    except Exception as exc:
        from stages.lib.errors import one_line

        return f"warning: MLflow not updated: {one_line(exc)}"


def add_arguments(parser) -> None:
    parser.add_argument("a", help="experiment name, git revision or 'workspace' (the before)")
    parser.add_argument("b", help="experiment name, git revision or 'workspace' (the after)")
    parser.add_argument("--out", type=Path, help="the page (default: reports/flips-A-vs-B.html)")
    parser.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")


def main(args) -> None:
    refs = {rev: resolve(rev) for rev in (args.a, args.b)}
    md5 = {rev: prepared_md5(read_at(rev, ref, LOCK)) for rev, ref in refs.items()}
    if md5[args.a] != md5[args.b]:
        raise PipelineError(f"{args.a} and {args.b} were evaluated on different data/prepared "
                            f"({md5[args.a] or 'none'} vs {md5[args.b] or 'none'}): their test images differ")
    if local_prepared_md5() != md5[args.a]:
        raise PipelineError(f"data/prepared here is not the one {args.a} and {args.b} used ({md5[args.a]}): "
                            f"`dvc exp apply {args.a}` (or git checkout + dvc checkout) brings it")
    rows = {rev: list(csv.DictReader(io.StringIO(read_at(rev, ref, PREDICTIONS)))) for rev, ref in refs.items()}
    counts, changed = flips(rows[args.a], rows[args.b])
    for kind, n in counts.items():
        print(f"{kind:>20}: {n}")
    from stages.lib.prepared import load_split

    images, _ = load_split("test")
    safe = lambda s: "".join(c if c.isalnum() or c in "._-" else "_" for c in s)  # noqa: E731
    out = args.out or Path("reports") / f"flips-{safe(args.a)}-vs-{safe(args.b)}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(args.a, args.b, counts, changed, images))
    print(f"wrote {out} ({len(changed)} images)")
    if not args.no_mlflow:
        print(log_to_b(args.b, refs[args.b], changed))


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
