#!/usr/bin/env python3
"""Render and lint charts/infermesh with the real Helm library (the pinned PyPI package
helm-python-sdk: Helm v4's Go SDK behind a C ABI, no helm binary), offline.

    python scripts/helm.py render [VALUES.yaml ...]         multi-document YAML, like `helm template`
    python scripts/helm.py render --json [VALUES.yaml ...]  {"objects": [{"source", "yaml"}], "notes"}
    python scripts/helm.py lint [VALUES.yaml ...]           `helm lint --strict`; exit 1 on a warning
    python scripts/helm.py render --skip-schema-validation  without values.schema.json

Run it with the project venv's Python (scripts/setup.sh installs the package there):
    ~/.cache/infermesh/venv/bin/python scripts/helm.py render

Values files merge left to right as `helm -f a.yaml -f b.yaml` does (maps merge, anything else
is replaced, null removes a default). The release is `infermesh` in namespace `infermesh`
unless --release/--namespace say otherwise. Values that break values.schema.json or a `fail`
in a template exit 1 with Helm's message on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parent.parent / "charts" / "infermesh"
# The Kubernetes version lint checks API versions against (k8s-openapi's feature v1_33).
KUBE_VERSION = "v1.33.0"

try:
    import helm_python as helm
except ImportError:
    sys.stderr.write(
        f"helm.py: the Helm SDK (helm-python-sdk) is not installed for {sys.executable}; "
        "run scripts/setup.sh\n"
    )
    sys.exit(3)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merges `over` into `base` the way Helm merges values files."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in files:
        parsed = helm.values_from_yaml(Path(f).read_text()) or {}
        values = merge(values, parsed)
    return values


# How Helm itself splits a template's output into documents (releaseutil.SplitManifests).
SEPARATOR = re.compile(r"(?:^|\n)---[ \t]*(?:\n|$)")


def documents(text: str) -> list[str]:
    docs = []
    for doc in SEPARATOR.split(text):
        # A document of only comments and blank lines is no object.
        meaningful = [
            line for line in doc.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
        if meaningful:
            docs.append(doc.strip("\n") + "\n")
    return docs


def render(
    values: dict[str, Any], release: str, namespace: str, chart_dir: Path
) -> tuple[list[dict[str, str]], str]:
    """Every object the chart installs, CRDs first, then templates in file order."""
    objects: list[dict[str, str]] = []
    notes = ""
    with helm.Chart.load(chart_dir) as chart:
        for crd in chart.crds:
            for doc in documents(crd["data"]):
                objects.append({"source": f"{chart.name}/{crd['name']}", "yaml": doc})
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            notes = rendered[path]
            continue
        if Path(path).name.startswith("_"):
            continue
        for doc in documents(rendered[path]):
            objects.append({"source": path, "yaml": doc})
    return objects, notes


def lint(values: dict[str, Any], namespace: str) -> int:
    report = helm.lint(CHART, values, strict=True, namespace=namespace, kube_version=KUBE_VERSION)
    names = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    worst = 0
    for m in report.get("messages", []):
        sev = int(m.get("severity", 0))
        worst = max(worst, sev)
        print(f"[{names.get(sev, sev)}] {m.get('path')}: {m.get('error')}")
    print(f"{report.get('total_charts_linted', 0)} chart(s) linted")
    # INFO (e.g. "icon is recommended") is advice; a warning or an error fails, as with --strict.
    return 1 if worst >= 2 or report.get("errors") else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("render", "lint"):
        s = sub.add_parser(name)
        s.add_argument("values", nargs="*", help="values files, merged left to right")
        s.add_argument("--release", default="infermesh")
        s.add_argument("--namespace", default="infermesh")
        if name == "render":
            s.add_argument("--json", action="store_true", help="objects and NOTES as JSON")
            s.add_argument(
                "--skip-schema-validation",
                action="store_true",
                help="render a copy of the chart without values.schema.json, as "
                "`helm install --skip-schema-validation` does (shows the templates' own `fail`s)",
            )
    args = p.parse_args()
    try:
        values = load_values(args.values)
        if args.command == "lint":
            return lint(values, args.namespace)
        if args.skip_schema_validation:
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / CHART.name
                shutil.copytree(CHART, copy, ignore=shutil.ignore_patterns("values.schema.json"))
                objects, notes = render(values, args.release, args.namespace, copy)
        else:
            objects, notes = render(values, args.release, args.namespace, CHART)
    except helm.HelmError as e:
        sys.stderr.write(f"helm: {type(e).__name__}: {e}\n")
        return 1
    if args.json:
        json.dump({"objects": objects, "notes": notes}, sys.stdout)
        sys.stdout.write("\n")
    else:
        for o in objects:
            sys.stdout.write(f"---\n# Source: {o['source']}\n{o['yaml']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
