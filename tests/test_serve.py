"""`mars-ray serve`: a real Ray Serve app on local Ray, called over real HTTP (127.0.0.1, a free port)
and through a DeploymentHandle, with a tiny BERT reward model.

Serve starts once for the module with two applications behind one proxy: ``rm-test`` at ``/``
(a model folder, bearer token required, small limits) and ``rm-run`` at ``/run`` (a training run
directory, rewards normalised with the run's statistics, no token). Rewards are compared with
:mod:`mars_ray.models.reward` run directly on the same model.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from mars_ray.config import Config
from mars_ray.serve import RewardClient, RewardServerError
from mars_ray.serve.protocol import RequestError

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

TOKEN_ENV = "MARS_TEST_SERVE_TOKEN"
TOKEN = "tok-" + secrets.token_hex(12)
LIMITS = {"serve.max_text_chars": "3000", "serve.max_batch_items": "16", "serve.max_request_bytes": "200000"}
# The run directory's recorded reward statistics (pooled mean 0.1, std sqrt(0.25 + 0.04) ...).
STATS = {"val_chosen_mean": 0.3, "val_chosen_std": 0.4, "val_rejected_mean": -0.1, "val_rejected_std": 0.2, "val_n": 30}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pairs(n: int):
    from mars_ray.data import read_preferences

    t = read_preferences(Config().data, seed=0).table.slice(0, n)
    return t.column("prompt").to_pylist(), t.column("chosen").to_pylist(), t.column("rejected").to_pylist()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert_rm_dir) -> Path:
    """A training run directory: model/ (the tiny BERT) and metrics.jsonl with reward statistics."""
    run = tmp_path_factory.mktemp("serve_run")
    shutil.copytree(tiny_bert_rm_dir, run / "model")
    rows = [{"epoch": 1, **dict.fromkeys(STATS, 5.0)}, {"epoch": 2, **STATS}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture(scope="module")
def direct(tiny_bert_rm_dir):
    """Reference rewards straight from mars_ray.models.reward (same model, seed and token limits)."""
    from mars_ray.models.reward import load_reward_model, score_texts

    cfg = Config()
    model, tok = load_reward_model(str(tiny_bert_rm_dir), seed=cfg.seed)

    def score(prompts, responses):
        return (
            score_texts(
                model,
                tok,
                prompts,
                responses,
                batch_size=4,
                max_prompt_tokens=cfg.data.max_prompt_tokens,
                max_response_tokens=cfg.data.max_response_tokens,
            )
            .astype(float)
            .tolist()
        )

    return score


@pytest.fixture(scope="module")
def served(ray_local, tiny_bert_rm_dir, run_dir):
    from ray import serve

    from mars_ray.serve import app as serve_app

    port = _free_port()
    os.environ[TOKEN_ENV] = TOKEN
    common = {
        "serve.port": str(port),
        "serve.num_cpus": "0.5",
        "serve.max_batch_size": "8",
        "serve.batch_wait_timeout_s": "0.05",
        "serve.forward_batch_size": "4",
        **LIMITS,
    }
    cfg = Config.load(overrides={**common, "serve.app_name": "rm-test", "serve.auth_token_env": TOKEN_ENV})
    # The run app autoscales (1..2 replicas): Serve accepts the autoscaling options built from the config.
    cfg_run = Config.load(
        overrides={
            **common,
            "serve.app_name": "rm-run",
            "serve.route_prefix": "/run",
            "serve.normalize": "true",
            "serve.min_replicas": "1",
            "serve.max_replicas": "2",
        }
    )
    t0 = time.perf_counter()
    handle, url = serve_app.start(cfg, str(tiny_bert_rm_dir))
    handle_run, url_run = serve_app.start(cfg_run, str(run_dir))
    print(f"serve up in {time.perf_counter() - t0:.1f}s at {url} and {url_run}")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    yield {
        "url": url,
        "url_run": url_run,
        "handle": handle,
        "handle_run": handle_run,
        "cfg": cfg,
        "cfg_run": cfg_run,
        "auth": auth,
    }
    serve.shutdown()
    os.environ.pop(TOKEN_ENV, None)


def post(url, path, body=None, *, data=None, headers=None, timeout=30):
    return requests.post(url + path, json=body if data is None else None, data=data, headers=headers, timeout=timeout)


def close(a, b, tol=1e-5):
    assert len(a) == len(b)
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=0, atol=tol)


# ------------------------------------------------------------------------------ scoring


def test_http_score_equals_direct_scoring(served, direct):
    prompts, chosen, _rejected = _pairs(12)
    r = post(served["url"], "/score", {"prompts": prompts, "responses": chosen}, headers=served["auth"])
    assert r.status_code == 200, r.text
    close(r.json()["rewards"], direct(prompts, chosen))


def test_concurrent_requests_are_batched_and_each_gets_its_own_rewards(served, direct):
    prompts, chosen, rejected = _pairs(24)
    reqs = [(prompts[i : i + 1 + i % 3], (chosen if i % 2 else rejected)[i : i + 1 + i % 3]) for i in range(24)]
    out: dict[int, list[float]] = {}

    def call(i):
        ps, rs = reqs[i]
        out[i] = post(served["url"], "/score", {"prompts": ps, "responses": rs}, headers=served["auth"]).json()[
            "rewards"
        ]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (ps, rs) in enumerate(reqs):
        close(out[i], direct(ps, rs))
    health = requests.get(served["url"] + "/health", headers=served["auth"], timeout=10).json()
    assert 1 < health["counters"]["largest_batch"] <= 8, health["counters"]


def test_handle_api(served, direct):
    prompts, chosen, rejected = _pairs(5)
    h = served["handle"]
    close(h.score.remote(prompts, chosen).result(), direct(prompts, chosen))
    cmp = h.compare.remote(prompts[0], chosen[0], rejected[0]).result()
    rc, rr = direct([prompts[0]] * 2, [chosen[0], rejected[0]])
    assert math.isclose(cmp["margin"], rc - rr, abs_tol=1e-5)
    assert math.isclose(cmp["probability"], 1 / (1 + math.exp(-(rc - rr))), abs_tol=1e-6)
    got = h.get_reward.remote([p + c for p, c in zip(prompts, chosen)], prompts).result()
    close(got["rewards"], direct(prompts, chosen))
    # The same validation as HTTP; the caller gets a ValueError that names the field.
    with pytest.raises(ValueError, match=r"responses\[1\]: expected a string, got integer"):
        h.score.remote(["a", "b"], ["x", 3]).result()
    # A separate handle from the app name works the same (what an RL worker does).
    from mars_ray.serve import get_handle

    close(get_handle("rm-test").score.remote(prompts[:1], chosen[:1]).result(), direct(prompts[:1], chosen[:1]))


def test_compare_over_http(served, direct):
    prompts, chosen, rejected = _pairs(1)
    r = post(
        served["url"],
        "/compare",
        {"prompt": prompts[0], "chosen": chosen[0], "rejected": rejected[0]},
        headers=served["auth"],
    )
    assert r.status_code == 200, r.text
    body = r.json()
    rc, rr = direct([prompts[0]] * 2, [chosen[0], rejected[0]])
    close([body["chosen_reward"], body["rejected_reward"], body["margin"]], [rc, rr, rc - rr])
    assert math.isclose(body["probability"], 1 / (1 + math.exp(-(rc - rr))), abs_tol=1e-6)
    assert body["normalized"] is False


def test_openrlhf_get_reward_schema(served, direct):
    prompts, chosen, _ = _pairs(4)
    queries = [p + c for p, c in zip(prompts, chosen)]
    # OpenRLHF's remote_rm_fn body: query (prompt + response), prompts, labels.
    r = post(
        served["url"],
        "/get_reward",
        {"query": queries, "prompts": prompts, "labels": [None] * 4},
        headers=served["auth"],
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"} and body["scores"] == body["rewards"]
    close(body["rewards"], direct(prompts, chosen))
    assert body["extra_logs"]["query_split"] == [1.0] * 4
    # No prompts, or a prompt the query does not start with: the whole query, empty prompt.
    r = post(
        served["url"], "/get_reward", {"query": queries[:2], "prompts": ["nope", prompts[1]]}, headers=served["auth"]
    )
    close(r.json()["rewards"], [direct([""], [queries[0]])[0], direct([prompts[1]], [chosen[1]])[0]])
    assert r.json()["extra_logs"]["query_split"] == [0.0, 1.0]
    r = post(served["url"], "/get_reward", {"query": queries[:2]}, headers=served["auth"])
    close(r.json()["rewards"], direct(["", ""], queries[:2]))


def test_health_reports_model_and_config_hash(served, tiny_bert_rm_dir):
    # without the token (or with a wrong one): only that the app is up
    for hdr in ({}, {"Authorization": "Bearer wrong"}):
        r = requests.get(served["url"] + "/health", headers=hdr, timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    h = requests.get(served["url"] + "/health", headers=served["auth"], timeout=10).json()
    assert h["status"] == "ok" and h["model_id"] == str(tiny_bert_rm_dir)
    assert h["config_hash"] == served["cfg"].hash() and h["normalized"] is False and h["auth"] is True
    assert TOKEN not in json.dumps(h)


# ------------------------------------------------------------------------------ safety


BAD = [
    (b'{"prompts": ["a"], "responses": ["b"]', 400, None, "not valid JSON"),
    (b'["a", "b"]', 400, None, "must be a JSON object"),
    (b"", 400, None, "empty"),
    ({"prompts": "a", "responses": ["b"]}, 422, "prompts", "expected an array of strings"),
    ({"prompts": ["a", {"x": 1}], "responses": ["b", "c"]}, 422, "prompts[1]", "got object"),
    ({"prompts": [], "responses": []}, 422, "prompts", "is empty"),
    ({"prompts": ["a", "b"], "responses": ["c"]}, 422, "responses", "prompts has 2 items but responses has 1"),
    ({"prompts": ["a"] * 17, "responses": ["b"] * 17}, 413, "prompts", "17 items; at most 16"),
    ({"prompts": ["a"], "responses": ["x" * 3001]}, 413, "responses[0]", "3001 characters; at most 3000"),
    ({"prompts": ["a"], "response": ["b"]}, 422, "response", "did you mean 'responses'"),
    (b'{"prompts": ["' + b"y" * 250_000 + b'"], "responses": ["b"]}', 413, None, "serve.max_request_bytes"),
]


@pytest.mark.parametrize("body, status, field, words", BAD, ids=[f"{b[1]}-{b[3][:20]}" for b in BAD])
def test_bad_requests_get_4xx_that_say_what_is_wrong(served, body, status, field, words):
    hdr = {**served["auth"], "Content-Type": "application/json"}
    r = post(served["url"], "/score", data=body if isinstance(body, bytes) else json.dumps(body).encode(), headers=hdr)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and words in r.json()["error"]


def test_bad_compare_and_get_reward(served):
    r = post(served["url"], "/compare", {"prompt": "p", "chosen": 1, "rejected": "r"}, headers=served["auth"])
    assert (r.status_code, r.json()["field"]) == (422, "chosen")
    r = post(served["url"], "/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, headers=served["auth"])
    assert (r.status_code, r.json()["field"]) == (422, "prompts")


def test_replica_survives_bad_and_oversized_requests(served, direct):
    url, auth = served["url"], served["auth"]
    pid = requests.get(url + "/health", headers=auth, timeout=10).json()["pid"]
    junk = [
        b"\x00\xff" * 1000,
        b'{"prompts": [' + b"[" * 5000 + b"]}",
        b'{"prompts": ["a"], "responses": [1e999]}',
        b"y" * 400_000,
    ]
    for data in junk:
        r = post(url, "/score", data=data, headers={**auth, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    # Bad requests mixed with good ones in flight at the same time: only the bad ones fail.
    prompts, chosen, _ = _pairs(6)
    results = {}

    def good(i):
        results[i] = post(url, "/score", {"prompts": prompts[i : i + 1], "responses": chosen[i : i + 1]}, headers=auth)

    def bad(i):
        results[100 + i] = post(url, "/score", {"prompts": [i], "responses": ["x"]}, headers=auth)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(6) for f in (good, bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(6):
        assert results[i].status_code == 200
        close(results[i].json()["rewards"], direct(prompts[i : i + 1], chosen[i : i + 1]))
        assert results[100 + i].status_code == 422
    h = requests.get(url + "/health", headers=auth, timeout=10).json()
    assert h["pid"] == pid and h["counters"]["failed"] == 0


def test_unauthorised_requests_get_401(served):
    body = {"prompts": ["p"], "responses": ["r"]}
    for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        r = post(served["url"], "/score", body, headers=hdr)
        assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
        assert TOKEN not in r.text and r.json()["field"] == "Authorization"
    for path in ("/compare", "/get_reward"):
        assert post(served["url"], path, {}, headers={}).status_code == 401
    assert post(served["url"], "/score", body, headers=served["auth"]).status_code == 200


# ------------------------------------------------------------------------------ run directory, client


def test_run_dir_is_served_normalised(served, direct, run_dir):
    prompts, chosen, _ = _pairs(6)
    mean = (0.3 - 0.1) / 2
    std = math.sqrt((0.4**2 + 0.3**2 + 0.2**2 + 0.1**2) / 2 - mean**2)
    r = post(served["url_run"], "/score", {"prompts": prompts, "responses": chosen})  # no token on this app
    assert r.status_code == 200, r.text
    close(r.json()["rewards"], [(x - mean) / std for x in direct(prompts, chosen)])
    h = requests.get(served["url_run"] + "/health", timeout=10).json()
    assert h["model_id"] == str((run_dir / "model").resolve()) and h["normalized"] is True
    assert math.isclose(h["normalization"]["std"], std) and "epoch 2 val rewards" in h["normalization"]["source"]
    close(
        served["handle_run"].score.remote(prompts, chosen).result(), [(x - mean) / std for x in direct(prompts, chosen)]
    )


def test_client_against_the_real_server(served, direct):
    prompts, chosen, rejected = _pairs(20)
    with RewardClient(served["url"], token=TOKEN, timeout=(2, 30), retries=2, chunk_size=16) as c:
        assert c.health()["status"] == "ok"
        close(c.score(prompts, chosen), direct(prompts, chosen))  # 20 pairs: two requests of 16 + 4
        cmp = c.compare(prompts[0], chosen[0], rejected[0])
        assert 0.0 < cmp["probability"] < 1.0
        close(
            c.get_reward([p + r for p, r in zip(prompts[:3], rejected[:3])], prompts[:3]),
            direct(prompts[:3], rejected[:3]),
        )
        with pytest.raises(RewardServerError) as e:
            c.score(["p"], ["x" * 3001])
        assert (e.value.status, e.value.field) == (413, "responses[0]")
    with pytest.raises(RewardServerError) as e:
        RewardClient(served["url"]).score(["p"], ["r"])
    assert e.value.status == 401


def test_handle_error_is_a_request_error(served):
    with pytest.raises(RequestError) as e:
        served["handle"].score.remote([], []).result()
    assert e.value.field == "prompts" and e.value.status == 422


# ------------------------------------------------------------------------------ the command


def _sigterm_load(url: str, *, clients: int):
    """Client threads posting to ``url`` until stopped; returns (counts, lost, stop). A 503 makes a
    client wait its Retry-After; a connection that cannot be made is a refusal; a request cut off
    after it was sent (reset, timeout) is lost."""
    from collections import Counter

    counts: Counter = Counter()
    lost: list[str] = []
    done = threading.Event()
    body = {"prompts": ["How do I boil an egg?"] * 2, "responses": ["Simmer it for nine minutes."] * 2}

    def client():
        with requests.Session() as sess:
            while not done.is_set():
                try:
                    r = sess.post(url, json=body, timeout=30)
                except requests.ConnectionError as e:
                    if "NewConnectionError" in repr(e) or "Connection refused" in repr(e):
                        counts["refused_connect"] += 1
                        done.wait(0.2)
                    else:
                        lost.append(repr(e))
                    continue
                except requests.Timeout as e:
                    lost.append(repr(e))
                    continue
                if r.status_code == 200:
                    counts["answered"] += 1
                elif r.status_code == 503:
                    counts["refused_503"] += 1
                    done.wait(float(r.headers.get("Retry-After", "1")))
                else:
                    counts[f"status_{r.status_code}"] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()

    def stop():
        done.set()
        for t in threads:
            t.join(40)

    return counts, lost, stop


STOP_WAYS = [
    pytest.param("SIGTERM", "pid", id="sigterm-pid"),
    pytest.param("SIGINT", "pid", id="sigint-pid", marks=pytest.mark.e2e),
    pytest.param("SIGTERM", "group", id="sigterm-group", marks=pytest.mark.e2e),
    pytest.param("SIGINT", "group", id="sigint-group", marks=pytest.mark.e2e),
]


@pytest.mark.parametrize(("signame", "target"), STOP_WAYS)
def test_cli_serve_blocks_prints_url_and_stops_on_sigterm(tiny_bert_rm_dir, tmp_path, signame, target):
    """`mars-ray serve` in its own process (its own local Ray): prints the URL, serves, and stops
    within 15 s however the stop signal comes: SIGTERM or SIGINT, to its PID or to its whole
    process group (`kill -- -PGID`, what a supervisor sends a job), every request in flight answered
    or refused with 503, none lost."""
    from _serve_proc import start_serve

    port = _free_port()
    args = ["--model", str(tiny_bert_rm_dir), "--serve.port", str(port), "--resources.num_cpus", "1"]
    log = tmp_path / "serve.log"
    proc = start_serve([*args, "--serve.num_cpus", "0.5"], log, timeout=120)
    try:
        text = log.read_text()
        assert f"at http://127.0.0.1:{port}" in text, text[-3000:]
        r = requests.post(f"http://127.0.0.1:{port}/score", json={"prompts": ["p"], "responses": ["r"]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["rewards"]) == 1
        # SIGTERM under load: 12 clients that honour Retry-After; every request is answered or
        # refused (503 while draining, or no connection once the server is gone), none is lost.
        counts, lost, stop = _sigterm_load(f"http://127.0.0.1:{port}/score", clients=12)
        time.sleep(2)
        t0 = time.time()
        sig = getattr(signal, signame)
        if target == "group":
            os.killpg(os.getpgid(proc.pid), sig)
        else:
            proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        exit_s = time.time() - t0
        time.sleep(1)
        stop()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"\n{signame} to the {target} under load: exit in {exit_s:.1f}s; {dict(counts)}")
    assert "stopped" in log.read_text() and "draining: 1 of 1 replica(s)" in log.read_text()
    assert exit_s < 15, exit_s  # Kubernetes, systemd and Docker send SIGKILL after 10-30 s
    assert counts["answered"] > 0 and counts["refused_503"] > 0, dict(counts)
    assert not lost and set(counts) <= {"answered", "refused_503", "refused_connect"}, (dict(counts), lost[:3])
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
