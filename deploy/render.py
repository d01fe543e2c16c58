"""Renders deploy/k8s overlays the way `kustomize build` does for the features they use (resources, images,
strategic-merge patches, labels), so the manifests can be validated where no kustomize binary is installed.

    python -m deploy.render deploy/k8s/overlays/gpu > gpu.yaml
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml


def render(directory: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = directory / res
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in k.get("patches", []):
        p = yaml.safe_load((directory / patch["path"]).read_text())
        for doc in docs:
            if doc["kind"] == p["kind"] and doc["metadata"]["name"] == p["metadata"]["name"]:
                merge(doc, p)
    for image in k.get("images", []):
        for doc in docs:
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    for label in k.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    return docs


def merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    """Strategic merge for what our patches touch: maps merge, lists of named items merge by name."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        elif (
            isinstance(value, list)
            and isinstance(base.get(key), list)
            and all("name" in v for v in value if isinstance(v, dict))
        ):
            by_name = {item.get("name"): item for item in base[key] if isinstance(item, dict)}
            for item in value:
                if isinstance(item, dict) and item.get("name") in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    base[key].append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


if __name__ == "__main__":
    yaml.safe_dump_all(render(Path(sys.argv[1])), sys.stdout, sort_keys=False)
