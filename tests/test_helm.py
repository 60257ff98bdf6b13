"""The Helm chart `helm/pdserve`: rendered by the real Helm engine (helm-python-sdk ships Helm v4
as a library; no helm binary), linted by Helm, every manifest validated against the Kubernetes
schemas (kubernetes-validate, strict: unknown fields fail), the RayCluster against KubeRay's CRD
schema (tests/data/raycluster-v1.schema.json) and the Prometheus Operator monitors against their
CRDs' fields (tests/data/prometheus-monitors-v1.schema.json), for the default values and the
realistic value sets below. Then the facts a deployment depends on: GPUs per pod follow the TP
sizes, every pod runs as non-root, the router joins the RayCluster with pool resources, the
NetworkPolicy confines the release's pods, the Redis password only travels through a Secret.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate",
                                          reason="kubernetes-validate is not installed")
# kubernetes-validate's own dependencies:
import jsonschema
from referencing import Registry, Resource

CHART = Path(__file__).resolve().parents[1] / "helm" / "pdserve"
DATA = Path(__file__).resolve().parent / "data"
RELEASE, NAMESPACE = "pd", "serving"
# The chart's kubeVersion floor (native gRPC probes are GA from 1.27) and the newest schemas.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
CRD_KINDS = {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
             ("monitoring.coreos.com/v1", "PodMonitor")}

# ---- value sets ---------------------------------------------------------------------------------

GPU = yaml.safe_load((CHART / "examples" / "gpu.yaml").read_text())  # the README's GPU example
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    # prefill TP=2 x2, decode TP=1 x4 on GPU nodes
    "gpu": GPU,
    "external-redis": {
        "redis": {"mode": "external",
                  "external": {"host": "redis.cache.svc", "port": 6380, "db": 2,
                               "passwordSecret": {"name": "pdserve-redis", "key": "password"}}},
    },
    "monitoring": {
        "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                       "podMonitor": {"enabled": True, "interval": "30s"}},
        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}]},
    },
    "secured": {
        "security": {"apiKeysSecret": "pdserve-api-keys",
                     "tls": {"secretName": "pdserve-tls", "clientCAKey": "ca.crt"}},
    },
    # Ray's token authentication, and an external Redis over mutual TLS with a password
    "ray-token-redis-tls": {
        "ray": {"authTokenSecret": {"name": "pdserve-ray-token"}},
        "redis": {"mode": "external",
                  "external": {"host": "redis.cache.svc", "port": 6380, "tls": True,
                               "passwordSecret": {"name": "pdserve-redis"},
                               "tlsCASecret": {"name": "redis-ca"},
                               "tlsClientSecret": "redis-client"}},
    },
    "pvc-model": {
        "model": {"source": "pvc", "pvc": {"claimName": "models", "path": "Qwen2.5-7B-Instruct"}},
        "cache": {"existingClaim": "pdserve-cache"},
        "redis": {"mode": "none"},
        "networkPolicy": {"apiFrom": [{"podSelector": {"matchLabels": {"role": "frontend"}}}]},
        "podDisruptionBudget": {"enabled": False},
    },
}


@pytest.fixture(scope="module")
def chart():
    loaded = helm.Chart.load(CHART)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def release(chart):
    """release(set_name) -> every object rendered for that value set (each set rendered once)."""
    rendered: dict[str, dict[str, str]] = {}

    def objects(set_name: str) -> list[dict[str, Any]]:
        if set_name not in rendered:
            rendered[set_name] = render(chart, VALUE_SETS[set_name])
        return [obj for path, text in rendered[set_name].items()
                if not path.endswith("NOTES.txt") for obj in yaml.safe_load_all(text) if obj]

    return objects


def render(chart, values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, as `helm template pd helm/pdserve -n serving` would."""
    return chart.render(values=copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def pod_specs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template the release creates: Deployments and the RayCluster's groups."""
    pods = {}
    for o in objs:
        if o["kind"] == "Deployment":
            pods[o["metadata"]["name"]] = o["spec"]["template"]
        elif o["kind"] == "RayCluster":
            pods["ray-head"] = o["spec"]["headGroupSpec"]["template"]
            for group in o["spec"]["workerGroupSpecs"]:
                pods[f"ray-{group['groupName']}"] = group["template"]
    return pods


def worker_group(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    groups = one(objs, "RayCluster")["spec"]["workerGroupSpecs"]
    return next(g for g in groups if g["groupName"] == name)


def router_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(objs, "Deployment", f"{RELEASE}-pdserve-router")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def effective_args(objs: list[dict[str, Any]], container: dict[str, Any]) -> list[str]:
    """The container's args after Kubernetes' $(VAR) expansion from its envFrom ConfigMap and
    its literal env values (Secret-sourced values stay as $(NAME))."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(one(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
    return [expand(arg, env) for arg in container.get("args", [])]


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


def flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) <= 1, f"{name} given {len(values)} times"
    return values[0] if values else None


def advertised_resources(group: dict[str, Any]) -> dict[str, Any]:
    """The Ray custom resources a worker group advertises: KubeRay puts rayStartParams'
    `resources` on the `ray start` bash line as --resources=<value>, so the value is a
    double-quoted shell word holding JSON."""
    word = group["rayStartParams"]["resources"]
    assert word.startswith('"') and word.endswith('"'), word
    return json.loads(word[1:-1].replace('\\"', '"'))


# ---- Helm: render and lint ----------------------------------------------------------------------

@pytest.mark.parametrize("set_name", VALUE_SETS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_helm_lint_is_clean(set_name, kube_version):
    report = helm.lint(CHART, copy.deepcopy(VALUE_SETS[set_name]), strict=True,
                       namespace=NAMESPACE, kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["errors"] == [] and problems == [], report


def test_default_release_renders_every_component(release):
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in release("default"))
    assert kinds == sorted([
        "ConfigMap/pd-pdserve-config",
        "Deployment/pd-pdserve-redis", "Service/pd-pdserve-redis",
        "Deployment/pd-pdserve-router", "Service/pd-pdserve",
        "RayCluster/pd-pdserve",
        "NetworkPolicy/pd-pdserve-internal", "NetworkPolicy/pd-pdserve-api",
        "NetworkPolicy/pd-pdserve-metrics",
        "PodDisruptionBudget/pd-pdserve-router", "PodDisruptionBudget/pd-pdserve-prefill",
        "PodDisruptionBudget/pd-pdserve-decode",
    ])


@pytest.mark.parametrize("values, message", [
    ({"prefill": {"tensorParallelSize": 2}}, "needs device: cuda"),
    ({"device": "tpu"}, "/device"),
    ({"router": {"replicas": 2}}, "/router/replicas"),
    ({"decode": {"replicas": 0}}, "/decode/replicas"),
    ({"redis": {"mode": "sentinel"}}, "/redis/mode"),
    ({"redis": {"mode": "external"}}, "set redis.external.host"),
    ({"redis": {"mode": "external", "external": {"host": "r", "tlsCASecret": {"name": "ca"}}}},
     "need redis.external.tls: true"),
    ({"ray": {"authTokenSecret": {"name": "t", "key": ""}}}, "/ray/authTokenSecret/key"),
    ({"model": {"source": "pvc"}}, "set model.pvc.claimName"),
    ({"monitoring": {"podMonitor": {"interval": "fast"}}}, "/monitoring/podMonitor/interval"),
    ({"prefil": {"replicas": 2}}, "prefil"),  # a misspelt key is refused, not ignored
])
def test_bad_values_are_refused_with_the_reason(chart, values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(chart, values)


# ---- schemas: Kubernetes, KubeRay, Prometheus Operator -----------------------------------------

@pytest.mark.parametrize("set_name", VALUE_SETS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_match_kubernetes_schemas(release, set_name, kube_version):
    failures = []
    for obj in release(set_name):
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}")
    assert not failures, "\n".join(failures)


def crd_validator(schema_file: str, kube_version: str) -> jsonschema.Draft202012Validator:
    """A validator for a vendored CRD schema whose Kubernetes types resolve to
    kubernetes-validate's strict definitions of that Kubernetes version."""
    definitions = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
                   / f"v{kube_version}-local-strict" / "_definitions.json")
    k8s = Resource.from_contents(json.loads(definitions.read_text()))
    schema = json.loads((DATA / schema_file).read_text())
    registry = Registry().with_resources([(k8s.id(), k8s)])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def crd_errors(validator: jsonschema.Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("set_name", VALUE_SETS)
def test_raycluster_matches_kuberay_crd(release, set_name):
    validator = crd_validator("raycluster-v1.schema.json", KUBE_VERSIONS[-1])
    raycluster = one(release(set_name), "RayCluster")
    assert crd_errors(validator, raycluster) == []


def test_kuberay_schema_catches_mistakes():
    """The vendored schema is not a rubber stamp: a misplaced field and a Kubernetes type error
    inside a pod template both fail."""
    validator = crd_validator("raycluster-v1.schema.json", KUBE_VERSIONS[-1])
    good = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
            "spec": {"headGroupSpec": {"template": {"spec": {"containers": [
                {"name": "ray-head", "image": "pdserve"}]}}}}}
    assert crd_errors(validator, good) == []
    bad_field = copy.deepcopy(good)
    bad_field["spec"]["workerGroupSpecs"] = [{"groupName": "prefill", "minReplicas": 1,
                                              "maxReplicas": 1, "replica": 1,
                                              "template": {"spec": {"containers": []}}}]
    assert any("replica" in e for e in crd_errors(validator, bad_field))
    bad_type = copy.deepcopy(good)
    bad_type["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"containerPort": "gcs"}]
    assert crd_errors(validator, bad_type)


def test_monitors_match_prometheus_operator_crds(release):
    validator = crd_validator("prometheus-monitors-v1.schema.json", KUBE_VERSIONS[-1])
    objs = release("monitoring")
    monitors = [one(objs, "ServiceMonitor"), one(objs, "PodMonitor")]
    for monitor in monitors:
        assert crd_errors(validator, monitor) == [], monitor["kind"]
    service_monitor, pod_monitor = monitors
    assert service_monitor["metadata"]["labels"]["release"] == "kps"
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    router_service = one(objs, "Service", f"{RELEASE}-pdserve")
    assert (service_monitor["spec"]["selector"]["matchLabels"].items()
            <= router_service["metadata"]["labels"].items())
    assert pod_monitor["spec"]["podMetricsEndpoints"][0] == {
        "port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    for name, pod in pod_specs(objs).items():
        if name.startswith("ray-"):
            ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
            assert ports["metrics"] == 8080, name


# ---- what a deployment depends on ---------------------------------------------------------------

def test_gpu_worker_groups_request_their_tp_size_in_gpus(release):
    objs = release("gpu")
    for name, replicas, tp in (("prefill", 2, 2), ("decode", 4, 1)):
        group = worker_group(objs, name)
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == replicas
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == tp, name
        assert resources["requests"]["nvidia.com/gpu"] == tp, name
        # one pdserve worker per pod: one unit of the pool resource `--pool-resources` asks for
        assert advertised_resources(group) == {f"pdserve_{name}": 1}
        assert group["template"]["spec"]["tolerations"] == GPU[name]["tolerations"]
    head = one(objs, "RayCluster")["spec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no pdserve workers on the head
    args = effective_args(objs, router_container(objs))
    assert flag(args, "--device") == "cuda"
    assert (flag(args, "--prefill"), flag(args, "--decode")) == ("2", "4")
    assert (flag(args, "--prefill-tp"), flag(args, "--decode-tp")) == ("2", "1")
    # one GPU per TP rank actor; a pod's TP ranks share its GPUs
    assert flag(args, "--worker-gpus") == "1"
    for name, pod in pod_specs(objs).items():
        if not name.endswith("-redis"):
            assert pod["spec"]["containers"][0]["image"] == "pdserve:0.1.0-cuda", name


def test_tp_sizes_reach_pdserve_and_each_rank_takes_one_gpu(chart):
    objs = [o for o in yaml.safe_load_all(render(chart, {
        "device": "cuda", "prefill": {"tensorParallelSize": 4},
        "decode": {"tensorParallelSize": 2}})["pdserve/templates/configmap.yaml"]) if o]
    data = objs[0]["data"]
    assert (data["PDSERVE_PREFILL_TP"], data["PDSERVE_DECODE_TP"]) == ("4", "2")
    assert data["PDSERVE_WORKER_GPUS"] == "1"


def test_cpu_release_requests_no_gpus(release):
    objs = release("default")
    for name, pod in pod_specs(objs).items():
        for container in pod["spec"]["containers"]:
            for section in container.get("resources", {}).values():
                assert "nvidia.com/gpu" not in section, name
    args = effective_args(objs, router_container(objs))
    assert (flag(args, "--device"), flag(args, "--worker-gpus")) == ("cpu", "0")


@pytest.mark.parametrize("set_name", VALUE_SETS)
def test_router_joins_the_ray_cluster_with_pool_resources(release, set_name):
    objs = release(set_name)
    raycluster = one(objs, "RayCluster")
    args = effective_args(objs, router_container(objs))
    assert args[0] == "up" and "--pool-resources" in args
    # KubeRay names the head Service "<RayCluster name>-head-svc"
    assert flag(args, "--ray-address") == (
        f"ray://{raycluster['metadata']['name']}-head-svc.{NAMESPACE}.svc:10001")
    assert "10001" in router_wait_for_head(objs)["command"]
    assert (flag(args, "--port"), flag(args, "--http-port"), flag(args, "--metrics-port")) == (
        "50051", "8000", "9400")
    assert not [a for a in args if "$(" in a and "REDIS_PASSWORD" not in a], args


def router_wait_for_head(objs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = pod_specs(objs)[f"{RELEASE}-pdserve-router"]
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == "wait-for-ray-head")


def test_router_service_and_probes(release):
    objs = release("default")
    container = router_container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "http": 8000, "metrics": 9400}
    # Kubernetes' native gRPC probes speak grpc.health.v1 to the API port
    assert container["startupProbe"]["grpc"] == {"port": 50051}
    assert container["startupProbe"]["failureThreshold"] * 10 >= 900
    assert container["livenessProbe"]["grpc"] == {"port": 50051}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http",
                                                      "scheme": "HTTP"}
    service = one(objs, "Service", f"{RELEASE}-pdserve")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (50051, "grpc"), "http": (8000, "http"), "metrics": (9400, "metrics")}
    pod_labels = pod_specs(objs)[f"{RELEASE}-pdserve-router"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("set_name", VALUE_SETS)
def test_every_pod_runs_as_non_root(release, set_name):
    pods = pod_specs(release(set_name))
    assert {"ray-head", "ray-prefill", "ray-decode", f"{RELEASE}-pdserve-router"} <= set(pods)
    for name, pod in pods.items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert context.get("runAsUser", 1) != 0 and not context.get("privileged"), where


@pytest.mark.parametrize("set_name", VALUE_SETS)
def test_network_policy_confines_the_release(release, set_name):
    objs = release(set_name)
    release = {"app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": RELEASE}
    internal = one(objs, "NetworkPolicy", f"{RELEASE}-pdserve-internal")["spec"]
    # all of this release's pods (router, Ray head and workers, Redis) and nothing else ...
    assert internal["podSelector"] == {"matchLabels": release}
    for name, pod in pod_specs(objs).items():
        assert release.items() <= pod["metadata"]["labels"].items(), name
    # ... accept anything (Ray, the ephemeral KV transfer ports, Redis) only from each other
    assert internal["policyTypes"] == ["Ingress"]
    assert internal["ingress"] == [{"from": [{"podSelector": {"matchLabels": release}}]}]
    api = one(objs, "NetworkPolicy", f"{RELEASE}-pdserve-api")["spec"]
    router_labels = pod_specs(objs)[f"{RELEASE}-pdserve-router"]["metadata"]["labels"]
    assert api["podSelector"]["matchLabels"].items() <= router_labels.items()
    assert api["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    (rule,) = api["ingress"]
    assert {p["port"] for p in rule["ports"]} == {"grpc", "http"}
    assert rule.get("from", []) == VALUE_SETS[set_name].get("networkPolicy", {}).get(
        "apiFrom", [])
    metrics = one(objs, "NetworkPolicy", f"{RELEASE}-pdserve-metrics")["spec"]
    assert [p["port"] for p in metrics["ingress"][0]["ports"]] == ["metrics"]


def test_builtin_redis_is_wired_to_the_router(release):
    objs = release("default")
    service = one(objs, "Service", f"{RELEASE}-pdserve-redis")
    config = one(objs, "ConfigMap")["data"]
    assert config["PDSERVE_REDIS_URL"] == (
        f"redis://{service['metadata']['name']}.{NAMESPACE}.svc:6379/0")
    redis = pod_specs(objs)[f"{RELEASE}-pdserve-redis"]["spec"]
    assert redis["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert "--no-redis" not in effective_args(objs, router_container(objs))


def test_external_redis_password_comes_from_the_secret(release):
    objs = release("external-redis")
    assert not [o for o in objs if "redis" in o["metadata"]["name"]]  # no built-in Redis
    assert "PDSERVE_REDIS_URL" not in one(objs, "ConfigMap")["data"]
    container = router_container(objs)
    env = [(v["name"], v) for v in container["env"]]
    assert [name for name, _ in env] == ["REDIS_PASSWORD", "PDSERVE_REDIS_URL"]  # order matters
    assert env[0][1]["valueFrom"] == {"secretKeyRef": {"name": "pdserve-redis",
                                                       "key": "password"}}
    # Kubernetes expands $(REDIS_PASSWORD) inside the env value; pdserve reads the URL from
    # $PDSERVE_REDIS_URL, so the password is in no manifest and on no command line
    assert env[1][1]["value"] == "redis://:$(REDIS_PASSWORD)@redis.cache.svc:6380/2"
    args = effective_args(objs, container)
    assert not [a for a in args if "redis" in a.lower()], args


def test_redis_mode_none_keeps_the_index_in_the_router(release):
    objs = release("pvc-model")
    assert "--no-redis" in effective_args(objs, router_container(objs))
    assert "PDSERVE_REDIS_URL" not in one(objs, "ConfigMap")["data"]


def test_pvc_model_is_mounted_everywhere_the_model_is_loaded(release):
    objs = release("pvc-model")
    args = effective_args(objs, router_container(objs))
    assert flag(args, "--model") == "/models/Qwen2.5-7B-Instruct"
    pods = pod_specs(objs)
    for name in (f"{RELEASE}-pdserve-router", "ray-prefill", "ray-decode"):
        spec = pods[name]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models",
                                                             "readOnly": True}
        assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "pdserve-cache"}
        (importer,) = [c for c in spec["initContainers"] if c["name"] == "import-model"]
        assert importer["args"] == ["import-model", "--model=/models/Qwen2.5-7B-Instruct"]
        for container in (importer, spec["containers"][0]):
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
            assert mounts["model-cache"]["mountPath"] == "/var/cache/pdserve"


def test_default_model_is_imported_before_workers_start(release):
    objs = release("default")
    config = one(objs, "ConfigMap")["data"]
    for name in (f"{RELEASE}-pdserve-router", "ray-prefill", "ray-decode"):
        spec = pod_specs(objs)[name]["spec"]
        (importer,) = [c for c in spec["initContainers"] if c["name"] == "import-model"]
        assert importer["args"] == ["import-model"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["model-cache"] == {"name": "model-cache", "emptyDir": {"sizeLimit": "8Gi"}}
        assert config["PDSERVE_CACHE_DIR"] == importer["volumeMounts"][0]["mountPath"]
    assert flag(effective_args(objs, router_container(objs)), "--model") is None


@pytest.mark.parametrize("set_name", ["default", "gpu"])
def test_ray_pods_get_a_memory_backed_dev_shm(release, set_name):
    objs = release(set_name)
    sizes = {"ray-head": "1Gi", "ray-prefill": VALUE_SETS[set_name].get("prefill", {}).get(
        "shmSize", "2Gi"), "ray-decode": VALUE_SETS[set_name].get("decode", {}).get(
        "shmSize", "2Gi")}
    for name, size in sizes.items():
        spec = pod_specs(objs)[name]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": size}, name
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["dshm"] == "/dev/shm", name


def test_disruption_budgets_fit_their_controllers(release):
    objs = release("gpu")
    budgets = {o["metadata"]["name"]: o["spec"] for o in objs
               if o["kind"] == "PodDisruptionBudget"}
    assert budgets[f"{RELEASE}-pdserve-router"]["maxUnavailable"] == 1  # a Deployment
    # KubeRay's RayCluster has no scale subresource: Kubernetes takes only an integer
    # minAvailable for its pods
    assert budgets[f"{RELEASE}-pdserve-prefill"] == {
        "minAvailable": 1, "selector": {"matchLabels": {
            "app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "prefill"}}}
    assert budgets[f"{RELEASE}-pdserve-decode"]["minAvailable"] == 3
    for pod in pod_specs(objs).values():
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        budget = budgets.get(f"{RELEASE}-pdserve-{component}")
        if budget:
            assert budget["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_a_settings_change_rolls_the_router(chart):
    def checksum(values):
        objs = [o for o in yaml.safe_load_all(
            render(chart, values)["pdserve/templates/router.yaml"]) if o]
        return objs[0]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"maxQueue": 64})


def test_notes_say_how_to_reach_the_api(chart):
    notes = render(chart, {})["pdserve/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} port-forward svc/{RELEASE}-pdserve 50051:50051 8000:8000" \
        in notes
    assert "pdserve generate --address 127.0.0.1:50051" in notes
    assert "http://127.0.0.1:8000/v1/chat/completions" in notes


def test_security_values_wire_keys_tls_and_probes(release):
    objs = release("secured")
    router = router_container(objs)
    args = effective_args(objs, router)
    assert flag(args, "--api-keys") == "/etc/pdserve/api-keys/api-keys"
    assert flag(args, "--tls-cert") == "/etc/pdserve/tls/tls.crt"
    assert flag(args, "--tls-key") == "/etc/pdserve/tls/tls.key"
    assert flag(args, "--tls-client-ca") == "/etc/pdserve/tls/ca.crt"
    mounts = {m["name"]: m for m in router["volumeMounts"]}
    assert mounts["api-keys"]["readOnly"] and mounts["tls"]["readOnly"]
    deployments = [o for o in objs if o["kind"] == "Deployment"
                   and any(c["name"] == "router"
                           for c in o["spec"]["template"]["spec"]["containers"])]
    volumes = {v["name"]: v for v in deployments[0]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "pdserve-api-keys"
    assert volumes["tls"]["secret"]["secretName"] == "pdserve-tls"
    # Kubelet's gRPC probe cannot speak TLS, and mTLS refuses a certificate-less HTTPS probe.
    assert "grpc" not in router["livenessProbe"] and "tcpSocket" in router["livenessProbe"]
    assert "tcpSocket" in router["readinessProbe"]
    plain = router_container(release("default"))
    assert "grpc" in plain["livenessProbe"] and flag(effective_args(
        release("default"), plain), "--api-keys") is None


def test_ray_token_and_redis_tls_reach_every_process_from_secrets(release):
    objs = release("ray-token-redis-tls")
    assert one(objs, "ConfigMap")["data"]["RAY_AUTH_MODE"] == "token"
    assert one(release("default"), "ConfigMap")["data"]["RAY_AUTH_MODE"] == "disabled"
    pods = pod_specs(objs)
    token_ref = {"secretKeyRef": {"name": "pdserve-ray-token", "key": "auth_token"}}
    ca_dir, client_dir = "/etc/pdserve/redis-tls/ca", "/etc/pdserve/redis-tls/client"
    url = (f"rediss://:$(REDIS_PASSWORD)@redis.cache.svc:6380/0?ssl_ca_certs={ca_dir}/ca.crt"
           f"&ssl_certfile={client_dir}/tls.crt&ssl_keyfile={client_dir}/tls.key")
    for name in ("ray-head", "ray-prefill", "ray-decode", f"{RELEASE}-pdserve-router"):
        spec = pods[name]["spec"]
        container = spec["containers"][0]
        env = {v["name"]: v for v in container["env"]}
        # Every Ray process, and the router (the Ray driver), get the token from the Secret
        # only: Ray reads $RAY_AUTH_TOKEN itself; no manifest holds it.
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == token_ref, name
        if name == "ray-head":
            continue  # runs no pdserve worker: talks to no Redis
        # One URL for every process that talks to Redis; its query names the mounted files.
        assert env["PDSERVE_REDIS_URL"]["value"] == url, name
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["redis-tls-ca"] == {"name": "redis-tls-ca", "mountPath": ca_dir,
                                          "readOnly": True}, name
        assert mounts["redis-tls-client"]["mountPath"] == client_dir, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["redis-tls-ca"]["secret"]["secretName"] == "redis-ca", name
        assert volumes["redis-tls-client"]["secret"]["secretName"] == "redis-client", name
    args = effective_args(objs, router_container(objs))
    assert not [a for a in args if "redis" in a.lower() or "token" in a.lower()], args
    # Without TLS nothing is mounted, and without a token Secret no RAY_AUTH_TOKEN is set.
    default_pods = pod_specs(release("default"))
    for name in ("ray-prefill", f"{RELEASE}-pdserve-router"):
        container = default_pods[name]["spec"]["containers"][0]
        assert "redis-tls-ca" not in {m["name"] for m in container["volumeMounts"]}
        assert "RAY_AUTH_TOKEN" not in {v["name"] for v in container.get("env", [])}
