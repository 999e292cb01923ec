"""clusters/ and jobs/: every job config loads under the strict typed config, the cluster
definitions validate against Ray's own schema (launcher) or KubeRay's field names (manifests), and
a `mars-ray train` job submitted with `ray job submit` runs across a real two-node local Ray."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from mars_ray.config import Config

JOBS, CLUSTERS = ROOT / "jobs", ROOT / "clusters"
RUNTIME_ENV = JOBS / "runtime_env.yaml"
OPENRLHF = JOBS / "openrlhf"
JOB_CONFIGS = sorted(p for p in JOBS.rglob("*.yaml") if p.name != "runtime_env.yaml")
LAUNCHER_YAMLS = sorted(CLUSTERS.glob("*.yaml"))
KUBERAY = CLUSTERS / "kuberay"
STAGES = {
    "prepare": ("data", "prepare"),
    "augment": ("augment",),
    "train": ("train",),
    "eval": ("eval",),
    "compare": ("compare",),
    "sweep": ("sweep",),
    "serve": ("serve",),
    "align": ("align",),
    "winrate": ("winrate",),
    "align-compare": ("align-compare",),
}
STRATEGIES = ("none", "uniform", "mars", "mars-nosem", "west-of-n", "adaboost")
# GPU node shapes the cluster definitions use: (CPUs, GPUs) per node.
INSTANCE_SHAPES = {"g5.48xlarge": (192, 8), "p4d.24xlarge": (96, 8), "a2-highgpu-8g": (96, 8)}
SHARED = "/mnt/shared/"


def ray_version() -> str:
    import ray

    return ray.__version__


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def job_cfg(path: Path, overrides: dict | None = None) -> Config:
    return Config.load(path, overrides)


# --------------------------------------------------------------------------------------------
# a. jobs/: run configs and the runtime_env
# --------------------------------------------------------------------------------------------


def test_jobs_tree_has_every_stage_in_both_sizes_and_the_paper():
    names = {p.relative_to(JOBS).as_posix() for p in JOB_CONFIGS}
    for size in ("laptop", "cluster"):
        for stage in STAGES:
            assert f"{size}/{stage}.yaml" in names
    assert {"paper/hh-rlhf.yaml", "paper/pku-saferlhf.yaml", "paper/ultrafeedback.yaml"} <= names
    assert RUNTIME_ENV.exists() and (JOBS / "README.md").exists()


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.relative_to(JOBS).as_posix())
def test_job_config_loads_strictly(path, monkeypatch):
    """Config.load rejects unknown keys, wrong types and cross-field problems; the file must pass
    with no API keys in the environment (endpoints are named by base_url, keys read at run time)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    raw = load_yaml(path)
    assert isinstance(raw, dict) and raw, f"{path} is not a mapping"
    cfg = job_cfg(path)
    # A job's working directory is a copy of --working-dir inside Ray's session directory, so a
    # relative output or data path would land (or be looked up) in that throw-away copy.
    assert os.path.isabs(cfg.output.dir), f"{path}: output.dir must be absolute"
    d = cfg.data.path
    assert d.startswith("builtin:") or os.path.isabs(d) or re.fullmatch(r"[\w.-]+/[\w.-]+", d), d
    # Round trip: the resolved config is itself a valid config with the same values.
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())).validate().to_dict() == cfg.to_dict()


@pytest.mark.parametrize("stage", STAGES)
def test_laptop_jobs_run_on_this_machine(stage):
    cfg = job_cfg(JOBS / "laptop" / f"{stage}.yaml")
    assert cfg.data.path.startswith("builtin:")
    refs = [
        cfg.model.reward,
        cfg.model.encoder,
        cfg.rewrite.model,
        cfg.paraphrase.model,
        cfg.rl.policy,
        cfg.rl.judge_model,
    ]
    assert all(r.startswith("builtin:") for r in refs), refs
    assert not cfg.train.use_gpu and cfg.resources.gpus_per_actor == 0 and not cfg.deepspeed.enabled
    assert cfg.train.num_workers <= 2 and cfg.resources.actors <= 2
    assert (
        not cfg.rl.use_gpu and cfg.rl.num_workers <= 2 and cfg.serve.num_gpus == 0 and cfg.rl.judge_backend == "local"
    )
    assert cfg.serve.host == "127.0.0.1"
    assert not cfg.output.dir.startswith(SHARED)
    # Two whole-CPU trials at once deadlock Tune on 2 cores (MACHINE-NOTES): one at a time here.
    assert cfg.compare.max_concurrent == 1 and cfg.tune.max_concurrent == 1


def _cluster_shapes() -> dict[str, tuple[int, int, int]]:
    """(nodes, CPUs per GPU node, GPUs per GPU node) of every cluster definition."""
    shapes = {}
    for path in LAUNCHER_YAMLS:
        c = load_yaml(path)
        for name, t in c["available_node_types"].items():
            if name == c["head_node_type"]:
                continue
            res = t.get("resources") or {}
            inst = t["node_config"].get("InstanceType") or t["node_config"].get("machineType")
            cpus, gpus = res.get("CPU"), res.get("GPU")
            if cpus is None or gpus is None:
                cpus, gpus = INSTANCE_SHAPES[inst]
            shapes[path.name] = (t["min_workers"], cpus, gpus)
    rc = load_yaml(KUBERAY / "raycluster.yaml")
    for g in rc["spec"]["workerGroupSpecs"]:
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        shapes[f"raycluster/{g['groupName']}"] = (g["minReplicas"], int(lim["cpu"]), int(lim["nvidia.com/gpu"]))
    return shapes


def test_cluster_jobs_ask_for_gpus_deepspeed_and_fit_every_cluster_definition():
    prep = job_cfg(JOBS / "cluster" / "prepare.yaml")
    aug = job_cfg(JOBS / "cluster" / "augment.yaml")
    train = job_cfg(JOBS / "cluster" / "train.yaml")
    for cfg in (prep, aug, train):
        assert cfg.output.dir.startswith(SHARED), "cluster runs must live on the shared filesystem"
        assert cfg.model.offline is False
    # prepare fetches from the hub; augment/train read what prepare wrote, with the same splits.
    assert not prep.data.path.startswith(("builtin:", "/"))
    for cfg in (aug, train):
        assert cfg.data.path == f"{prep.output.dir}/pairs.parquet"
        assert (cfg.seed, cfg.data.val_fraction, cfg.data.test_fraction) == (
            prep.seed,
            prep.data.val_fraction,
            prep.data.test_fraction,
        )
        assert not cfg.model.reward.startswith("builtin:") and not cfg.model.encoder.startswith("builtin:")
        assert cfg.resources.gpus_per_actor >= 1 and cfg.resources.actors == 16
        assert cfg.model.cache_dir and cfg.model.cache_dir.startswith(SHARED)
    t = train.train
    assert t.use_gpu and t.num_workers == 16
    assert train.deepspeed.enabled and train.deepspeed.stage in (2, 3) and train.train.precision in ("auto", "bf16")
    from mars_ray.train.deepspeed_config import build_ds_config

    ds = build_ds_config(train.deepspeed, t, world_size=t.num_workers)
    assert ds["zero_optimization"]["stage"] == train.deepspeed.stage
    # The jobs fit each cluster definition: 16 GPUs over the GPU nodes, CPUs per worker/actor too.
    for name, (nodes, cpus, gpus) in _cluster_shapes().items():
        assert nodes * gpus >= t.num_workers, name
        assert nodes * gpus >= aug.resources.actors * aug.resources.gpus_per_actor, name
        per_node = -(-t.num_workers // nodes)
        assert per_node <= gpus and per_node * (t.cpus_per_worker or 1) <= cpus, name
        assert per_node * (aug.resources.cpus_per_actor or 1) <= cpus, name


def test_cluster_jobs_for_evaluation_serving_tuning_and_the_policy_stage(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    shapes = _cluster_shapes()
    gpus_total = min(n * g for n, _, g in shapes.values())
    for stage in ("eval", "compare", "sweep", "serve", "align", "winrate", "align-compare"):
        cfg = job_cfg(JOBS / "cluster" / f"{stage}.yaml")
        assert cfg.output.dir.startswith(SHARED) and cfg.model.offline is False, stage
        assert cfg.model.cache_dir and cfg.model.cache_dir.startswith(SHARED), stage
    compare = job_cfg(JOBS / "cluster" / "compare.yaml")
    assert set(compare.compare.strategies) == set(STRATEGIES) and len(compare.compare.seeds) == 3
    assert compare.train.use_gpu and compare.compare.max_concurrent <= gpus_total
    sweep = job_cfg(JOBS / "cluster" / "sweep.yaml")
    assert {"mars.tau", "mars.budget"} <= set(sweep.tune.space) and sweep.tune.scheduler == "asha"
    assert sweep.tune.max_concurrent <= gpus_total
    serve = job_cfg(JOBS / "cluster" / "serve.yaml")
    assert serve.serve.num_gpus >= 1 and serve.serve.max_replicas and serve.serve.auth_token_env
    assert serve.serve.host == "0.0.0.0" and serve.serve.max_batch_items >= 1024
    align = job_cfg(JOBS / "cluster" / "align.yaml")
    r = align.rl
    assert r.use_gpu and r.num_workers == 8 and (r.kl_coef, r.clip, r.lora) == (0.02, 0.2, True)
    assert not r.reward_deploy and align.serve.app_name == serve.serve.app_name  # the serve job's app
    for name, (nodes, _cpus, gpus) in shapes.items():
        assert nodes * gpus >= r.num_workers + serve.serve.min_replicas, name
    win = job_cfg(JOBS / "cluster" / "winrate.yaml")
    assert (win.rl.judge_backend, win.rl.judge_mode, win.rl.judge_model) == ("openai", "text", "gpt-4.1")
    cmp = job_cfg(JOBS / "cluster" / "align-compare.yaml")
    assert len(cmp.rl.reward_models) >= 2
    assert all(m.startswith(compare.output.dir + "/trials/") for m in cmp.rl.reward_models)


def test_paper_pipeline_compares_then_aligns_against_the_compared_reward_models(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = job_cfg(JOBS / "paper" / "hh-rlhf.yaml")
    cmp = job_cfg(JOBS / "paper" / "pipeline" / "hh-rlhf-compare.yaml")
    # The same experiment as the per-strategy paper runs: data, model, budget, rewriter, paraphraser.
    for key in (
        "data.path",
        "data.max_pairs",
        "model.reward",
        "model.encoder",
        "mars.tau",
        "mars.budget",
        "mars.epochs",
        "rewrite.model",
        "paraphrase.model",
        "train.lr",
        "train.lora_r",
        "seed",
    ):
        assert cmp.get(key) == base.get(key), key
    assert set(cmp.compare.strategies) == set(STRATEGIES) - {"west-of-n"} and cmp.compare.seeds == [0, 1, 2]
    al = job_cfg(JOBS / "paper" / "pipeline" / "hh-rlhf-align-compare.yaml")
    assert al.rl.policy == "TinyLlama/TinyLlama-1.1B-Chat-v1.0" and (al.rl.kl_coef, al.rl.clip) == (0.02, 0.2)
    assert (al.data.path, al.data.max_pairs, al.seed) == (base.data.path, base.data.max_pairs, base.seed)
    assert al.rl.judge_model == "gpt-4.1" and al.rl.judge_mode == "text"
    names = set(al.rl.reward_models)
    assert f"{cmp.output.dir}/trials/strategy=mars_seed=0" in names
    assert f"{cmp.output.dir}/trials/strategy=uniform_seed=0" in names
    assert any("west-of-n" in n for n in names)


OPENRLHF_FLAGS = ROOT / "tests" / "data" / "openrlhf_0.11.2_train_ppo_ray_flags.txt"


def test_openrlhf_ppo_job_speaks_openrlhf_0_11_2_against_our_get_reward():
    """jobs/openrlhf/ppo.sh: every flag is one of OpenRLHF 0.11.2's `train_ppo_ray` flags (the list
    was read off that release's argument parser), value-based PPO (GAE + a critic), KL 0.02 and
    clip 0.2, rewards from `mars-ray serve`'s /get_reward, and the runtime env pins that release."""
    from ray.runtime_env import RuntimeEnv

    known = set(OPENRLHF_FLAGS.read_text().split())
    text = (OPENRLHF / "ppo.sh").read_text(encoding="utf-8")
    submit = next(line for line in text.splitlines() if line.startswith("ray job submit"))
    cmd = shlex.split(submit)
    i = cmd.index("--")
    assert cmd[i + 1 : i + 4] == ["python3", "-m", "openrlhf.cli.train_ppo_ray"]
    flags = [t for t in cmd[i + 4 :] if t.startswith("--")]
    assert flags and not set(flags) - known, set(flags) - known
    args = dict(zip(cmd[i + 4 :], cmd[i + 5 :]))
    assert args["--algo.advantage.estimator"] == "gae" and "--critic.model_name_or_path" in args
    assert (args["--algo.kl.init_coef"], args["--actor.eps_clip"]) == ("0.02", "0.2")
    assert args["--reward.remote_url"].endswith(":8000/get_reward")
    assert cmd[cmd.index("--runtime-env") + 1] == "jobs/openrlhf/runtime_env.yaml"
    env = load_yaml(OPENRLHF / "runtime_env.yaml")
    RuntimeEnv(**env)
    assert any(pkg.startswith("openrlhf") and "==0.11.2" in pkg for pkg in env["pip"]["packages"])
    # Step 1 of the script is a real `mars-ray serve` job line with a real config.
    serve_line = next(
        line.lstrip("# ") for line in text.splitlines() if "mars-ray serve" in line and "ray job submit" in line
    )
    from mars_ray.cli import _parser

    entry = shlex.split(serve_line)
    entry = entry[entry.index("--") + 1 :]
    assert _parser().parse_known_args(entry[1:])[0].func.__name__ == "cmd_serve"
    assert (ROOT / entry[entry.index("--config") + 1]).is_file()


PAPER = sorted((JOBS / "paper").glob("*.yaml"))
WEST_OF_N_EXTRA = {
    "paraphrase.backend": "openai",
    "paraphrase.model": "gpt-4.1-mini",
    "paraphrase.base_url": "https://api.openai.com/v1",
}


def paper_overrides(strategy: str, seed: int = 0) -> dict[str, str]:
    over = {"mars.strategy": strategy, "seed": str(seed)}
    return {**over, **WEST_OF_N_EXTRA} if strategy == "west-of-n" else over


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_configs_match_the_paper_for_every_strategy(path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = job_cfg(path)
    d = base.data
    # 1,000 training pairs: 1,250 selected, 10% val + 10% test held out.
    assert d.max_pairs == 1250 and d.val_fraction == d.test_fraction == 0.1
    assert round(d.max_pairs * (1 - d.val_fraction - d.test_fraction)) == 1000
    assert (d.max_prompt_tokens, d.max_response_tokens) == (512, 192)
    assert base.model.reward == "microsoft/deberta-v3-base"
    assert base.model.encoder == "sentence-transformers/all-mpnet-base-v2"
    m = base.mars
    assert (m.strategy, m.allocation, m.tau, m.budget) == ("mars", "signed", 0.5, 5000)
    t = base.train
    assert (t.lr, t.lora, t.lora_r, t.lora_alpha) == (2e-5, True, 16, 32) and t.use_gpu
    assert (base.rewrite.backend, base.rewrite.model) == ("openai", "gpt-4.1")
    assert (base.rewrite.max_attempts_rejected, base.rewrite.max_attempts_chosen) == (5, 5)
    assert (base.paraphrase.backend, base.paraphrase.model) == ("seq2seq", "humarin/chatgpt_paraphraser_on_T5_base")
    assert base.paraphrase.num_beams > 1 and base.paraphrase.temperature == 0
    assert base.output.dir.startswith(SHARED)
    # The README's override list gives every strategy a valid config (same data, seed, budget).
    readme = (JOBS / "README.md").read_text(encoding="utf-8")
    assert f"for strategy in {' '.join(STRATEGIES)}" in readme
    assert " ".join(f"--{k} {v}" for k, v in WEST_OF_N_EXTRA.items()) in readme
    for strategy in STRATEGIES:
        cfg = job_cfg(path, paper_overrides(strategy))
        assert cfg.mars.strategy == strategy
        assert (cfg.data.path, cfg.data.max_pairs, cfg.mars.budget) == (d.path, d.max_pairs, m.budget)


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    raw = load_yaml(RUNTIME_ENV)
    assert set(raw) <= set(RuntimeEnv.known_fields), set(raw) - set(RuntimeEnv.known_fields)
    env = RuntimeEnv(**raw)  # Ray's own type checks (env_vars str -> str, config fields, ...)
    assert env.to_dict()["env_vars"] == raw["env_vars"]
    assert "working_dir" not in raw, "the working directory is given on the command line (--working-dir .)"
    assert {".git", ".venv", "runs"} <= set(raw["excludes"])
    assert not [k for k in raw.get("env_vars", {}) if re.search(r"(^|_)(API_KEY|KEY|TOKEN|SECRET|PASSWORD)$", k)], (
        "no secrets here"
    )
    assert "pip" not in raw and "conda" not in raw, "dependencies come with the cluster's image / setup"
    # The same environment is what the RayJob manifest hands to its job.
    rj = load_yaml(KUBERAY / "rayjob.yaml")
    assert yaml.safe_load(rj["spec"]["runtimeEnvYAML"])["env_vars"] == raw["env_vars"]


def _readme_commands(path: Path) -> list[list[str]]:
    """Every `ray job submit ...` command of a README (continuation lines joined)."""
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    return [
        shlex.split(line.strip(), comments=True)
        for line in text.splitlines()
        if line.strip().startswith("ray job submit")
    ]


def test_jobs_readme_commands_are_real():
    from mars_ray.cli import _parser

    cmds = _readme_commands(JOBS / "README.md")
    assert len(cmds) >= 6
    used = set()
    for cmd in cmds:
        i = cmd.index("--")
        opts, entry = cmd[:i], cmd[i + 1 :]
        assert "--address" in opts and opts[opts.index("--runtime-env") + 1] == "jobs/runtime_env.yaml"
        assert opts[opts.index("--working-dir") + 1] == "."
        assert entry[0] == "mars-ray"
        args, _ = _parser().parse_known_args(entry[1:])  # the subcommand exists
        assert args.func.__name__.startswith("cmd_")
        if "--config" in entry:
            conf = entry[entry.index("--config") + 1]
            # The paper loop's `jobs/paper/$dataset.yaml` must exist for every dataset it names.
            for c in [conf.replace("$dataset", p.stem) for p in PAPER] if "$dataset" in conf else [conf]:
                assert (ROOT / c).is_file(), c
                used.add(c)
    assert {f"jobs/{s}/{n}.yaml" for s in ("laptop", "cluster") for n in STAGES} <= used
    assert {p.relative_to(ROOT).as_posix() for p in PAPER} <= used


# --------------------------------------------------------------------------------------------
# b. clusters/: launcher YAMLs against Ray's schema, KubeRay manifests structurally
# --------------------------------------------------------------------------------------------


def _ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


def test_launcher_yamls_exist_for_aws_and_gcp():
    providers = {load_yaml(p)["provider"]["type"] for p in LAUNCHER_YAMLS}
    assert {"aws", "gcp"} <= providers


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_rays_schema(path):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml(path)
    schema = _ray_schema()
    jsonschema.validate(raw, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(raw)))  # after Ray fills its provider defaults, as `ray up` does
    # The schema is strict: a misspelt key is caught (so passing above means something).
    bad = copy.deepcopy(raw)
    bad["available_node_types"][raw["head_node_type"]]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_cpu_head_gpu_workers_pinned_ray(path):
    c = load_yaml(path)
    v = ray_version()
    head, types = c["head_node_type"], c["available_node_types"]
    assert types[head]["resources"].get("GPU", 0) == 0 and types[head]["resources"].get("CPU") == 0
    gpu_types = [n for n, t in types.items() if n != head]
    assert gpu_types
    for n in gpu_types:
        t = types[n]
        inst = t["node_config"].get("InstanceType") or t["node_config"].get("machineType")
        gpus = t["resources"].get("GPU") or INSTANCE_SHAPES[inst][1]
        assert gpus == 8 and t["min_workers"] == t["max_workers"] == 2
        # GPU nodes: the plain pip install (CUDA torch from PyPI), never the CPU wheel index.
        setup = " ".join(t.get("worker_setup_commands", []) + c["worker_setup_commands"] + c["setup_commands"])
        assert "whl/cpu" not in setup and "~/mars_ray" in setup
        # torch pinned before anything pulls an unpinned one, and CUDA checked at set-up (issue 39)
        own = t["worker_setup_commands"]
        assert own[0] == 'pip install --no-cache-dir "torch==2.13.0"', own
        assert any("torch.cuda.is_available()" in cmd for cmd in own), own
    assert any("whl/cpu" in cmd for cmd in c["head_setup_commands"]), "the CPU head installs CPU torch first"
    d = c["docker"]
    assert d["head_image"] == f"rayproject/ray:{v}-py311-cpu" and d["worker_image"] == f"rayproject/ray:{v}-py311-gpu"
    pins = re.findall(r"ray\[[\w,]+\]==([\d.]+)", yaml.safe_dump(c))
    assert pins and set(pins) == {v}
    assert c["file_mounts"] == {"~/mars_ray": "."}
    assert any("/mnt/shared:/mnt/shared" in o for o in d["run_options"])
    assert any("/mnt/shared" in cmd for cmd in c["initialization_commands"])


# Field names of KubeRay's ray.io/v1 Go types (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec,
# RayJobSpec): an unknown key here would be silently dropped by the API server.
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
    "schedule",
}
CONTAINER_FIELDS = {
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "resources",
    "ports",
    "env",
    "envFrom",
    "volumeMounts",
    "lifecycle",
    "securityContext",
    "readinessProbe",
    "livenessProbe",
    "workingDir",
}


def _check_pod_template(tpl: dict, where: str, *, gpu: bool) -> None:
    spec = tpl["spec"]
    containers = spec["containers"]
    assert containers, where
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in containers:
        assert set(c) <= CONTAINER_FIELDS, (where, set(c) - CONTAINER_FIELDS)
        assert c["name"] and c["image"], where
        res = c["resources"]
        assert res["limits"] and res["requests"], where
        assert all(isinstance(v, str) for v in res["limits"].values()), f"{where}: quantities as strings"
        assert ("nvidia.com/gpu" in res["limits"]) == gpu, where
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert mounts.get("/mnt/shared") in volumes, f"{where}: the shared filesystem is not mounted"
        assert set(mounts.values()) <= volumes, where
        assert c["image"].endswith("-gpu" if gpu else "-cpu"), where
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    pvc = load_yaml(KUBERAY / "shared-storage.yaml")
    assert claims == [pvc["metadata"]["name"]] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _check_raycluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, (where, set(spec) - RAYCLUSTER_SPEC_FIELDS)
    assert spec["rayVersion"] == ray_version()
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS and {"rayStartParams", "template"} <= set(head)
    params = head["rayStartParams"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), "rayStartParams are strings"
    assert params.get("num-cpus") == "0", "no Ray work on the head"
    _check_pod_template(head["template"], f"{where} head", gpu=False)
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert set(g) <= WORKER_GROUP_FIELDS, (where, set(g) - WORKER_GROUP_FIELDS)
        assert {"groupName", "rayStartParams", "template"} <= set(g)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _check_pod_template(g["template"], f"{where} {g['groupName']}", gpu=True)
    images = {c["image"] for g in [head, *groups] for c in g["template"]["spec"]["containers"]}
    assert len({i.rsplit("-", 1)[0] for i in images}) == 1, "one image, CPU and GPU builds"


def test_kuberay_raycluster_manifest():
    rc = load_yaml(KUBERAY / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    _check_raycluster_spec(rc["spec"], "RayCluster")


def test_kuberay_rayjob_manifest_runs_a_repo_job_config():
    from ray.runtime_env import RuntimeEnv

    from mars_ray.cli import _parser

    rj = load_yaml(KUBERAY / "rayjob.yaml")
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob" and rj["metadata"]["name"]
    spec = rj["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    _check_raycluster_spec(spec["rayClusterSpec"], "RayJob")
    assert spec["rayClusterSpec"] == load_yaml(KUBERAY / "raycluster.yaml")["spec"], "keep the two clusters equal"
    entry = shlex.split(spec["entrypoint"])
    assert entry[0] == "mars-ray"
    assert _parser().parse_known_args(entry[1:])[0].func.__name__ == "cmd_train"
    conf = entry[entry.index("--config") + 1]
    # The image keeps this checkout at /home/ray/mars_ray (clusters/docker/Dockerfile).
    assert conf.startswith("/home/ray/mars_ray/")
    local = ROOT / conf.removeprefix("/home/ray/mars_ray/")
    assert local.is_file() and local.is_relative_to(JOBS)
    assert job_cfg(local).train.use_gpu
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def test_dockerfile_pins_ray_and_keeps_the_checkout_where_the_rayjob_expects_it():
    text = (CLUSTERS / "docker" / "Dockerfile").read_text(encoding="utf-8")
    v = ray_version()
    assert f"ARG BASE_IMAGE=rayproject/ray:{v}-py311-gpu" in text
    assert re.findall(r"ray\[[\w,]+\]==([\d.]+)", text) == [v]
    assert "COPY --chown=1000:100 . /home/ray/mars_ray" in text
    ignore = (CLUSTERS / "docker" / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv", "runs"} <= set(ignore)


def test_clusters_readme_names_every_definition_and_edit_marker():
    readme = (CLUSTERS / "README.md").read_text(encoding="utf-8")
    for p in [*LAUNCHER_YAMLS, *KUBERAY.glob("*.yaml"), CLUSTERS / "docker" / "Dockerfile"]:
        assert p.relative_to(ROOT).as_posix() in readme, p
    # Every placeholder in the definitions is explained in the README.
    markers = set()
    for p in [*LAUNCHER_YAMLS, *KUBERAY.glob("*.yaml")]:
        markers |= set(re.findall(r"EDIT[-\w]*", p.read_text(encoding="utf-8")))
    for m in markers - {"EDIT"}:
        assert m in readme, m


# --------------------------------------------------------------------------------------------
# c. End to end: `ray job submit` of `mars-ray train` on a two-node local Ray
# --------------------------------------------------------------------------------------------

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head + one more node, 1 CPU each: with 1-CPU actors and workers, a pool of 2 must use both."""
    from _ray_cluster import LocalRayCluster

    cluster = LocalRayCluster.start(head_cpus=1, worker_cpus=(1,))
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _tiny_overrides(bert: Path, llama: Path, cache: Path) -> dict[str, str]:
    """On top of jobs/laptop/train.yaml: tiny models, tiny data, 2 stage actors and 2 Train workers
    of 1 CPU each (so they cannot share a node)."""
    return {
        "model.reward": str(bert),
        "model.encoder": str(bert),
        "model.cache_dir": str(cache),
        "rewrite.model": str(llama),
        "paraphrase.model": str(llama),
        "rewrite.max_new_tokens": "12",
        "rewrite.gate": "false",  # a random tiny model never writes a reply the gate would pass
        "paraphrase.max_new_tokens": "12",
        "paraphrase.num_beams": "1",
        "rewrite.max_attempts_rejected": "1",
        "rewrite.max_attempts_chosen": "1",
        "paraphrase.min_length_ratio": "0.01",
        "paraphrase.max_length_ratio": "100",
        "paraphrase.max_copy_similarity": "1.0",
        "paraphrase.min_semantic_similarity": "0.0",
        "paraphrase.temperature": "1.0",
        "paraphrase.topup_rounds": "0",
        "data.max_pairs": "30",
        "data.val_fraction": "0.2",
        "data.test_fraction": "0.2",
        "data.split_by": "pair",
        "mars.strategy": "mars",
        "mars.epochs": "1",
        "mars.budget": "12",
        "mars.warmup_passes": "0",
        "train.batch_size": "4",
        "train.lr": "1e-3",
        "train.lora_r": "4",
        "train.lora_alpha": "8",
        "train.num_workers": "2",
        "train.cpus_per_worker": "1",
        "resources.actors": "2",
        "resources.cpus_per_actor": "1",
        "resources.batch_size": "8",
        "paraphrase.batch_size": "8",
        "semantic.batch_size": "8",
    }


def _job_cmd(address: str, sid: str, config: str, overrides: dict[str, str], *, wait: bool) -> list[str]:
    return [
        "ray",
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        sid,
        "--runtime-env",
        str(RUNTIME_ENV),
        "--working-dir",
        str(ROOT),
        *([] if wait else ["--no-wait"]),
        "--",
        "mars-ray",
        "train",
        "--config",
        config,
        *[f"--{k}={v}" for k, v in overrides.items()],
    ]


def _actors_by_node(address: str, job_id: str) -> dict[str, Counter]:
    """{node_id: Counter(class_name)} of every actor the job created, dead or alive."""
    from _ray_cluster import as_dict
    from ray.util.state import list_actors

    rows = [
        as_dict(a) for a in list_actors(address=address, filters=[("job_id", "=", job_id)], detail=True, limit=10000)
    ]
    out: dict[str, Counter] = defaultdict(Counter)
    for a in rows:
        # An actor killed before it was placed (e.g. a pool scaled down at a stage's end) has no node.
        out[a["node_id"] or "unplaced"][a["class_name"]] += 1
    return out


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_train_job_spans_two_nodes_and_stops_cleanly(two_node_cluster, tiny_bert_dir, tiny_llama_dir, tmp_path):
    from _ray_cluster import submit
    from ray.job_submission import JobStatus, JobSubmissionClient

    cluster = two_node_cluster
    nodes = cluster.wait_for_nodes(2, timeout=60)
    node_ids = {n["node_id"] for n in nodes}
    assert len(node_ids) == 2
    client = JobSubmissionClient(cluster.address)
    over = _tiny_overrides(tiny_bert_dir, tiny_llama_dir, tmp_path / "cache")
    config = str(JOBS / "laptop" / "train.yaml")  # the shipped laptop config, shrunk by overrides

    # 1. A complete run, submitted exactly as jobs/README.md says (plus the overrides).
    run = tmp_path / "run"
    sid = f"mars-e2e-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    job = submit(
        _job_cmd(cluster.address, sid, config, {**over, "output.dir": str(run)}, wait=True), cluster.env, timeout=600
    )
    seconds = time.time() - t0
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-4000:]
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED
    assert ": mars, 1 epoch(s)" in job.stdout and "serve it       mars-ray serve --model" in job.stdout

    # The run directory is complete.
    cfg = Config.load(run / "config.yaml")
    assert (cfg.resources.actors, cfg.train.num_workers, cfg.mars.strategy) == (2, 2, "mars")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["world_size"] == 2
    assert 0 <= rows[0]["val_accuracy"] <= 1 and rows[0]["test_n"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and Path(summary["model"]) == run / "model"
    assert (run / "metrics.csv").exists() and (run / "epochs" / "001" / "manifest.json").exists()
    assert (run / "model" / "config.json").exists() and list((run / "model").glob("*.safetensors"))
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(run / "model").config.num_labels == 1

    # The job's Ray Data stage actors and Ray Train workers ran on both nodes.
    job_id = client.get_job_info(sid).job_id
    by_node = _actors_by_node(cluster.address, job_id)
    report = {n[:8]: dict(c) for n, c in by_node.items()}
    print(f"\ntrain job {seconds:.1f}s; actors per node: {report}")
    assert set(by_node) - {"unplaced"} == node_ids, report
    # Every data stage's pool (2 actors of 1 CPU: one per node) and the Ray Train worker group.
    # jobs/runtime_env.yaml makes a stage wait for its whole pool, so no actor is left unplaced.
    stage_actors = [
        f"MapWorker(MapBatches({a}))" for a in ("ScoreActor", "EmbedActor", "RefineActor", "ParaphraseActor")
    ]
    for cls in [*stage_actors, "RayTrainWorker"]:
        assert all(by_node[n][cls] > 0 for n in node_ids), (cls, report)
    assert "unplaced" not in by_node, report

    # 2. A long job, stopped with `ray job stop` while it trains.
    long_run = tmp_path / "long"
    sid2 = f"mars-e2e-stop-{uuid.uuid4().hex[:8]}"
    long_over = {
        **over,
        "mars.strategy": "none",
        "mars.epochs": "50",
        "train.passes": "1000",
        "output.dir": str(long_run),
    }
    out = submit(_job_cmd(cluster.address, sid2, config, long_over, wait=False), cluster.env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    deadline = time.time() + 300
    while not (long_run / "ray_train" / "epoch_001").exists():  # training under way
        status = client.get_job_status(sid2)
        assert status not in TERMINAL, client.get_job_logs(sid2)[-3000:]
        assert time.time() < deadline, "the long job never reached training"
        time.sleep(1)
    time.sleep(3)
    t_stop = time.time()
    stop = subprocess.run(
        ["ray", "job", "stop", "--address", cluster.address, sid2],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    while client.get_job_status(sid2) not in TERMINAL:
        assert time.time() - t_stop < 60, "the job did not stop within 60 s"
        time.sleep(0.5)
    stop_s = time.time() - t_stop
    assert client.get_job_status(sid2) == JobStatus.STOPPED
    # Nothing of the stopped job is left running on either node.
    job2 = client.get_job_info(sid2).job_id
    from _ray_cluster import as_dict
    from ray.util.state import list_actors, list_placement_groups

    # Ray Train's PlacementGroupCleaner is detached on purpose: it outlives its controller, removes
    # the run's placement group and then exits on its own (polling the controller's state). What
    # must hold: no actor of the job but that cleaner stays alive, and every placement group of
    # the job is removed, so the stopped job holds no resources.
    def leftovers():
        alive = [
            as_dict(a)
            for a in list_actors(
                address=cluster.address, detail=True, filters=[("job_id", "=", job2), ("state", "=", "ALIVE")]
            )
        ]
        pgs = [
            as_dict(p)
            for p in list_placement_groups(
                address=cluster.address, detail=True, filters=[("creator_job_id", "=", job2)]
            )
        ]
        return (
            [a for a in alive if a["class_name"] != "PlacementGroupCleaner"],
            [p for p in pgs if p["state"] != "REMOVED"],
        )

    deadline = time.time() + 120
    while True:
        alive, pgs = leftovers()
        if (not alive and not pgs) or time.time() > deadline:
            break
        time.sleep(1)
    assert not alive, [(a["class_name"], a["node_id"][:8]) for a in alive]
    assert not pgs, [(p["placement_group_id"][:8], p["state"]) for p in pgs]
    assert len(cluster.wait_for_nodes(2, timeout=10)) == 2  # stopping a job leaves the nodes up
    print(
        f"job stop -> STOPPED in {stop_s:.1f}s; actors of the stopped job per node: "
        f"{ {n[:8]: dict(c) for n, c in _actors_by_node(cluster.address, job2).items()} }"
    )
    for d in (run, long_run, tmp_path / "cache"):  # checkpoints and models: do not leave them behind
        shutil.rmtree(d, ignore_errors=True)
