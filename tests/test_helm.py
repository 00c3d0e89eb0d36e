"""The Helm chart (lint, render, strict Kubernetes 1.35 validation), values for the official Airflow
chart, and the Dockerfiles (read, since no Docker engine runs here)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from pod_security import assert_restricted

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tldr-vlp"


@pytest.fixture(scope="module")
def helm() -> str:
    """bin/helm (what `make test` installs with scripts/get-helm.sh) or helm on PATH; a missing helm fails."""
    for candidate in (ROOT / "bin" / "helm", shutil.which("helm")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("no helm binary: run `make helm` (scripts/get-helm.sh) or put helm on PATH")


def template(helm: str, *args: str) -> list[dict]:
    proc = subprocess.run([helm, "template", "tldr-vlp", str(CHART), "--namespace", "tldr-vlp", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.35.0", strict=True)
    return docs


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def test_helm_lint(helm):
    proc = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_render_is_valid(helm):
    kinds = by_kind(template(helm))
    assert set(kinds) == {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Role", "RoleBinding",
                          "Service", "Deployment", "NetworkPolicy"}
    assert "Secret" not in kinds  # credentials are referenced by name, never rendered as values
    deployment = kinds["Deployment"][0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "mlflow server --app-name basic-auth" in container["args"][0] and "--serve-artifacts" in container["args"][0]
    assert deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == \
        "tldr-vlp-mlflow"
    assert kinds["Service"][0]["spec"]["ports"][0]["port"] == 5000


def test_mlflow_requires_the_secrets_user(helm):
    kinds = by_kind(template(helm))
    spec = kinds["Deployment"][0]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    # the admin is the Secret's client credentials: the names stage pods and Airflow get through envFrom
    for name, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
                      ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "tldr-vlp-mlflow", "key": key}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert "tldr-vlp-mlflow" in values["stage"]["secretEnvFrom"]
    airflow = yaml.safe_load((ROOT / "helm" / "values-airflow.yaml").read_text())
    assert "name: tldr-vlp-mlflow" in airflow["extraEnvFrom"]
    ini = next(c for c in kinds["ConfigMap"] if "basic_auth.ini" in c["data"])
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "auth")
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount['mountPath']}/basic_auth.ini"
    assert next(v for v in spec["volumes"] if v["name"] == "auth")["configMap"]["name"] == ini["metadata"]["name"]
    assert "default_permission = NO_PERMISSIONS" in ini["data"]["basic_auth.ini"]
    assert spec["automountServiceAccountToken"] is False


def test_network_policy_admits_only_this_releases_pods_to_mlflow(helm):
    kinds = by_kind(template(helm, "--set", "airflow.namespace=orchestration"))
    policy = kinds["NetworkPolicy"][0]["spec"]
    mlflow_labels = kinds["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= mlflow_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    stage, airflow = rule["from"]
    # stage pods: the labels the pod config gives them (test_configmap_drives_valid_pods renders them)
    assert stage == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tldr-vlp",
                                                     "app.kubernetes.io/instance": "tldr-vlp"}}}
    assert airflow == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "orchestration"}},
                       "podSelector": {"matchLabels": {"component": "worker", "release": "airflow"}}}


def test_chart_pods_meet_the_restricted_pod_security_standard(helm):
    for values in ((), ("--set", "mlflow.persistence.enabled=false")):
        for deployment in by_kind(template(helm, *values))["Deployment"]:
            spec = deployment["spec"]["template"]["spec"]
            assert_restricted(spec, uid=1000)
            # read-only root filesystem: /tmp is a writable emptyDir, and HOME points there
            container = spec["containers"][0]
            tmp = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
            assert next(v for v in spec["volumes"] if v["name"] == tmp)["emptyDir"] == {}
            assert {"name": "HOME", "value": "/tmp"} in container["env"]


def test_rbac_lets_airflow_run_pods(helm):
    kinds = by_kind(template(helm, "--set", "airflow.namespace=orchestration",
                             "--set", "airflow.serviceAccountName=af-worker"))
    rules = {r["resources"][0]: set(r["verbs"]) for r in kinds["Role"][0]["rules"]}
    assert {"create", "get", "watch", "delete"} <= rules["pods"]
    assert "get" in rules["pods/log"] and "create" in rules["pods/exec"]  # logs + the XCom sidecar
    binding = kinds["RoleBinding"][0]
    assert binding["roleRef"]["name"] == kinds["Role"][0]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "af-worker", "namespace": "orchestration"}]


def test_configmap_drives_valid_pods(helm, tmp_path, monkeypatch):
    """The chart's pipeline ConfigMap is the pod config the DAG reads: rendered pods stay valid."""
    kinds = by_kind(template(helm, "--set", "stage.image.tag=1.2.3",
                             "--set-json", 'stage.stageResources={"train-captioner":{"gpus":2,"shm_gb":4},'
                                           '"evaluate":{"scratch_gb":100}}',
                             "--set-json", 'stage.nodeSelector={"pool":"ml"}'))
    config = json.loads(kinds["ConfigMap"][0]["data"]["kubernetes.json"])
    defaults = json.loads((ROOT / "dags" / "tldr_dagkit" / "kubernetes.json").read_text())
    assert set(config) <= set(defaults), set(config) - set(defaults)
    assert config["image"] == "ghcr.io/tldr-vlp/stage:1.2.3"
    assert config["env"]["MLFLOW_TRACKING_URI"] == "http://tldr-vlp-mlflow.tldr-vlp.svc:5000"
    path = tmp_path / "kubernetes.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("TLDR_KUBERNETES_CONFIG", str(path))
    monkeypatch.delenv("AIRFLOW_VAR_TLDR_KUBERNETES", raising=False)
    from test_k8s_pods import local_volumes, main_container, render_pods
    from tldr_dagkit.compress import build_compress_dag

    pods = render_pods(build_compress_dag("tldr_compress", None), {})
    captioner = pods["train_captioner"][0]
    assert main_container(captioner)["image"] == "ghcr.io/tldr-vlp/stage:1.2.3"
    assert main_container(captioner)["command"][:3] == ["deepspeed", "--num_gpus", "2"]
    assert captioner["spec"]["nodeSelector"] == {"pool": "ml", "nvidia.com/gpu.present": "true"}
    assert local_volumes(captioner)["/dev/shm"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert local_volumes(pods["evaluate"][0])["/scratch"] == {"sizeLimit": "100Gi"}
    policy = kinds["NetworkPolicy"][0]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for pod in (p for task_pods in pods.values() for p in task_pods):
        assert policy.items() <= pod["metadata"]["labels"].items()  # let in to MLflow
        assert pod["spec"]["automountServiceAccountToken"] is False


def test_external_stores_render_valid(helm):
    kinds = by_kind(template(helm, "--set", "mlflow.persistence.enabled=false",
                             "--set", "mlflow.backendStoreSecret.name=mlflow-db",
                             "--set", "mlflow.backendStoreSecret.key=uri",
                             "--set", "mlflow.artifactsDestination=s3://bucket/mlflow"))
    assert "PersistentVolumeClaim" not in kinds
    container = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert "s3://bucket/mlflow" in container["args"][0]


def test_values_for_the_official_airflow_chart():
    values = yaml.safe_load((ROOT / "helm" / "values-airflow.yaml").read_text())
    assert values["executor"] in ("KubernetesExecutor", "CeleryExecutor", "CeleryKubernetesExecutor")
    assert values["dags"]["gitSync"]["enabled"] and values["dags"]["gitSync"]["subPath"] == "dags"
    env = {e["name"]: e["value"] for e in values["env"]}
    mount = values["volumeMounts"][0]
    assert env["TLDR_KUBERNETES_CONFIG"] == f"{mount['mountPath']}/kubernetes.json"
    volume = next(v for v in values["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "tldr-vlp-pipeline"  # the chart's ConfigMap for release tldr-vlp
    connection = json.loads(env["AIRFLOW_CONN_KUBERNETES_DEFAULT"])
    assert connection["conn_type"] == "kubernetes" and connection["extra"]["in_cluster"] is True
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["workers"]["serviceAccount"]["name"] == chart_values["airflow"]["serviceAccountName"]
    assert env["TLDR_RUNNER"] == "kubernetes"


def test_dockerfiles_install_the_package_and_its_entrypoint():
    stage = (ROOT / "containers" / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in stage
    assert "COPY tldr_tasks /src/tldr_tasks" in stage and 'pip install "/src[s3]"' in stage
    assert "download.pytorch.org/whl/cu" in stage and "faiss-gpu" in stage and "DS_BUILD_FUSED_ADAM=1" in stage
    assert 'ENTRYPOINT ["tldr-vlp"]' in stage and "RUN tldr-vlp stages" in stage
    assert "USER 1000" in stage
    airflow = (ROOT / "containers" / "Dockerfile.airflow").read_text()
    assert "FROM apache/airflow:${AIRFLOW_VERSION}" in airflow
    assert "COPY --chown=airflow:0 dags /opt/airflow/dags" in airflow
    assert "apache-airflow-providers-cncf-kubernetes" in airflow and '"/opt/tldr-vlp[s3]"' in airflow
    # The console script the images call is the one the package declares.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'tldr-vlp = "tldr_tasks.cli:main"' in pyproject
    # Every file the Dockerfiles COPY is let through by their ignore files.
    for name in ("Dockerfile.dockerignore", "Dockerfile.airflow.dockerignore"):
        ignore = (ROOT / "containers" / name).read_text().splitlines()
        assert ignore[ignore.index("*") + 1:][:3] == ["!pyproject.toml", "!README.md", "!tldr_tasks/"]
    assert "!dags/" in (ROOT / "containers" / "Dockerfile.airflow.dockerignore").read_text()
