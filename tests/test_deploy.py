"""The shipped Kubernetes manifests: they parse, kustomize finds every file, the gateway's configuration is valid
for alignloop's settings, and the vLLM pods get the same LoRA set-up as the locally started server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.settings import GatewaySettings
from serve.vllm_process import VLLMServerConfig, vllm_environment

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"


def documents() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((K8S / resource).read_text()):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def container(document: dict) -> dict:
    (only,) = document["spec"]["template"]["spec"]["containers"]
    return only


def test_kustomization_lists_every_manifest_and_each_parses():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = {kind for kind, _ in documents()}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds


def test_the_gateway_config_is_valid_production_settings(monkeypatch):
    config = documents()[("ConfigMap", "alignloop-config")]["data"]
    fields = set(GatewaySettings.model_fields)
    assert {key.removeprefix("ALIGNLOOP_").lower() for key in config} <= fields
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="refusing to start in production"):
        GatewaySettings()  # the secrets are missing: production refuses
    monkeypatch.setenv("ALIGNLOOP_API_KEYS", "team:sk-team-0123456789abcdef")
    monkeypatch.setenv("ALIGNLOOP_ADMIN_KEY", "admin-0123456789abcdef0123")
    monkeypatch.setenv("ALIGNLOOP_USER_ID_SALT", "a-real-salt-0123456789")
    with pytest.raises(ValueError, match="set ALIGNLOOP_SERVICE_KEY"):
        GatewaySettings()  # the trainer's key is missing
    monkeypatch.setenv("ALIGNLOOP_SERVICE_KEY", "service-0123456789abcdef0123")
    settings = GatewaySettings()
    assert not settings.embedded and settings.store_url.startswith("redis://")
    vllm = documents()[("StatefulSet", "vllm")]
    assert len(settings.vllm_urls) == vllm["spec"]["replicas"]
    assert all(url.startswith("http://vllm-") and url.endswith(".vllm:8000") for url in settings.vllm_urls)
    args = container(vllm)["args"]
    assert f"--served-model-name={settings.base_model_name}" in args


def test_vllm_pods_resolve_adapters_like_the_local_server():
    vllm = container(documents()[("StatefulSet", "vllm")])
    env = {item["name"]: item["value"] for item in vllm["env"]}
    local = vllm_environment(VLLMServerConfig(model="m", adapter_dir="/adapters"))
    for key in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_PLUGINS"):
        assert env[key] == local[key]
    assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == "/adapters"
    assert "--enable-lora" in vllm["args"]
    mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    assert mounts["adapters"] == "/adapters"


def test_the_gateway_is_probed_and_gets_its_secrets_from_a_secret():
    gateway = container(documents()[("Deployment", "gateway")])
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    sources = {next(iter(s)): next(iter(s.values()))["name"] for s in gateway["envFrom"]}
    assert sources == {"configMapRef": "alignloop-config", "secretRef": "alignloop-secrets"}
    config = documents()[("ConfigMap", "alignloop-config")]["data"]
    assert not {"ALIGNLOOP_API_KEYS", "ALIGNLOOP_ADMIN_KEY", "ALIGNLOOP_USER_ID_SALT"} & set(config)
