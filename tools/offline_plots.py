"""`dvc plots show` that works offline: Vega, Vega-Lite and vega-embed inlined into DVC's HTML template.

    python tools/offline_plots.py            # writes .dvc/tmp/plots_offline.html, points DVC at it
    python tools/offline_plots.py --registry http://127.0.0.1:4873   # another npm registry

DVC's own page loads the three libraries from a CDN, so without the internet only image plots show.
This fetches the same versions DVC links to from the npm registry (which this project's machines can
reach), checks each tarball against its pinned sha512, and writes a template with the code inlined
(~0.8 MB) and plots drawn as SVG. `dvc config --local plots.html_template` then makes every
`dvc plots show` and `dvc plots diff` use it; `make setup` runs this once per checkout.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / ".dvc/tmp/plots_offline.html"  # .dvc/tmp is git-ignored
# The versions dvc-render's page links to, with the npm registry's sha512 of each tarball.
PACKAGES = {
    "vega": ("5.20.2", "qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    "vega-lite": ("5.2.0", "Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    "vega-embed": ("6.18.2", "wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega {vega}, Vega-Lite {vega_lite}, vega-embed {vega_embed}, from the npm registry (tools/offline_plots.py) -->
{libraries}
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


class Fail(Exception):
    """Printed as one line, exit code 1."""


def fetch_package(registry: str, name: str, version: str, integrity: str, timeout_s: float) -> bytes:
    """`build/<name>.min.js` from the package's tarball, after checking the tarball's sha512."""
    url = f"{registry.rstrip('/')}/{name}/-/{name}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            tarball = response.read()
    except OSError as exc:
        raise Fail(f"cannot download {url} ({getattr(exc, 'reason', exc)})") from None
    digest = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != integrity:
        raise Fail(f"{url}: sha512 {digest} is not the pinned {integrity}")
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
            member = tar.extractfile(f"package/build/{name}.min.js")
            return member.read()
    except (tarfile.TarError, KeyError, AttributeError) as exc:
        raise Fail(f"{url} holds no package/build/{name}.min.js ({exc})") from None


def template(registry: str, timeout_s: float) -> str:
    scripts = []
    for name, (version, integrity) in PACKAGES.items():
        code = fetch_package(registry, name, version, integrity, timeout_s).decode()
        code = code.replace("</script", "<\\/script")  # the HTML parser must not end the element early
        scripts.append(f"    <script>{code}</script>")
    return PAGE.format(libraries="\n".join(scripts), refresh_tag="{refresh_tag}",
                       **{name.replace("-", "_"): version for name, (version, _) in PACKAGES.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("npm_config_registry") or "https://registry.npmjs.org"
    parser.add_argument("--registry", default=default, help=f"npm registry (default {default})")
    parser.add_argument("--out", type=Path, default=TEMPLATE)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per download")
    parser.add_argument("--no-config", action="store_true", help="only write the file, leave DVC's config alone")
    args = parser.parse_args()
    try:
        page = template(args.registry, args.timeout)
    except Fail as exc:
        sys.exit(f"error: {exc}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(page, encoding="utf8")
    os.replace(tmp, args.out)
    if not args.no_config:  # a path relative to .dvc/, in the git-ignored config.local of this checkout
        relative = os.path.relpath(args.out.resolve(), REPO / ".dvc")
        subprocess.run(["dvc", "config", "--local", "plots.html_template", relative], cwd=REPO, check=True)
    print(f"wrote {args.out} ({len(page) // 1024} KiB): dvc plots show now works offline")


if __name__ == "__main__":
    main()
