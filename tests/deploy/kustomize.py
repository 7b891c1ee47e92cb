"""A pure-Python render of the part of kustomize that deploy/k8s uses, for machines without a kustomize binary.

`kubectl kustomize` (kustomize v5) is the reference: tests/deploy renders every overlay with it where it is
installed and checks that this render gives the same objects. Supported, and refused otherwise: `resources` (files
and directories), `components`, `namespace`, `labels` (with `includeSelectors: false`) and `images`. A directory
resource is a kustomization rendered on its own; a component's objects join the objects of the kustomization that
lists it; then that kustomization's namespace, labels and images apply to all of them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "labels", "images"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding", "IngressClass"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def render(directory: str | Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` prints (in no particular order)."""
    return _build(Path(directory), [])


def _build(directory: Path, objects: list[dict]) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - FIELDS
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: {sorted(unknown)} is beyond this render; use kustomize")
    objects = list(objects)
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += _build(path, [])
        else:
            objects += [copy.deepcopy(d) for d in yaml.safe_load_all(path.read_text()) if d]
    for component in kustomization.get("components", []):
        objects = _build(directory / component, objects)
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
    for entry in kustomization.get("labels", []):
        if entry.get("includeSelectors", False):
            raise ValueError("labels with includeSelectors are beyond this render; use kustomize")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates") and obj["kind"] in WORKLOADS:
                obj["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
                for claim in obj["spec"].get("volumeClaimTemplates", []):
                    claim.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                if _image_name(container["image"]) == image["name"]:
                    name = image.get("newName", image["name"])
                    tag = image.get("newTag", _image_tag(container["image"]))
                    container["image"] = f"{name}:{tag}" if tag else name
    return objects


def _containers(obj: dict) -> list[dict]:
    if obj["kind"] not in WORKLOADS:
        return []
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec.get("containers", [])


def _image_name(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return image[: len(image) - len(last)] + last.split(":", 1)[0].split("@", 1)[0]


def _image_tag(image: str) -> str | None:
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None
