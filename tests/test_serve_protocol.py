"""The pure part of reward serving (no Ray, no model): validation, query splitting, normalisation,
what --model points to, the serve config checks, and the HTTP client's retries against a real
local HTTP server."""

from __future__ import annotations

import json
import math
import pickle
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from mars_ray.cli import main
from mars_ray.config import Config, ServeConfig
from mars_ray.serve import RewardClient, RewardClientError, RewardServerError
from mars_ray.serve import protocol as P

LIM = P.Limits(max_text_chars=50, max_batch_items=4, max_request_bytes=2000)


def err(fn, *args) -> P.RequestError:
    with pytest.raises(P.RequestError) as e:
        fn(*args)
    return e.value


# ------------------------------------------------------------------------------ validation


def test_score_happy_path_and_empty_strings_allowed():
    assert P.parse_score({"prompts": ["p", ""], "responses": ["a", ""]}, LIM) == (["p", ""], ["a", ""])


@pytest.mark.parametrize(
    "body, status, field, words",
    [
        ({"prompts": "p", "responses": ["a"]}, 422, "prompts", "expected an array of strings, got string"),
        ({"prompts": ["p", 3], "responses": ["a", "b"]}, 422, "prompts[1]", "expected a string, got integer"),
        ({"prompts": ["p"], "responses": [None]}, 422, "responses[0]", "got null"),
        ({"prompts": [], "responses": []}, 422, "prompts", "is empty"),
        ({"prompts": ["p"] * 5, "responses": ["a"] * 5}, 413, "prompts", "5 items; at most 4"),
        ({"prompts": ["p"], "responses": ["x" * 51]}, 413, "responses[0]", "51 characters; at most 50"),
        ({"prompts": ["p", "q"], "responses": ["a"]}, 422, "responses", "prompts has 2 items but responses has 1"),
        ({"prompts": ["p"]}, 422, "responses", "missing field 'responses'"),
        ({"prompt": ["p"], "responses": ["a"]}, 422, "prompt", "did you mean 'prompts'"),
    ],
)
def test_score_errors_name_the_field(body, status, field, words):
    e = err(P.parse_score, body, LIM)
    assert (e.status, e.field) == (status, field)
    assert words in e.message
    assert e.to_json() == {"error": e.message, "field": field}


def test_json_body_errors():
    assert err(P.parse_json_body, b"{not json", LIM).status == 400
    assert "JSON object, got array" in err(P.parse_json_body, b"[1, 2]", LIM).message
    assert err(P.parse_json_body, b"   ", LIM).status == 400
    assert err(P.parse_json_body, b"\xff\xfe{}", LIM).status == 400
    big = err(P.parse_json_body, b" " * 2001, LIM)
    assert big.status == 413 and "serve.max_request_bytes" in big.message
    deep = err(P.parse_json_body, b"[" * 1500, P.Limits())
    assert deep.status == 400 and "nested too deeply" in deep.message
    assert P.parse_json_body(b'{"a": 1}', LIM) == {"a": 1}


def test_compare_validation():
    assert P.parse_compare({"prompt": "p", "chosen": "c", "rejected": "r"}, LIM) == ("p", "c", "r")
    e = err(P.parse_compare, {"prompt": "p", "chosen": ["c"], "rejected": "r"}, LIM)
    assert e.field == "chosen" and "expected a string, got array" in e.message
    assert err(P.parse_compare, {"prompt": "p", "chosen": "c"}, LIM).field == "rejected"


def _pairs_of(items):
    return [(it.prompt, it.response, it.family, it.split) for it in items]


def test_get_reward_schema_is_lenient_like_openrlhf():
    # labels and unknown fields are ignored; prompts may be absent or null
    assert _pairs_of(P.parse_get_reward({"query": ["q"], "labels": [None], "new_field": 1}, LIM)) == [
        ("", "q", "plain", False)
    ]
    assert _pairs_of(P.parse_get_reward({"query": ["q"], "prompts": None}, LIM)) == [("", "q", "plain", False)]
    assert _pairs_of(P.parse_get_reward({"query": ["pq"], "prompts": ["p"]}, LIM)) == [("p", "q", "plain", True)]
    assert err(P.parse_get_reward, {"prompts": ["p"]}, LIM).field == "query"
    assert err(P.parse_get_reward, {"query": ["a", "b"], "prompts": ["a"]}, LIM).field == "prompts"
    assert err(P.parse_get_reward, {"query": ["a"], "prompts": [1]}, LIM).field == "prompts[0]"
    # OpenRLHF 0.9.1-0.11.0 post empty lists to every URL after the first: answered, not refused
    assert P.parse_get_reward({"query": [], "prompts": [], "labels": []}, LIM) == []


def test_query_items_plain_hh_and_templated():
    assert _pairs_of([P.query_item("Q: hi A: hello", "Q: hi")]) == [("Q: hi", " A: hello", "plain", True)]
    assert _pairs_of([P.query_item("whole text", None)]) == [("", "whole text", "plain", False)]
    assert _pairs_of([P.query_item("whole text", "")]) == [("", "whole text", "plain", False)]
    assert _pairs_of([P.query_item("Q", "Q")]) == [("Q", "", "plain", True)]
    # an HH transcript keeps its own text up to the last Assistant turn (as HH prompts are stored)
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: more"
    assert _pairs_of([P.query_item(hh)]) == [(hh[: hh.rindex(" more")], "more", "hh", True)]
    # a chat template's text becomes the conversation as mars_ray stores prompts, whatever `prompts` says
    q = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>"
    assert _pairs_of([P.query_item(q, "a prompt that is not its prefix")]) == [("What is 2+2?", "4", "chatml", True)]
    multi = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello"
    assert P.query_item(multi).prompt == "\n\nSystem: Be brief.\n\nHuman: Hi?\n\nAssistant:"


def test_get_reward_takes_messages():
    conv = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}]
    assert _pairs_of(P.parse_get_reward({"messages": [conv]}, LIM)) == [("Hi?", "Hello", "messages", True)]
    bad = err(P.parse_get_reward, {"messages": [[{"role": "user", "content": "Hi?"}]]}, LIM)
    assert bad.field == "messages[0]" and "expected 'assistant'" in bad.message
    assert err(P.parse_get_reward, {"messages": "x"}, LIM).field == "messages"
    long = [{"role": "user", "content": "x" * 51}, {"role": "assistant", "content": "a"}]
    assert err(P.parse_get_reward, {"messages": [long]}, LIM).status == 413


def test_reward_logs_have_one_value_per_query_under_every_key():
    items = [P.query_item("plain"), P.query_item("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na")]
    logs = P.reward_logs(items, [False, True])
    assert all(len(v) == 2 for v in logs.values())
    assert (
        logs["format_plain"] == [1.0, 0.0]
        and logs["format_chatml"] == [0.0, 1.0]
        and logs["format_gemma"] == [0.0, 0.0]
    )
    assert logs["query_split"] == [0.0, 1.0] and logs["truncated"] == [0.0, 1.0]


def test_classify_request_like_vllm():
    items, act, model = P.parse_classify({"model": "m", "input": "text"}, LIM)
    assert _pairs_of(items) == [("", "text", "plain", False)] and act is True and model == "m"
    items, act, _ = P.parse_classify({"input": ["a", "b"], "use_activation": False}, LIM)
    assert len(items) == 2 and act is False
    assert P.parse_classify({"input": "x", "activation": False}, LIM)[1] is False  # vLLM < 0.11.2's name
    conv = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}]
    assert _pairs_of(P.parse_classify({"messages": conv}, LIM)[0]) == [("Hi?", "Hello", "messages", True)]
    assert err(P.parse_classify, {"input": "x", "normalize": True}, LIM).status == 400
    assert err(P.parse_classify, {"model": "m"}, LIM).field == "input"


def test_default_caps_take_real_rollouts():
    """A 30,000-character rollout and a 1,024-item batch pass the default caps (the model's own
    limit truncates them, by the training rule)."""
    lim = P.Limits()
    assert len(P.check_text_list(["x" * 30_000] * 1024, "query", lim)) == 1024
    assert lim.max_request_bytes > 1024 * 30_000


def test_request_error_survives_pickling():
    e = pickle.loads(pickle.dumps(P.RequestError("bad", field="prompts[2]", status=413)))
    assert (e.message, e.field, e.status) == ("bad", "prompts[2]", 413)
    assert isinstance(e, ValueError)


# ------------------------------------------------------------------------------ auth


def test_bearer_check(monkeypatch):
    assert P.bearer_ok(None, None)
    assert P.bearer_ok("Bearer s3cret", "s3cret")
    assert P.bearer_ok("bearer  s3cret ", "s3cret")
    for bad in (None, "", "s3cret", "Basic s3cret", "Bearer wrong", "Bearer "):
        assert not P.bearer_ok(bad, "s3cret")
    monkeypatch.setenv("MARS_TEST_TOKEN", "tok-123")
    assert P.read_token("MARS_TEST_TOKEN") == "tok-123"
    assert P.read_token(None) is None
    monkeypatch.setenv("MARS_TEST_TOKEN", "  ")
    with pytest.raises(ValueError, match="MARS_TEST_TOKEN is unset or empty"):
        P.read_token("MARS_TEST_TOKEN")
    s = P.Secret("tok-123")
    assert "tok-123" not in repr(s) and "tok-123" not in str(s) and s.get() == "tok-123"


# ------------------------------------------------------------------------------ normalisation


def test_sigmoid_is_stable():
    assert P.sigmoid(0.0) == 0.5
    assert P.sigmoid(1000.0) == 1.0 and P.sigmoid(-1000.0) == 0.0
    assert math.isclose(P.sigmoid(1.3), 1 / (1 + math.exp(-1.3)))


def test_pooled_stats_match_numpy():
    rng = np.random.default_rng(0)
    c, r = rng.normal(1.0, 2.0, 500), rng.normal(-0.5, 0.7, 500)
    row = {
        "val_chosen_mean": c.mean(),
        "val_chosen_std": c.std(),
        "val_rejected_mean": r.mean(),
        "val_rejected_std": r.std(),
        "val_n": 500,
    }
    mean, std, n = P.pooled_stats(row, "val")
    both = np.concatenate([c, r])
    assert n == 500 and math.isclose(mean, both.mean(), abs_tol=1e-9) and math.isclose(std, both.std(), rel_tol=1e-9)
    assert P.pooled_stats({**row, "val_chosen_std": None}, "val") is None


def _run_dir(tmp_path, rows, with_model=True):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    if with_model:
        (run / "model" / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_reward_stats_from_run_dir(tmp_path):
    stats = {"chosen_mean": 1.0, "chosen_std": 0.0, "rejected_mean": -1.0, "rejected_std": 0.0, "n": 10}
    old = {"epoch": 1, **{f"val_{k}": 9.0 for k in stats}}
    last = {"epoch": 2, **{f"val_{k}": None for k in stats}, **{f"test_{k}": v for k, v in stats.items()}}
    run = _run_dir(tmp_path, [old, last])
    mean, std, source = P.reward_stats(str(run))
    assert (mean, std) == (0.0, 1.0) and "epoch 2 test rewards (n=10" in source
    norm = P.make_normalizer(ServeConfig(normalize=True), str(run))
    assert norm.apply([1.0, 3.0]) == [1.0, 3.0] and norm.enabled
    explicit = P.make_normalizer(ServeConfig(normalize=True, norm_mean=1.0, norm_std=2.0), None)
    assert explicit.apply([3.0]) == [1.0]
    assert not P.make_normalizer(ServeConfig(), None).enabled


def test_reward_stats_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="not a training run directory.*serve.norm_mean"):
        P.reward_stats(None)
    run = _run_dir(tmp_path, [{"epoch": 1, "val_accuracy": 0.5}])
    with pytest.raises(ValueError, match="no val_/test_ chosen_mean"):
        P.reward_stats(str(run))
    (run / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match="does not exist"):
        P.reward_stats(str(run))
    flat = {"val_chosen_mean": 1.0, "val_chosen_std": 0.0, "val_rejected_mean": 1.0, "val_rejected_std": 0.0}
    (run / "metrics.jsonl").write_text(json.dumps(flat) + "\n")
    with pytest.raises(ValueError, match="standard deviation 0"):
        P.reward_stats(str(run))


# ------------------------------------------------------------------------------ --model


def test_resolve_target(tmp_path):
    run = _run_dir(tmp_path, [{"epoch": 1}])
    t = P.resolve_target(str(run))
    assert t.load == str((run / "model").resolve()) and t.run_dir == str(run.resolve())
    t = P.resolve_target(str(run / "model"))
    assert t.load == str((run / "model").resolve()) and t.run_dir == str(run.resolve())
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert P.resolve_target(str(plain)).run_dir is None
    assert P.resolve_target("org/name") == P.ServeTarget("org/name", "org/name", None)
    assert P.resolve_target("builtin:minilm").load == "builtin:minilm"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no model/ model folder yet"):
        P.resolve_target(str(unfinished))


# ------------------------------------------------------------------------------ config


def test_serve_config_problems():
    assert ServeConfig().problems() == []
    bad = ServeConfig(
        max_batch_size=0,
        port=0,
        min_replicas=2,
        norm_mean=1.0,
        route_prefix="x",
        max_ongoing_requests=4,
        request_timeout_s=0,
    )
    text = "\n".join(bad.problems())
    for words in (
        "serve.max_batch_size=0 must be >= 1",
        "serve.port=0",
        "serve.min_replicas needs serve.max_replicas",
        "norm_mean and serve.norm_std go together",
        "must start with '/'",
        "serve.request_timeout_s=0",
    ):
        assert words in text, words
    assert "batches could never fill" in "\n".join(ServeConfig(max_ongoing_requests=4).problems())
    assert ServeConfig(min_replicas=3, max_replicas=2).problems()
    # Every new field is a normal config key (dotted overrides, YAML round trip).
    cfg = Config.load(overrides={"serve.max_replicas": "3", "serve.threads": "2", "serve.norm_mean": "null"})
    assert cfg.serve.max_replicas == 3 and cfg.serve.threads == 2
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))).hash() == cfg.hash()


def test_deployment_options_replicas_autoscaling_resources():
    from mars_ray.serve.app import deployment_options, url_of

    o = deployment_options(ServeConfig(num_replicas=2, num_cpus=0.5, num_gpus=1.0))
    assert o["num_replicas"] == 2 and "autoscaling_config" not in o
    assert o["ray_actor_options"]["num_cpus"] == 0.5 and o["ray_actor_options"]["num_gpus"] == 1.0
    assert o["max_ongoing_requests"] == 64  # 2 x max_batch_size: one batch fills while one runs
    a = deployment_options(ServeConfig(min_replicas=0, max_replicas=4, num_replicas=2))
    assert "num_replicas" not in a
    assert a["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "initial_replicas": 2,
        "target_ongoing_requests": 32.0,
    }
    assert url_of(ServeConfig(host="0.0.0.0", port=9000, route_prefix="/rm")) == "http://127.0.0.1:9000/rm"
    assert url_of(ServeConfig(port=8001)) == "http://127.0.0.1:8001"


def test_serve_command_fails_early_without_ray(capsys, tmp_path, tiny_bert_rm_dir):
    rm = str(tiny_bert_rm_dir)
    assert main(["serve", "--model", rm, "--serve.max_batch_size", "0"]) == 2
    assert "serve.max_batch_size=0 must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", rm, "--serve.normalize", "true"]) == 1
    assert "no recorded reward statistics" in capsys.readouterr().err
    assert main(["serve", "--model", rm, "--serve.auth_token_env", "MARS_UNSET_VAR_XYZ"]) == 1
    assert "MARS_UNSET_VAR_XYZ is unset" in capsys.readouterr().err
    # every interface and no token: refused before Ray starts, with what to do
    assert main(["serve", "--model", rm, "--serve.host", "0.0.0.0"]) == 1
    assert "no token is set" in capsys.readouterr().err
    # a backbone without a reward head would be served with a random one: refused, keys named
    assert main(["serve", "--model", "builtin:minilm"]) == 1
    assert "has no reward-head weights (none of classifier.weight" in capsys.readouterr().err


def test_only_loopback_serves_without_a_token():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert P.is_loopback(host), host
        P.check_exposure(host, None, False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "rm.example.internal", ""):
        assert not P.is_loopback(host), host
        with pytest.raises(ValueError, match=r"serve.auth_token_env .*127.0.0.1.*allow_unauthenticated true"):
            P.check_exposure(host, None, False)
        P.check_exposure(host, "a-token", False)  # a token: fine
        P.check_exposure(host, None, True)  # opted in


# ------------------------------------------------------------------------------ client retries


class _Flaky(BaseHTTPRequestHandler):
    """Answers the first ``fail`` POSTs with ``status`` (Retry-After: 0), then scores by text length."""

    fail, status, seen, auth = 0, 503, [], []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        type(self).auth.append(self.headers.get("Authorization"))
        if len(self.seen) <= self.fail:
            return self._send(self.status, {"error": "busy", "field": None}, {"Retry-After": "0"})
        if "responses" in body and len(body["prompts"]) != len(body["responses"]):
            return self._send(422, {"error": "prompts has 2 items but responses has 1", "field": "responses"})
        return self._send(200, {"rewards": [float(len(r)) for r in body.get("responses", body.get("query", []))]})

    def _send(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    def start(fail=0, status=503):
        handler = type("H", (_Flaky,), {"fail": fail, "status": status, "seen": [], "auth": []})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler

    servers = []
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_client_retries_503_then_succeeds(flaky):
    url, h = flaky(fail=2, status=503)
    with RewardClient(url, retries=3, backoff_factor=0.01, token="tok-xyz") as c:
        assert c.score(["p"], ["abc"]) == [3.0]
        assert "tok-xyz" not in repr(c)
    assert len(h.seen) == 3 and h.auth == ["Bearer tok-xyz"] * 3


def test_client_gives_up_after_retries_and_never_retries_4xx(flaky):
    url, h = flaky(fail=10, status=502)
    with pytest.raises(RewardServerError) as e:
        RewardClient(url, retries=2, backoff_factor=0.01).score(["p"], ["a"])
    assert e.value.status == 502 and len(h.seen) == 3
    url, h = flaky()
    with pytest.raises(RewardServerError) as e:
        RewardClient(url, retries=3)._request("POST", "/score", {"prompts": ["a", "b"], "responses": ["x"]})
    assert (e.value.status, e.value.field) == (422, "responses") and len(h.seen) == 1


def test_client_chunks_long_lists_and_reaches_get_reward(flaky):
    url, h = flaky()
    c = RewardClient(url, chunk_size=2)
    assert c.score(["p"] * 5, ["a", "bb", "ccc", "dddd", "eeeee"]) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [len(b["prompts"]) for b in h.seen] == [2, 2, 1]
    assert c.get_reward(["xy"], ["x"]) == [2.0] and h.seen[-1] == {"query": ["xy"], "prompts": ["x"]}


def test_client_connection_refused_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RewardClientError, match="failed after retries"):
        RewardClient(f"http://127.0.0.1:{port}", retries=1, backoff_factor=0.01, timeout=1).health()
    with pytest.raises(RewardClientError, match="MARS_UNSET_VAR_XYZ"):
        RewardClient("http://127.0.0.1:1", token_env="MARS_UNSET_VAR_XYZ")
