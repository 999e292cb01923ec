"""`mars-ray winrate`: two policies' responses to the same prompts, judged pairwise by an LLM.

Both policies answer the same held-out prompts (greedy, ``rl.eval_max_new_tokens``; through the
generation cache, so a rerun generates nothing). The judge sees every pair twice, once in each
order, and a prompt is a win only when both orders prefer the same response
(:func:`~mars_ray.core.judging.combine_orders`), which cancels the judge's position bias. Judges:

- ``rl.judge_backend=local``, ``rl.judge_mode=logits`` (default): a local chat model's next-token
  log-probabilities of "A" and "B" after the judge prompt; always gives a verdict, deterministic;
- ``rl.judge_mode=text``: a local model or any OpenAI-compatible endpoint (GPT-4.1, vLLM, a
  llama.cpp server, ``mars-ray llm-server``) answers in words; the verdict is parsed, and an
  answer without one makes that prompt ``invalid`` (counted, never guessed).

The judge prompt is ``mars_ray/prompts/judge.txt``. Writes ``responses.jsonl``, ``verdicts.jsonl``,
``winrate.json`` and ``winrate.md`` into ``output.dir``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mars_ray.config import Config
from mars_ray.core.atomic import write_json, write_text
from mars_ray.core.judging import combine_orders, logit_verdict, parse_verdict, position_bias, winrate_summary


def policy_path(ref: str) -> str:
    """An align directory means its merged policy (``DIR/policy``); anything else loads as given."""
    p = Path(ref)
    if p.is_dir() and (p / "policy" / "config.json").exists() and not (p / "config.json").exists():
        return str(p / "policy")
    return ref


def conversation_text(messages: Sequence[dict[str, str]]) -> str:
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def generate_responses(cfg: Config, ref: str, prompts: list[list[dict[str, str]]]) -> tuple[list[str | None], dict]:
    """Greedy responses of the policy ``ref`` to chat ``prompts`` (cached)."""
    from mars_ray.generation import CachedGenerator, GenParams, default_cache
    from mars_ray.generation.local import LocalChatGenerator
    from mars_ray.models.reward import generation_dtype
    from mars_ray.runtime import pick_device

    t0 = time.perf_counter()
    device = pick_device(cfg.resources.device)
    dtype = generation_dtype("auto", device)
    inner = LocalChatGenerator(
        policy_path(ref),
        GenParams(max_new_tokens=cfg.rl.eval_max_new_tokens, temperature=0.0),
        batch_size=cfg.rl.judge_batch_size,
        cache_dir=cfg.model.cache_dir,
        offline=cfg.model.offline,
        dtype=dtype,
        device=device,
    )
    inner.model_id = f"{inner.model_id}@{str(dtype).removeprefix('torch.')}"  # the dtype changes outputs: cache key
    gen = CachedGenerator(inner, default_cache(cfg.model.cache_dir, cfg.model.cache_backend))
    outs = [o[0].strip() if o and o[0] is not None else None for o in gen.generate(prompts, 1)]
    from mars_ray.runtime import placement

    stats = {
        "model": inner.model_id,
        **gen.stats.as_dict(),
        "seconds": round(time.perf_counter() - t0, 2),
        "ran_on": placement(device),
    }
    del inner, gen
    gc.collect()
    return outs, stats


class LogitJudge:
    """Verdicts from a local chat model's log-probabilities of answering "A" or "B"."""

    def __init__(
        self,
        model_ref: str,
        *,
        batch_size: int,
        tie_margin: float,
        cache_dir: str | None = None,
        offline: bool | None = None,
        device: str | None = None,
    ) -> None:
        from mars_ray.models.resolve import load_causal_lm, resolve_model
        from mars_ray.models.reward import generation_dtype
        from mars_ray.runtime import pick_device

        resolved = resolve_model(model_ref, cache_dir=cache_dir, offline=offline)
        self.device = pick_device(device)
        self.model, self.tokenizer = load_causal_lm(
            resolved, dtype=generation_dtype("auto", self.device), device=self.device
        )
        self.model_id = resolved.model_id
        self.batch_size = int(batch_size)
        self.tie_margin = float(tie_margin)
        self.ids = {v: self._first_tokens(v) for v in ("A", "B")}

    def _first_tokens(self, letter: str) -> list[int]:
        ids = set()
        for text in (letter, " " + letter):
            toks = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if toks:
                ids.add(int(toks[0]))
        return sorted(ids)

    def judge(self, requests: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
        import torch

        texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in requests]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        res: dict[int, dict[str, Any]] = {}
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(self.device)
                logits = self.model(**enc).logits[:, -1, :].float()  # left padding: the last position is real
                logp = torch.log_softmax(logits, dim=-1)
                for row, i in enumerate(idx):
                    la = float(torch.logsumexp(logp[row, self.ids["A"]], 0))
                    lb = float(torch.logsumexp(logp[row, self.ids["B"]], 0))
                    res[i] = {"verdict": logit_verdict(la, lb, self.tie_margin), "logp_a": la, "logp_b": lb}
        return [res[i] for i in range(len(texts))]

    def close(self) -> None:
        del self.model
        gc.collect()


class TextJudge:
    """Verdicts parsed from a generated answer (a local chat model or an OpenAI-compatible endpoint)."""

    def __init__(self, cfg: Config) -> None:
        from mars_ray.generation import CachedGenerator, GenParams, default_cache
        from mars_ray.generation.local import make_generator
        from mars_ray.runtime import pick_device

        r = cfg.rl
        local = {"device": pick_device(cfg.resources.device)} if r.judge_backend != "openai" else {}
        inner = make_generator(
            r.judge_backend,
            r.judge_model,
            GenParams(max_new_tokens=r.judge_max_new_tokens, temperature=0.0),
            batch_size=r.judge_batch_size,
            base_url=r.judge_base_url,
            api_key_env=r.judge_api_key_env,
            cache_dir=cfg.model.cache_dir,
            offline=cfg.model.offline,
            concurrency=r.judge_concurrency,
            timeout_s=r.judge_timeout_s,
            max_retries=r.judge_max_retries,
            **local,
        )
        self.inner = inner
        self.gen = CachedGenerator(inner, default_cache(cfg.model.cache_dir, cfg.model.cache_backend))
        self.model_id = f"{r.judge_backend}:{r.judge_model}"

    def judge(self, requests: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
        outs = self.gen.generate(requests, 1)
        return [{"verdict": parse_verdict(o[0] if o else None), "text": o[0] if o else None} for o in outs]

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def make_judge(cfg: Config):
    r = cfg.rl
    if r.judge_mode == "logits":
        return LogitJudge(
            r.judge_model,
            batch_size=r.judge_batch_size,
            tie_margin=r.tie_margin,
            cache_dir=cfg.model.cache_dir,
            offline=cfg.model.offline,
            device=cfg.resources.device,
        )
    return TextJudge(cfg)


def judge_requests(messages: list[dict[str, str]], first: str, second: str) -> list[dict[str, str]]:
    from mars_ray.generation.prompts import render

    return render("judge", conversation=conversation_text(messages), response_a=first, response_b=second)


def judge_wellformed(judge, items: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The audit rubric (``prompts/wellformed.txt``) for ``(prompt, reply)`` items with a judge of
    :func:`make_judge`, asked twice per item with the letters swapped (well-formed = "A", then
    = "B"): ``wellformed`` is True or False when both answers agree, None when they disagree or
    one has no verdict (counted, never guessed; a judge biased to one letter gives None)."""
    from mars_ray.core.judging import to_messages
    from mars_ray.generation.prompts import render

    def reqs(good: str, bad: str):
        return [
            render("wellformed", conversation=conversation_text(to_messages(p)), reply=r.strip(), good=good, bad=bad)
            for p, r in items
        ]

    first, second = judge.judge(reqs("A", "B")), judge.judge(reqs("B", "A"))
    out = []
    for v1, v2 in zip(first, second):
        a = {"A": True, "B": False}.get(v1.get("verdict"))
        b = {"B": True, "A": False}.get(v2.get("verdict"))
        out.append({"wellformed": a if a is not None and a == b else None, "first": v1, "second": v2})
    return out


def winrate(
    cfg: Config,
    policy_a: str,
    policy_b: str,
    *,
    names: tuple[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Judge ``policy_a`` against ``policy_b`` on ``rl.eval_prompts`` held-out prompts; returns the
    ``winrate.json`` content (from ``policy_a``'s side: win = ``policy_a`` is better)."""
    from mars_ray.models.resolve import load_tokenizer, resolve_model
    from mars_ray.rl.align import prompt_rows, write_jsonl

    cfg.validate()
    r = cfg.rl
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    names = names or (Path(policy_a).name or policy_a, Path(policy_b).name or policy_b)
    t0 = time.perf_counter()
    tok = load_tokenizer(resolve_model(policy_path(policy_a), cache_dir=cfg.model.cache_dir, offline=cfg.model.offline))
    rows, info = prompt_rows(
        cfg, split="test", limit=r.eval_prompts, tokenizer=tok, max_tokens=r.max_prompt_tokens, path=r.eval_path
    )
    msgs = [row["prompt"] for row in rows]
    log(f"winrate: {names[0]} vs {names[1]} on {len(rows)} prompts from {info['data']} ({info['split']} split)")
    resp_a, gen_a = generate_responses(cfg, policy_a, msgs)
    resp_b, gen_b = generate_responses(cfg, policy_b, msgs)
    ok = [i for i in range(len(rows)) if resp_a[i] is not None and resp_b[i] is not None]
    judge = make_judge(cfg)
    t1 = time.perf_counter()
    try:
        first = judge.judge([judge_requests(msgs[i], resp_a[i], resp_b[i]) for i in ok])
        swapped = judge.judge([judge_requests(msgs[i], resp_b[i], resp_a[i]) for i in ok])
    finally:
        judge.close()
    judge_s = time.perf_counter() - t1
    v1: list[str | None] = [None] * len(rows)
    v2: list[str | None] = [None] * len(rows)
    detail: dict[int, tuple[dict, dict]] = {}
    for k, i in enumerate(ok):
        v1[i], v2[i] = first[k]["verdict"], swapped[k]["verdict"]
        detail[i] = (first[k], swapped[k])
    outcomes = [combine_orders(v1[i], v2[i]) for i in range(len(rows))]
    summary = winrate_summary(outcomes, seed=cfg.seed)
    summary.update(position_bias([v1[i] for i in ok], [v2[i] for i in ok]))
    summary.update(
        {
            "policy_a": names[0],
            "policy_b": names[1],
            "policy_a_path": policy_path(policy_a),
            "policy_b_path": policy_path(policy_b),
            "judge": judge.model_id,
            "judge_mode": r.judge_mode,
            "orders": 2,
            "judge_calls": 2 * len(ok),
            "prompts": info,
            "generation": {"a": gen_a, "b": gen_b},
            "judge_generation": judge.gen.stats.as_dict() if hasattr(judge, "gen") else None,
            "mean_response_chars": {"a": _mean_len(resp_a), "b": _mean_len(resp_b)},
            "seconds": {"judge": round(judge_s, 2), "total": round(time.perf_counter() - t0, 2)},
        }
    )
    write_jsonl(
        out / "responses.jsonl",
        [
            {"i": i, "prompt": rows[i]["rm_prompt"], "response_a": resp_a[i], "response_b": resp_b[i]}
            for i in range(len(rows))
        ],
    )
    write_jsonl(
        out / "verdicts.jsonl",
        [
            {
                "i": i,
                "a_shown_first": detail[i][0] if i in detail else None,
                "b_shown_first": detail[i][1] if i in detail else None,
                "outcome": outcomes[i],
            }
            for i in range(len(rows))
        ],
    )
    write_json(out / "winrate.json", summary, default=float)
    write_text(out / "winrate.md", winrate_markdown(summary))
    log(
        f"winrate: {names[0]} vs {names[1]}: {summary['win']} wins, {summary['tie']} ties, {summary['loss']} losses"
        f" ({summary['invalid']} invalid); win-rate {summary['win_rate']:.3f} "
        f"[{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]; {out}/winrate.json"
    )
    return summary


def _mean_len(xs: Sequence[str | None]) -> float:
    v = [len(x) for x in xs if x is not None]
    return float(sum(v) / len(v)) if v else float("nan")


def winrate_markdown(s: dict[str, Any]) -> str:
    lvl = int(round(100 * s.get("level", 0.95)))
    return "\n".join(
        [
            f"# Win-rate: {s['policy_a']} vs {s['policy_b']}",
            "",
            f"Judge `{s['judge']}` ({s['judge_mode']}), both orders asked for each of {s['n_prompts']} prompts "
            f"from `{s['prompts']['data']}` ({s['prompts']['split']} split).",
            "",
            "| wins | ties | losses | invalid | win-rate (ties = 1/2) | "
            + f"{lvl}% CI (bootstrap) | wins / decisive | {lvl}% CI (Wilson) |",
            "|---|---|---|---|---|---|---|---|",
            f"| {s['win']} | {s['tie']} | {s['loss']} | {s['invalid']} | {s['win_rate']:.3f} | [{s['ci_low']:.3f}, {s['ci_high']:.3f}] "
            f"| {s['decisive_win_rate']:.3f} | [{s['decisive_ci_low']:.3f}, {s['decisive_ci_high']:.3f}] |",
            "",
            f"Position bias: the judge picked the first-shown response in {s['picked_first_position']:.0%} of verdicts; "
            f"its two orders agreed on a winner for {s['orders_agree']:.0%} of prompts.",
            f"Mean response length: {s['mean_response_chars']['a']:.0f} chars ({s['policy_a']}), "
            f"{s['mean_response_chars']['b']:.0f} chars ({s['policy_b']}).",
            "",
        ]
    )
