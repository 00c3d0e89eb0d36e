"""The tldr_compress DAG, built from `tldr_tasks.pipeline.STAGES`.

Shape of a run:

    plan -> choose_runner -> local.<stage> ...        (runner "local": BashOperator per stage)
                          -> kubernetes.<stage> ...   (runner "kubernetes": one pod per stage)
    evaluation_requested -> <group>.evaluate          (short-circuit: only when asked)
    -> publish                                        (XCom: output URL, MLflow run id, metrics)

The run's MLflow parent run is opened by `plan`, ended FINISHED by `publish`, and ended FAILED by
the failure callback of any task that fails for good (after its retries), or else by the next run's
`plan` (a run marked failed or killed leaves it RUNNING); every stage task logs a nested run under
it through the same executor `compress` uses (`tldr-vlp run <stage>`). `publish` records on it what
`compress` records (runner.record_run): summary metrics, manifest, report, plots, lineage.

Both runners are always in the DAG; `choose_runner` (a branch) picks one per run, so the trigger
form chooses and the graph shows which ran. Sharded stages (embed, assign, caption) fan out with dynamic
task mapping, one task (pod) per shard group; `plan` computes every command once from the params.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from datetime import timedelta

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Asset, Param, TaskGroup, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException
from kubernetes.client import models as k8s

from tldr_dagkit import settings
from tldr_dagkit.plan import build_plan, check_conf, check_params, task_id
from tldr_tasks.config import AUTO, FEATURES, FILTERS, FUSIONS, STRATEGIES, Config, ConfigError, presets
from tldr_tasks.contract import Resources
from tldr_tasks.pipeline import STAGES, StageSpec

CRAWL_ASSET = Asset(name="tldr_crawl", uri="tldr://crawl/registered")
COMPRESSED_ASSET = Asset(name="tldr_compressed", uri="tldr://compressed/latest")
DISTRIBUTED_STAGES = ("train-captioner",)  # run under the DeepSpeed launcher over the pod's GPUs
GROUPS = {"local": "local", "kubernetes": "kubernetes"}  # runner -> task group id
STAGE_UID = 1000  # the stage image's user (containers/Dockerfile: useradd --uid 1000, USER 1000)
STAGE_CACHE = "/home/tldr/.cache"  # HOME/.cache of that user: HF, Triton, pip caches go below it
STAGE_SCRATCH = "/scratch"  # $TMPDIR of a stage that declares scratch_gb
MAX_GROWTH = 0.5  # retrain a reused captioner once the crawl has 50% more shards than it was trained on


def end_run_failed(context) -> None:
    """Failure callback of every task (it runs once the task has no retry left): the run's MLflow
    parent run ends FAILED, so a failed Airflow run never leaves it RUNNING."""
    from tldr_tasks import tracking

    parent = tracking.finish_parent_by_key(run_key(context["ti"].dag_id, context["run_id"]), "FAILED")
    print(f"MLflow run {parent} ended FAILED" if parent else "no MLflow run opened yet")


def run_key(dag_id: str, run_id: str) -> str:
    """The MLflow parent run's `tldr.run_key` (the stages get it as TLDR_RUN_KEY)."""
    return f"{dag_id}/{run_id}"


DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=settings.retry_delay_s()),
                "retry_exponential_backoff": 2.0, "on_failure_callback": end_run_failed}


def compress_params() -> dict[str, Param]:
    """The trigger form. Defaults come from tldr_tasks.config, so the form and params.yaml agree. The UI
    marks a field required unless its type allows null: the optional ones do (empty = the default)."""
    d = Config()
    return {
        "input_url": Param(settings.crawl_url(), type="string", minLength=1, title="Input crawl URL",
                           description="WebDataset shards: a folder, a glob or a brace pattern "
                                       "(crawl/{00000..00099}.tar); local path or s3://. Default: the crawl "
                                       "tldr_ingest registered."),
        "output_url": Param(settings.output_root(), type="string", minLength=1, title="Output root URL",
                            description="Runs write to <root>/runs/<run_id>; the captioner and embeddings "
                                        "under <root> are shared, so a rerun only embeds new shards."),
        "ratio": Param(d.sample.ratio, type=["number", "string"],
                       oneOf=[{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {"const": AUTO}],
                       title="Keep ratio", description="Share of the crawl to keep, in (0, 1]; the paper keeps 0.25. "
                       "auto: the smallest share of the ratio curve within sample.auto_tolerance of the whole "
                       "crawl's score on a carved validation split (docs/pipeline.md)."),
        "clusters": Param(d.cluster.clusters, type="integer", minimum=0, title="Clusters",
                          description="k-means clusters over the codebook features (paper: 3000 for CC3M); "
                                      "0 = round(8 * sqrt(ratio * samples))."),
        "feature": Param(d.embed.feature, type="string", enum=list(FEATURES), title="Clustering feature",
                         description="What k-means clusters: tower (the pretrained image tower's pooled feature) "
                                     "or one of the captioner's codebook features (the paper's: quantized_mean)."),
        "strategy": Param(d.sample.strategy, type="string", enum=list(STRATEGIES), title="Sampling strategy",
                          description="How samples are picked inside each cluster (paper: uniform)."),
        "filter": Param(d.sample.filter, type="string", enum=list(FILTERS), title="Alignment filter",
                        description="clip_score: only the better-aligned half by the built-in CLIP reference can be "
                                    "kept (needs strategy uniform, balanced or semdedup); none: no filter."),
        "fusion": Param(d.caption.fusion, type="string", enum=list(FUSIONS), title="Caption fusion",
                        description="How the original and the generated caption make the training caption."),
        "captioner_preset": Param(d.captioner.preset, type="string", enum=list(presets("captioner")),
                                  title="Captioner preset", description="Size of the codebook captioner."),
        "retrain_captioner": Param(False, type=["null", "boolean"], title="Retrain the captioner",
                                   description="Train a new captioner on the current crawl even if one with the "
                                               "same parameters exists under the output root (else it is reused)."),
        "captioner_max_growth": Param(MAX_GROWTH, type=["null", "number"], minimum=0,
                                      title="Retrain after crawl growth",
                                      description="Retrain once the crawl has grown by more than this share "
                                                  "(0.5 = 50% more shards) since the reused captioner was trained."),
        "run_evaluation": Param(False, type=["null", "boolean"], title="Run evaluation",
                                description="Train the downstream CLIP on full vs compressed vs random "
                                            "subsets (long; needs the eval input)."),
        "eval_input_url": Param(None, type=["null", "string"], title="Eval input URL",
                                description="Clean held-out shards for the evaluation."),
        "runner": Param(settings.default_runner(), type="string", enum=list(settings.RUNNERS), title="Runner",
                        description="local: every stage runs on the Airflow worker. kubernetes: one pod per "
                                    "stage with the stage image and GPU limits."),
        "shard_groups": Param(2, type="integer", minimum=1, maximum=512, title="Shard groups",
                              description="Workers (tasks or pods) for the sharded stages embed, assign and caption."),
        "overrides": Param([], type=["null", "array"], items={"type": "string", "pattern": r"^[a-z_]+(\.[a-z_]+)?=.*$"},
                           title="Extra parameters",
                           description="One section.key=value per line, any key of params.yaml, e.g. "
                                       "captioner.epochs=1 or seed=3. Applied last."),
    }


def _landed_input(triggering_asset_events) -> tuple[str | None, str | None]:
    """(url, version) of the newest crawl registered by tldr_ingest, when an Asset event started this run."""
    if not triggering_asset_events:
        return None, None
    events = list(triggering_asset_events[CRAWL_ASSET]) if CRAWL_ASSET in triggering_asset_events else []
    if not events:
        return None, None
    extra = events[-1].extra or {}
    return extra.get("url"), extra.get("version")


def pod_resources(spec: StageSpec, config: dict) -> Resources:
    """A stage's pod resources: pipeline.STAGES, with stage_resources' overrides of any field."""
    override = config.get("stage_resources", {}).get(spec.name, {})
    kinds = {f.name: int if f.name == "gpus" else float for f in fields(Resources)}
    return replace(spec.resources, **{k: kinds[k](v) for k, v in override.items() if k in kinds})


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def pod_settings(spec: StageSpec, config: dict) -> dict:
    """KubernetesPodOperator keyword arguments for one stage (everything but its arguments)."""
    r = pod_resources(spec, config)
    # requests == limits: the pod gets Guaranteed QoS and is never the first one evicted.
    limits = {"cpu": _quantity(r.cpus), "memory": f"{_quantity(r.memory_gb)}Gi"}
    requests = dict(limits)
    if r.scratch_gb:  # the scheduler picks a node with that much free disk for the scratch emptyDir
        requests["ephemeral-storage"] = f"{_quantity(r.scratch_gb)}Gi"
    volumes, mounts = local_volumes(r)
    node_selector = dict(config.get("node_selector") or {})
    tolerations = list(config.get("tolerations") or [])
    if r.gpus:
        limits["nvidia.com/gpu"] = str(r.gpus)
        node_selector.update(config.get("gpu_node_selector") or {})
        tolerations += config.get("gpu_tolerations") or []
    cmds = ["tldr-vlp"]
    processes = 1
    if spec.name in DISTRIBUTED_STAGES and r.gpus >= 1:
        # --no_local_rank: the launcher would otherwise put --local_rank=I before `run` (LOCAL_RANK env is set).
        cmds = ["deepspeed", "--num_gpus", str(r.gpus), "--no_local_rank", "--module", "tldr_tasks.cli"]
        processes = r.gpus
    uid = int(config.get("run_as_user", STAGE_UID))
    env = {
        # Torch would size its thread pool by the node's cores and stall on CFS throttling: one
        # thread per core of the limit, shared by the processes (DeepSpeed starts one per GPU).
        "OMP_NUM_THREADS": str(max(1, int(r.cpus) // processes)),
        "TLDR_CPUS": "owned",  # the pod's CPU limit is its own: OpenMP may spin (runner.thread_defaults)
        "XDG_CACHE_HOME": STAGE_CACHE,
        "TRITON_CACHE_DIR": f"{STAGE_CACHE}/triton",
        "TLDR_RUN_KEY": "{{ dag.dag_id }}/{{ run_id }}",
        "AIRFLOW_CTX_DAG_ID": "{{ dag.dag_id }}",
        "AIRFLOW_CTX_DAG_RUN_ID": "{{ run_id }}",
        "AIRFLOW_CTX_TASK_ID": "{{ ti.task_id }}",
        "AIRFLOW_CTX_TRY_NUMBER": "{{ ti.try_number }}",
        "AIRFLOW_CTX_MAP_INDEX": "{{ ti.map_index }}",
        "TLDR_INPUT_VERSION": "{{ ti.xcom_pull(task_ids='plan', key='input_version') or '' }}",
        **({"TMPDIR": STAGE_SCRATCH} if r.scratch_gb else {}),
        **{k: str(v) for k, v in (config.get("env") or {}).items()},
    }
    return {
        "namespace": config.get("namespace"),
        "in_cluster": config.get("in_cluster", True),
        "kubernetes_conn_id": config.get("kubernetes_conn_id"),
        "image": config["image"],
        "image_pull_policy": config.get("image_pull_policy"),
        "image_pull_secrets": [k8s.V1LocalObjectReference(name=n) for n in config.get("image_pull_secrets") or []],
        "service_account_name": config.get("service_account_name"),
        # Stages never call the Kubernetes API: no token in the pod (the worker execs the XCom sidecar).
        "automount_service_account_token": False,
        "name": f"tldr-{spec.name}",
        # The chart's pod config adds its release (app.kubernetes.io/instance): its NetworkPolicy admits
        # these pods to MLflow by it.
        "labels": {**(config.get("labels") or {}), "app.kubernetes.io/name": "tldr-vlp",
                   "app.kubernetes.io/component": spec.name},
        "cmds": cmds,
        "env_vars": [k8s.V1EnvVar(name=k, value=v) for k, v in env.items()],
        # Credentials only as references to Kubernetes Secrets: values never pass through Airflow.
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name))
                     for name in config.get("secret_env_from") or []],
        "container_resources": k8s.V1ResourceRequirements(requests=requests, limits=limits),
        # The restricted Pod Security Standard: non-root (the image's uid), no privilege escalation,
        # no capabilities, the runtime's seccomp profile; plus a read-only root filesystem, with
        # emptyDirs for what the stages write locally (local_volumes).
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=uid, run_as_group=uid, fs_group=uid,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        "container_security_context": restricted_container_context(uid),
        "xcom_sidecar_container_security_context": restricted_container_context(uid),
        "volumes": volumes,
        "volume_mounts": mounts,
        "node_selector": node_selector,
        "tolerations": [k8s.V1Toleration(**_snake(t)) for t in tolerations],
        "startup_timeout_seconds": int(config.get("startup_timeout_seconds", 900)),
        "get_logs": True,
        "log_events_on_failure": True,
        "do_xcom_push": True,
        # Delete pods that succeeded; keep failed ones for `kubectl logs/describe`.
        "on_finish_action": "delete_succeeded_pod",
    }


def local_volumes(r: Resources) -> tuple[list, list]:
    """(volumes, mounts): emptyDirs for what a stage writes locally, as the root filesystem is read-only:
    /tmp (staging, DeepSpeed checkpoints), the caches, and the shared memory and scratch `r` declares."""
    volumes = [k8s.V1Volume(name=name, empty_dir=k8s.V1EmptyDirVolumeSource()) for name in ("tmp", "cache")]
    mounts = [k8s.V1VolumeMount(name="tmp", mount_path="/tmp"), k8s.V1VolumeMount(name="cache", mount_path=STAGE_CACHE)]
    if r.shm_gb:
        # A container's own /dev/shm is 64 MiB, and DataLoader workers pass every batch through it.
        # Memory-backed: its files count toward the memory limit; the size limit caps them.
        volumes.append(k8s.V1Volume(name="shm", empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=f"{_quantity(r.shm_gb)}Gi")))
        mounts.append(k8s.V1VolumeMount(name="shm", mount_path="/dev/shm"))
    if r.scratch_gb:
        # Node disk for $TMPDIR; a pod that writes more than the size limit is evicted (not the node filled).
        volumes.append(k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(
            size_limit=f"{_quantity(r.scratch_gb)}Gi")))
        mounts.append(k8s.V1VolumeMount(name="scratch", mount_path=STAGE_SCRATCH))
    return volumes, mounts


def restricted_container_context(uid: int) -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        run_as_non_root=True, run_as_user=uid, allow_privilege_escalation=False, privileged=False,
        read_only_root_filesystem=True, capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def _snake(toleration: dict) -> dict:
    names = {"tolerationSeconds": "toleration_seconds"}
    return {names.get(k, k): v for k, v in toleration.items()}


def _pick(key: str):
    """A plain function for XComArg.map(): one shard group's command for one stage."""

    def pick(group: dict):
        return group[key]

    return pick


def _add_stage_tasks(group: str, plan, groups, config: dict) -> dict:
    """One task per stage in the current TaskGroup, wired along STAGES' deps; returns {stage: task}."""
    tasks = {}
    for spec in STAGES:
        tid = task_id(spec.name)
        if group == "local":
            common = {"task_id": tid, "append_env": True,
                      # a worker runs several stage tasks at once: OpenMP threads wait passively
                      "env": {"TLDR_CPUS": "shared", "TLDR_RUN_KEY": "{{ dag.dag_id }}/{{ run_id }}",
                              "TLDR_INPUT_VERSION": "{{ ti.xcom_pull(task_ids='plan', key='input_version') or '' }}"}}
            if spec.sharded:
                op = BashOperator.partial(**common).expand(bash_command=groups.map(_pick(f"local__{tid}")))
            else:
                op = BashOperator(**common, bash_command=plan[f"local__{tid}"])
        else:
            common = {"task_id": tid, **pod_settings(spec, config)}
            if spec.sharded:
                op = KubernetesPodOperator.partial(**common).expand(arguments=groups.map(_pick(f"pod__{tid}")))
            else:
                op = KubernetesPodOperator(**common, arguments=plan[f"pod__{tid}"])
        for dep in spec.deps:
            tasks[dep] >> op
        tasks[spec.name] = op
    return tasks


def _parse_result(value):
    """A stage's XCom: a dict from a pod's return.json, the JSON line a BashOperator pushed, or None."""
    if isinstance(value, str):
        return json.loads(value.strip().splitlines()[-1]) if value.strip() else None
    return value


def open_run(params, dag_id: str, run_id: str, input_url: str, input_version: str | None) -> dict:
    """The `plan` task: check the params, pick the captioner (tldr_tasks.captioners' policy), compute
    every task's command and open the run's MLflow parent run. Returns the plan plus `mlflow_run_id`
    and `captioner_reason`."""
    from tldr_tasks import captioners, preflight, tracking
    from tldr_tasks.contract import StageIO
    from tldr_tasks.runner import input_fingerprint

    cfg = check_params(params, input_url)
    # The stages' own preflight, on the whole run: input and eval input readable, output root writable.
    root = str(params["output_url"]).rstrip("/")
    with_eval = bool(params.get("run_evaluation"))
    preflight.check(cfg, StageIO(input=input_url, out=root, embed_cache=f"{root}/embed",
                                 eval_input=params.get("eval_input_url") if with_eval else None), with_eval=with_eval)
    crawl = input_fingerprint(input_url, input_version)
    growth = params.get("captioner_max_growth")  # 0 is a value (retrain on any growth); empty is the default
    choice = captioners.choose(root, cfg, crawl["version"], crawl["shards"],
                               retrain=bool(params.get("retrain_captioner")),
                               max_growth=MAX_GROWTH if growth is None else float(growth))
    plan = build_plan(params, run_id, executable=settings.tldr_executable(), result_json=settings.POD_RESULT_PATH,
                      input_url=input_url, input_version=input_version, captioner_url=choice["url"])
    tags = {"airflow.dag_id": dag_id, "airflow.run_id": run_id, "tldr.input_version": crawl["version"],
            "tldr.captioner": tracking.redact(choice["url"]), "tldr.captioner_choice": choice["reason"]}
    # max_active_runs=1: no other run of this DAG is alive now, so its parent runs still RUNNING (a run
    # marked failed or killed before its failure callback ran) are orphans: end them FAILED.
    tracking.end_stale_runs(f"tags.`airflow.dag_id` = '{dag_id}' and tags.`tldr.run_key` != "
                            f"'{run_key(dag_id, run_id)}' and tags.`tldr.run_key` LIKE '{dag_id}/%'",
                            "the next run of the DAG found it RUNNING")
    plan["mlflow_run_id"] = tracking.parent_run_id(cfg, StageIO(input=input_url, out=plan["out"]), tags=tags,
                                                   key=run_key(dag_id, run_id))
    plan["captioner_reason"] = choice["reason"]
    print(f"captioner {choice['url']}: {choice['reason']}\nMLflow run: {plan['mlflow_run_id']}")
    return plan


def build_compress_dag(dag_id: str, doc_md: str | None) -> DAG:
    config = settings.kubernetes_config()
    with DAG(
        dag_id=dag_id,
        doc_md=doc_md,
        description="TL;DR: compress a crawl into a small, better-captioned training set",
        # A newly registered crawl (tldr_ingest) or a person starts a run; never a clock, whose run would
        # compress the form's default input, which does not exist until tldr_ingest has registered a crawl.
        schedule=CRAWL_ASSET,
        start_date=None,
        catchup=False,
        # Runs share the captioner and the embedding cache: one at a time.
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        params=compress_params(),
        tags=["tldr-vlp", "compression", "mlops"],
    ) as dag:

        @task(multiple_outputs=True)
        def plan(params=None, run_id=None, ti=None, triggering_asset_events=None, dag_run=None) -> dict:
            """Every task's command for this run; refuses bad parameters before any work starts."""
            url, version = _landed_input(triggering_asset_events)
            try:
                # first: a conf key the form does not have (a typo would run with the default)
                check_conf(getattr(dag_run, "conf", None), params.keys())
                # A scheduled (Asset/cron) run compresses the landed crawl; a manual one what the form says.
                return open_run(params, ti.dag_id, run_id, url or params["input_url"], version)
            except ConfigError as err:
                # the same parameters fail the same way again: no retry, the reason in the task log
                raise AirflowFailException(f"error: {err}") from None

        @task(multiple_outputs=False)
        def shard_groups(groups: list) -> list[dict]:
            """One entry per shard group: the sharded stages' tasks (pods) are mapped over this list."""
            return groups

        @task.branch
        def choose_runner(runner: str) -> str:
            return f"{GROUPS[runner]}.{task_id(STAGES[0].name)}"

        @task.short_circuit(ignore_downstream_trigger_rules=False)
        def evaluation_requested(params=None) -> bool:
            return bool(params["run_evaluation"])

        @task(multiple_outputs=True, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS, outlets=[COMPRESSED_ASSET])
        def publish(plan: dict, ti=None, outlet_events=None) -> dict:
            """The run's outcome in one XCom: the output URL, the MLflow run id and the key metrics."""
            group = GROUPS[plan["runner"]]
            materialized = _parse_result(ti.xcom_pull(task_ids=f"{group}.materialize"))
            evaluated = _parse_result(ti.xcom_pull(task_ids=f"{group}.evaluate"))
            embeds = ti.xcom_pull(task_ids=f"{group}.embed") or []
            embeds = [_parse_result(e) for e in (embeds if isinstance(embeds, list) else [embeds]) if e]
            embed_totals: dict[str, float] = {}
            for result in embeds:
                for key, value in (result.get("metrics") or {}).items():
                    if isinstance(value, (int, float)) and key.startswith("shards_"):
                        embed_totals[key] = embed_totals.get(key, 0) + value
            summary = {
                "out": plan["out"],
                "shards_url": f"{plan['out']}/shards",
                "input": plan["input"],
                "input_version": plan["input_version"],
                "runner": plan["runner"],
                "captioner": plan["captioner"],
                "mlflow_run_id": plan["mlflow_run_id"],
                "metrics": (materialized or {}).get("metrics", {}),
                "embed": embed_totals,
                "evaluation": (evaluated or {}).get("metrics") if evaluated else None,
            }
            from tldr_tasks import tracking
            from tldr_tasks.runner import record_run

            # What local `compress` records too (metrics named as `tldr-vlp compare` shows them, the
            # manifest, report and plots, the lineage), read from the run folder: the same for both runners.
            record_run(plan["mlflow_run_id"], plan["out"])
            tracking.finish_parent(plan["mlflow_run_id"], "FINISHED")
            outlet_events[COMPRESSED_ASSET].extra = {k: summary[k] for k in ("out", "mlflow_run_id", "input_version")}
            print(f"compressed shards: {summary['shards_url']}\nMLflow run: {summary['mlflow_run_id']}")
            return summary

        run_plan = plan()
        groups = shard_groups(run_plan["groups"])
        choose = choose_runner(run_plan["runner"])
        want_evaluation = evaluation_requested()
        run_plan >> want_evaluation
        done = publish(run_plan)
        for group in GROUPS.values():
            with TaskGroup(group, tooltip=f"every stage with the {group} runner"):
                tasks = _add_stage_tasks(group, run_plan, groups, config)
            choose >> tasks[STAGES[0].name]
            for spec in STAGES:
                if spec.optional:
                    want_evaluation >> tasks[spec.name]
            # publish waits for the last required stage and for the optional ones (evaluate).
            required = [s for s in STAGES if not s.optional]
            [tasks[required[-1].name], *(tasks[s.name] for s in STAGES if s.optional)] >> done
    return dag
