"""The served reward model, called the way RL frameworks call one.

A real Ray Serve app on local Ray and real HTTP. Two reward models behind one proxy: the tiny
decoder (``/dec``: a Llama with SmolLM2's tokenizer and chat template, a ``score`` head) and the
tiny encoder (``/enc``: a BERT, text pairs). Where a framework installs here its own code makes
the call:

- OpenRLHF 0.11.2 (``pip install --no-deps openrlhf``): ``openrlhf.utils.agent.SingleTurnAgentExecutor``,
  the per-sample client of 0.9.1 and later, builds the query from a real tokenizer (the decoded
  chat-templated prompt plus the response and its end-of-turn token) and POSTs it; the package
  ``__init__`` of ``openrlhf.utils`` pulls torch-side helpers (math utils), so it is bypassed and
  the ``agent`` module imported alone (it needs aiohttp). The generation engine is a scripted one
  that returns a fixed reply's token ids: vLLM cannot run here, and the reply is what the test
  controls. 0.9.0's whole-batch POST (``remote_rm_utils.request_api_wrapper``) is rebuilt as its
  exact request (``{"query", "prompts", "labels"}``, ``openrlhf/utils/remote_rm_utils.py`` v0.9.0).
- verl 0.9.1 (``pip install --no-deps verl``): its reward loop calls ``compute_score(data_source=,
  solution_str=, ground_truth=, extra_info=, **reward_kwargs)``
  (``verl/experimental/reward_loop/reward_manager/naive.py``); the adapter is loaded from its file
  path as verl loads a ``custom_reward_function`` (``verl/trainer/ppo/reward.py``). Its vLLM
  reward-model path posts ``{"model", "input", "use_activation": false}`` to ``/classify`` and
  reads ``data[-1].probs[-1]`` (``verl/experimental/reward_loop/reward_model.py``).
- TRL 1.16: ``GRPOTrainer`` trains a tiny policy for 2 steps with the light client's
  ``RewardFunction`` as its reward function (tests marked slow).

The score of a templated query must equal, to 1e-4, the score ``/score`` gives the same
conversation (its prompt as mars_ray stores conversations, ``messages_to_prompt``).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import requests

from mars_ray.config import Config
from mars_ray.core.chat import messages_to_prompt

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
TRL_TEMPLATES = Path(pytest.importorskip("trl").__file__).parent / "chat_templates"
CONV = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]
# (name, template file or None, end-of-turn text, family, conversation)
FAMILY_CASES = [
    ("qwen2_5", "qwen2_5", "<|im_end|>", "chatml", MULTI),
    ("llama3", "llama3", "<|eot_id|>", "llama3", MULTI),
    ("llama3_1", "llama3_1", "<|eot_id|>", "llama3", CONV),
    ("gemma", "gemma", "<end_of_turn>", "gemma", CONV),
    ("phi3", "phi3", "<|end|>", "phi", MULTI),
    ("mistral", None, "</s>", "mistral", CONV),
    ("hh", None, "", "hh", CONV),
]


def _render(template: str | None, messages: list[dict], name: str) -> str:
    """The policy's rendered prompt (``add_generation_prompt=True``), as OpenRLHF builds it."""
    if name == "mistral":  # the mistralai cookbook's v3 shape (no template in TRL)
        return "<s>[INST] " + messages[0]["content"] + "[/INST] "
    if name == "hh":
        return "\n\nHuman: " + messages[0]["content"] + "\n\nAssistant: "
    from transformers.utils.chat_template_utils import render_jinja_template

    bos = "<|begin_of_text|>" if template.startswith("llama") else "<bos>"
    out = render_jinja_template(
        [messages],
        chat_template=(TRL_TEMPLATES / f"{template}.jinja").read_text(),
        add_generation_prompt=True,
        bos_token=bos,
        eos_token="<|endoftext|>",
    )
    return out[0][0] if isinstance(out, tuple) else out[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, tiny_llama_rm_dir, tiny_bert_rm_dir):
    from ray import serve

    from mars_ray.serve import app as serve_app

    port = _free_port()
    urls = {}
    for name, model in (("dec", tiny_llama_rm_dir), ("enc", tiny_bert_rm_dir)):
        cfg = Config.load(
            overrides={
                "serve.port": str(port),
                "serve.app_name": f"rm-{name}",
                "serve.route_prefix": f"/{name}",
                "serve.num_cpus": "0.5",
                "serve.max_batch_size": "8",
                "data.max_prompt_tokens": "96",
                "data.max_response_tokens": "64",
            }
        )
        _, urls[name] = serve_app.start(cfg, str(model))
    yield urls
    for name in urls:
        serve.delete(f"rm-{name}")


def _score(url: str, prompt: str, response: str) -> float:
    r = requests.post(url + "/score", json={"prompts": [prompt], "responses": [response]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["rewards"][0]


def _get_reward(url: str, body: dict) -> dict:
    r = requests.post(url + "/get_reward", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------ query formats


@pytest.mark.parametrize("rm", ["dec", "enc"])
@pytest.mark.parametrize(("name", "template", "eot", "family", "conv"), FAMILY_CASES, ids=[c[0] for c in FAMILY_CASES])
def test_templated_query_scores_as_its_conversation(served, rm, name, template, eot, family, conv):
    """OpenRLHF's per-sample request (0.9.1+): query = rendered prompt + reply + end-of-turn."""
    prompt = _render(template, conv[:-1], name)
    reply = conv[-1]["content"]
    body = _get_reward(served[rm], {"query": [prompt + reply + eot], "prompts": [prompt], "labels": [""]})
    logs = body["extra_logs"]
    assert logs[f"format_{family}"] == [1.0] and logs["query_split"] == [1.0] and logs["truncated"] == [0.0]
    # an HH transcript keeps its own text as the prompt; a chat template's, the stored conversation
    stored = prompt.rstrip(" ") if name == "hh" else messages_to_prompt(conv[:-1])
    want = _score(served[rm], stored, reply)
    assert abs(body["rewards"][0] - want) < 1e-4, (body, want)
    assert body["scores"] == body["rewards"]


def test_messages_long_rollouts_and_whole_batches(served):
    url = served["dec"]
    # conversations as messages score as the same conversation rendered by the policy
    via_messages = _get_reward(url, {"messages": [MULTI]})["rewards"][0]
    assert abs(via_messages - _score(url, messages_to_prompt(MULTI[:-1]), MULTI[-1]["content"])) < 1e-4
    # a 30,000-character rollout is answered (truncated by the training rule, and said so)
    long_reply = ("The answer keeps going. " * 1300)[:30_000]
    q = _render("qwen2_5", CONV[:-1], "qwen2_5") + long_reply + "<|im_end|>"
    body = _get_reward(url, {"query": [q], "prompts": [""], "labels": [""]})
    assert len(q) > 30_000 and body["extra_logs"]["truncated"] == [1.0] and len(body["rewards"]) == 1
    # OpenRLHF <= 0.9.0 posts the whole rollout batch at once: 1,024 queries in one request
    queries = [
        _render("qwen2_5", [{"role": "user", "content": f"Question {i}?"}], "qwen2_5") + f"Answer {i}."
        for i in range(1024)
    ]
    t0 = time.perf_counter()
    body = _get_reward(url, {"query": queries, "prompts": [""] * 1024, "labels": [""] * 1024})
    assert len(body["rewards"]) == 1024 and all(len(v) == 1024 for v in body["extra_logs"].values())
    print(f"1,024-item request: {time.perf_counter() - t0:.1f} s")
    # the empty request OpenRLHF 0.9.1-0.11.0 send to every URL after the first
    assert _get_reward(url, {"query": [], "prompts": [], "labels": []}) == {
        "rewards": [],
        "scores": [],
        "extra_logs": {k: [] for k in body["extra_logs"]},
    }


# ------------------------------------------------------------------------------ OpenRLHF


def _openrlhf_agent():
    """OpenRLHF's SingleTurnAgentExecutor, imported without the torch-side package __init__."""
    try:
        spec = importlib.util.find_spec("openrlhf")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        pytest.skip("openrlhf is not installed (make install adds it with --no-deps)")
    pytest.importorskip("aiohttp")
    pkg = types.ModuleType("openrlhf.utils")
    pkg.__path__ = [str(Path(spec.submodule_search_locations[0]) / "utils")]
    saved = sys.modules.get("openrlhf.utils")
    sys.modules["openrlhf.utils"] = pkg
    try:
        return importlib.import_module("openrlhf.utils.agent").SingleTurnAgentExecutor
    finally:
        if saved is not None:
            sys.modules["openrlhf.utils"] = saved


class _ScriptedEngine:
    """Stands in for the vLLM engine only: returns a fixed reply's token ids (and EOS), as vLLM's
    ``RequestOutput.outputs[0]`` carries them."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    async def generate(self, prompt_ids, sampling_params, multi_modal_data=None):
        out = types.SimpleNamespace(token_ids=list(self.token_ids), text="", logprobs=None, finish_reason="stop")
        return types.SimpleNamespace(outputs=[out])


def test_openrlhf_agent_executor_gets_the_conversation_score(served, tiny_llama_rm_dir):
    from transformers import AutoTokenizer

    executor_cls = _openrlhf_agent()
    tok = AutoTokenizer.from_pretrained(tiny_llama_rm_dir)
    prompt = tok.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)
    reply_ids = tok(CONV[-1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    sp = types.SimpleNamespace(max_tokens=64, logprobs=None)
    want = _score(served["dec"], messages_to_prompt(CONV[:-1]), CONV[-1]["content"])
    url = served["dec"] + "/get_reward"
    for urls in ([url], [url, url]):  # two URLs: 0.11.0 posts an empty list to the second
        ex = executor_cls(urls)
        out = asyncio.run(ex.execute(prompt, "", sp, 256, tok, _ScriptedEngine(reply_ids)))
        reward = out["reward"]
        assert reward is not None, "OpenRLHF got no reward (a failed request becomes None)"
        assert abs(float(reward[0] if isinstance(reward, list) else reward) - want) < 1e-4
        assert out["extra_logs"]["format_chatml"] == [1.0]


# ------------------------------------------------------------------------------ verl


def _verl_loader():
    """verl's loader of a custom reward function file (``verl.utils.import_utils.load_extern_object``,
    what ``verl.trainer.ppo.reward.get_custom_reward_fn`` calls), imported without ``verl/__init__``
    (it imports torch-side ``verl.protocol`` and tensordict)."""
    try:
        spec = importlib.util.find_spec("verl")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        pytest.skip("verl is not installed (make install adds it with --no-deps)")
    root = Path(spec.submodule_search_locations[0])
    saved = {k: sys.modules.get(k) for k in ("verl", "verl.utils")}
    for name, folder in (("verl", root), ("verl.utils", root / "utils")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        sys.modules[name] = pkg
    try:
        return importlib.import_module("verl.utils.import_utils").load_extern_object
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_verl_compute_score_and_classify(served):
    url = served["dec"]
    want = _score(url, messages_to_prompt(CONV[:-1]), CONV[-1]["content"])
    path = ROOT / "mars_ray" / "serve" / "verl_reward.py"
    load_extern_object = _verl_loader()
    raw_fn = load_extern_object(module_path=str(path), object_name="compute_score")
    reward_kwargs = {"url": url}  # custom_reward_function.reward_kwargs

    def fn(**kwargs):  # verl's _call_with_kwargs: reward_kwargs merged over the call's (reward.py)
        return raw_fn(**{**kwargs, **reward_kwargs})

    for prompt in (CONV[:-1], messages_to_prompt(CONV[:-1])):  # chat messages, or the stored text
        got = fn(data_source="hh", solution_str=CONV[-1]["content"], ground_truth=None, extra_info={"prompt": prompt})
        assert abs(float(got) - want) < 1e-4
    with pytest.raises(ValueError, match="extra_info has no prompt"):
        fn(data_source="hh", solution_str="x", ground_truth=None, extra_info={"index": 3})
    # verl's vLLM reward-model call: the conversation rendered with the reward model's template
    from transformers import AutoTokenizer

    from mars_ray.models.resolve import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2").path)
    text = tok.apply_chat_template(CONV, tokenize=False)
    r = requests.post(url + "/classify", json={"model": "rm", "input": text, "use_activation": False}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["num_classes"] == 1 and body["usage"]["prompt_tokens"] > 0
    assert abs(body["data"][-1]["probs"][-1] - want) < 1e-4
    # vLLM's default for a one-label model: the sigmoid
    p = requests.post(url + "/classify", json={"input": [text]}, timeout=60).json()["data"][0]["probs"][0]
    assert abs(p - 1 / (1 + __import__("math").exp(-want))) < 1e-4
    pooled = requests.post(url + "/pooling", json={"input": text, "use_activation": False}, timeout=60).json()
    assert pooled["data"][0]["object"] == "pooling" and abs(pooled["data"][0]["data"][0] - want) < 1e-4


# ------------------------------------------------------------------------------ the light client and TRL


def test_light_client_imports_without_ray_torch_or_deepspeed(served):
    """``mars_ray.serve.client`` (and the verl adapter) in a process where importing Ray, torch or
    DeepSpeed fails: it still scores, as the RewardFunction TRL would call."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ray', 'torch', 'deepspeed', 'transformers'):
            raise ImportError('blocked: ' + name)
        return None
sys.meta_path.insert(0, Block())
from mars_ray.serve.client import RewardFunction
import mars_ray.serve.verl_reward
f = RewardFunction({served["enc"]!r})
conv = [[{{'role': 'user', 'content': 'Hi?'}}]]
out = f(prompts=conv, completions=[[{{'role': 'assistant', 'content': 'Hello!'}}]], trainer_state=None)
plain = f(prompts=['Hi?'], completions=['Hello!'])
print(out, plain, sorted(m for m in ('ray', 'torch', 'deepspeed') if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    conv_r, plain_r, loaded = (json.loads(x.replace("'", '"')) for x in out.stdout.strip().split(" ", 2))
    assert loaded == [] and len(conv_r) == len(plain_r) == 1
    assert abs(conv_r[0] - _score(served["enc"], "Hi?", "Hello!")) < 1e-4


@pytest.mark.slow
@pytest.mark.e2e
def test_trl_grpo_two_steps_with_the_served_reward(served, tiny_llama_dir, tmp_path):
    """TRL's GRPOTrainer, outside mars-ray align: a tiny policy, the served encoder reward model
    through RewardFunction, 2 optimisation steps on a conversational dataset."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from mars_ray.serve.client import RewardFunction

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Name a colour, {i}."}] for i in range(8)]})
    reward = RewardFunction(served["enc"])
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-4,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/mars_ray_reward/mean" in h or "reward" in h]
    assert trainer.state.global_step == 2 and logged


# ------------------------------------------------------------------------------ checkpoints across frameworks


def _openrlhf_models():
    """``openrlhf.models.model`` (OpenRLHF 0.11.2's reward-model class and loader), imported
    without the package ``__init__`` files. Its module imports ``flash_attn`` for ring attention
    (sample packing), which has no CPU build: those names are placeholders that raise if called,
    and the tests never pack samples."""
    try:
        spec = importlib.util.find_spec("openrlhf")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        pytest.skip("openrlhf is not installed (make install adds it with --no-deps)")
    root = Path(spec.submodule_search_locations[0])

    def unavailable(*_a, **_k):
        raise RuntimeError("flash_attn is not installed (sample packing is not used here)")

    stubs = {
        "openrlhf.utils": root / "utils",
        "openrlhf.models": root / "models",
        "flash_attn": None,
        "flash_attn.bert_padding": None,
        "flash_attn.utils": None,
        "flash_attn.utils.distributed": None,
    }
    saved = {k: sys.modules.get(k) for k in stubs}
    for name, folder in stubs.items():
        mod = types.ModuleType(name)
        if folder is not None:
            mod.__path__ = [str(folder)]
        for attr in ("index_first_axis", "pad_input", "rearrange", "unpad_input", "all_gather"):
            setattr(mod, attr, unavailable)
        sys.modules[name] = mod
    try:
        return importlib.import_module("openrlhf.models.model")
    except ImportError as e:
        pytest.skip(f"openrlhf.models.model does not import here: {e}")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_an_openrlhf_value_head_checkpoint_scores_as_openrlhf_computes_it(tiny_llama_dir, tmp_path):
    """A reward model built and saved by OpenRLHF's own class with its head at ``value_head``
    (``value_head_prefix`` in config.json, as ``openrlhf/cli/train_rm.py`` saves it) loads with that
    head, and its rewards equal OpenRLHF's ``RewardModel.forward`` on the same tokens to 1e-4;
    without the prefix in config.json the folder is refused, naming the missing keys."""
    import torch
    from transformers import AutoTokenizer

    from mars_ray.models.resolve import has_reward_head
    from mars_ray.models.reward import MissingRewardHead, encode_pairs, load_reward_model, score_encoded

    om = _openrlhf_models()
    rm = (
        om.get_llm_for_sequence_regression(
            str(tiny_llama_dir),
            "reward",
            param_dtype="bf16",
            attn_implementation="eager",
            init_value_head=True,
            value_head_prefix="value_head",
        )
        .float()
        .eval()
    )
    with torch.no_grad():
        rm.value_head.weight.mul_(50.0)  # a head whose rewards differ clearly between texts
    rm.config.value_head_prefix = "value_head"
    out = tmp_path / "openrlhf_rm"
    rm.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.save_pretrained(out)
    assert has_reward_head(str(out))
    model, mtok = load_reward_model(str(out), dtype="float32")
    prompts = ["\n\nHuman: What is 2+2?\n\nAssistant:", "Name a colour."]
    responses = ["It is 4.", "Blue, the colour of a clear sky at noon."]
    enc = encode_pairs(mtok, prompts, responses, max_prompt_tokens=64, max_response_tokens=32)
    ours = score_encoded(model, mtok, enc, batch_size=2)
    for ids, r in zip(enc.input_ids, ours):
        x = torch.tensor([ids])
        with torch.no_grad():
            theirs = float(rm(x, attention_mask=torch.ones_like(x)))
        assert abs(theirs - float(r)) < 1e-4, (theirs, float(r))
    # the same folder without the prefix: its value_head.weight is not a head transformers knows
    conf = json.loads((out / "config.json").read_text())
    conf.pop("value_head_prefix")
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(MissingRewardHead, match=r"missing score\.weight.*value_head"):
        load_reward_model(str(out), dtype="float32")


def test_a_backbone_is_refused_where_a_reward_model_is_needed(tiny_bert_dir, ray_local):
    from mars_ray.models.reward import MissingRewardHead, load_reward_model
    from mars_ray.serve import app as serve_app

    with pytest.raises(MissingRewardHead, match=r"missing classifier\.bias, classifier\.weight"):
        load_reward_model(str(tiny_bert_dir))
    model, _ = load_reward_model(str(tiny_bert_dir), new_head=True, seed=1)  # training starts one on purpose
    assert model.classifier.weight.abs().sum() > 0
    with pytest.raises(MissingRewardHead, match="has no reward-head weights"):
        serve_app.build_app(Config(), str(tiny_bert_dir))


def test_saved_models_load_the_way_each_framework_loads_them(tiny_llama_rm_dir, tiny_bert_rm_dir, tmp_path):
    """The model card's claims: TRL (``AutoModelForSequenceClassification`` with one label, as
    ``RewardTrainer`` and GRPO's model rewards load it) for both kinds; OpenRLHF's loader for a
    decoder, reading the same reward at the last token of a text that ends in a non-pad token."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mars_ray.models.reward import encode_pairs, load_reward_model, score_encoded

    for folder in (tiny_llama_rm_dir, tiny_bert_rm_dir):
        ours, tok = load_reward_model(str(folder), dtype="float32")
        trl = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
        enc = encode_pairs(tok, ["Name a colour."], ["Blue."], max_prompt_tokens=32, max_response_tokens=16)
        x = torch.tensor(enc.input_ids)
        kw = {"token_type_ids": torch.tensor(enc.token_type_ids)} if enc.token_type_ids else {}
        with torch.no_grad():
            assert (
                abs(float(trl(input_ids=x, **kw).logits[0, 0]) - float(score_encoded(ours, tok, enc, batch_size=1)[0]))
                < 1e-5
            )
    om = _openrlhf_models()
    # OpenRLHF loads in bf16 or fp16 only: a copy whose weights bf16 holds exactly compares in fp32
    exact = tmp_path / "bf16_exact"
    model, tok = load_reward_model(str(tiny_llama_rm_dir), dtype="float32")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.save_pretrained(exact)
    tok.save_pretrained(exact)
    rm = (
        om.get_llm_for_sequence_regression(
            str(exact), "reward", param_dtype="bf16", attn_implementation="eager", value_head_prefix="score"
        )
        .float()
        .eval()
    )
    ours, tok = load_reward_model(str(exact), dtype="float32")
    enc = encode_pairs(tok, ["Name a colour."], ["Blue."], max_prompt_tokens=32, max_response_tokens=16)
    assert enc.input_ids[0][-1] != tok.pad_token_id  # the chat template ends the turn after its EOS
    x = torch.tensor(enc.input_ids)
    with torch.no_grad():
        theirs = float(rm(x, attention_mask=torch.ones_like(x)))
    assert abs(theirs - float(score_encoded(ours, tok, enc, batch_size=1)[0])) < 1e-4
    assert AutoTokenizer.from_pretrained(tiny_llama_rm_dir).chat_template


@pytest.mark.slow
@pytest.mark.e2e
def test_the_openrlhf_jobs_serve_command_starts_and_answers_openrlhf(tiny_llama_rm_dir, tmp_path):
    """jobs/openrlhf/ppo.sh's step 1, the serve command as written (cluster config, no token, on
    0.0.0.0), with only what this machine lacks overridden: the model (the tiny decoder), GPUs and
    replicas, the shared cache path and the port."""
    import shlex
    import signal

    text = (ROOT / "jobs" / "openrlhf" / "ppo.sh").read_text()
    line = next(ln for ln in text.splitlines() if "mars-ray serve" in ln)
    args = shlex.split(line.split(" -- ", 1)[1])
    assert args[:2] == ["mars-ray", "serve"]
    i = args.index("--model")
    # the job serves a trained run's model, whose config.json carries its reward statistics
    # (serve.yaml normalises): the tiny decoder with statistics stored as mars-ray train stores them
    import shutil

    from mars_ray.model_card import store_reward_statistics

    model = tmp_path / "rm"
    shutil.copytree(tiny_llama_rm_dir, model)
    store_reward_statistics(model, {"mean": 0.1, "std": 0.5, "n_pairs": 10}, "a test")
    args[i + 1] = str(model)
    port = _free_port()
    local = [
        "--serve.num_gpus",
        "0",
        "--serve.num_cpus",
        "0.5",
        "--serve.min_replicas",
        "1",
        "--serve.max_replicas",
        "1",
        "--model.cache_dir",
        str(tmp_path / "cache"),
        "--serve.port",
        str(port),
        "--resources.num_cpus",
        "2",
    ]
    from _serve_proc import start_serve

    assert args[1] == "serve", args
    log = tmp_path / "serve.log"
    proc = start_serve([*args[2:], *local], log)
    try:
        assert "serving " in log.read_text(), log.read_text()[-3000:]
        q = _render("qwen2_5", CONV[:-1], "qwen2_5") + CONV[-1]["content"] + "<|im_end|>"
        body = _get_reward(f"http://127.0.0.1:{port}", {"query": [q], "prompts": [""], "labels": [""]})
        assert len(body["rewards"]) == 1 and body["extra_logs"]["format_chatml"] == [1.0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
