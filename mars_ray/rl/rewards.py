"""The policy stage's reward function: the reward model served by Ray Serve.

:class:`ServedReward` is what TRL's GRPO/RLOO trainers call with each batch of completions. It
asks the Serve deployment of :mod:`mars_ray.serve.app` (its ``DeploymentHandle`` from inside the
cluster, or HTTP through :class:`~mars_ray.serve.client.RewardClient`) for r(prompt, completion)
and keeps count of calls, scored items and seconds, so rollout, reward and update time can be
reported separately. It is built on the driver and pickled to every Ray Train worker; the handle or
HTTP session is opened lazily in the worker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mars_ray.core.chat import messages_to_prompt
from mars_ray.core.judging import completion_text


@dataclass
class RewardTarget:
    """Where the rewards come from: ``app`` (a Serve app name, called through its handle) or
    ``url`` (an HTTP reward server: ``mars-ray serve`` or any server speaking its ``/score``)."""

    app: str | None = None
    url: str | None = None
    token_env: str | None = None
    timeout_s: float = 120.0

    def describe(self) -> str:
        return f"Serve app {self.app!r} (DeploymentHandle)" if self.app else f"HTTP {self.url}"


@dataclass
class RewardCounters:
    calls: int = 0
    items: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "items": self.items, "seconds": round(self.seconds, 4)}


class ServedReward:
    """A TRL reward function (``reward_funcs=[ServedReward(...)]``) backed by the served reward model.

    TRL passes ``prompts`` (possibly chat messages), ``completions`` and every extra dataset column
    as keyword arguments; the dataset built by :mod:`mars_ray.rl.align` carries ``rm_prompt``, the
    prompt text the reward model was trained on, which is used when present.
    """

    def __init__(self, target: RewardTarget, name: str = "served_reward") -> None:
        self.target = target
        self.counters = RewardCounters()
        self.__name__ = name  # TRL logs rewards under the function's name
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:  # the handle / HTTP session is opened where it is used
        return {"target": self.target, "name": self.__name__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["target"], state["name"])

    def _connect(self) -> Any:
        if self._client is None:
            if self.target.app:
                from ray import serve

                self._client = serve.get_app_handle(self.target.app)
            else:
                import os

                from mars_ray.serve.client import RewardClient

                name = self.target.token_env
                if name and not os.environ.get(name):
                    raise RuntimeError(
                        f"rl.reward_token_env={name!r}, but {name} is not set in this process's environment "
                        f"(a Ray worker on {os.uname().nodename}); Ray workers get it from the environment "
                        "`ray start` ran in (clusters/README.md: secrets.env) or from the job's runtime_env"
                    )
                self._client = RewardClient(
                    self.target.url, token_env=self.target.token_env, timeout=(3.05, self.target.timeout_s)
                )
        return self._client

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        client = self._connect()
        t0 = time.perf_counter()
        if self.target.app:
            out = client.score.remote(list(prompts), list(responses)).result(timeout_s=self.target.timeout_s)
        else:
            out = client.score(list(prompts), list(responses))
        self.counters.calls += 1
        self.counters.items += len(responses)
        self.counters.seconds += time.perf_counter() - t0
        return [float(x) for x in out]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        rm_prompts = kwargs.get("rm_prompt")
        if rm_prompts is None:
            rm_prompts = [stored_prompt(p) for p in prompts]
        return self.score([str(p) for p in rm_prompts], [completion_text(c) for c in completions])


def stored_prompt(prompt: Any) -> str:
    """A TRL prompt as the reward model's training data stores it: a string as it is, chat
    messages as their transcript (:func:`mars_ray.core.chat.messages_to_prompt`), never their
    contents run together."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return messages_to_prompt(list(prompt))
    return completion_text(prompt)
