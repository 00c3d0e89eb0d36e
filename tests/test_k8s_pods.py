"""Every KubernetesPodOperator of tldr_compress, rendered and strictly validated without a cluster.

Each pod is rendered the way a worker renders it (render_template_fields, then
build_pod_request_obj(dry_run=True)) with the XComs the `plan` task would push, serialised, and
validated against the Kubernetes 1.35 schema in strict mode (a misspelt field fails).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import airflow.providers.cncf.kubernetes  # noqa: F401 - declared in the airflow extra: missing fails, never skips
import kubernetes_validate
import pytest

ROOT = Path(__file__).resolve().parents[1]


from kubernetes.client import ApiClient  # noqa: E402
from pod_security import assert_restricted  # noqa: E402
from tldr_dagkit import settings  # noqa: E402
from tldr_dagkit.compress import build_compress_dag  # noqa: E402
from tldr_dagkit.plan import build_plan  # noqa: E402

from tldr_tasks import captioners  # noqa: E402
from tldr_tasks.config import Config  # noqa: E402
from tldr_tasks.pipeline import STAGES  # noqa: E402

K8S_VERSION = "1.35.0"
RUN_ID = "manual__2026-01-02T03:04:05+00:00"


class FakeTI:
    """The bits of a TaskInstance that rendering and pod labels read; XComs come from a dict."""

    def __init__(self, dag_id: str, task_id: str, map_index: int, xcoms: dict):
        self.dag_id, self.task_id, self.run_id, self.map_index = dag_id, task_id, RUN_ID, map_index
        self.try_number = 1
        self._xcoms = xcoms

    def xcom_pull(self, task_ids=None, key="return_value", default=None, **_):
        return self._xcoms.get((task_ids, key), default)


def plan_xcoms(dag, conf: dict) -> tuple[dict, dict]:
    """What `plan` and `shard_groups` would push for a run triggered with `conf`."""
    params = {**{k: dag.params[k] for k in dag.params}, **conf}
    plan = build_plan(params, RUN_ID, executable="/venv/bin/tldr-vlp", result_json=settings.POD_RESULT_PATH)
    xcoms = {("plan", key): value for key, value in plan.items()}
    xcoms[("plan", "return_value")] = plan
    xcoms[("shard_groups", "return_value")] = plan["groups"]
    return params, xcoms


def render_pods(dag, conf: dict) -> dict[str, list[dict]]:
    """{task_id: [pod manifest per map index]} for every KubernetesPodOperator in the DAG."""
    params, xcoms = plan_xcoms(dag, conf)
    pods: dict[str, list[dict]] = {}
    for task in dag.tasks:
        if not task.task_id.startswith("kubernetes."):
            continue
        if task.is_mapped:
            # Resolve the fan-out exactly as the worker does (shard_groups' XCom, .map(pick)), then unmap.
            expand = task._get_specified_expand_input().value
            ctx = {"ti": FakeTI(dag.dag_id, task.task_id, -1, xcoms), "run_id": RUN_ID}
            argument_lists = list(expand["arguments"].resolve(ctx))
            operators = [(i, task.unmap({"arguments": args})) for i, args in enumerate(argument_lists)]
        else:
            operators = [(-1, task)]
        for map_index, op in operators:
            ti = FakeTI(dag.dag_id, task.task_id, map_index, xcoms)
            context = {"ti": ti, "task_instance": ti, "run_id": RUN_ID, "dag": dag, "task": op, "params": params,
                       "dag_run": SimpleNamespace(run_id=RUN_ID, conf=conf)}
            op.render_template_fields(context)
            pod = op.build_pod_request_obj(context, dry_run=True)
            manifest = ApiClient().sanitize_for_serialization(pod)
            manifest.setdefault("apiVersion", "v1")
            manifest.setdefault("kind", "Pod")
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
            manifest["_operator"] = op
            pods.setdefault(task.task_id.split(".", 1)[1], []).append(manifest)
    return pods


def main_container(manifest: dict) -> dict:
    return next(c for c in manifest["spec"]["containers"] if c["name"] == "base")


def env_of(manifest: dict) -> dict:
    return {e["name"]: e.get("value") for e in main_container(manifest).get("env", [])}


@pytest.fixture(scope="module")
def dag():
    return build_compress_dag("tldr_compress", None)


@pytest.fixture(scope="module")
def default_pods(dag):
    return render_pods(dag, {})


def test_every_stage_has_a_valid_pod(default_pods):
    assert set(default_pods) == {s.name.replace("-", "_") for s in STAGES}
    for spec in STAGES:
        pods = default_pods[spec.name.replace("-", "_")]
        assert len(pods) == (2 if spec.sharded else 1)  # shard_groups defaults to 2


def test_resources_follow_pipeline_spec(default_pods):
    for spec in STAGES:
        for pod in default_pods[spec.name.replace("-", "_")]:
            res = main_container(pod)["resources"]
            cpus = str(int(spec.resources.cpus))
            assert res["requests"]["cpu"] == res["limits"]["cpu"] == cpus
            assert res["requests"]["memory"] == res["limits"]["memory"] == f"{int(spec.resources.memory_gb)}Gi"
            if spec.resources.gpus:
                assert res["limits"]["nvidia.com/gpu"] == str(spec.resources.gpus)
                assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
                    "tolerations"]
            else:
                assert "nvidia.com/gpu" not in res["limits"]
                assert not pod["spec"].get("tolerations")


def test_commands(default_pods):
    captioner = main_container(default_pods["train_captioner"][0])
    assert captioner["command"] == ["deepspeed", "--num_gpus", "1", "--no_local_rank", "--module",
                                    "tldr_tasks.cli"]
    args = captioner["args"]
    assert args[:2] == ["run", "train-captioner"]
    root = settings.output_root()
    assert args[args.index("--out") + 1] == f"{root}/runs/manual__2026-01-02T03-04-05-00-00"
    # the captioner folder is keyed by its parameters (plan's default when no crawl version is known)
    assert args[args.index("--captioner") + 1] == f"{root}/captioners/{captioners.params_key(Config())}"
    assert args[args.index("--embed-cache") + 1] == f"{root}/embed"
    assert args[args.index("--input") + 1] == settings.crawl_url()
    assert args[-2:] == ["--result-json", "/airflow/xcom/return.json"]
    cluster = main_container(default_pods["cluster"][0])
    assert cluster["command"] == ["tldr-vlp"] and cluster["args"][:2] == ["run", "cluster"]
    assert "--set" in cluster["args"] and "sample.ratio=0.25" in cluster["args"]
    for i, pod in enumerate(default_pods["embed"]):
        args = main_container(pod)["args"]
        assert args[args.index("--shard-index") + 1] == str(i)
        assert args[args.index("--num-shards") + 1] == "2"
        assert pod["metadata"]["labels"]["map_index"] == str(i)


def test_secrets_are_references_and_context_env(default_pods):
    for name, pods in default_pods.items():
        for pod in pods:
            container = main_container(pod)
            assert container["envFrom"] == [{"secretRef": {"name": "tldr-vlp-storage"}},
                                            {"secretRef": {"name": "tldr-vlp-mlflow"}}]
            env = env_of(pod)
            assert env["TLDR_RUN_KEY"] == f"tldr_compress/{RUN_ID}"
            assert env["AIRFLOW_CTX_DAG_RUN_ID"] == RUN_ID
            assert env["AIRFLOW_CTX_DAG_ID"] == "tldr_compress"
            assert env["AIRFLOW_CTX_TASK_ID"] == f"kubernetes.{name}"
            assert env["AIRFLOW_CTX_TRY_NUMBER"] == "1"
            assert env["MLFLOW_TRACKING_URI"] == "http://tldr-vlp-mlflow:5000"
            # No credential value travels in the pod spec itself.
            assert not any(k.startswith("AWS_") or "PASSWORD" in k or "TOKEN" in k for k in env)


def test_pods_meet_the_restricted_pod_security_standard(default_pods):
    dockerfile = (ROOT / "containers" / "Dockerfile").read_text()
    assert "useradd --uid 1000" in dockerfile and "USER 1000" in dockerfile  # the image's uid
    for name, pods in default_pods.items():
        for pod in pods:
            assert_restricted(pod["spec"], uid=1000)
            assert {c["name"] for c in pod["spec"]["containers"]} == {"base", "airflow-xcom-sidecar"}
            # the root filesystem is read-only: /tmp and the caches are emptyDirs
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in main_container(pod)["volumeMounts"]}
            for path in ("/tmp", "/home/tldr/.cache"):
                assert volumes[mounts[path]]["emptyDir"] == {}, (name, path)
            assert env_of(pod)["XDG_CACHE_HOME"] == "/home/tldr/.cache"


def local_volumes(pod: dict) -> dict:
    """{mount path: emptyDir} of the main container."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]["emptyDir"] for m in main_container(pod)["volumeMounts"]}


def test_loader_workers_get_shared_memory_and_evaluate_gets_scratch(default_pods):
    for name, pods in default_pods.items():
        for pod in pods:
            volumes, container = local_volumes(pod), main_container(pod)
            if name == "train_captioner":  # DataLoader workers pass batches through /dev/shm (64 MiB by default)
                assert volumes["/dev/shm"] == {"medium": "Memory", "sizeLimit": "2Gi"}
            else:
                assert "/dev/shm" not in volumes, name
            if name == "evaluate":  # inputs decoded to $TMPDIR: node disk, reserved at scheduling
                assert volumes["/scratch"] == {"sizeLimit": "20Gi"}
                assert env_of(pod)["TMPDIR"] == "/scratch"
                assert container["resources"]["requests"]["ephemeral-storage"] == "20Gi"
                assert "ephemeral-storage" not in container["resources"]["limits"]
            else:
                assert "/scratch" not in volumes and "TMPDIR" not in env_of(pod), name
                assert "ephemeral-storage" not in container["resources"]["requests"], name


def test_torch_threads_equal_the_cpu_limit(default_pods):
    for name, pods in default_pods.items():
        for pod in pods:
            container = main_container(pod)
            limit = int(container["resources"]["limits"]["cpu"])
            # DeepSpeed starts one process per GPU: they share the limit
            processes = int(container["command"][2]) if container["command"][0] == "deepspeed" else 1
            assert int(env_of(pod)["OMP_NUM_THREADS"]) * processes == limit, name
            # requests == limits: the cores are the pod's own, so the executor lets OpenMP spin briefly
            assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"], name
            assert env_of(pod)["TLDR_CPUS"] == "owned", name


def test_pod_lifecycle_and_xcom(default_pods):
    for pods in default_pods.values():
        for pod in pods:
            op = pod["_operator"]
            assert op.on_finish_action.value == "delete_succeeded_pod"  # keep failed pods for debugging
            assert op.get_logs and op.do_xcom_push and op.retries >= 2
            assert any(c["name"] == "airflow-xcom-sidecar" for c in pod["spec"]["containers"])
            assert pod["metadata"]["namespace"] == "tldr-vlp"
            assert pod["spec"]["serviceAccountName"] == "tldr-vlp-stage"
            assert pod["spec"]["automountServiceAccountToken"] is False  # stages never call the API


def test_non_default_params_and_config(monkeypatch):
    config = {"image": "registry.example.com/tldr/stage:9.9", "namespace": "ml",
              "node_selector": {"pool": "batch"}, "gpu_node_selector": {"gpu-type": "h100"},
              "gpu_tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule",
                                   "tolerationSeconds": 60}],
              "secret_env_from": ["s3-creds"],
              "stage_resources": {"train-captioner": {"gpus": 4, "cpus": 32, "shm_gb": 8},
                                  "evaluate": {"scratch_gb": 150}, "sample": {"scratch_gb": 0.5}}}
    monkeypatch.setenv("AIRFLOW_VAR_TLDR_KUBERNETES", json.dumps(config))
    dag = build_compress_dag("tldr_compress", None)
    conf = {"input_url": "s3://bucket/crawl/{00000..00009}.tar", "output_url": "s3://bucket/out", "ratio": 0.1,
            "clusters": 7, "feature": "code_histogram", "strategy": "hard", "filter": "none", "fusion": "concat",
            "captioner_preset": "base", "run_evaluation": True, "eval_input_url": "s3://bucket/eval",
            "shard_groups": 5, "overrides": ["captioner.epochs=1", "seed=3"]}
    pods = render_pods(dag, conf)
    assert len(pods["embed"]) == 5 and len(pods["caption"]) == 5
    captioner = pods["train_captioner"][0]
    container = main_container(captioner)
    assert container["image"] == "registry.example.com/tldr/stage:9.9"
    assert container["command"] == ["deepspeed", "--num_gpus", "4", "--no_local_rank", "--module",
                                    "tldr_tasks.cli"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["limits"]["cpu"] == "32"
    assert env_of(captioner)["OMP_NUM_THREADS"] == "8"  # 32 CPUs shared by 4 DeepSpeed ranks
    assert local_volumes(captioner)["/dev/shm"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert local_volumes(pods["evaluate"][0])["/scratch"] == {"sizeLimit": "150Gi"}
    assert local_volumes(pods["sample"][0])["/scratch"] == {"sizeLimit": "0.5Gi"}
    assert env_of(pods["sample"][0])["TMPDIR"] == "/scratch"
    assert captioner["spec"]["nodeSelector"] == {"pool": "batch", "gpu-type": "h100"}
    assert captioner["spec"]["tolerations"][0]["tolerationSeconds"] == 60
    assert captioner["metadata"]["namespace"] == "ml"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    args = main_container(pods["sample"][0])["args"]
    for item in ("sample.ratio=0.1", "cluster.clusters=7", "embed.feature=code_histogram", "sample.strategy=hard",
                 "sample.filter=none",
                 "caption.fusion=concat", "captioner.preset=base", "captioner.epochs=1", "seed=3"):
        assert item in args
    assert args[args.index("--input") + 1] == "s3://bucket/crawl/{00000..00009}.tar"
    assert "--eval-input" not in args
    evaluate = main_container(pods["evaluate"][0])["args"]
    assert evaluate[evaluate.index("--eval-input") + 1] == "s3://bucket/eval"
    assert pods["sample"][0]["spec"]["nodeSelector"] == {"pool": "batch"}
    caption = main_container(pods["caption"][4])["args"]
    assert caption[caption.index("--shard-index") + 1] == "4" and caption[caption.index("--num-shards") + 1] == "5"


def test_cpu_only_captioner_runs_without_deepspeed_launcher(monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_TLDR_KUBERNETES", json.dumps({"stage_resources": {"train-captioner": {"gpus": 0}}}))
    pods = render_pods(build_compress_dag("tldr_compress", None), {})
    container = main_container(pods["train_captioner"][0])
    assert container["command"] == ["tldr-vlp"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_shared_memory_must_fit_in_the_memory_limit():
    from tldr_dagkit.compress import pod_resources

    from tldr_tasks.pipeline import get_stage

    spec = get_stage("train-captioner")
    assert pod_resources(spec, {"stage_resources": {"train-captioner": {"shm_gb": "6"}}}).shm_gb == 6.0
    with pytest.raises(ValueError, match="counted in memory_gb"):
        pod_resources(spec, {"stage_resources": {"train-captioner": {"memory_gb": 2}}})
