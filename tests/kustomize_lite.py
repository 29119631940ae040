"""Just enough kustomize to render deploy/k8s for validation in CI (no kustomize binary here):
resources (files and directories), configMapGenerator (files, no hash suffix), labels, and
strategic-merge patches (maps merged; lists of named items merged by name; other lists
replaced)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
            isinstance(x, dict) and "name" in x for x in base + patch):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, existing in enumerate(out):
                if existing["name"] == item["name"]:
                    out[i] = _merge(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict[str, Any]]:
    directory = Path(directory)
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = directory / res
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in kust.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in gen.get("files", [])}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for label in kust.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for patch in kust.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        for i, doc in enumerate(docs):
            if (doc["kind"], doc["metadata"]["name"]) == (body["kind"], body["metadata"]["name"]):
                docs[i] = _merge(doc, body)
    return docs


def referenced_files(directory: Path) -> list[Path]:
    """Every file a kustomization names, recursively."""
    kust = yaml.safe_load((Path(directory) / "kustomization.yaml").read_text())
    out = [Path(directory) / "kustomization.yaml"]
    for res in kust.get("resources", []):
        path = Path(directory) / res
        out += referenced_files(path) if path.is_dir() else [path]
    out += [Path(directory) / f for g in kust.get("configMapGenerator", []) for f in g.get("files", [])]
    out += [Path(directory) / p["path"] for p in kust.get("patches", [])]
    return out
