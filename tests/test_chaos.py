"""The chaos suite (issue 21): real processes killed at chosen points (``MARS_RAY_CHAOS``, see
``mars_ray/core/chaos.py``), a real full disk; each test prints its figure (``-s`` shows them).

Every faulted run is compared with the same run unfaulted: the same synthetic pairs, the same
metrics, and every input pair used or quarantined."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mars_ray.core import chaos
from mars_ray.core import schema as S

pytestmark = [pytest.mark.ray, pytest.mark.chaos, pytest.mark.e2e]


def _same_metrics(got: dict, want: dict) -> None:
    """A resumed run's metrics row equals the uninterrupted run's: texts exactly, numbers to 1e-4."""
    texts = {k for k, v in want.items() if isinstance(v, str)}
    assert {k: got.get(k) for k in texts} == {k: want[k] for k in texts}
    assert {k: v for k, v in got.items() if k not in texts} == pytest.approx(
        {k: v for k, v in want.items() if k not in texts}, rel=1e-4, abs=1e-6
    )


def _child_env(rules: str | None) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)  # the child starts its own local Ray, which inherits the rules
    env.pop(chaos.ENV, None)
    if rules:
        env[chaos.ENV] = rules
    return env


def _run(
    cmd: list[str], rules: str | None, *, until: Callable[[], bool] | None = None, timeout: float = 600
) -> tuple[int, str]:
    """Run ``mars-ray`` ``cmd`` in its own session (its output to a file, so a full pipe never blocks
    it); with ``until``, kill its whole process group (driver, Ray, workers) as soon as ``until()``
    holds. Returns (exit code, the output's tail)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mars_ray.cli", *cmd],
            env=_child_env(rules),
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout
        try:
            while proc.poll() is None:
                if until is not None and until():
                    break
                assert time.time() < deadline, f"{cmd} still running after {timeout} s"
                time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):  # what is left: a self-killed driver's Ray, or all of it
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        return proc.returncode, log.read().decode(errors="replace")[-6000:]


def _pairs_of(t) -> list[tuple[str, str, str]]:
    return sorted(zip(*(t.column(c).to_pylist() for c in (S.PAIR_ID, S.CHOSEN, S.REJECTED))))


def test_rules_parse_and_refuse_nonsense(tmp_path):
    m = str(tmp_path / "m")
    assert chaos.parse(f"paraphrase.batch@2:kill={m}; train.checkpoint.epoch2@1:pause={m}") == [
        ("paraphrase.batch", 2, "kill", m),
        ("train.checkpoint.epoch2", 1, "pause", m),
    ]
    for bad in ("x@0:kill=m", "x@2:explode=m", "x:kill=m", "x@2:kill=", "x@two:kill=m"):
        with pytest.raises(ValueError, match="bad rule"):
            chaos.parse(bad)


def test_a_rule_fires_once_at_its_visit(tmp_path, monkeypatch):
    marker = tmp_path / "m"
    monkeypatch.setenv(chaos.ENV, f"unit.point@3:pause={marker}")
    monkeypatch.setenv(f"{chaos.ENV}_PAUSE_S", "0.01")
    monkeypatch.setattr(chaos, "_hits", chaos.Counter())
    chaos.point("unit.point")
    chaos.point("other.point")
    chaos.point("unit.point")
    assert not marker.exists()
    chaos.point("unit.point")  # the 3rd visit: claims the marker, pauses 0.01 s
    assert f"unit.point@3 pid {os.getpid()}" in marker.read_text()
    marker.write_text("claimed")
    monkeypatch.setattr(chaos, "_hits", chaos.Counter())  # a restarted process: counts from 0 again
    for _ in range(4):
        chaos.point("unit.point")
    assert marker.read_text() == "claimed"  # a claimed rule never fires again


def test_ray_data_actor_killed_mid_augmentation(ray_local, tmp_path, monkeypatch, tiny_bert_dir, tiny_llama_dir):
    """A paraphrase actor SIGKILLed after generating its second batch, before returning it: Ray Data
    restarts the actor and retries the batch; the epoch completes with exactly the synthetic pairs
    of the unfaulted run, none lost or duplicated."""
    from test_augment import tiny_cfg

    from mars_ray.augment import run_epoch
    from mars_ray.data import read_preferences

    over = {"mars.strategy": "uniform", "paraphrase.batch_size": "4", "resources.actors": "1"}
    ref_cfg = tiny_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, **over, **{"resources.in_process": "true"})
    data = read_preferences(ref_cfg.data, seed=ref_cfg.seed)
    train = data.table.filter(pc.equal(data.table.column(S.SPLIT), "train"))
    assert data.report["read"] == data.report["kept"] + data.report["quarantined"]
    ref = run_epoch(ref_cfg, train, reward_ref=ref_cfg.model.reward, epoch=1, log=lambda m: None)

    # The same epoch on a Ray Data actor pool, on its own empty cache (the killed actor generates).
    marker = tmp_path / "actor-killed"
    monkeypatch.setenv(chaos.ENV, f"paraphrase.batch@2:kill={marker}")
    cfg = tiny_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, **over, **{"model.cache_dir": str(tmp_path / "c2")})
    res = run_epoch(cfg, train, reward_ref=cfg.model.reward, epoch=1, log=lambda m: None)
    killed_pid = int(marker.read_text().split("pid")[1])
    assert killed_pid != os.getpid()  # an actor process died, not this one

    got, want = _pairs_of(res.synthetic), _pairs_of(ref.synthetic)
    assert got == want, "the faulted epoch's synthetic pairs differ from the unfaulted run's"
    assert len({g[0] for g in got}) == len(got)  # no pair twice
    assert res.summary["synthetic"] + res.summary["budget_unspent"] == cfg.mars.budget
    assert res.per_pair.num_rows == train.num_rows  # every original pair accounted for
    print(
        f"\nchaos: Ray Data paraphrase actor (pid {killed_pid}) SIGKILLed after its 2nd batch; the epoch completed "
        f"with {len(got)} synthetic pairs, identical to the unfaulted run's ({len(got)}/{len(want)}); "
        f"{train.num_rows} original pairs in, {res.per_pair.num_rows} allocated; lost 0, duplicated 0"
    )


def test_driver_killed_mid_augmentation_and_mid_pass(ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir):
    """`mars-ray train` (uniform, 2 epochs, a Ray Train worker, a checkpoint every step) killed
    twice: the driver SIGKILLs itself after epoch 2's second paraphrase batch (stages in the
    driver), then the resumed run is killed whole (driver, Ray, worker) in epoch 2's training,
    right after its second checkpoint. Each `--resume` reads epoch 1 back; the second restarts
    epoch 2's training at that checkpoint; the run ends with the unfaulted run's synthetic pairs
    and metrics."""
    from test_pipeline import _comparable, loop_cfg

    from mars_ray.pipeline import read_metrics, run_mars

    over = {
        "mars.strategy": "uniform",
        "resources.in_process": "true",
        "train.num_workers": "1",
        "train.cpus_per_worker": "1",
        "train.threads": "1",
        "train.checkpoint_steps": "1",
    }
    # The reference trains in this process (no worker group to start): the same loop, the same numbers.
    ref = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "ref", **over | {"train.num_workers": "0"})
    run_mars(ref, log=lambda m: None)

    run = loop_cfg(
        tmp_path, tiny_bert_dir, tiny_llama_dir, "faulted", **over, **{"model.cache_dir": str(tmp_path / "c2")}
    )
    run.save(tmp_path)
    out = Path(run.output.dir)
    m1, m2 = tmp_path / "driver-killed", tmp_path / "paused-mid-pass"
    # 18 training texts in batches of 8: 3 paraphrase batches an epoch, so the 5th is epoch 2's 2nd
    rules = f"paraphrase.batch@5:kill={m1};train.checkpoint.epoch2@2:pause={m2}"
    rc, log = _run(["train", "--config", str(tmp_path / "config.yaml")], rules)
    assert rc == -signal.SIGKILL and m1.exists(), log[-3000:]
    assert (out / "epochs" / "001" / "manifest.json").exists(), "killed before epoch 2"
    assert not (out / "epochs" / "002" / "augment_summary.json").exists(), "killed after epoch 2's augmentation"

    def registered_step() -> int | None:  # the step of the checkpoint Ray Train has registered
        snap = out / "ray_train" / "epoch_002" / "checkpoint_manager_snapshot.json"
        try:
            return json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]["steps"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # paused right after reporting step 2's checkpoint; killed once Ray Train has registered it
    rc, log = _run(["train", "--resume", str(out)], rules, until=lambda: m2.exists() and registered_step() == 2)
    assert m2.exists(), log[-3000:]
    assert not (out / "epochs" / "002" / "manifest.json").exists() and len(read_metrics(out)) == 1
    # The last resume in this process (on this test's local Ray): nothing kills it.
    from mars_ray.pipeline import load_run_config

    run_mars(load_run_config(out), resume=True, log=lambda m: None)

    got, want = read_metrics(out), read_metrics(ref.output.dir)
    resumed = got[-1].pop("resumed_from_step", None)
    assert resumed == 2, resumed
    assert [sorted(r) for r in _comparable(got)] == [sorted(r) for r in _comparable(want)]
    for g, w in zip(_comparable(got), _comparable(want)):
        _same_metrics(g, w)
    for t in ("001", "002"):
        a = pq.read_table(Path(ref.output.dir) / "epochs" / t / "train.parquet")
        b = pq.read_table(out / "epochs" / t / "train.parquet")
        assert _pairs_of(a) == _pairs_of(b), f"epoch {t}: training pairs differ"
    n_syn = sum(r["synthetic"] for r in got)
    print(
        f"\nchaos: driver SIGKILLed mid-augmentation (epoch 2), then the whole run killed mid-pass (epoch 2, "
        f"after step 2 of its pass); resumed twice: epoch 2 restarted at step {resumed}; {n_syn} synthetic pairs and "
        f"{len(got)} epochs of metrics equal to the unfaulted run's (rel 1e-4); lost 0"
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_disk_full_while_an_epoch_writes(ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir):
    """A run that crashed at the start of epoch 2's training, resumed on a real full disk (a tmpfs with
    32 KiB free): the resume fails naming the file it could not write, every file of epoch 1 (and
    the rest of the run directory) is byte-identical, nothing half-written is left; with space
    again, the next `--resume` ends with the unfaulted run's metrics."""
    from test_pipeline import _comparable, loop_cfg

    from mars_ray.pipeline import load_run_config, read_metrics, run_mars

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): no real full disk to test on")
    try:
        over = {"mars.strategy": "uniform", "resources.in_process": "true", "train.num_workers": "0"}
        ref = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "ref", **over)
        run_mars(ref, log=lambda m: None)

        # A run that crashed at epoch 2's first training step (the driver trains: it is the crash).
        run = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "run", **over)
        os.environ[chaos.ENV] = f"train.step.epoch2@1:raise={tmp_path / 'crashed'}"
        try:
            with pytest.raises(RuntimeError, match="injected"):
                run_mars(run, log=lambda m: None)
        finally:
            os.environ.pop(chaos.ENV, None)
        assert len(read_metrics(run.output.dir)) == 1

        out = disk / "run"
        shutil.copytree(run.output.dir, out)
        cfg = load_run_config(out)
        cfg.output.dir = str(out)
        cfg.save(out)  # the run, moved: what its resume writes back
        before = _snapshot(out)
        used = int(
            subprocess.run(["df", "--output=used", "-B1", str(disk)], capture_output=True, text=True).stdout.split()[-1]
        )
        free = 32 * 1024
        subprocess.run(["mount", "-o", f"remount,size={used + free}", str(disk)], check=True)
        with pytest.raises(OSError) as err:
            run_mars(cfg, resume=True, log=lambda m: None)
        msg = str(err.value)
        assert err.value.errno == 28 and str(out) in msg, msg  # ENOSPC, naming the file under the run
        after = _snapshot(out)
        # Done epochs and the run's own files, byte for byte; the interrupted epoch 2 is redone on
        # resume (its files rewritten whole, with the same pairs).
        changed = sorted(k for k in before if after.get(k) != before[k] and not k.startswith("epochs/002/"))
        assert not changed, f"files of the interrupted run changed or vanished: {changed}"
        redone = "epochs/002/train.parquet"
        if after.get(redone) != before[redone]:
            assert pq.read_table(out / redone).equals(pq.read_table(Path(run.output.dir) / redone))
        assert not [k for k in after if ".tmp" in k], "a half-written temporary was left"
        assert len(read_metrics(out)) == 1

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        run_mars(cfg, resume=True, log=lambda m: None)
        got, want = _comparable(read_metrics(out)), _comparable(read_metrics(ref.output.dir))
        assert len(got) == 2
        for g, w in zip(got, want):
            _same_metrics(g, w)
        new = sorted(set(after) - set(before))
        same = sum(after.get(k) == v for k, v in before.items())
        print(
            f"\nchaos: disk full (tmpfs, {free // 1024} KiB free) in epoch 2: {type(err.value).__name__}: {msg}; "
            f"{same} of {len(before)} files byte-identical (the rest: the interrupted epoch's, same content), "
            f"{len(new)} new files, 0 temporaries; "
            f"resumed with space: {len(got)} epochs, metrics equal to the unfaulted run's"
        )
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
