"""Rewrite the figures in README.md and docs/*.md from the results files they come from.

A figure in the docs is a marked region whose content this script writes:

    <!-- numbers: metrics/eval.json test_accuracy .2% -->86.81%<!-- /numbers -->
    <!-- numbers: benchmarks/results/cpu-avx2-2core/results.md table 1 -->
    | route | ... |
    <!-- /numbers -->

Specs: `FILE.json KEY FORMAT` (KEY dotted, list items by index; FORMAT a Python format spec, `%` for
percent), `FILE.md table N` (the file's N-th markdown table, verbatim) and `FILE.md line N` (its N-th
line). `make docs` rewrites every region; `--check` changes nothing, lists the regions that differ from
their files and exits 2 (tests/test_docs.py runs it), so a number in the docs is never typed by hand.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from stages.lib.errors import PipelineError, run

ROOT = Path(__file__).resolve().parents[1]
REGION = re.compile(r"(?<!`)<!-- numbers: (?P<spec>[^>]*?) -->(?P<body>.*?)<!-- /numbers -->", re.S)


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def tables(text: str) -> list[str]:
    found, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append("\n".join(current))
            current = []
    if current:
        found.append("\n".join(current))
    return found


def value(spec: str, root: Path = ROOT) -> str:
    """What the region with `spec` holds, read from its file."""
    parts = spec.split()
    if len(parts) != 3:
        raise PipelineError(f"numbers: {spec!r}: expected FILE KEY FORMAT, FILE.md table N or FILE.md line N")
    name, key, fmt = parts
    path = root / name
    if not path.is_file():
        raise PipelineError(f"numbers: {name} not found (named by <!-- numbers: {spec} -->)")
    text = path.read_text()
    if name.endswith(".md"):
        if key not in ("table", "line") or not fmt.isdigit() or int(fmt) < 1:
            raise PipelineError(f"numbers: {spec!r}: a markdown file takes `table N` or `line N`")
        items = tables(text) if key == "table" else text.splitlines()
        if int(fmt) > len(items):
            raise PipelineError(f"numbers: {name} has no {key} {fmt}")
        item = items[int(fmt) - 1]
        return f"\n{item}\n" if key == "table" else item
    data = json.loads(text)
    for step in key.split("."):
        try:
            data = data[int(step)] if isinstance(data, list) else data[step]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PipelineError(f"numbers: {name} has no {key}") from None
    return format(data, fmt)


def rewrite(text: str, root: Path = ROOT) -> str:
    return REGION.sub(lambda m: f"<!-- numbers: {m['spec']} -->{value(m['spec'], root)}<!-- /numbers -->", text)


def stale(root: Path = ROOT) -> list[str]:
    """`page: spec` for every region whose content differs from its file."""
    out = []
    for page in pages(root):
        for m in REGION.finditer(page.read_text()):
            if m["body"] != value(m["spec"], root):
                out.append(f"{page.relative_to(root)}: {m['spec']}")
    return out


def main(args) -> None:
    if args.check:
        differ = stale()
        if differ:
            raise PipelineError("numbers differ from their files (run `make docs`): " + "; ".join(differ))
        print("every figure matches its file")
        return
    for page in pages():
        text = page.read_text()
        new = rewrite(text)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(ROOT)}")


def add_arguments(parser) -> None:
    parser.add_argument("--check", action="store_true", help="change nothing; exit 2 when a figure differs")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
