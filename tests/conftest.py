"""Shared fixtures. Tests are layered: unit (no Ray), `ray` (local Ray), `slow` (real models)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Never reach for the hub from tests; built-in models are on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The test Ray (``ray_local``) and the CLI's private Ray in subprocesses: what `mars-ray` sets.
from mars_ray.runtime import LOCAL_RAY_ENV  # noqa: E402

for _k, _v in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_k, _v)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the cores: OpenMP threads that spin while they wait would take
    # them from the other process (inherited by the Ray workers and CLI subprocesses it starts).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def shared_file(name: str) -> Path:
    """A file from ../shared/data, or skip the test with a clear reason."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real data file {p} is absent (the ../shared/data folder is not beside the project)")
    return p


HH = "hh_rlhf_helpful_base_test.jsonl"
PKU = "pku_saferlhf_v0test_safe_vs_unsafe_3590.jsonl"
UF = "ultrafeedback_binarized_sample_1200.jsonl"
LLMBAR = "llmbar_rewardbench_chat_hard_419.jsonl"


def head_lines(name: str, n: int, out: Path) -> Path:
    """Copy the first ``n`` lines of a shared data file to ``out`` (a tmp file, never the repo)."""
    src = shared_file(name)
    with src.open("rb") as f, out.open("wb") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return out


def write_jsonl(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


# Modules with the longest tests, started first, longest first: under `pytest -n 2 --dist
# loadscope --no-loadscope-reorder` (make test) each module runs whole on one worker, in collection
# order, so the long ones must not be left for the end, where one worker would run them while the
# other waits. (Without --no-loadscope-reorder, xdist puts the modules with the most tests first,
# whatever their time: the experiments module, 5 tests and ~175 s, ran last.) Module
# times under -n 2 on 2 cores (2026-12-05, suite 750 s): align ~230 s, experiments ~175 s,
# pipeline ~160 s, augment ~140 s, cluster jobs ~125 s, chaos ~125 s, train faults ~120 s,
# train ~110 s, serve ~70 s, ray entry ~35 s, bank ~30 s.
LONGEST_MODULES = (
    "test_gpu_sim.py",
    "test_align.py",
    "test_experiments.py",
    "test_pipeline.py",
    "test_augment.py",
    "test_clusters_jobs.py",
    "test_chaos.py",
    "test_train_faults.py",
    "test_train.py",
    "test_serve.py",
    "test_ray_entry.py",
    "test_bank.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept


@pytest.fixture(autouse=True)
def _drop_in_process_actors():
    """A test's in-process stage actors (``resources.in_process``) and their models go with it."""
    yield
    from mars_ray.stages.common import clear_local_actors

    clear_local_actors()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (start-up costs ~5 s)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from tiny_models import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_bert_rm_dir(tmp_path_factory, tiny_bert_dir):
    """The tiny BERT as a reward model (a seeded head saved with it): what a server loads."""
    from tiny_models import tiny_reward_model

    return tiny_reward_model(tiny_bert_dir, tmp_path_factory.mktemp("tiny_bert_rm"))


@pytest.fixture(scope="session")
def tiny_llama_rm_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama as a decoder reward model (``score`` head, SmolLM2's chat template)."""
    from tiny_models import tiny_reward_model

    return tiny_reward_model(tiny_llama_dir, tmp_path_factory.mktemp("tiny_llama_rm"))
