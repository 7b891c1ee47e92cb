"""The shipped Kubernetes manifests, checked without a cluster: every overlay renders (with kustomize where it is
installed, and with tests/deploy/kustomize.py, which must agree with it), every object is valid against the
Kubernetes schemas (kubernetes-validate; the Prometheus operator's objects, which it has no schema for, are checked
for their structure here and their PromQL with promtool), and the invariants that keep the deployment sound hold:
probes and resources on every container, adapters written by the trainer only, secrets only from the Secret, every
key a pod reads documented in the README, the gateway's vLLM URLs in step with the vLLM replicas, and a network
that is closed unless a policy opens it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from tests.deploy.kustomize import render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
TARGETS = ["deploy/k8s", "deploy/k8s/overlays/monitoring", "deploy/k8s/overlays/ingress"]
KUBERNETES_VERSION = "1.32.0"  # the oldest minor version the manifests are meant for (all fields exist since)
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
SECRET = "alignloop-secrets"
CONFIG = "alignloop-config"


def kustomize_binary() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def objects(target: str = "deploy/k8s/overlays/ingress") -> list[dict]:
    return render(REPO / target)


def index(found: list[dict]) -> dict[tuple[str, str], dict]:
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in found}


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def workloads(found: list[dict]) -> list[dict]:
    return [obj for obj in found if obj["kind"] in ("Deployment", "StatefulSet")]


def container(found: list[dict], kind: str, name: str) -> dict:
    (only,) = pod_spec(index(found)[(kind, name)])["containers"]
    return only


def env(c: dict) -> dict[str, dict]:
    return {item["name"]: item for item in c.get("env", [])}


# ---- rendering and schemas ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_every_overlay_renders_with_kustomize_and_the_python_render_agrees(target):
    binary = kustomize_binary()
    if binary is None:
        pytest.skip("neither kustomize nor kubectl is installed; the Python render stands in")
    printed = subprocess.run([*binary, str(REPO / target)], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    reference = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in yaml.safe_load_all(printed.stdout)
    }
    ours = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in render(REPO / target)}
    assert ours.keys() == reference.keys()
    assert [key for key in reference if reference[key] != ours[key]] == []


def test_the_base_lists_every_manifest_and_the_overlays_add_monitoring_and_an_ingress():
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert set(base["resources"]) == {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    kinds = {target: {obj["kind"] for obj in objects(target)} for target in TARGETS}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds[
        "deploy/k8s"
    ]
    assert not kinds["deploy/k8s"] & (OPERATOR_KINDS | {"Ingress"})  # the base needs no CRDs and no controller
    assert kinds["deploy/k8s/overlays/monitoring"] - kinds["deploy/k8s"] == OPERATOR_KINDS
    assert kinds["deploy/k8s/overlays/ingress"] - kinds["deploy/k8s"] == OPERATOR_KINDS | {"Ingress"}
    for target in TARGETS:
        for obj in objects(target):
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == "alignloop", (target, obj["kind"], obj["metadata"]["name"])
            assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "alignloop"


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_is_valid_against_the_kubernetes_schemas(target):
    checked = 0
    for obj in objects(target):
        if obj["kind"] in OPERATOR_KINDS:
            continue  # no schema in kubernetes-validate: test_the_operator_objects_are_well_formed checks them
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 20


def test_the_schema_check_catches_a_broken_object():
    """The validation above is live: a misspelt field and a wrong type are both refused."""
    gateway = index(objects())[("Deployment", "gateway")]
    misspelt = yaml.safe_load(yaml.safe_dump(gateway))
    pod_spec(misspelt)["containers"][0]["readinesProbe"] = pod_spec(misspelt)["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong = yaml.safe_load(yaml.safe_dump(gateway))
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


# ---- the Prometheus operator's objects ---------------------------------------------------------------------------
def test_the_operator_objects_are_well_formed():
    found = objects()
    services = {obj["metadata"]["name"]: obj for obj in found if obj["kind"] == "Service"}
    monitors = {obj["metadata"]["name"]: obj for obj in found if obj["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"gateway", "trainer", "vllm"}
    scraped = {}
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services.values() if selector.items() <= s["metadata"].get("labels", {}).items()]
        ports = {port["name"]: port for port in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics" and endpoint["port"] in ports, (name, endpoint)
            assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
            port = ports[endpoint["port"]]
            scraped[name] = port.get("targetPort", port["port"])
    workload_ports = {
        obj["metadata"]["name"]: {
            p["name"]: p["containerPort"] for c in pod_spec(obj)["containers"] for p in c["ports"]
        }
        for obj in workloads(found)
    }
    assert workload_ports["gateway"][scraped["gateway"]] == 8000
    assert workload_ports["trainer"][scraped["trainer"]] == 9101
    assert scraped["vllm"] == 8000

    (rule,) = [obj for obj in found if obj["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    names = []
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for entry in group["rules"]:
            assert set(entry) <= {"alert", "record", "expr", "for", "labels", "annotations"}, entry
            assert ("alert" in entry) != ("record" in entry) and entry["expr"].strip()
            if "alert" in entry:
                names.append(entry["alert"])
                assert entry["labels"]["severity"] in ("critical", "warning")
                assert entry["annotations"]["summary"]
                assert "for" not in entry or re.fullmatch(r"\d+[smh]", entry["for"])
    assert len(names) == len(set(names))
    wanted = {
        "AlignloopGatewayErrors",  # 5xx rate
        "AlignloopThumbsUpFalling",  # the promoted version's thumbs-up rate
        "AlignloopTrainerBacklogGrowing",
        "AlignloopTrainerNoRound",
        "AlignloopVersionStuckUngated",
    }
    assert wanted <= set(names)


def exported_metric_names() -> set[str]:
    """Every series name alignloop's gateway and trainer can export."""
    from online_rl.trainer_metrics import TrainerMetrics
    from serve.metrics import GatewayMetrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = set()
    for registry in (GatewayMetrics().registry, TrainerMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    return names


def rules() -> list[dict]:
    (rule,) = [obj for obj in objects() if obj["kind"] == "PrometheusRule"]
    return [entry for group in rule["spec"]["groups"] for entry in group["rules"]]


def test_the_alerts_read_only_metrics_that_exist():
    exported = exported_metric_names() | {entry["record"] for entry in rules() if "record" in entry}
    for entry in rules():
        used = set(re.findall(r"\balignloop[:_][a-z_:0-9]+", entry["expr"]))
        assert used <= exported, (entry.get("alert") or entry.get("record"), used - exported)
        assert used or 'up{job="trainer-metrics"}' in entry["expr"]  # the trainer-metrics scrape target's health
    assert not any("thumbs_up_rate" in entry["expr"] for entry in rules())  # a rate is PromQL over counters


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (make setup installs Debian's prometheus package)")
    return binary


def write_rules(tmp_path: Path, annotations: bool = True) -> Path:
    (rule,) = [obj for obj in objects() if obj["kind"] == "PrometheusRule"]
    spec = rule["spec"]
    if not annotations:  # promtool's unit tests compare them too; the tests are about when an alert fires
        for group in spec["groups"]:
            for entry in group["rules"]:
                entry.pop("annotations", None)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_promtool_accepts_the_rules(tmp_path):
    checked = subprocess.run([promtool(), "check", "rules", str(write_rules(tmp_path))], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_alerts_fire_when_they_should(tmp_path):
    """promtool's rule unit tests on made-up series (tests/deploy/alerts_test.yaml)."""
    binary = promtool()
    write_rules(tmp_path, annotations=False)
    shutil.copy(Path(__file__).with_name("alerts_test.yaml"), tmp_path / "alerts_test.yaml")
    tested = subprocess.run([binary, "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


# ---- invariants of the pods -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_probes_and_resources(target):
    for obj in workloads(objects(target)):
        spec = pod_spec(obj)
        for c in spec["containers"]:
            where = f"{obj['metadata']['name']}/{c['name']}"
            assert "readinessProbe" in c and "livenessProbe" in c, where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"], where
        for c in spec.get("initContainers", []):
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]


def volume_mounts(found: list[dict], name: str) -> dict[str, tuple[dict, dict]]:
    """claim name -> (the container's mount, the pod's volume) of one workload's single container."""
    obj = next(o for o in workloads(found) if o["metadata"]["name"] == name)
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    (c,) = pod_spec(obj)["containers"]
    found_mounts = {}
    for mount in c.get("volumeMounts", []):
        if mount["name"] not in volumes:  # a StatefulSet's claim template (Redis's own data)
            continue
        claim = (volumes[mount["name"]].get("persistentVolumeClaim") or {}).get("claimName")
        if claim:
            found_mounts[claim] = (mount, volumes[mount["name"]])
    return found_mounts


def read_only(mounted: tuple[dict, dict]) -> bool:
    mount, volume = mounted
    return bool(mount.get("readOnly")) and bool(volume["persistentVolumeClaim"].get("readOnly"))


def writable(mounted: tuple[dict, dict]) -> bool:
    mount, volume = mounted
    return not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")


def test_the_trainer_writes_the_adapters_and_vllm_only_reads_them():
    found = objects()
    trainer, vllm, gateway = (volume_mounts(found, name) for name in ("trainer", "vllm", "gateway"))
    assert writable(trainer["adapters"]) and trainer["adapters"][0]["mountPath"] == "/adapters"
    assert read_only(vllm["adapters"]) and vllm["adapters"][0]["mountPath"] == "/adapters"
    assert read_only(trainer["models"]) and read_only(vllm["models"])
    assert writable(gateway["images"]) and read_only(trainer["images"]) and "images" not in vllm
    assert "adapters" not in gateway  # the gateway stages versions through vLLM, never touches their files
    writers = [
        (obj["metadata"]["name"], claim)
        for obj in workloads(found)
        for claim, mounted in volume_mounts(found, obj["metadata"]["name"]).items()
        if claim == "adapters" and writable(mounted)
    ]
    assert writers == [("trainer", "adapters")]


def test_the_trainer_is_one_gpu_replica_that_promotes_through_the_gateway():
    found = objects()
    deployment = index(found)[("Deployment", "trainer")]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    trainer = container(found, "Deployment", "trainer")
    assert trainer["command"] == ["alignloop", "trainer"]
    resources = trainer["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1 and resources["limits"]["nvidia.com/gpu"] == 1
    variables = env(trainer)
    assert variables["ALIGNLOOP_TRAINER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET,
        "key": "ALIGNLOOP_SERVICE_KEY",  # the gateway's service key: the trainer's identity
    }
    assert variables["ALIGNLOOP_STORE_URL"]["valueFrom"]["configMapKeyRef"] == {
        "name": CONFIG,
        "key": "ALIGNLOOP_STORE_URL",
    }
    assert variables["ALIGNLOOP_TRAINER_METRICS_HOST"]["value"] == "0.0.0.0"
    assert variables["ALIGNLOOP_TRAINER_METRICS_PORT"]["value"] == "9101"
    assert {p["containerPort"] for p in trainer["ports"]} == {9101}
    gateway_url = variables["ALIGNLOOP_TRAINER_GATEWAY_URL"]["value"]
    service = index(found)[("Service", "gateway")]
    assert gateway_url == f"http://{service['metadata']['name']}" and service["spec"]["ports"][0]["port"] == 80
    gpus = {
        obj["metadata"]["name"]
        for obj in workloads(found)
        for c in pod_spec(obj)["containers"]
        if "nvidia.com/gpu" in c["resources"]["limits"]
    }
    assert gpus == {"trainer", "vllm"}


def test_the_demo_runs_alone_in_front_of_the_gateway_with_its_own_key():
    found = objects()
    demo = container(found, "Deployment", "demo")
    assert demo["command"][:2] == ["alignloop", "demo"] and "--gateway-url" in demo["command"]
    assert demo["command"][demo["command"].index("--gateway-url") + 1] == "http://gateway"
    assert env(demo)["ALIGNLOOP_DEMO_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET,
        "key": "ALIGNLOOP_DEMO_API_KEY",
    }
    service = index(found)[("Service", "demo")]
    port = env(demo)["ALIGNLOOP_DEMO_PORT"]["value"]
    assert service["spec"]["ports"][0]["targetPort"] == "http" and str(demo["ports"][0]["containerPort"]) == port
    ingress = index(found)[("Ingress", "alignloop")]
    backends = {p["path"]: p["backend"]["service"]["name"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert backends == {"/v1": "gateway", "/": "demo"}


# ---- settings each pod reads -------------------------------------------------------------------------------------
DUMMY_SECRETS = {
    "ALIGNLOOP_API_KEYS": "team:sk-team-0123456789abcdef,demo:sk-demo-0123456789abcdef",
    "ALIGNLOOP_ADMIN_KEY": "admin-0123456789abcdef0123",
    "ALIGNLOOP_USER_ID_SALT": "a-real-salt-0123456789",
    "ALIGNLOOP_SERVICE_KEY": "service-0123456789abcdef0123",
    "ALIGNLOOP_DEMO_API_KEY": "sk-demo-0123456789abcdef",
    "REDIS_PASSWORD": "0123456789abcdef0123456789abcdef",
}


def pod_environment(found: list[dict], c: dict) -> dict[str, str]:
    """The environment a container gets, with the Secret's keys filled from DUMMY_SECRETS."""
    config = index(found)[("ConfigMap", CONFIG)]["data"]
    values = {}
    for source in c.get("envFrom", []):
        assert "configMapRef" in source and source["configMapRef"]["name"] == CONFIG, "secrets come one key at a time"
        values.update(config)
    for item in c.get("env", []):
        if "value" in item:
            values[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            values[item["name"]] = DUMMY_SECRETS[item["valueFrom"]["secretKeyRef"]["key"]]
        else:
            values[item["name"]] = config[item["valueFrom"]["configMapKeyRef"]["key"]]
    return values


def test_each_pod_environment_is_valid_for_its_process(monkeypatch, tmp_path):
    from demo.settings import DemoSettings
    from online_rl.trainer import TrainerSettings
    from serve.settings import GatewaySettings

    found = objects()
    for cls, name in ((GatewaySettings, "gateway"), (TrainerSettings, "trainer"), (DemoSettings, "demo")):
        values = pod_environment(found, container(found, "Deployment", name))
        prefix = cls.model_config["env_prefix"]
        own = {k.removeprefix(prefix).lower() for k in values if k.startswith(prefix)}
        shared = {k.removeprefix("ALIGNLOOP_").lower() for k in values if k.startswith("ALIGNLOOP_")}
        assert own <= set(cls.model_fields) or name == "gateway", (name, own - set(cls.model_fields))
        assert shared <= set(cls.model_fields) | own | {"trainer_" + f for f in cls.model_fields} | {
            "demo_" + f for f in cls.model_fields
        }, (name, shared - set(cls.model_fields))
        with monkeypatch.context() as patch:
            for key, value in values.items():
                patch.setenv(key, value)
            settings = cls()
        if name == "gateway":
            assert settings.environment == "production" and not settings.embedded
        if name == "trainer":
            assert settings.api_key.get_secret_value() == DUMMY_SECRETS["ALIGNLOOP_SERVICE_KEY"]
            assert settings.metrics_host == "0.0.0.0" and settings.metrics_port == 9101
            assert str(settings.adapter_dir) == "/adapters" and settings.model == "/models/llava-base"
        if name == "demo":
            assert settings.api_key.get_secret_value() == DUMMY_SECRETS["ALIGNLOOP_DEMO_API_KEY"]
            api_keys = [pair.partition(":")[2] for pair in DUMMY_SECRETS["ALIGNLOOP_API_KEYS"].split(",")]
            assert settings.api_key.get_secret_value() in api_keys  # the demo's key is one of the API keys


def test_the_gateway_config_is_production_settings_and_refuses_without_its_secrets(monkeypatch):
    from serve.settings import GatewaySettings

    config = index(objects())[("ConfigMap", CONFIG)]["data"]
    assert {key.removeprefix("ALIGNLOOP_").lower() for key in config} <= set(GatewaySettings.model_fields)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="refusing to start in production"):
        GatewaySettings()  # the secrets are missing: production refuses


def test_the_gateway_names_every_vllm_replica_and_vllm_serves_the_configured_model(monkeypatch):
    from serve.settings import GatewaySettings

    found = objects()
    gateway = container(found, "Deployment", "gateway")
    for key, value in pod_environment(found, gateway).items():
        monkeypatch.setenv(key, value)
    settings = GatewaySettings()
    vllm = index(found)[("StatefulSet", "vllm")]
    replicas = vllm["spec"]["replicas"]
    assert settings.vllm_urls == [f"http://vllm-{i}.vllm:8000" for i in range(replicas)]
    assert vllm["spec"]["serviceName"] == "vllm" and index(found)[("Service", "vllm")]["spec"]["clusterIP"] == "None"
    args = container(found, "StatefulSet", "vllm")["args"]
    assert f"--served-model-name={settings.base_model_name}" in args
    assert f"--model={settings.model}" in args  # the trainer trains on the same base (its ALIGNLOOP_MODEL)
    max_loras = next(int(a.split("=")[1]) for a in args if a.startswith("--max-loras="))
    assert max_loras >= 2  # the old and the new version share batches across a swap


def test_vllm_pods_resolve_adapters_like_the_local_server():
    from serve.vllm_process import VLLMServerConfig, vllm_environment

    vllm = container(objects(), "StatefulSet", "vllm")
    variables = {item["name"]: item["value"] for item in vllm["env"]}
    local = vllm_environment(VLLMServerConfig(model="m", adapter_dir="/adapters"))
    for key in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_PLUGINS"):
        assert variables[key] == local[key]
    assert variables["VLLM_LORA_RESOLVER_CACHE_DIR"] == "/adapters"
    assert "--enable-lora" in vllm["args"]


def test_secrets_come_only_from_the_secret_and_the_redis_password_is_in_no_url():
    found = objects()
    config = index(found)[("ConfigMap", CONFIG)]["data"]
    assert not set(DUMMY_SECRETS) & set(config)
    store_url = config["ALIGNLOOP_STORE_URL"]
    assert "@" not in store_url and "password_file=/var/run/secrets/alignloop/redis-password" in store_url
    assert "images=/images" in store_url  # image bytes on the shared volume, not in Redis's memory
    for obj in workloads(found):
        spec = pod_spec(obj)
        for c in spec["containers"] + spec.get("initContainers", []):
            for item in c.get("env", []):
                secret_like = item["name"] in DUMMY_SECRETS or re.search(r"KEY|PASSWORD|AUTH|SALT", item["name"])
                if secret_like:
                    assert "secretKeyRef" in item.get("valueFrom", {}), (obj["metadata"]["name"], item["name"])
            assert all("secretRef" not in source for source in c.get("envFrom", []))
    gateway = volume_secret_files(found, "gateway")
    assert gateway == {"/var/run/secrets/alignloop/redis-password": "REDIS_PASSWORD"}
    assert volume_secret_files(found, "trainer") == gateway


def volume_secret_files(found: list[dict], name: str) -> dict[str, str]:
    obj = next(o for o in workloads(found) if o["metadata"]["name"] == name)
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"] if "secret" in v}
    files = {}
    for c in pod_spec(obj)["containers"]:
        for mount in c.get("volumeMounts", []):
            if mount["name"] in volumes:
                for item in volumes[mount["name"]]["secret"]["items"]:
                    files[f"{mount['mountPath']}/{item['path']}"] = item["key"]
    return files


def keys_pods_read(found: list[dict]) -> set[str]:
    """Every environment variable a container of any pod gets, and every key of the Secret or the ConfigMap it
    reads (by envFrom, by reference, or as a file)."""
    config = index(found)[("ConfigMap", CONFIG)]["data"]
    keys = set()
    for obj in workloads(found):
        spec = pod_spec(obj)
        for c in spec["containers"] + spec.get("initContainers", []):
            if c.get("envFrom"):
                keys |= set(config)
            for item in c.get("env", []):
                keys.add(item["name"])
                reference = item.get("valueFrom", {})
                for kind in ("secretKeyRef", "configMapKeyRef"):
                    if kind in reference:
                        keys.add(reference[kind]["key"])
        for volume in spec.get("volumes", []):
            keys |= {item["key"] for item in (volume.get("secret") or {}).get("items", [])}
    return keys


def undocumented_keys(readme: str) -> set[str]:
    """The keys pods read that the README does not name in backticks."""
    return {key for key in keys_pods_read(objects()) if f"`{key}`" not in readme}


def test_every_key_a_pod_reads_is_documented_in_the_readme():
    assert undocumented_keys((REPO / "README.md").read_text()) == set()


def test_the_readme_check_sees_a_missing_key():
    readme = (REPO / "README.md").read_text()
    assert "ALIGNLOOP_SERVICE_KEY" in undocumented_keys(readme.replace("`ALIGNLOOP_SERVICE_KEY`", "the service key"))


# ---- the network -----------------------------------------------------------------------------------------------------
def policies(found: list[dict]) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj["spec"] for obj in found if obj["kind"] == "NetworkPolicy"}


def selected(policy: dict, labels: dict) -> bool:
    selector = policy["podSelector"]
    if selector.get("matchLabels", {}).items() - labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        if expression["operator"] != "In" or labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_the_network_is_closed_unless_a_policy_opens_it():
    found = objects("deploy/k8s")
    specs = policies(found)
    assert specs["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for obj in workloads(found):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        own = [name for name, spec in specs.items() if name not in ("default-deny", "dns") and selected(spec, labels)]
        assert own, f"{obj['metadata']['name']} has no policy of its own"

    def sources(name: str) -> set[str]:
        return {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            for rule in specs[name]["ingress"]
            for peer in rule["from"]
        }

    assert sources("vllm") == {"gateway"}  # runtime LoRA loading is on: only the gateway may reach vLLM
    assert sources("redis") == {"gateway", "trainer"}
    assert specs["trainer"]["ingress"] == [] and specs["vllm"]["egress"] == [] and specs["redis"]["egress"] == []
    for name, port in (("gateway", 8000), ("demo", 7860)):  # the front doors
        (rule,) = specs[name]["ingress"]
        assert "from" not in rule and rule["ports"] == [{"protocol": "TCP", "port": port}]
    scrape = policies(objects("deploy/k8s/overlays/monitoring"))["prometheus-scrapes"]
    assert {p["port"] for p in scrape["ingress"][0]["ports"]} == {9101, 8000}


# ---- the image -------------------------------------------------------------------------------------------------------
def requirement_names(path: Path) -> set[str]:
    names = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_the_runtime_image_has_no_test_tools_and_make_setup_installs_both():
    runtime = requirement_names(REPO / "requirements" / "app.txt")
    tests = requirement_names(REPO / "requirements" / "test.txt")
    assert {"pytest", "playwright", "schemathesis", "ruff", "import-linter", "kubernetes-validate"} <= tests
    assert not runtime & tests
    assert {"limits", "redis", "fastapi", "uvicorn", "peft", "trl"} <= runtime
    dockerfile = "\n".join(
        line for line in (REPO / "deploy" / "Dockerfile").read_text().splitlines() if not line.startswith("#")
    )
    assert "-r requirements/app.txt" in dockerfile and "test.txt" not in dockerfile
    assert "download.pytorch.org/whl/cpu" not in dockerfile  # PyPI's torch is the CUDA build: the trainer's GPU
    makefile = (REPO / "Makefile").read_text()
    assert "-r requirements/app.txt" in makefile and "-r requirements/test.txt" in makefile
    locked = requirement_names(REPO / "requirements" / "lock.txt")
    assert (runtime | tests) <= locked | {"uvicorn"}, (runtime | tests) - locked
