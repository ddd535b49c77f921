"""The plots of dvc.yaml without the internet, drawn with vl-convert (Vega, Vega-Lite and vega-embed in a wheel).

    python tools/offline_plots.py                  # DVC's page template with the libraries inlined; points DVC at it
    python tools/offline_plots.py --render DIR [REV ...]   # each plot as DIR/<plot>.svg and .png, DIR/index.html

DVC's own page loads Vega from a CDN, so without the internet only image plots show. vl-convert-python
carries Vega, Vega-Lite and vega-embed compiled into its wheel: the first form inlines its JavaScript bundle
(~0.9 MB) into DVC's HTML template, and `dvc config --local plots.html_template` makes every `dvc plots
show` and `dvc plots diff` use it (interactive, drawn by the browser). The second renders the Vega-Lite
specs of `dvc plots show --json` (`dvc plots diff --json REV ...` with revisions), data included, to SVG
and PNG files in this process, and writes a page of the SVGs that runs no script: no browser is needed to
make them, none to fetch anything to show them.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / ".dvc/tmp/plots_offline.html"  # .dvc/tmp is git-ignored
VL_VERSION = "5.21"  # the newest Vega-Lite 5 in vl-convert: DVC writes Vega-Lite v5 specs
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {versions}, from vl-convert-python's wheel (tools/offline_plots.py) -->
    <script>{bundle}</script>
    <script>
        // DVC calls vegaEmbed(element, spec): draw SVG, which stays sharp when zoomed and can be inspected.
        window.vegaEmbed = (embed => (element, spec, options) => embed(element, spec, {{renderer: "svg", ...options}}))(window.vegaEmbed);
    </script>
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""
STATIC_PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>{title}</title>
    <!-- drawn by {versions} from vl-convert-python (tools/offline_plots.py --render): no script, nothing fetched -->
    <style>
        body {{ font-family: sans-serif; }}
        figure {{ display: inline-block; margin: 15px; vertical-align: top; }}
    </style>
</head>
<body>
{figures}
</body>
</html>
"""


class Fail(Exception):
    """Printed as one line, exit code 1."""


def vl_convert():
    try:
        import vl_convert
    except ImportError:
        raise Fail("vl-convert-python is not installed in this environment (make setup installs uv.lock)") from None
    return vl_convert


def versions() -> str:
    vlc = vl_convert()
    return f"Vega {vlc.get_vega_version()}, Vega-Lite {VL_VERSION}, vega-embed {vlc.get_vega_embed_version()}"


def template() -> str:
    """DVC's page template ({refresh_tag} and {plot_divs} left for DVC) with vl-convert's bundle inlined."""
    bundle = vl_convert().javascript_bundle(vl_version=VL_VERSION)
    bundle = bundle.replace("</script", "<\\/script")  # the HTML parser must not end the element early
    return PAGE.format(bundle=bundle, versions=versions(), refresh_tag="{refresh_tag}")


def shown_plots(revisions: list[str], cwd: Path) -> dict:
    """{plot id: [Vega-Lite spec, ...]} from `dvc plots show --json` (`dvc plots diff --json REV ...`)."""
    command = ["dvc", "plots", "diff", *revisions, "--json"] if revisions else ["dvc", "plots", "show", "--json"]
    result = subprocess.run([sys.executable, "-m", *command], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise Fail(f"{' '.join(command)} failed: {' '.join(result.stderr.split())[-500:]}")
    shown = json.loads(result.stdout)
    for error in shown.get("errors") or []:
        print(f"note: dvc plots: {error}", file=sys.stderr)
    return {name: [r["content"] for r in renderers if r.get("type") == "vega"]
            for name, renderers in (shown.get("data") or {}).items()}


def render(out: Path, revisions: list[str] = (), cwd: Path | None = None) -> list[Path]:
    """Every plot as out/<plot>.svg and out/<plot>.png (2× scale), and out/index.html showing the SVGs."""
    vlc = vl_convert()
    plots = {name: specs for name, specs in shown_plots(list(revisions), cwd or Path.cwd()).items() if specs}
    if not plots:
        raise Fail("dvc plots shows no Vega plot here (run the pipeline first: dvc repro)")
    out.mkdir(parents=True, exist_ok=True)
    figures, written = [], []
    for name, specs in plots.items():
        for i, spec in enumerate(specs):
            stem = re.sub(r"[^\w.-]", "_", name) + (f"-{i}" if i else "")
            svg = vlc.vegalite_to_svg(spec, vl_version=VL_VERSION)
            (out / f"{stem}.svg").write_text(svg, encoding="utf8")
            (out / f"{stem}.png").write_bytes(vlc.vegalite_to_png(spec, vl_version=VL_VERSION, scale=2))
            written += [out / f"{stem}.svg", out / f"{stem}.png"]
            figures.append(f'<figure id="{html.escape(stem)}">{svg}<figcaption><a href="{html.escape(stem)}.svg">SVG'
                           f'</a> <a href="{html.escape(stem)}.png">PNG</a></figcaption></figure>')
    title = "Plots: " + (", ".join(revisions) if revisions else "workspace")
    page = STATIC_PAGE.format(title=html.escape(title), versions=versions(), figures="\n".join(figures))
    (out / "index.html").write_text(page, encoding="utf8")
    return [out / "index.html", *written]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", type=Path, metavar="DIR", help="draw every plot into DIR (SVG, PNG, index.html)")
    parser.add_argument("revisions", nargs="*", help="with --render: git revisions or experiments to compare")
    parser.add_argument("--out", type=Path, default=TEMPLATE, help=f"the template's path (default {TEMPLATE})")
    parser.add_argument("--no-config", action="store_true", help="only write the template, leave DVC's config alone")
    args = parser.parse_args()
    if args.revisions and not args.render:
        parser.error("revisions go with --render DIR")
    try:
        if args.render:
            files = render(args.render, args.revisions)
            print(f"wrote {files[0]} and {len(files) - 1} SVG and PNG files")
            return
        page = template()
    except Fail as exc:
        sys.exit(f"error: {exc}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(page, encoding="utf8")
    os.replace(tmp, args.out)
    if not args.no_config:  # a path relative to .dvc/, in the git-ignored config.local of this checkout
        relative = os.path.relpath(args.out.resolve(), REPO / ".dvc")
        subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", relative], cwd=REPO,
                       check=True)
    print(f"wrote {args.out} ({len(page) // 1024} KiB): dvc plots show now works offline")


if __name__ == "__main__":
    main()
