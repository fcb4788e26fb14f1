"""Render deploy/k8s/ from the charts with their default values: `make manifests` (a test keeps them in sync).

Each output file holds the objects of one component, as deploy/k8s did before the charts: agent.yaml and
aadproxy.yaml from clusterconnect-agent (templates/agent/, templates/aadproxy/), relay.yaml from
clusterconnect-relay. deploy/k8s/namespace.yaml is not rendered: a chart does not own its namespace.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RELEASE = "clusterconnect"

# chart -> (namespace, {template folder or "": output file})
CHARTS = {
    "clusterconnect-agent": ("clusterconnect", {"agent": "agent.yaml", "aadproxy": "aadproxy.yaml"}),
    "clusterconnect-relay": ("clusterconnect-relay", {"": "relay.yaml"}),
}
SOURCE = "# Source: "


def helm_template(helm: Path, chart: str, namespace: str) -> str:
    return subprocess.run(
        [str(helm), "template", RELEASE, str(HERE / chart), "--namespace", namespace],
        check=True, capture_output=True, text=True,
    ).stdout


def split_by_folder(rendered: str, chart: str) -> dict[str, list[str]]:
    """Documents of `helm template` output grouped by their template's folder under templates/."""
    groups: dict[str, list[str]] = {}
    for doc in rendered.split("---\n"):
        if not doc.strip():
            continue
        first, _, _ = doc.partition("\n")
        if not first.startswith(SOURCE):
            raise SystemExit(f"{chart}: a rendered document without its {SOURCE!r} line: {first!r}")
        template = Path(first.removeprefix(SOURCE)).relative_to(Path(chart, "templates"))
        folder = template.parent.as_posix() if template.parent != Path(".") else ""
        groups.setdefault(folder, []).append(doc.rstrip("\n") + "\n")
    return groups


def render(helm: Path) -> dict[str, str]:
    """Output file name -> its text."""
    files: dict[str, str] = {}
    for chart, (namespace, outputs) in CHARTS.items():
        groups = split_by_folder(helm_template(helm, chart, namespace), chart)
        if set(groups) != set(outputs):
            raise SystemExit(f"{chart}: template folders {sorted(groups)}, expected {sorted(outputs)}")
        for folder, name in outputs.items():
            header = (f"# Rendered from deploy/helm/{chart} with its default values (release {RELEASE}, namespace"
                      f" {namespace}) by `make manifests`.\n# Do not edit: change the chart and render again.\n")
            files[name] = header + "---\n".join(groups[folder])
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--helm", type=Path, default=ROOT / "tools/helm/bin/helm", help="helm binary (`make helm`)")
    parser.add_argument("--out", type=Path, default=ROOT / "deploy/k8s", help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render(args.helm).items():
        (args.out / name).write_text(text)


if __name__ == "__main__":
    main()
