"""OpenAIGenerator against a real OpenAI-compatible HTTP server on 127.0.0.1.

Fast tests serve the tiny random Llama (``tiny_llama_dir``) through
``mars_ray.serve.llm_server`` and call it over real HTTP: happy path, the client's own retries
on 429/500, timeouts, budgets, secret hygiene, the official ``openai`` client. ``slow`` tests
serve the real SmolLM2 (and, when llama-cpp-python is installed, its GGUF through
``python -m llama_cpp.server``). Every server runs on a free port and is stopped by its fixture.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mars_ray.generation import GeneratorAuthError, GenParams, TextGenerator
from mars_ray.generation.openai_backend import OpenAIGenerator
from mars_ray.serve.llm_server import Faults, run_server

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "MARS_RAY_TEST_OPENAI_KEY"
SECRET = "sk-test-MARSRAY-d41d8cd98f00b204e9800998ecf8427e"
PARAPHRASE = "Paraphrase the following text, keeping its meaning. Reply with the paraphrase only."

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def tiny_gen(tiny_llama_dir):
    from mars_ray.generation.local import LocalChatGenerator

    return LocalChatGenerator(str(tiny_llama_dir), GenParams(max_new_tokens=8), batch_size=8)


@pytest.fixture
def serve():
    """``serve(generator, **run_server_kwargs) -> handle``; every server is stopped at teardown."""
    handles = []

    def start(generator, **kw):
        h = run_server(generator, **kw)
        handles.append(h)
        return h

    yield start
    for h in handles:
        t0 = time.monotonic()
        h.stop()
        assert time.monotonic() - t0 < 15, "server did not stop promptly"


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return KEY_ENV


def client_for(url: str, **kw) -> OpenAIGenerator:
    kw.setdefault("api_key_env", KEY_ENV)
    return OpenAIGenerator("tiny", kw.pop("params", GenParams(max_new_tokens=8)), base_url=url, **kw)


# --------------------------------------------------------------------------------- happy path


def test_happy_path_n_outputs_order_and_usage(tiny_gen, serve, secret_env):
    h = serve(tiny_gen, api_key=SECRET, max_batch=1)  # the server insists on the key: proves it is sent
    reqs = [
        "The cat sat on the mat.",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the sea at night."}],
        "Numbers: one two three four five.",
    ]
    gen = client_for(h.url, params=GenParams(max_new_tokens=8, temperature=0.0), concurrency=4)
    assert isinstance(gen, TextGenerator)
    assert gen.model_id == "openai:tiny"
    t0 = time.monotonic()
    out = gen.generate(reqs, n=2)
    elapsed = time.monotonic() - t0
    assert len(out) == 3 and all(len(row) == 2 for row in out)
    assert all(isinstance(t, str) for row in out for t in row)
    # Greedy: each output is what the model itself gives that request, so the order is kept.
    direct = tiny_gen.generate(reqs, 1)
    for i in range(3):
        assert out[i] == [direct[i][0]] * 2, i
    st = gen.stats
    assert st["requests"] == 6 and st["calls"] == 6 and st["succeeded"] == 6
    assert st["retries"] == 0 and st["failed_by_reason"] == {} and st["http_status"] == {"200": 6}
    assert st["prompt_tokens"] > 6 and st["completion_tokens"] > 0
    sst = get_json(h.root_url + "/stats")
    assert sst["completed"] == 6 and sst["by_status"] == {"200": 6}
    assert sst["prompt_tokens"] == st["prompt_tokens"] and sst["completion_tokens"] == st["completion_tokens"]
    assert elapsed < 30


def test_per_request_caps_become_max_tokens(tiny_gen, serve):
    h = serve(tiny_gen, max_batch=1)
    reqs = ["The cat sat on the mat.", "Numbers: one two three four five."]
    gen = client_for(h.url, api_key_env="MARS_RAY_UNSET_KEY_VAR", concurrency=2)
    out = gen.generate(reqs, n=1, max_new_tokens=[2, 50])  # 50 is above params (8): capped at 8
    assert out == [tiny_gen.generate([reqs[0]], 1, max_new_tokens=[2])[0], tiny_gen.generate([reqs[1]], 1)[0]]
    assert 0 < gen.stats["completion_tokens"] <= 2 + 8


def test_sampling_slots_differ_and_server_micro_batches(tiny_gen, serve):
    h = serve(tiny_gen, max_batch=8, batch_wait_s=0.2)
    gen = OpenAIGenerator(
        "tiny",
        GenParams(max_new_tokens=12, temperature=1.0),
        base_url=h.url,
        api_key_env="MARS_RAY_UNSET_KEY_VAR",
        concurrency=4,
    )
    out = gen.generate(["Tell me a story about a dragon."], n=4)
    assert all(isinstance(t, str) for t in out[0])
    assert len(set(out[0])) > 1  # seed = params.seed + slot: distinct samples
    assert gen.stats["succeeded"] == 4
    assert h.stats()["max_batch_seen"] >= 2  # concurrent requests shared a generate() call
    # each request's seed is its sampling slot on the server: batched or alone, the same sample
    alone = OpenAIGenerator(
        "tiny",
        GenParams(max_new_tokens=12, temperature=1.0),
        base_url=h.url,
        api_key_env="MARS_RAY_UNSET_KEY_VAR",
        concurrency=1,
    )
    assert alone.generate(["Tell me a story about a dragon."], n=4) == out


def test_official_openai_client_against_server(tiny_gen, serve):
    import openai

    h = serve(tiny_gen, served_model="tiny-llama")
    client = openai.OpenAI(base_url=h.url, api_key="unused", max_retries=0, timeout=30)
    resp = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hello there!"}],
        n=3,
        max_tokens=5,
        temperature=0.7,
        seed=3,
    )
    assert resp.object == "chat.completion" and resp.model == "tiny-llama"
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for c in resp.choices:
        assert isinstance(c.message.content, str) and c.message.role == "assistant"
        assert c.finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    # Raw response: headers and the parsed body.
    raw = client.chat.completions.with_raw_response.create(
        model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert raw.headers["content-type"].startswith("application/json") and raw.retries_taken == 0
    assert raw.parse().choices[0].finish_reason in ("stop", "length")
    # An invalid request is a 400 in the OpenAI error format (not retried).
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="x", messages=[])
    assert ei.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], stream=True)
    st = get_json(h.root_url + "/stats")
    assert st["completed"] == 2 and st["by_status"].get("400") == 2


def test_a_malformed_request_fails_alone(tiny_gen, serve):
    h = serve(tiny_gen)
    gen = client_for(h.url, api_key_env="MARS_RAY_UNSET_KEY_VAR", max_retries=2)
    out = gen.generate(["fine", [{"content": "no role"}], "also fine"], n=1)
    assert isinstance(out[0][0], str) and out[1] == [None] and isinstance(out[2][0], str)
    st = gen.stats
    assert st["failed_by_reason"] == {"400": 1} and st["succeeded"] == 2
    assert st["requests"] == 3  # a 400 is not retried


# --------------------------------------------------------------------------- retries and faults


@pytest.mark.parametrize("status,fail_first", [(429, 2), (500, 1)])
def test_transient_errors_are_retried_by_the_client(tiny_gen, serve, status, fail_first):
    h = serve(tiny_gen, faults=Faults(fail_first=fail_first, fail_status=status, retry_after=0))
    gen = client_for(h.url, api_key_env="MARS_RAY_UNSET_KEY_VAR", max_retries=3, concurrency=1)
    t0 = time.monotonic()
    out = gen.generate(["Say something."], n=1)
    elapsed = time.monotonic() - t0
    assert isinstance(out[0][0], str)
    st = gen.stats
    assert st["retries"] == fail_first and st["requests"] == fail_first + 1 and st["calls"] == 1
    assert st["http_status"] == {str(status): fail_first, "200": 1}
    assert st["failed_by_reason"] == {} and st["succeeded"] == 1
    sst = h.stats()
    assert sst["injected_failures"] == fail_first and sst["received"] == fail_first + 1
    assert elapsed < 1.0 * fail_first + 5  # the client's backoff: ~0.5 s, 1 s, ... (retry-after 0)


def test_retries_are_bounded_then_the_output_is_none(tiny_gen, serve):
    h = serve(tiny_gen, faults=Faults(fail_first=100, fail_status=429, retry_after=0))
    gen = client_for(h.url, api_key_env="MARS_RAY_UNSET_KEY_VAR", max_retries=1, concurrency=2)
    t0 = time.monotonic()
    out = gen.generate(["a", "b"], n=1)
    assert out == [[None], [None]]
    st = gen.stats
    assert st["failed_by_reason"] == {"429": 2} and st["requests"] == 4 and st["retries"] == 2
    assert h.stats()["received"] == 4
    assert time.monotonic() - t0 < 5


def test_timeouts_end_as_none_within_bounded_time(tiny_gen, serve):
    h = serve(tiny_gen, faults=Faults(delay_s=3.0))
    gen = client_for(h.url, api_key_env="MARS_RAY_UNSET_KEY_VAR", timeout_s=0.5, max_retries=1, concurrency=2)
    t0 = time.monotonic()
    out = gen.generate(["slow one", "slow two"], n=1)
    elapsed = time.monotonic() - t0
    assert out == [[None], [None]]
    st = gen.stats
    assert st["failed_by_reason"] == {"timeout": 2}
    assert st["requests"] == 4 and st["retries"] == 2 and st["succeeded"] == 0
    # 2 attempts x 0.5 s + one backoff (<= 0.5 s), well under the server's 3 s delay.
    assert elapsed < 2.9


def test_connection_refused_is_counted(tiny_gen):
    port = free_port()  # nothing listens there any more
    gen = OpenAIGenerator(
        "tiny", base_url=f"http://127.0.0.1:{port}/v1", api_key_env="MARS_RAY_UNSET_KEY_VAR", max_retries=1, timeout_s=2
    )
    t0 = time.monotonic()
    assert gen.generate(["x", "y"], n=2) == [[None, None], [None, None]]
    assert gen.stats["failed_by_reason"] == {"connection": 4} and gen.stats["requests"] == 8
    assert time.monotonic() - t0 < 10


# --------------------------------------------------------------------------------------- budgets


def test_max_requests_budget(tiny_gen, serve):
    h = serve(tiny_gen)
    gen = client_for(h.url, api_key_env="MARS_RAY_UNSET_KEY_VAR", max_requests=3, concurrency=2)
    out = gen.generate([f"request {i}" for i in range(5)], n=1)
    flat = [t for row in out for t in row]
    assert sum(t is not None for t in flat) == 3 and sum(t is None for t in flat) == 2
    st = gen.stats
    assert st["requests"] == 3 and st["failed_by_reason"] == {"budget_exhausted": 2}
    assert h.stats()["received"] == 3
    # Later calls are refused at once, without HTTP.
    assert gen.generate(["more"], n=2) == [[None, None]]
    assert gen.stats["failed_by_reason"] == {"budget_exhausted": 4} and h.stats()["received"] == 3
    gen.reset_stats()  # a new run
    assert isinstance(gen.generate(["again"], n=1)[0][0], str)


def test_max_requests_budget_counts_retries(tiny_gen, serve):
    h = serve(tiny_gen, faults=Faults(fail_first=2, fail_status=429, retry_after=0))
    gen = client_for(h.url, api_key_env="MARS_RAY_UNSET_KEY_VAR", max_requests=3, max_retries=4, concurrency=1)
    out = gen.generate(["first", "second"], n=1)
    assert isinstance(out[0][0], str) and out[1] == [None]  # 429, 429, 200 used the 3 requests
    st = gen.stats
    assert st["requests"] == 3 and st["retries"] == 2 and st["failed_by_reason"] == {"budget_exhausted": 1}
    assert h.stats()["received"] == 3


def test_max_requests_budget_stops_retries_midway(tiny_gen, serve):
    h = serve(tiny_gen, faults=Faults(fail_first=100, fail_status=500))
    gen = client_for(h.url, api_key_env="MARS_RAY_UNSET_KEY_VAR", max_requests=2, max_retries=5, concurrency=1)
    t0 = time.monotonic()
    assert gen.generate(["x"], n=1) == [[None]]
    st = gen.stats
    assert st["requests"] == 2 and st["failed_by_reason"] == {"budget_exhausted": 1}
    assert h.stats()["received"] == 2 and time.monotonic() - t0 < 5


def test_max_tokens_budget(tiny_gen, serve):
    h = serve(tiny_gen)
    gen = client_for(h.url, api_key_env="MARS_RAY_UNSET_KEY_VAR", max_tokens=1, concurrency=1)
    out = gen.generate(["one", "two", "three"], n=1)
    assert isinstance(out[0][0], str) and out[1:] == [[None], [None]]
    st = gen.stats
    assert st["prompt_tokens"] + st["completion_tokens"] >= 1
    assert st["failed_by_reason"] == {"budget_exhausted": 2} and h.stats()["received"] == 1


# -------------------------------------------------------------------------------------- secrets


def test_the_api_key_appears_nowhere(tiny_gen, serve, secret_env, monkeypatch, caplog):
    wrong_env, wrong = "MARS_RAY_TEST_WRONG_KEY", "sk-test-WRONG-0123456789abcdef0123456789"
    monkeypatch.setenv(wrong_env, wrong)
    caplog.set_level(logging.DEBUG)
    h = serve(tiny_gen, api_key=SECRET, faults=Faults(fail_first=1, fail_status=500))
    good = client_for(h.url, max_retries=2)
    bad = client_for(h.url, api_key_env=wrong_env, max_retries=2, concurrency=1)
    texts = good.generate(["hello", "world"], n=1)
    # The server refused the wrong key: not retried, and the call fails loudly (a run must not go on
    # without its generator), naming the variable but not the key.
    with pytest.raises(GeneratorAuthError, match="401") as refused:
        bad.generate(["hello", "again"], n=2)
    assert "MARS_RAY_TEST_WRONG_KEY" in str(refused.value)
    assert bad.stats["failed_by_reason"] == {"401": 1}  # the first refusal stops the other calls
    with pytest.raises(GeneratorAuthError):  # and every later call
        bad.generate(["hello"], n=1)
    assert bad.stats["requests"] == 1
    assert good.stats["retries"] == 1  # the injected 500 was retried (and logged by the client)
    assert caplog.records, "expected some log records (retries, failures)"
    blobs = [
        repr(good),
        repr(bad),
        str(good),
        str(good.stats),
        str(bad.stats),
        json.dumps(texts),
        str(refused.value),
        caplog.text,
        json.dumps(get_json(h.root_url + "/stats")),
        repr(h),
    ]
    for rec in caplog.records:
        blobs.append(rec.getMessage())
        blobs.append(repr(rec.args))
        if rec.exc_info:
            blobs.append(logging.Formatter().formatException(rec.exc_info))
    blobs.append(pickle.dumps(good).decode("latin-1"))
    for key in (SECRET, wrong):
        for blob in blobs:
            assert key not in blob
    # Pickled without the key; re-read from the environment on the other side.
    clone = pickle.loads(pickle.dumps(good))
    assert clone.model_id == good.model_id and isinstance(clone.generate(["again"], n=1)[0][0], str)


def test_key_handling_without_a_server(monkeypatch):
    monkeypatch.delenv("MARS_RAY_UNSET_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="MARS_RAY_UNSET_KEY_VAR") as ei:
        OpenAIGenerator("gpt-x", api_key_env="MARS_RAY_UNSET_KEY_VAR")  # api.openai.com needs a key
    monkeypatch.setenv("MARS_RAY_SET_KEY_VAR", SECRET)
    gen = OpenAIGenerator("gpt-x", api_key_env="MARS_RAY_SET_KEY_VAR")
    assert gen.model_id == "openai:gpt-x" and SECRET not in repr(gen) and SECRET not in str(ei.value)
    local = OpenAIGenerator(
        "m", base_url="http://user:pw-X1Y2@127.0.0.1:9/v1?token=tok-Z3W4", api_key_env="MARS_RAY_UNSET_KEY_VAR"
    )
    assert "X1Y2" not in repr(local) and "Z3W4" not in repr(local) and "127.0.0.1:9/v1" in repr(local)
    assert local.generate([], n=3) == [] and local.generate(["x"], n=0) == [[]]


# -------------------------------------------------------------------------------- command line


def test_server_command_line(tiny_llama_dir, tmp_path):
    """``python -m mars_ray.serve.llm_server`` serves, prints its URL, stops on SIGTERM."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mars_ray.serve.llm_server",
            "--model",
            str(tiny_llama_dir),
            "--port",
            str(port),
            "--max-new-tokens",
            "6",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "serving" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"server exited early: {proc.stderr.read()[-2000:]}")
        assert f"http://127.0.0.1:{port}/v1" in line
        gen = OpenAIGenerator("tiny", base_url=f"http://127.0.0.1:{port}/v1", api_key_env="MARS_RAY_UNSET_KEY_VAR")
        out = gen.generate(["Hello", "World"], n=2)
        assert all(isinstance(t, str) for row in out for t in row)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            pytest.fail("server did not stop on SIGTERM")
    assert rc == 0


# ------------------------------------------------------------------------------- real models


def _looks_like_paraphrase(src: str, out: str) -> bool:
    words = lambda s: {w.strip(".,;:!?\"'").lower() for w in s.split()} - {"the", "a", "an", "of", "to", "and", "is"}
    return bool(out) and 0.3 <= len(out) / len(src) <= 3.0 and len(words(src) & words(out)) >= 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_paraphrase_through_the_server(serve):
    from mars_ray.generation.local import LocalChatGenerator

    local = LocalChatGenerator("builtin:smollm2", GenParams(max_new_tokens=48), batch_size=4)
    h = serve(local, served_model="smollm2")
    gen = OpenAIGenerator(
        "smollm2",
        GenParams(max_new_tokens=48, temperature=0.0),
        base_url=h.url,
        api_key_env="MARS_RAY_UNSET_KEY_VAR",
        concurrency=2,
        timeout_s=120,
    )
    src = [
        "The weather was so cold this morning that the lake in the park froze over.",
        "Regular exercise improves both physical health and mental well-being.",
    ]
    t0 = time.monotonic()
    out = gen.generate([f"{PARAPHRASE}\n\n{s}" for s in src], n=1)
    elapsed = time.monotonic() - t0
    print(f"\nsmollm2 via server: {elapsed:.1f} s; {out}; {gen.stats}")
    for s, row in zip(src, out):
        assert isinstance(row[0], str) and _looks_like_paraphrase(s, row[0]), row[0]
    assert gen.stats["completion_tokens"] > 0 and gen.stats["failed_by_reason"] == {}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_llama_cpp_server_with_smollm2_gguf(tmp_path):
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        pytest.skip(
            "llama-cpp-python is not installed (build it once with "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python[server]"; never in a test)'
        )
    from mars_ray.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    port = free_port()
    log = (tmp_path / "llama_cpp_server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                get_json(base + "/models", timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        "llama_cpp.server did not start: " + (tmp_path / "llama_cpp_server.log").read_text()[-2000:]
                    )
                time.sleep(0.5)
        gen = OpenAIGenerator(
            "smollm2",
            GenParams(max_new_tokens=48, temperature=0.7),
            base_url=base,
            api_key_env="MARS_RAY_UNSET_KEY_VAR",
            concurrency=2,
            timeout_s=60,
        )
        src = "Regular exercise improves both physical health and mental well-being."
        out = gen.generate([f"{PARAPHRASE}\n\n{src}"], n=2)
        assert all(isinstance(t, str) and t for t in out[0]), out
        st = gen.stats
        assert st["succeeded"] == 2 and st["prompt_tokens"] > 0 and st["completion_tokens"] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
