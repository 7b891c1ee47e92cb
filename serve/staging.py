"""Staging: a version is loaded and checked on every healthy vLLM replica before its alias moves to it.

The gateway is what knows the vLLM replicas, so staging lives here. `StagingService.stage(version)` asks each healthy
replica, in parallel, for a short greedy answer to a fixed probe, first from the base model, then from the version
(`policy-vN`). The probe is text (`PROBE_PROMPT`): the adapters are LoRAs of the language model, and a prompt without
an image costs the replicas, which keep serving users meanwhile, a prefill of a few tokens instead of an image's
(bench/README.md has what staging costs under load). Naming the version makes the replica load it through its
filesystem resolver, so its first user request finds it loaded; the answer is the smoke check that it took effect:
- the version's answer differs from the base model's: staged;
- the answer is the same but the log-probabilities of its tokens differ (by more than `logprob_tolerance`): staged.
  An adapter may legitimately keep a short greedy answer; it cannot leave every token's probability unchanged if
  its weights reach the model;
- both equal the base model's: the adapter has no effect there (all-zero LoRA weights, or modules vLLM does not
  apply), and staging fails, unless the promotion says `require_effect: false` (an admin promoting such an
  adapter on purpose).
A replica that cannot load the version (an error, a timeout) fails staging too. If any healthy replica fails, the
promotion is refused: the alias does not move, every replica keeps serving the version it served, and the refusal
goes into the alias history with each replica's reason (`promote_refused`).

With no healthy replica there is nothing to stage on, and the promotion is refused as well.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import httpx

from online_rl.schema import adapter_name
from serve.upstream import Upstream, UpstreamPool

logger = logging.getLogger(__name__)
PROBE_PROMPT = "Describe a small red square above a large blue circle in detail."


@dataclasses.dataclass(frozen=True)
class ProbeAnswer:
    text: str
    logprobs: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class ReplicaStaging:
    url: str
    staged: bool
    seconds: float
    effect: str | None = None  # "answer" or "logprobs": how the version's answer differed from the base model's
    error: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"seconds": round(self.seconds, 3)}


@dataclasses.dataclass(frozen=True)
class StagingReport:
    version: int
    replicas: tuple[ReplicaStaging, ...]
    seconds: float

    @property
    def staged(self) -> bool:
        return bool(self.replicas) and all(replica.staged for replica in self.replicas)

    @property
    def reason(self) -> str:
        if not self.replicas:
            return f"{adapter_name(self.version)}: no healthy vLLM replica to stage it on"
        failed = [r for r in self.replicas if not r.staged]
        if failed:
            return "; ".join(f"{r.url} did not stage {adapter_name(self.version)}: {r.error}" for r in failed)
        return f"{adapter_name(self.version)} staged on {len(self.replicas)} replica(s) in {self.seconds:.2f} s"

    def as_dict(self) -> dict:
        return {
            "version": self.version,
            "staged": self.staged,
            "seconds": round(self.seconds, 3),
            "replicas": [replica.as_dict() for replica in self.replicas],
        }


class StagingError(Exception):
    pass


class StagingService:
    def __init__(
        self,
        pool: UpstreamPool,
        base_model_name: str,
        timeout_s: float = 60.0,
        probe_tokens: int = 8,
        logprob_tolerance: float = 1e-3,
    ):
        self.pool = pool
        self.base_model_name = base_model_name
        self.timeout_s = timeout_s
        self.probe_tokens = probe_tokens
        self.logprob_tolerance = logprob_tolerance
        self.messages = [{"role": "user", "content": PROBE_PROMPT}]

    async def stage(self, version: int, require_effect: bool = True) -> StagingReport:
        """Loads and checks `version` on every healthy replica (see the module's docstring)."""
        started = time.perf_counter()
        healthy = [upstream for upstream in self.pool.upstreams if upstream.healthy]
        replicas = await asyncio.gather(*(self._stage_on(u, version, require_effect) for u in healthy))
        report = StagingReport(version, tuple(replicas), time.perf_counter() - started)
        logger.info(
            "staging version=%s staged=%s seconds=%.3f %s",
            adapter_name(version),
            report.staged,
            report.seconds,
            " ".join(f"{r.url}={'ok:' + str(r.effect) if r.staged else 'failed'}" for r in replicas),
        )
        return report

    async def warm(self, version: int) -> None:
        """Loads `version` on every healthy replica, best effort (before a rollback moves back to it)."""
        healthy = [upstream for upstream in self.pool.upstreams if upstream.healthy]
        results = await asyncio.gather(
            *(self._probe(u, adapter_name(version)) for u in healthy), return_exceptions=True
        )
        for upstream, result in zip(healthy, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("warming failed version=%s url=%s error=%s", version, upstream.base_url, result)

    async def _stage_on(self, upstream: Upstream, version: int, require_effect: bool) -> ReplicaStaging:
        started = time.perf_counter()
        try:
            base = await self._probe(upstream, self.base_model_name)
            candidate = await self._probe(upstream, adapter_name(version))
        except StagingError as error:
            return ReplicaStaging(upstream.base_url, False, time.perf_counter() - started, error=str(error))
        seconds = time.perf_counter() - started
        if candidate.text != base.text:
            return ReplicaStaging(upstream.base_url, True, seconds, effect="answer")
        difference = max(
            (abs(a - b) for a, b in zip(candidate.logprobs, base.logprobs, strict=False)),
            default=0.0,
        )
        if difference > self.logprob_tolerance or len(candidate.logprobs) != len(base.logprobs):
            return ReplicaStaging(upstream.base_url, True, seconds, effect="logprobs")
        if not require_effect:
            return ReplicaStaging(upstream.base_url, True, seconds, effect=None)
        return ReplicaStaging(
            upstream.base_url,
            False,
            seconds,
            error=f"no effect on the probe: its answer {candidate.text!r} and its token log-probabilities equal the "
            f"base model's (largest difference {difference:.2g})",
        )

    def body(self, model: str) -> dict:
        """The probe request for `model`."""
        return {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.probe_tokens,
            "temperature": 0,
            "logprobs": True,
        }

    async def _probe(self, upstream: Upstream, model: str) -> ProbeAnswer:
        try:
            response = await self.pool.client.post(
                f"{upstream.base_url}/v1/chat/completions", json=self.body(model), timeout=self.timeout_s
            )
        except httpx.HTTPError as error:
            raise StagingError(f"{type(error).__name__} asking for {model}") from error
        if response.status_code != 200:
            raise StagingError(f"HTTP {response.status_code} asking for {model}: {_message(response)}")
        try:
            choice = response.json()["choices"][0]
            content = (choice.get("logprobs") or {}).get("content") or []
            return ProbeAnswer(choice["message"]["content"] or "", tuple(float(t["logprob"]) for t in content))
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise StagingError(f"an answer for {model} that is not a chat completion") from error


def _message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("error", {})
        return str(detail.get("message") if isinstance(detail, dict) else detail)[:300]
    except ValueError:
        return response.text[:300]
