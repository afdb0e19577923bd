"""Write ``offline.html``, the page template of ``dvc plots show`` that draws with no network.

dvc-render's own page loads vega, vega-lite and vega-embed from a CDN, so its plots stay blank
offline. This template inlines the copies ``make setup`` installs from the npm registry
(``package.json`` beside this file) and leaves out dvc-render's ``{scripts}`` placeholder,
which is where the CDN tags would go. ``.dvc/config`` names the template (``[plots]
html_template``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The browser builds, in load order (vega-embed needs the other two).
LIBRARIES = (
    "vega/build/vega.min.js",
    "vega-lite/build/vega-lite.min.js",
    "vega-embed/build/vega-embed.min.js",
)
#: dvc-render fills ``{plot_divs}`` (required) and ``{refresh_tag}``.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC plots</title>
{scripts}
    <style>
        table {{ border-spacing: 15px; }}
        img {{ max-width: 100%; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def inline_script(path: Path) -> str:
    """A ``<script>`` element holding ``path``'s code (its own name as a comment)."""
    code = path.read_text(encoding="utf8")
    if "</script" in code.lower():
        raise ValueError(f"{path} contains '</script' and cannot be inlined as is")
    return f"<script>/* {path.parent.parent.name} */\n{code}\n</script>"


def build(modules: Path, out: Path) -> Path:
    """Write the template with the libraries of the ``node_modules`` folder ``modules``."""
    missing = [name for name in LIBRARIES if not (modules / name).is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)} under {modules}: run `make setup`")
    scripts = "\n".join(inline_script(modules / name) for name in LIBRARIES)
    out.write_text(PAGE.format(scripts=scripts), encoding="utf8")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modules", type=Path, default=HERE / "node_modules")
    parser.add_argument("--out", type=Path, default=HERE / "offline.html")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.modules, args.out)}")


if __name__ == "__main__":
    main()
