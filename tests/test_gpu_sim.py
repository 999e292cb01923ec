"""A simulated GPU cluster (marker ``gpu_sim``): local Ray nodes that advertise the GPUs, CPUs and
accelerator label of each cluster definition's GPU node type, on this CPU-only machine.

Every phase of every file in ``jobs/cluster/``, ``jobs/openrlhf/`` and ``clusters/serve/`` is
reserved there as Ray would place it (``mars_ray.placement``), alone or beside what must run at
the same time (the reward server next to the policy stage or OpenRLHF, the vLLM app next to the
augment pools): a phase that would stay pending on the real cluster fails the test by name.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _ray_cluster import BIN_DIR, LocalRayCluster
from conftest import ROOT
from test_clusters_jobs import JOBS, LAUNCHER_YAMLS, _cluster_shapes, job_cfg

from mars_ray.placement import Phase, command_phases, serve_bundles

pytestmark = [pytest.mark.gpu_sim, pytest.mark.ray, pytest.mark.timeout(600)]

# What Ray's NVML detection names each instance type's GPU (research notes: A10G on g5, A100 on
# p4d and a2); a simulated node advertises it as the resource accelerator_type:<X>, as a real one.
ACCELERATOR = {"g5.48xlarge": "A10G", "p4d.24xlarge": "A100", "a2-highgpu-8g": "A100"}
SIM_ENV = {"RAY_enable_worker_prestart": "0"}  # no idle workers for 100+ advertised CPUs
NODE_ARGS = ("--object-store-memory", "150000000")
VLLM_APP = ROOT / "clusters" / "serve" / "vllm-openai.yaml"
PPO = JOBS / "openrlhf" / "ppo.sh"
COMMAND = {"augment-vllm": "augment"}  # job file stem -> mars-ray command, where they differ


def _accelerators() -> dict[str, str | None]:
    """Cluster definition -> the accelerator its GPU nodes report (None: not known from the file)."""
    out: dict[str, str | None] = {}
    for path in LAUNCHER_YAMLS:
        c = yaml.safe_load(path.read_text())
        for name, t in c["available_node_types"].items():
            if name != c["head_node_type"]:
                inst = t["node_config"].get("InstanceType") or t["node_config"].get("machineType")
                out[path.name] = ACCELERATOR.get(inst)
    return out


def _shapes() -> dict[tuple[int, int, int, str | None], list[str]]:
    """Distinct (nodes, CPUs, GPUs, accelerator) node shapes -> the cluster definitions with it."""
    acc = _accelerators()
    out: dict[tuple, list[str]] = {}
    for name, (nodes, cpus, gpus) in _cluster_shapes().items():
        out.setdefault((nodes, cpus, gpus, acc.get(name)), []).append(name)
    return out


SHAPES = _shapes()


# ------------------------------------------------------------------ other projects' requests


def openrlhf_bundles(script: Path) -> tuple[dict[str, float], ...]:
    """What OpenRLHF 0.11.2's ``train_ppo_ray`` reserves for the flags in ``script`` (read from its
    source: openrlhf/cli/train_ppo_ray.py, trainer/ray/launcher.py, trainer/ray/vllm_engine.py):
    one {GPU: 1, CPU: 1} bundle per GPU of the actor group (the reference shares it when
    colocated), of the critic group, of the reference group when not colocated and the KL is on,
    of the reward group when the reward model is not remote, and per vLLM engine x tensor-parallel
    size."""
    line = next(x for x in script.read_text().splitlines() if "openrlhf.cli.train_ppo_ray" in x)
    argv = shlex.split(line.split(" -- ", 1)[1])
    flags: dict[str, str | bool] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            flags[a[2:]] = True if (not nxt or nxt.startswith("--")) else nxt

    def group(role: str) -> int:
        return int(flags.get(f"{role}.num_nodes", 1)) * int(flags.get(f"{role}.num_gpus_per_node", 1))

    gpus = group("actor")
    kl_on = float(flags.get("algo.kl.init_coef", 0.001)) > 0
    if kl_on and not (flags.get("train.colocate_actor_ref") or flags.get("train.colocate_all")):
        gpus += group("ref")
    if flags.get("critic.model_name_or_path"):
        gpus += group("critic")
    if not flags.get("reward.remote_url"):
        gpus += group("reward")
    gpus += int(flags.get("vllm.num_engines", 0)) * int(flags.get("vllm.tensor_parallel_size", 1))
    return tuple({"GPU": 1.0, "CPU": 1.0} for _ in range(gpus))


def vllm_app_bundles(path: Path) -> tuple[dict[str, float], ...]:
    """What Ray Serve LLM (Ray 2.60, ray/llm/_internal/serve: LLMServer.get_deployment_options and
    vllm_models.placement_bundles) reserves for each app of a Serve config: per replica,
    tensor x pipeline parallel bundles of {GPU: 1} (+ accelerator_type:<X>: 0.001 when set), the
    replica actor's CPUs (ray_actor_options.num_cpus, default 1) in bundle 0; replicas at start:
    autoscaling min_replicas, else num_replicas."""
    out: list[dict[str, float]] = []
    for app in yaml.safe_load(path.read_text())["applications"]:
        for llm in app["args"]["llm_configs"]:
            dc = llm.get("deployment_config") or {}
            auto = dc.get("autoscaling_config") or {}
            replicas = int(auto.get("min_replicas", dc.get("num_replicas", 1)))
            ek = llm.get("engine_kwargs") or {}
            per = int(ek.get("tensor_parallel_size", 1)) * int(ek.get("pipeline_parallel_size", 1))
            cpus = float((dc.get("ray_actor_options") or {}).get("num_cpus", 1))
            for _ in range(replicas):
                for k in range(per):
                    b = {"GPU": 1.0, **({"CPU": cpus} if k == 0 else {})}
                    if llm.get("accelerator_type"):
                        b[f"accelerator_type:{llm['accelerator_type']}"] = 0.001
                    out.append(b)
    return tuple(out)


# ------------------------------------------------------------------ the phases


def all_phases() -> list[Phase]:
    phases: list[Phase] = []
    for path in sorted((JOBS / "cluster").glob("*.yaml")):
        cfg = job_cfg(path)
        for ph in command_phases(COMMAND.get(path.stem, path.stem), cfg):
            phases.append(Phase(f"jobs/cluster/{path.name}: {ph.name}", ph.bundles))
    serve = serve_bundles(job_cfg(JOBS / "cluster" / "serve.yaml"))
    align = command_phases("align", job_cfg(JOBS / "cluster" / "align.yaml"))[0]
    phases.append(
        Phase("jobs/cluster/align.yaml beside serve.yaml's replicas (rl.reward_deploy false)", align.bundles + serve)
    )
    phases.append(Phase("jobs/openrlhf/ppo.sh beside serve.yaml's replicas", openrlhf_bundles(PPO) + serve))
    aug = command_phases("augment", job_cfg(JOBS / "cluster" / "augment-vllm.yaml"))[0]
    phases.append(Phase("clusters/serve/vllm-openai.yaml", vllm_app_bundles(VLLM_APP)))
    phases.append(
        Phase(
            "jobs/cluster/augment-vllm.yaml beside vllm-openai.yaml's replicas",
            aug.bundles + vllm_app_bundles(VLLM_APP),
        )
    )
    return phases


def test_every_cluster_file_has_its_phases():
    names = " ".join(p.name for p in all_phases())
    for path in sorted((JOBS / "cluster").glob("*.yaml")):
        assert f"jobs/cluster/{path.name}" in names
    assert "ppo.sh" in names and "vllm-openai.yaml" in names
    # and the OpenRLHF recipe reads as OpenRLHF would: actor 8 (ref colocated) + critic 2 + 4 engines
    assert len(openrlhf_bundles(PPO)) == 14
    assert len(vllm_app_bundles(VLLM_APP)) == 8


def _check_on(cluster: LocalRayCluster, phases: list[Phase], timeout_s: float) -> list[dict]:
    """``mars_ray.placement.check_phases`` in a driver process of its own joined to ``cluster``."""
    spec = [{"name": p.name, "bundles": list(p.bundles)} for p in phases]
    code = (
        "import json, sys, ray\n"
        "from mars_ray.placement import Phase, check_phases\n"
        f"ray.init(address={cluster.gcs_address!r}, logging_level='ERROR')\n"
        "spec = json.load(sys.stdin)\n"
        "rows = check_phases([Phase(s['name'], tuple(s['bundles'])) for s in spec], "
        f"timeout_s={timeout_s})\n"
        "print('ROWS' + json.dumps(rows))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=cluster.env,
        cwd=ROOT,
        timeout=120 + timeout_s * len(phases),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("ROWS", 1)[1])


@pytest.fixture(scope="module", params=sorted(SHAPES, key=str), ids=lambda s: "+".join(SHAPES[s]))
def sim_cluster(request):
    nodes, cpus, gpus, acc = request.param
    c = LocalRayCluster.start(
        head_cpus=0,
        worker_cpus=(cpus,) * nodes,
        worker_gpus=gpus,
        worker_resources={f"accelerator_type:{acc}": 1} if acc else None,
        node_args=NODE_ARGS,
        extra_env=SIM_ENV,
    )
    try:
        yield c, request.param
    finally:
        c.shutdown()


@pytest.mark.e2e  # a simulated cluster per definition: ~40 s each
def test_every_phase_fits_the_cluster_it_is_written_for(sim_cluster):
    cluster, (nodes, cpus, gpus, _acc) = sim_cluster
    rows = _check_on(cluster, all_phases(), timeout_s=20)
    pending = [f"{r['phase']} ({r['gpus']:g} GPUs, {r['cpus']:g} CPUs)" for r in rows if not r["fits"]]
    assert not pending, f"on {nodes} x ({gpus} GPUs, {cpus} CPUs) these would stay pending:\n" + "\n".join(pending)


@pytest.mark.e2e  # a simulated cluster per definition: ~40 s each
def test_the_check_names_what_cannot_fit(sim_cluster, tmp_path):
    """The same check says no where the cluster says no: the OpenRLHF recipe as it was (critic on 4
    GPUs: 16 beside the 2 reward replicas), and one GPU more than the cluster has."""
    cluster, (nodes, _cpus, gpus, _acc) = sim_cluster
    old = tmp_path / "ppo.sh"
    old.write_text(re.sub(r"--critic.num_gpus_per_node \d+", "--critic.num_gpus_per_node 4", PPO.read_text()))
    serve = serve_bundles(job_cfg(JOBS / "cluster" / "serve.yaml"))
    too_many = tuple({"GPU": 1.0, "CPU": 1.0} for _ in range(nodes * gpus + 1))
    rows = _check_on(
        cluster,
        [Phase("old ppo.sh beside serve", openrlhf_bundles(old) + serve), Phase("one GPU too many", too_many)],
        timeout_s=5,
    )
    assert [r["fits"] for r in rows] == [False, False], rows


@pytest.mark.e2e  # a simulated cluster per definition: ~40 s each
def test_cluster_check_command_reports_each_phase(sim_cluster):
    """`mars-ray cluster-check` against the running cluster: exit 0 and a line per phase when the
    job fits; exit 1 naming the phase when it does not."""
    cluster, (nodes, _cpus, gpus, _acc) = sim_cluster
    mars = str(Path(BIN_DIR) / "mars-ray")
    base = [
        mars,
        "cluster-check",
        "train",
        "--config",
        str(JOBS / "cluster" / "train.yaml"),
        "--ray-address",
        cluster.gcs_address,
    ]
    ok = subprocess.run(base, capture_output=True, text=True, env=cluster.env, cwd=ROOT, timeout=180)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "fits" in ok.stdout and "train: training workers" in ok.stdout and f"{nodes * gpus:g} GPUs" in ok.stdout
    big = subprocess.run(
        [*base, "--train.num_workers", str(nodes * gpus + 2), "--timeout", "5"],
        capture_output=True,
        text=True,
        env=cluster.env,
        cwd=ROOT,
        timeout=180,
    )
    assert big.returncode == 1, big.stdout + big.stderr[-2000:]
    assert "STAYS PENDING" in big.stdout and "train: training workers" in big.stderr


# ------------------------------------------------------------------ jobs on the simulated cluster


@pytest.fixture(scope="module")
def small_gpu_cluster():
    """A head of 1 CPU (the job drivers) and two nodes of 2 CPUs and 2 GPUs each, labelled A10G."""
    c = LocalRayCluster.start(
        head_cpus=1,
        worker_cpus=(2, 2),
        worker_gpus=2,
        worker_resources={"accelerator_type:A10G": 1},
        node_args=NODE_ARGS,
        extra_env=SIM_ENV,
    )
    try:
        yield c
    finally:
        c.shutdown()


def _runtime_env(tmp_path: Path, placement_log: Path) -> Path:
    """jobs/runtime_env.yaml plus the placement log: every device choice of the job lands there."""
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    env.setdefault("env_vars", {})["MARS_RAY_PLACEMENT_LOG"] = str(placement_log)
    env.pop("working_dir", None)
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


def _submit(cluster: LocalRayCluster, runtime_env: Path, argv: list[str], *, wait: bool = True, timeout: float = 600):
    import uuid

    from _ray_cluster import submit

    sid = f"gpusim-{argv[0]}-{uuid.uuid4().hex[:8]}"
    cmd = ["ray", "job", "submit", "--address", cluster.address, "--submission-id", sid]
    cmd += ["--runtime-env", str(runtime_env), "--working-dir", str(ROOT), *([] if wait else ["--no-wait"])]
    job = submit([*cmd, "--", "mars-ray", *argv], cluster.env, timeout=timeout)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    return sid, job


def _placements(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []


def _jobs_on_gpus(cluster, nodes: set[str], tmp_path: Path, bert: Path, llama: Path, *, device: str, gpus: int) -> None:
    """`ray job submit` of a tiny `mars-ray train` (GPU stage pools, ``min(2, gpus)`` GPU Train
    workers), a `compare` of concurrent GPU trials with their held-out evaluation in a GPU task, a
    DeepSpeed ZeRO-2 training run (on CUDA only: DeepSpeed's CPU path is another code path) and a
    `serve` of GPU replicas. Each actor, worker, task and replica logs where it chose its device:
    every one holds GPU ids from Ray, sits on a GPU node and loaded its model on ``device``
    (cpu: the simulated cluster's override; cuda: a real GPU)."""
    import time
    import urllib.request

    from _ray_cluster import free_port, wait_http
    from ray.job_submission import JobSubmissionClient
    from test_clusters_jobs import _tiny_overrides

    width = min(2, gpus)
    log = tmp_path / "placement.jsonl"
    renv = _runtime_env(tmp_path, log)
    over = {
        **_tiny_overrides(bert, llama, tmp_path / "cache"),
        "resources.gpus_per_actor": "1",
        "resources.actors": str(width),
        "train.use_gpu": "true",
        "train.num_workers": str(width),
        "resources.device": "cpu" if device == "cpu" else "auto",
    }
    laptop = str(JOBS / "laptop" / "train.yaml")

    def args(over: dict[str, str]) -> list[str]:
        return ["--config", laptop, *[f"--{k}={v}" for k, v in over.items()]]

    def placed(rows: list[dict]) -> None:
        for r in rows:
            assert r["device"].startswith(device) and len(r["gpu_ids"]) == 1 and r["node_id"] in nodes, r
            # Ray sets CUDA_VISIBLE_DEVICES to the reserved GPU; Ray Train to all GPUs of the node's
            # workers, where the device must then be cuda:<the reserved one's position>
            visible = (r["cuda_visible_devices"] or "").split(",")
            assert r["gpu_ids"][0] in visible, r
            if device == "cuda" and len(visible) > 1:
                assert r["device"] == f"cuda:{visible.index(r['gpu_ids'][0])}", r

    # 1. train: stage pools and Train workers each on a GPU of their own
    run = tmp_path / "run"
    t0 = time.time()
    _submit(cluster, renv, ["train", *args({**over, "output.dir": str(run)})])
    print(f"\ntrain job: {time.time() - t0:.0f} s")
    rows = _placements(log)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert metrics[0]["world_size"] == width and 0 <= metrics[0]["val_accuracy"] <= 1
    who = sorted({r["who"] for r in rows})
    # the stage actors (scoring, the encoder, the generators) and the Train workers
    train = [r for r in rows if "train" in r["who"].lower() or r["who"].startswith("_Worker")]
    assert len(train) == width and len(rows) > len(train) and "Encoder.__init__" in who, who
    placed(rows)
    assert len({(r["node_id"], r["gpu_ids"][0]) for r in train}) == width, train  # a GPU per worker
    assert len({r["node_id"] for r in rows}) == len(nodes), rows  # the pools spread over the GPU nodes

    # 2. compare: trials at once, each training on a GPU, each evaluated in a GPU task
    heldout = tmp_path / "heldout.jsonl"  # not the run's own data: a trial leaves out the pairs it trained on
    heldout.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "chosen": f"a good answer {i}", "rejected": f"no {i}"}) + "\n"
            for i in range(8)
        )
    )
    cmp_dir = tmp_path / "compare"
    before = len(_placements(log))
    cmp_over = {
        **over,
        "output.dir": str(cmp_dir),
        "compare.strategies": "[none]",
        "compare.seeds": "[0, 1]",
        "compare.max_concurrent": str(width),
        "compare.eval_paths": f"[{heldout}]",
        "bank.before_compare": "false",
        "train.num_workers": "1",
    }
    t0 = time.time()
    _submit(cluster, renv, ["compare", *args(cmp_over)])
    print(f"compare job: {time.time() - t0:.0f} s")
    evals = sorted(cmp_dir.glob("trials/*/heldout/*/eval.json"))
    assert len(evals) == 2, list(cmp_dir.rglob("eval.json"))
    ran = [json.loads(e.read_text())["ran_on"] for e in evals]
    placed(ran)
    new = _placements(log)[before:]
    placed(new)
    assert len(new) >= 4, new  # 2 trials x (training + evaluation)

    # 3. DeepSpeed ZeRO-2 on the GPUs (a real GPU only)
    if device == "cuda":
        ds = tmp_path / "ds"
        _submit(
            cluster,
            renv,
            [
                "train",
                *args(
                    {
                        **over,
                        "output.dir": str(ds),
                        "deepspeed.enabled": "true",
                        "deepspeed.stage": "2",
                        "mars.strategy": "none",
                    }
                ),
            ],
        )
        assert json.loads((ds / "metrics.jsonl").read_text().splitlines()[0])["world_size"] == width

    # 4. serve: replicas with a GPU each, answering over HTTP
    port = free_port()
    before = len(_placements(log))
    serve_args = ["serve", "--config", str(JOBS / "laptop" / "serve.yaml"), "--model", str(run)]
    serve_args += ["--serve.port", str(port), "--serve.num_replicas", str(width), "--serve.num_gpus", "1"]
    serve_args += ["--serve.num_cpus", "0.5", "--resources.device", over["resources.device"]]
    serve_args += ["--output.dir", str(tmp_path / "serve")]
    sid, _ = _submit(cluster, renv, serve_args, wait=False)
    client = JobSubmissionClient(cluster.address)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=300)
        body = json.dumps({"prompts": ["Hi?", "Hi?"], "responses": ["Hello.", "No."]}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/score", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert len(json.loads(r.read())["rewards"]) == 2
        deadline = time.time() + 60
        while len([r for r in _placements(log)[before:] if r["who"].startswith("RewardServer")]) < width:
            assert time.time() < deadline, _placements(log)[before:]
            time.sleep(1)
        replicas = [r for r in _placements(log)[before:] if r["who"].startswith("RewardServer")]
        placed(replicas)
        assert len({(r["node_id"], r["gpu_ids"][0]) for r in replicas}) == width, replicas
    finally:
        client.stop_job(sid)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_train_compare_and_serve_jobs_run_on_the_gpus_ray_gives_them(
    small_gpu_cluster, tiny_bert_dir, tiny_llama_dir, tmp_path
):
    """The jobs of :func:`_jobs_on_gpus` on the simulated cluster: 2 GPU nodes, model code on the CPU."""
    cluster = small_gpu_cluster
    nodes = {n["node_id"] for n in cluster.wait_for_nodes(3, timeout=60) if n["resources_total"].get("GPU")}
    _jobs_on_gpus(cluster, nodes, tmp_path, tiny_bert_dir, tiny_llama_dir, device="cpu", gpus=2)


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_cluster_paths_on_real_gpus(tiny_bert_dir, tiny_llama_dir, tmp_path):
    """The same jobs on this machine's real GPUs (one Ray node; skips without CUDA): GPU stage
    pools, DDP over NCCL on up to 2 GPUs, DeepSpeed ZeRO-2, GPU trials and evaluation, GPU replicas."""
    import os

    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    gpus = torch.cuda.device_count()
    c = LocalRayCluster.start(head_cpus=max(2, os.cpu_count() or 2))
    try:
        nodes = {n["node_id"] for n in c.wait_for_nodes(1, timeout=60)}
        _jobs_on_gpus(c, nodes, tmp_path, tiny_bert_dir, tiny_llama_dir, device="cuda", gpus=gpus)
    finally:
        c.shutdown()
