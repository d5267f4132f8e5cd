"""deploy/kubernetes/: every manifest valid against Kubernetes' own OpenAPI schemas (strict: a misspelt
field fails), checked offline with the schemas that the kubernetes-validate package bundles; and the pieces
agreeing with each other and with diffserve: probes on the routes that exist, the container's arguments
parsed by `diffserve serve`'s own parser, the output directory on the shared volume, the secrets the env
names present in the Secret."""

from __future__ import annotations

import copy
import json
import re
import socket
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the test extra) is not installed"
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The oldest Kubernetes these manifests are meant for, and the newest the package knows.
VERSIONS = ("1.29.0", kv.latest_version())


def documents() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict:
    (doc,) = [d for d in documents() if d["kind"] == kind]
    return doc


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test: the schemas must come from the package."""

    def refuse(*args, **kwargs):
        raise AssertionError("the manifest check tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_manifests_validate_offline_and_strictly(offline):
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["Deployment", "PersistentVolumeClaim", "Secret", "Service"]
    for doc in documents():
        for version in VERSIONS:
            kv.validate(doc, version, strict=True)  # raises ValidationError with the path of the fault


def test_the_validator_catches_mistakes(offline):
    deployment = by_kind("Deployment")
    for spoil in (
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),  # misspelt
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="http"),
        lambda d: d["spec"].pop("selector"),
    ):
        broken = copy.deepcopy(deployment)
        spoil(broken)
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, VERSIONS[-1], strict=True)


def container() -> dict:
    (c,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_gpu_and_probes():
    c = container()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/liveness"
    startup = c["startupProbe"]
    # liveness and readiness wait for it: long enough to load and warm up a large model
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == c["ports"][0]["name"]
    # the routes the probes call exist in the app
    from diffserve.server.routes import system

    paths = {route.path for route in system.router.routes}
    assert {"/health", "/liveness"} <= paths


def test_service_reaches_the_pods():
    deployment, service = by_kind("Deployment"), by_kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in [p["name"] for p in container()["ports"]]
    assert container()["ports"][0]["containerPort"] == 8000  # Dockerfile.cuda's --port (checked below)


def test_arguments_parse_and_the_store_and_outputs_are_shared():
    from diffserve.cli import build_parser
    from diffserve.server.cli import config_from_args

    c = container()
    secret = by_kind("Secret")
    env = {e["name"]: e for e in c["env"]}
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert env["DIFFSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "api-key"
    # Kubernetes expands $(NAME) in args from the container's env, as it would here
    values = {
        name: secret["stringData"][e["valueFrom"]["secretKeyRef"]["key"]]
        for name, e in env.items()
        if "valueFrom" in e
    }
    # (a name not in env would reach diffserve as the literal text "$(NAME)")
    args = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: values[m.group(1)], a) for a in c["args"]]
    # the image's entrypoint (Dockerfile.cuda's: diffserve serve ... --output-dir /data) comes first
    dockerfile = (DEPLOY.parents[1] / "Dockerfile.cuda").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert entrypoint[:2] == ["diffserve", "serve"]
    cfg = config_from_args(build_parser().parse_args([*entrypoint[1:], *args]))
    assert cfg.job_store and cfg.job_store.startswith("postgresql://")
    assert cfg.port == c["ports"][0]["containerPort"] and cfg.host == "0.0.0.0"
    assert (
        cfg.drain_timeout + 5
        < by_kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )
    # the output directory and the models are on the ReadWriteMany claim every replica mounts
    pvc = by_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in by_kind("Deployment")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in (str(cfg.output_dir), "/models"):
        claim = volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]
    assert cfg.worker.runtime.model.startswith("/models/")
    assert by_kind("Deployment")["spec"]["replicas"] >= 2
