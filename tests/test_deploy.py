"""deploy/: the Kubernetes manifests (docs/deploy.md).

Every manifest of a built-in kind validates against the Kubernetes schemas of kubernetes-validate, strict (no unknown
field); the KServe InferenceService loads into the ``kserve`` package's ``V1beta1InferenceService`` with no field left
over, and its pod spec validates as a Pod. Then the manifests are checked against each other and against the CLI:
the ports the probes and the Service name are the ones `lance-trt serve` listens on, the init container writes the
repository the server reads, the grace period outlasts the drain, the HPA scales on the adapter's metrics.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import secrets
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from runtime.serving.repository import build_parser as build_repo_parser
from runtime.serving.server import ServerOptions, build_serve_parser, default_log_path
from runtime.spec.endpoints import LANCE_MODEL

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
"""The oldest Kubernetes the manifests target (the preStop ``sleep`` action is on by default from 1.30) and the
newest the installed kubernetes-validate has schemas for."""
OPTIONAL = {"secret-admin-key.example.yaml", "servicemonitor.yaml", "kserve-inferenceservice.yaml"}
"""Files `kubectl apply -k deploy/` leaves out: the example Secret (it would replace a real key), the ServiceMonitor
(needs the Prometheus Operator's CRD) and the KServe alternative (KServe's CRDs)."""
CUSTOM_KINDS = {"InferenceService", "ServiceMonitor", "Kustomization"}
"""Kinds kubernetes-validate has no schema for; each has its own test below."""
STOP_MARGIN_S = 15 + 10
"""`TritonServer.stop`: SIGKILL ``--exit-timeout-secs`` + 15 s after its SIGTERM, then up to 10 s for the stubs."""
NAME_LABEL = {"app.kubernetes.io/name": "lance-trt"}


# --- loading -------------------------------------------------------------------------------------------------------


def _documents(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(DEPLOY.glob("*.yaml")) for doc in _documents(path.name)]


def _one(name: str, kind: str) -> dict[str, Any]:
    docs = [doc for doc in _documents(name) if doc["kind"] == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _deployment() -> dict[str, Any]:
    return _one("deployment.yaml", "Deployment")


def _pod_spec() -> dict[str, Any]:
    return _deployment()["spec"]["template"]["spec"]


def _container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    containers = pod["initContainers" if init else "containers"]
    return next(c for c in containers if c["name"] == name)


def _server() -> dict[str, Any]:
    return _container(_pod_spec(), "tritonserver")


def _init() -> dict[str, Any]:
    return _container(_pod_spec(), "repo", init=True)


def _serve_args(container: dict[str, Any]) -> Any:
    command = container["command"]
    assert command[:2] == ["lance-trt", "serve"], command
    return build_serve_parser().parse_args(command[2:])


def _repo_args(container: dict[str, Any]) -> Any:
    command = container["command"]
    assert command[:2] == ["lance-trt", "repo"], command
    return build_repo_parser().parse_args(command[2:])


def _mount_of(container: dict[str, Any], path: PurePosixPath | Path) -> dict[str, Any]:
    """The volume mount that holds ``path`` in ``container``: the deepest mount path above it."""
    path = PurePosixPath(path)
    mounts = [m for m in container["volumeMounts"] if path == PurePosixPath(m["mountPath"])
              or PurePosixPath(m["mountPath"]) in path.parents]
    assert mounts, f"container {container['name']}: nothing is mounted at {path}"
    return max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["volumes"] if v["name"] == name)


_SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "Ti": 2**40}


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity such as ``8``, ``500m`` or ``48Gi`` as a number."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", str(value))
    assert match and match[2] in _SUFFIXES, f"not a quantity: {value!r}"
    return float(match[1]) * _SUFFIXES[match[2]]


def _probe_window(probe: dict[str, Any]) -> int:
    """Seconds a probe may fail before the kubelet acts (Kubernetes' defaults: every 10 s, 3 failures)."""
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


# --- the kustomization and the schemas -------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_optional_ones() -> None:
    kustomization = _one("kustomization.yaml", "Kustomization")
    listed = kustomization["resources"]
    for name in listed:
        assert (DEPLOY / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    assert len(set(listed)) == len(listed), "a resource listed twice"
    present = {path.name for path in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert not set(listed) & OPTIONAL, f"kustomization.yaml lists optional files: {sorted(set(listed) & OPTIONAL)}"
    assert present == set(listed) | OPTIONAL, f"neither listed nor optional: {sorted(present - set(listed) - OPTIONAL)}"
    # its image entry rewrites the image of every container it applies (one edit sets the registry)
    images = {entry["name"] for entry in kustomization["images"]}
    used = {c["image"].rsplit(":", 1)[0] for name in listed for doc in _documents(name) if doc["kind"] == "Deployment"
            for c in doc["spec"]["template"]["spec"]["initContainers"] + doc["spec"]["template"]["spec"]["containers"]}
    assert used and used <= images, f"images {sorted(used - images)} are not in kustomization.yaml's images"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    validated = set()
    for name, doc in _all_documents():
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(part) for part in err.path)
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {where}: {err.message} "
                        f"(Kubernetes {version})")
        validated.add(doc["kind"])
    assert validated == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret",
                         "PersistentVolumeClaim"}


def test_strict_validation_refuses_a_misspelled_field_and_a_wrong_type() -> None:
    misspelled = _deployment()
    spec = misspelled["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriodSecond"):
        kubernetes_validate.validate(misspelled, K8S_VERSIONS[0], strict=True)
    wrong_type = _deployment()
    _container(wrong_type["spec"]["template"]["spec"], "tritonserver")["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[0], strict=True)


def test_manifests_are_namespace_neutral_and_labelled() -> None:
    for name, doc in _all_documents():
        if doc["kind"] == "Kustomization":
            assert "namespace" not in doc, f"{name} sets a namespace"
            continue
        assert "namespace" not in doc["metadata"], f"{name}: {doc['kind']} sets a namespace"
        assert NAME_LABEL.items() <= doc["metadata"].get("labels", {}).items(), f"{name}: {doc['kind']} label"


# --- the Deployment against the CLI, the Service and the Secret ------------------------------------------------------


def test_probes_and_service_use_the_ports_serve_listens_on() -> None:
    server = _server()
    args = _serve_args(server)
    assert args.address == "0.0.0.0", "gRPC and HTTP must listen beyond loopback for the kubelet and the Service"
    assert args.metrics_address == "0.0.0.0", "the metrics port must be reachable by Prometheus"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}

    for kind in ("startupProbe", "readinessProbe"):
        probe = server[kind]["httpGet"]
        assert probe["path"] == f"/v2/models/{LANCE_MODEL}/ready", kind
        assert ports[probe["port"]] == args.http_port, kind
    live = server["livenessProbe"]["httpGet"]
    assert live["path"] == "/v2/health/live" and ports[live["port"]] == args.http_port
    assert not args.restrict_health, "the probes send no admin key"

    service = _one("service.yaml", "Service")
    deployment = _deployment()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(service_ports) == {"grpc", "http", "metrics"}
    for name, port in service_ports.items():
        assert port["targetPort"] == name and port["port"] == ports[name], f"Service port {name}"


def test_the_init_container_writes_the_repository_the_server_reads() -> None:
    pod, init, server = _pod_spec(), _init(), _server()
    repo, serve = _repo_args(init), _serve_args(server)
    assert repo.engine_set == "torch" and repo.engine_dirs == [], "the torch set takes no ENGINE_DIR"
    assert repo.out == serve.repo, f"repo writes {repo.out}, serve reads {serve.repo}"
    assert init["image"] == server["image"]

    # the repository and the checkpoint (named by its absolute path in lance/1/checkpoint.path) are the same volume
    # at the same place in both containers
    for path in (repo.out, repo.checkpoint):
        init_mount, server_mount = _mount_of(init, path), _mount_of(server, path)
        assert (init_mount["name"], init_mount["mountPath"]) == (server_mount["name"], server_mount["mountPath"]), path
    out_mount = _mount_of(init, repo.out)
    assert "emptyDir" in _volume(pod, out_mount["name"]) and not out_mount.get("readOnly"), "a writable pod volume"

    checkpoint_mount = _mount_of(server, repo.checkpoint)
    assert checkpoint_mount["mountPath"] == str(repo.checkpoint) and checkpoint_mount.get("readOnly")
    claim = _volume(pod, checkpoint_mount["name"])["persistentVolumeClaim"]
    pvc = _one("checkpoint-pvc.yaml", "PersistentVolumeClaim")
    assert claim["claimName"] == pvc["metadata"]["name"] and claim.get("readOnly")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"], "every replica mounts the checkpoint"

    # serve checks its log file is writable before it starts: the default sits beside the repository
    log_mount = _mount_of(server, default_log_path(serve.repo))
    assert log_mount["name"] == out_mount["name"] and not log_mount.get("readOnly")


def test_the_grace_period_outlasts_the_drain() -> None:
    pod, server = _pod_spec(), _server()
    args = _serve_args(server)
    assert args.drain_timeout == 120
    pre_stop = server.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    needed = pre_stop + args.drain_timeout + args.exit_timeout_secs + STOP_MARGIN_S
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > args.drain_timeout and grace >= needed, f"grace {grace} s, a full drain and stop take {needed} s"


def test_probe_windows_cover_load_and_a_restart_inside_serve() -> None:
    server = _server()
    args = _serve_args(server)
    # serve itself gives up after --ready-timeout; the startup probe must not give up earlier
    assert _probe_window(server["startupProbe"]) >= args.ready_timeout
    # while serve restarts a dead server, HTTP refuses connections; liveness must wait out one restart
    one_restart = args.restart_backoff * 2 ** (args.max_restarts - 1) + args.ready_timeout
    assert _probe_window(server["livenessProbe"]) >= one_restart
    # readiness drops the pod within seconds of a drain or a failure
    assert _probe_window(server["readinessProbe"]) <= 30


def test_the_admin_key_is_the_secret_mounted_as_a_0400_file() -> None:
    pod, server = _pod_spec(), _server()
    key_file = _serve_args(server).admin_key_file
    mount = _mount_of(server, key_file)
    assert mount.get("readOnly")
    secret_volume = _volume(pod, mount["name"])["secret"]
    secret = _one("secret-admin-key.example.yaml", "Secret")
    assert secret_volume["secretName"] == secret["metadata"]["name"]
    relative = str(PurePosixPath(key_file).relative_to(mount["mountPath"]))
    assert secret_volume["items"] == [{"key": "admin-key", "path": relative}]
    assert secret_volume["defaultMode"] == 0o400
    # a root-owned 0400 file is readable by the non-root server only through the pod's fsGroup
    assert pod["securityContext"]["runAsNonRoot"] and "fsGroup" in pod["securityContext"]

    # the example's placeholder is refused by serve (a pod started with it exits 2); the documented recipe is not
    placeholder = secret["stringData"]["admin-key"]
    with pytest.raises(ValueError, match="admin_key"):
        ServerOptions(admin_key=placeholder)
    ServerOptions(admin_key=secrets.token_hex(24))           # `openssl rand -hex 24`


def test_resources_gpu_shm_and_security_context() -> None:
    pod = _pod_spec()
    for container in pod["initContainers"] + pod["containers"]:
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        for resource in ("cpu", "memory"):
            assert _quantity(requests[resource]) <= _quantity(limits[resource]), (container["name"], resource)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
    server = _server()
    assert server["resources"]["requests"]["nvidia.com/gpu"] == server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in _init()["resources"]["limits"], "the init container holds no GPU"

    shm = _volume(pod, _mount_of(server, "/dev/shm")["name"])["emptyDir"]
    assert shm["medium"] == "Memory" and _mount_of(server, "/dev/shm")["mountPath"] == "/dev/shm"
    # memory-backed: it counts against the container's memory limit, so it must fit well inside it
    assert _quantity(shm["sizeLimit"]) <= _quantity(server["resources"]["limits"]["memory"]) / 2


def test_service_monitor_scrapes_the_metrics_port() -> None:
    monitor = _one("servicemonitor.yaml", "ServiceMonitor")
    service = _one("service.yaml", "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    metrics = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    assert metrics["port"] == _serve_args(_server()).metrics_port and endpoint["path"] == "/metrics"


# --- autoscaling -----------------------------------------------------------------------------------------------------

_ADAPTER_KEYS = {
    "config": {"rules", "resourceRules", "externalRules"},
    "rule": {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery", "labelValueReplacements"},
    "resources": {"template", "overrides"},
    "override": {"group", "resource"},
    "name": {"matches", "as"},
}
"""The fields prometheus-adapter's config accepts (pkg/config/config.go); it loads the file with
``yaml.UnmarshalStrict``, so any other key stops the adapter."""


def _adapter_rules() -> list[dict[str, Any]]:
    config = yaml.safe_load(_one("prometheus-adapter-rules.yaml", "ConfigMap")["data"]["config.yaml"])
    assert set(config) <= _ADAPTER_KEYS["config"], set(config) - _ADAPTER_KEYS["config"]
    return config["rules"]


def test_adapter_rules_are_a_prometheus_adapter_config() -> None:
    rules = _adapter_rules()
    assert rules
    serving_doc = (DEPLOY.parent / "docs" / "serving.md").read_text(encoding="utf-8")
    for rule in rules:
        assert set(rule) <= _ADAPTER_KEYS["rule"], set(rule) - _ADAPTER_KEYS["rule"]
        assert set(rule["resources"]) <= _ADAPTER_KEYS["resources"]
        assert set(rule["name"]) <= _ADAPTER_KEYS["name"]
        overrides = rule["resources"]["overrides"]
        for label in overrides.values():
            assert set(label) <= _ADAPTER_KEYS["override"]
        assert overrides["namespace"] == {"resource": "namespace"} and overrides["pod"] == {"resource": "pod"}

        series = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
        assert series, rule["seriesQuery"]
        assert re.search(rule["name"]["matches"], series[1]), "name.matches must match the discovered series"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", rule["name"]["as"])

        # every series the query reads is narrowed to the pods asked for and to model lance, and grouped by pod
        query = rule["metricsQuery"]
        selectors = re.findall(r"(\w+)\{([^}]*)\}", query)
        assert selectors
        for metric, labels in selectors:
            assert "<<.LabelMatchers>>" in labels, f"{metric}: without <<.LabelMatchers>> it sums every pod"
            assert f'model="{LANCE_MODEL}"' in labels, metric
            assert metric.startswith("nv_inference_") and metric in serving_doc, f"{metric}: not a documented metric"
        assert query.count("sum(") == query.count("by (<<.GroupBy>>)"), "each sum grouped by the asked resource"


def test_hpa_scales_the_deployment_on_the_adapter_metrics() -> None:
    hpa = _one("hpa.yaml", "HorizontalPodAutoscaler")
    deployment = _deployment()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                     deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "a re-apply would reset the HPA's replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    names = {metric["pods"]["metric"]["name"] for metric in hpa["spec"]["metrics"]}
    assert all(metric["type"] == "Pods" for metric in hpa["spec"]["metrics"])
    assert names == {rule["name"]["as"] for rule in _adapter_rules()}
    queue = next(m["pods"]["target"] for m in hpa["spec"]["metrics"]
                 if m["pods"]["metric"]["name"] == "lance_queue_time_per_request_us")
    assert queue["type"] == "AverageValue" and _quantity(queue["averageValue"]) == 500_000   # 0.5 s in us


# --- KServe ----------------------------------------------------------------------------------------------------------


KSERVE_CHECK = Path(__file__).with_name("kserve_check.py")


@functools.cache
def _kserve_report(doc_json: str) -> dict[str, Any]:
    """tests/kserve_check.py on ``doc_json`` (kserve and tritonclient cannot share a process)."""
    run = subprocess.run([sys.executable, str(KSERVE_CHECK)], input=doc_json, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _load_inference_service(doc: dict[str, Any]) -> dict[str, Any]:
    """kserve's view of the InferenceService; a field its models have no place for is a ValueError."""
    report = _kserve_report(json.dumps(doc, sort_keys=True))
    if report["error"]:
        raise ValueError(report["error"])
    return report


def _inference_service() -> dict[str, Any]:
    return _one("kserve-inferenceservice.yaml", "InferenceService")


def test_inference_service_loads_into_the_kserve_model() -> None:
    report = _load_inference_service(_inference_service())
    assert report["types"] == ["V1beta1InferenceService", "V1beta1PredictorSpec", "V1Container"]
    assert not report["built_in_runtime"], "a custom container, no built-in runtime"


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(minReplica=p.pop("minReplicas")), "V1beta1PredictorSpec has no field minReplica"),
    (lambda p: p["containers"][0].update(volumeMount=p["containers"][0].pop("volumeMounts")),
     "V1Container has no field volumeMount"),
    (lambda p: p.update(maxReplicas="8"), "predictor.maxReplicas: expected int"),
    (lambda p: p["containers"][0].pop("name"), "validation error for V1Container"),   # a required field
])
def test_kserve_loader_refuses_a_wrong_field(mutate: Any, message: str) -> None:
    doc = copy.deepcopy(_inference_service())
    mutate(doc["spec"]["predictor"])
    with pytest.raises(ValueError, match=re.escape(message)):
        _load_inference_service(doc)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_inference_service_pod_spec_validates_as_a_pod(version: str) -> None:
    doc = _inference_service()
    kserve_only = set(_load_inference_service(doc)["predictor_only_fields"])
    pod_spec = {key: value for key, value in doc["spec"]["predictor"].items() if key not in kserve_only}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]}, "spec": pod_spec}
    kubernetes_validate.validate(pod, version, strict=True)


def test_inference_service_runs_the_same_server_as_the_deployment() -> None:
    doc = _inference_service()
    predictor, pod = doc["spec"]["predictor"], _pod_spec()
    assert doc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Standard",
                                              "serving.kserve.io/autoscalerClass": "external"}
    # a custom container is named kserve-container and exposes one port: gRPC, as h2c
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    args = _serve_args(container)
    assert container["ports"] == [{"name": "h2c", "containerPort": args.grpc_port, "protocol": "TCP"}]
    # the rest is the Deployment's pod, probes by port number (the HTTP port is not declared here)
    server = copy.deepcopy(_server())
    names = {p["name"]: p["containerPort"] for p in server.pop("ports")}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        server[kind]["httpGet"]["port"] = names[server[kind]["httpGet"]["port"]]
    assert {k: v for k, v in container.items() if k not in ("name", "ports")} == \
        {k: v for k, v in server.items() if k != "name"}
    for key in ("initContainers", "volumes", "securityContext", "tolerations", "terminationGracePeriodSeconds"):
        assert predictor[key] == pod[key], key
    hpa = _one("hpa.yaml", "HorizontalPodAutoscaler")["spec"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    assert doc["metadata"]["labels"]["app.kubernetes.io/component"] != \
        _one("service.yaml", "Service")["spec"]["selector"]["app.kubernetes.io/component"], \
        "the Service of deployment.yaml must not select KServe's pods"
