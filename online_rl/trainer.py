"""The online alignment worker (`alignloop trainer`): feedback events in, gated adapter versions out.

One round:
1. read feedback events from the store's consumer group (after a restart, first the ones it was given and never
   acknowledged) and turn them into preference pairs (`online_rl.pairs`);
2. when `round_min_pairs` pairs are waiting, or some pairs have waited `round_max_wait_s`, train a LoRA on them with
   DPO or Dense DPO (`online_rl.dpo`), starting from the promoted version's adapter (or a fresh one on the base);
   with `online_share` > 0 (Mixed-DPO) that share of the slots holds judged pairs sampled from the policy itself
   on logged prompts whose images have facts (`online_rl.online_pairs`);
3. publish `policy-vN` atomically and register it, acknowledging the round's events in the same registry write, so
   an event is trained on by exactly one published version even across crashes;
4. check that the gateway serves it exactly as transformers + PEFT answer (`online_rl.served_check`), then gate it
   (`online_rl.gate`): it and the version it would replace answer the same held-out ShapesWorld scenes through the
   gateway, and it is rejected when a metric (CHAIR_s, POPE-adversarial, object recall) is worse with 95% confidence
   beyond its margin. Otherwise it is promoted through the gateway, which stages it on every vLLM replica first
   (`online_rl.promotion`), or with `canary_share` > 0 it serves that share of the traffic until its users' thumbs
   decide (`online_rl.canary`). A gate that cannot finish marks it `gate_failed`, and it is gated again later.
   `gate_suites` picks what the gate scores (`online_rl.gate_suites`): ShapesWorld (the default), POPE, MMHal-Bench
   or CHAIR on real images, and the held-out slice of the store's own pairs, which is then never trained on.

Each phase logs one line (`phase=read|bdhs|train|publish|served_check|gate|warm ...`), and the trainer's Prometheus
metrics (`online_rl.trainer_metrics`) are served on `metrics_port`. The loop never ends on a failed round: it logs
it (one line for an unreachable gateway or store) and tries again with backoff.

An up-rated answer with no rejected partner gets one from BDHS (`online_rl.bdhs`, up to `bdhs_per_round` a round):
the policy, with ~99% of the image hidden, completes the answer's cut sentences into its typical hallucinations.
Events that formed no pair at all are acknowledged with the round that read them. The reference policy is the
policy with its adapter disabled, i.e. the SFT model.

With `--algorithm ppo` the worker runs Fact-RLHF PPO instead (`training.ppo`): every `ppo_interval_s` it takes the
distinct recent prompts with one image from the store, with the facts registered for their images, runs
`ppo_steps` PPO steps against the reward model in `reward_model` from the promoted version's adapter, and
publishes and gates the result exactly as a DPO round's. It does not read feedback events.

    alignloop trainer --gateway-url http://127.0.0.1:8000 --store-url sqlite:///runs/alignloop.db
    alignloop trainer --algorithm ppo --reward-model runs/reward-fact
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from alignloop.cores import checked_cores
from alignloop.settings import ClientSettings, ModelSettings
from online_rl.canary import CanaryMonitor, CanaryRules
from online_rl.gate import DEFAULT_SUITE, Gate, GateResult, Scorer, ScorerSuite, gateway_scorer
from online_rl.gate_suites import Answerer, FeedbackHoldoutSuite
from online_rl.pairs import PairSource, PreferencePair, build_pairs
from online_rl.promotion import Promote, gateway_promoter
from online_rl.schema import AdapterVersion, Delivery, adapter_name
from online_rl.store import ConflictError, FeedbackStore
from online_rl.trainer_metrics import TrainerMetrics
from training.evaluation.paired import with_margins

if TYPE_CHECKING:
    from training.evaluation.pair_judge import LLMPairJudge

logger = logging.getLogger(__name__)

ALL_PAIR_SOURCES = ("correction", "thumbs", "preference", "bdhs")
GateSuiteName = Literal["shapes", "pope", "mmhal", "chair", "feedback-holdout"]
UNGATED = ("candidate", "gate_failed")


def log_phase(phase: str, **fields: Any) -> None:
    """One structured line per phase of a round: `phase=<name> key=value ...`."""

    def text(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            return ",".join(f"{k}:{text(v)}" for k, v in value.items()) or "-"
        return str(value).replace(" ", "_") if isinstance(value, str) and len(str(value)) < 40 else repr(value)

    logger.info("phase=%s %s", phase, " ".join(f"{key}={text(value)}" for key, value in fields.items()))


class TrainerSettings(ModelSettings, ClientSettings):
    """The trainer's settings: the shared ones (store, model, adapter directory, alias, the gateway it gates
    through) and its own, read from ALIGNLOOP_TRAINER_* variables."""

    model_config = SettingsConfigDict(env_prefix="ALIGNLOOP_TRAINER_")

    group: str = Field(default="trainer", description="the consumer group it reads feedback events as")
    consumer: str = Field(default="trainer-1", description="its consumer name in that group")
    algorithm: Literal["dpo", "dense-dpo", "ppo"] = Field(
        default="dense-dpo",
        description="dpo / dense-dpo train on feedback pairs; ppo runs Fact-RLHF PPO on recent traffic",
    )
    round_min_pairs: int = Field(default=16, ge=1, description="pairs that start a round")
    round_max_wait_s: float = Field(default=300.0, gt=0, description="the longest a pair waits for its round, seconds")
    epochs: int = Field(default=3, ge=1, description="passes over a round's pairs")
    batch_pairs: int = Field(default=4, ge=1, description="pairs per optimizer step")
    learning_rate: float = Field(default=5e-4, gt=0, description="AdamW learning rate of the LoRA")
    beta: float = Field(default=0.1, gt=0, description="DPO's beta")
    gamma: float = Field(default=5.0, ge=1.0, description="Dense DPO weight of corrected tokens")
    correction_end_weight: float | None = Field(
        default=None,
        ge=0,
        description="Dense DPO: weight of a correction's end-of-answer token; none: as the diff says (gamma when a "
        "correction deletes the answer's last words)",
    )
    dense_normalize: bool = Field(
        default=True, description="Dense DPO: divide the weighted log-prob sum by the summed weights"
    )
    sft_weight: float = Field(
        default=1.0,
        ge=0,
        description=(
            "weight of the chosen answers' token NLL added to the preference loss (RPO); 0 is plain (Dense) DPO"
        ),
    )
    pair_sources: Annotated[frozenset[PairSource], NoDecode] = Field(
        default=frozenset(ALL_PAIR_SOURCES),
        description="pairs to train on, comma-separated: correction, thumbs, preference, bdhs (online: online-share)",
    )
    lora_rank: int = Field(default=8, ge=1, description="rank of a fresh LoRA (a version's child keeps its parent's)")
    online_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "Mixed-DPO: chance that a training slot holds a judged online pair (sampled from the policy) instead of "
            "its feedback pair; 0 trains on feedback pairs alone"
        ),
    )
    online_samples: int = Field(default=2, ge=2, description="answers sampled per prompt for a judged online pair")
    bdhs_per_round: int = Field(
        default=8,
        ge=0,
        description=(
            "BDHS: up-rated answers with no rejected partner that get a sampled hallucination as rejected, per round"
        ),
    )
    reward_model: Path = Field(
        default=Path("runs/reward-fact"), description=("PPO: the reward model directory (`alignloop train reward`)")
    )
    ppo_interval_s: float = Field(default=600.0, gt=0, description="PPO: seconds between rounds")
    ppo_steps: int = Field(default=10, ge=1, description="PPO: rollout batches per round")
    ppo_rollout_batch: int = Field(default=16, ge=1, description="PPO: prompts per rollout batch")
    ppo_learning_rate: float = Field(default=1e-4, gt=0, description="PPO: policy and value learning rate")
    ppo_min_prompts: int = Field(default=16, ge=1, description="PPO: distinct recent prompts needed for a round")
    seed: int = Field(default=0, description="seeds the LoRA, the pair order and the sampling")
    eval_split: Literal["validation", "test"] = Field(
        default="validation", description="the ShapesWorld split the gate scores on"
    )
    eval_images: int = Field(default=100, ge=1, description="images the gate scores each version on")
    gate_confidence: float = Field(
        default=0.95, gt=0, lt=1, description="gate: a metric blocks a version only when worse with this confidence"
    )
    gate_chair_margin: float = Field(
        default=0.0, ge=0, le=1, description="gate: CHAIR_s may rise this much with confidence and still pass"
    )
    gate_pope_margin: float = Field(
        default=0.0, ge=0, le=1, description="gate: POPE-adversarial may fall this much with confidence and still pass"
    )
    gate_recall_margin: float = Field(
        default=0.02, ge=0, le=1, description="gate: object recall may fall this much with confidence and still pass"
    )
    gate_concurrency: int = Field(default=8, ge=1, description="gate: requests in flight to the gateway")
    gate_suites: Annotated[tuple[GateSuiteName, ...], NoDecode] = Field(
        default=("shapes",),
        description=(
            "gate: what versions are compared on, comma-separated: shapes (ShapesWorld), pope, mmhal, chair (real "
            "images; docs/gating.md), feedback-holdout (held-out store pairs, then never trained on)"
        ),
    )
    gate_pope_files: Annotated[tuple[Path, ...], NoDecode] = Field(
        default=(), description="gate suite pope: the POPE question files (JSONL), comma-separated, one per setting"
    )
    gate_pope_image_dir: Path | None = Field(default=None, description="gate suite pope: the images (COCO val2014)")
    gate_pope_images: int = Field(
        default=0, ge=0, description="gate suite pope: images asked about, in file order; 0: all"
    )
    gate_pope_question_suffix: str = Field(
        default="", description="gate suite pope: text appended to each question (the official files ask it bare)"
    )
    gate_mmhal_questions: Path | None = Field(
        default=None, description="gate suite mmhal: MMHal-Bench's question file (response_template.json)"
    )
    gate_mmhal_image_dir: Path | None = Field(default=None, description="gate suite mmhal: MMHal-Bench's images")
    gate_mmhal_max_tokens: int = Field(default=512, ge=1, description="gate suite mmhal: answer length limit")
    gate_mmhal_score_margin: float = Field(
        default=0.0,
        ge=0,
        le=6,
        description="gate suite mmhal: the mean rating (0-6) may fall this much with confidence",
    )
    gate_chair_annotations: Annotated[tuple[Path, ...], NoDecode] = Field(
        default=(),
        description="gate suite chair: COCO-style annotation files, comma-separated (instances, optionally captions)",
    )
    gate_chair_image_dir: Path | None = Field(default=None, description="gate suite chair: the annotated images")
    gate_chair_images: int = Field(default=500, ge=0, description="gate suite chair: images described; 0: all")
    gate_chair_max_tokens: int = Field(default=512, ge=1, description="gate suite chair: description length limit")
    gate_holdout_share: float = Field(
        default=0.1, gt=0, lt=1, description="gate suite feedback-holdout: share of the store's pairs held out"
    )
    gate_holdout_max_pairs: int = Field(
        default=1000, ge=1, description="gate suite feedback-holdout: the most held-out pairs a version is scored on"
    )
    gate_holdout_margin: float = Field(
        default=0.0, ge=0, le=1, description="gate suite feedback-holdout: ranking accuracy may fall this much"
    )
    judge_url: str | None = Field(
        default=None,
        description=(
            "an OpenAI-compatible judge (base URL ending in /v1; the gateway itself, or an external model): rates "
            "MMHal answers, and ranks online pairs on images without ShapesWorld facts"
        ),
    )
    judge_model: str | None = Field(default=None, description="the judge's model name (e.g. llava-rlhf@v3)")
    judge_api_key_env: str = Field(
        default="ALIGNLOOP_TRAINER_JUDGE_API_KEY", description="the environment variable holding the judge's API key"
    )
    gate_retry_interval_s: float = Field(
        default=60.0, gt=0, description="seconds before a version whose gate failed is gated again"
    )
    canary_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="live canary: share of unpinned traffic a gated version serves first; 0: off",
    )
    canary_min_rated: int = Field(default=30, ge=1, description="live canary: rated answers between two looks")
    canary_max_looks: int = Field(default=10, ge=1, description="live canary: looks before it must decide")
    canary_margin: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="live canary: how much lower its thumbs-up rate may be and count as no worse",
    )
    served_check: bool = Field(
        default=True,
        description="before gating a version, check that the gateway serves it exactly as transformers + PEFT answer",
    )
    poll_interval_s: float = Field(default=2.0, gt=0, description="seconds between reads of the feedback stream")
    cpus: Annotated[str | None, AfterValidator(checked_cores)] = Field(
        default=None,
        description="the cores it runs on, one torch thread each, e.g. 1 or 4-7 (`up` sets them beside vLLM on CPU); "
        "none: all",
    )
    metrics_host: str = Field(default="127.0.0.1", description="the address of the trainer's /metrics")
    metrics_port: int = Field(default=9101, ge=0, le=65535, description="the port of the trainer's /metrics; 0: none")

    @field_validator("pair_sources", "gate_suites", "gate_pope_files", "gate_chair_annotations", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value

    @field_validator("gate_suites")
    @classmethod
    def _some_suites(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one gate suite")
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _judge_complete(self) -> TrainerSettings:
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("a judge needs both judge_url and judge_model")
        return self

    def pair_judge(self, http_client=None):
        """The LLM judge of online pairs on real images, or None when no judge is configured."""
        if not self.judge_url:
            return None
        import os

        from training.evaluation.pair_judge import LLMPairJudge

        api_key = os.environ.get(self.judge_api_key_env, "EMPTY")
        return LLMPairJudge.connect(self.judge_url, self.judge_model, api_key, http_client=http_client)

    def mmhal_judge(self, http_client=None):
        """MMHal-Bench's rating judge at the judge endpoint (`training.evaluation.mmhal.OpenAIJudge`)."""
        import os

        from training.evaluation.mmhal import OpenAIJudge

        api_key = os.environ.get(self.judge_api_key_env, "EMPTY")
        return OpenAIJudge(self.judge_url, self.judge_model, api_key, http_client=http_client)


@dataclasses.dataclass
class RoundResult:
    version: int
    outcome: str  # promoted, canary, rejected or gate_failed
    pairs: int
    events: int
    gate: GateResult | None
    train_metrics: dict[str, float]
    seconds: float
    pair_sources: dict[str, int] = dataclasses.field(default_factory=dict)  # pairs per source (correction, ...)
    reasons: list[str] = dataclasses.field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"


def version_label(version: int | None) -> str:
    return "base" if version is None else adapter_name(version)


class OnlineTrainer:
    def __init__(
        self,
        settings: TrainerSettings,
        store: FeedbackStore,
        scorer: Scorer | None = None,
        metrics: TrainerMetrics | None = None,
        promote: Promote | None = None,
        served_checker: Callable[[AdapterVersion], list[str]] | None = None,
        answerer: Answerer | None = None,
        pair_judge: LLMPairJudge | None = None,
        judge_http_client=None,
    ):
        """`scorer(model_name) -> report` scores a served model name with per-scene tallies; by default through the
        gateway (`online_rl.gate.gateway_scorer`). `promote` moves the alias (`online_rl.promotion`): by default
        through the gateway, which stages the version on every vLLM replica first, when the gate scores through it
        too; with a scorer of the caller's own (no gateway), straight in the store. `served_checker(version) ->
        problems` runs before the gate; by default, with the gateway, it checks that the gateway serves the version
        exactly as transformers + PEFT answer (`online_rl.served_check`). `answerer(model_name) -> ChatModel`
        answers for the real-image gate suites; by default through the gateway. `pair_judge` ranks online pairs on
        images without ShapesWorld facts; by default the judge the settings configure (`judge_http_client`, an
        httpx.Client, replaces its connection and the MMHal judge's, e.g. in tests)."""
        from online_rl.gate_suites import build_suites, gateway_answerer
        from training.lora import vllm_base_model

        through_gateway = scorer is None
        self.settings = settings
        self.store = store
        self.metrics = metrics or TrainerMetrics()
        if promote is None:
            promote = (
                store.promote
                if scorer is not None
                else gateway_promoter(settings.gateway_url, settings.api_key.get_secret_value())
            )
        self.promote = promote
        scorer = scorer or gateway_scorer(
            settings.gateway_url,
            settings.api_key.get_secret_value(),
            settings.eval_split,
            settings.eval_images,
            settings.gate_concurrency,
        )
        shapes = ScorerSuite(
            DEFAULT_SUITE,
            scorer,
            {
                "base_model": vllm_base_model(settings.model),
                "split": settings.eval_split,
                "images": settings.eval_images,
            },
            with_margins(
                {
                    "chair_s": settings.gate_chair_margin,
                    "pope_adversarial_accuracy": settings.gate_pope_margin,
                    "object_recall": settings.gate_recall_margin,
                }
            ),
        )
        answerer = answerer or gateway_answerer(
            settings.gateway_url, settings.api_key.get_secret_value(), settings.gate_concurrency
        )
        suites = build_suites(
            settings,
            store,
            shapes,
            answerer,
            self.holdout_rewards,
            judge_factory=lambda: settings.mmhal_judge(judge_http_client),
        )
        self.gate = Gate(
            None,
            Path(settings.adapter_dir) / ".gate-scores",
            shapes.fixed,
            confidence=settings.gate_confidence,
            seed=settings.seed,
            suites=suites,
        )
        self.holdout = next((s for s in suites if isinstance(s, FeedbackHoldoutSuite)), None)
        self.pair_judge = pair_judge if pair_judge is not None else settings.pair_judge(judge_http_client)
        self._said_no_judge = False
        rules = CanaryRules(settings.canary_min_rated, settings.canary_max_looks, settings.gate_confidence)
        self.canary = CanaryMonitor(
            store, settings.public_alias, dataclasses.replace(rules, margin=settings.canary_margin), promote=promote
        )
        self.deliveries: list[Delivery] = []
        self.bdhs_candidates: list = []  # (generation, event ids) of up-rated answers without a rejected partner
        self.first_pair_at: float | None = None
        self.rounds = 0
        self.event_times: dict[int, list[float]] = {}  # version -> arrival times of the events it was trained on
        self.served_checker = served_checker
        if served_checker is None and through_gateway and settings.served_check:
            self.served_checker = self._check_served_through_gateway
        self._runner = None
        self._parent_path: str | None = None
        self._resumed = False

    # ---- events -> pairs ---------------------------------------------------------------------------------------
    def poll(self) -> list[PreferencePair]:
        """Reads new events (after a restart: the unacknowledged ones first) and returns the pairs they support."""
        new = self.store.read_events(
            self.settings.group, self.settings.consumer, count=1000, include_own_pending=not self._resumed
        )
        self._resumed = True
        known = {d.delivery_id for d in self.deliveries}
        self.deliveries += [d for d in new if d.delivery_id not in known]
        events = [d.event for d in self.deliveries]
        sources = self.settings.pair_sources
        pairs = [pair for pair in build_pairs(events, self.store.get_generation) if pair.source in sources]
        if self.holdout is not None:  # the gate's held-out pairs are never trained on
            from online_rl.holdout import is_held_out

            pairs = [pair for pair in pairs if not is_held_out(pair, self.settings.gate_holdout_share)]
        if self.settings.bdhs_per_round > 0 and "bdhs" in sources:
            from online_rl.bdhs import unpartnered_good_answers

            candidates = unpartnered_good_answers(events, self.store.get_generation, pairs)
            self.bdhs_candidates = candidates[-self.settings.bdhs_per_round :]
        if (pairs or self.bdhs_candidates) and self.first_pair_at is None:
            self.first_pair_at = time.monotonic()
        return pairs

    def round_due(self, pairs: list[PreferencePair]) -> bool:
        """Enough pairs (counting the BDHS pairs the round will make) are waiting, or some have waited long enough."""
        waiting = len(pairs) + len(self.bdhs_candidates)
        if waiting >= self.settings.round_min_pairs:
            return True
        waited = (
            self.first_pair_at is not None and time.monotonic() - self.first_pair_at >= self.settings.round_max_wait_s
        )
        return waiting > 0 and waited

    def bdhs_pairs(self, policy, processor) -> list[PreferencePair]:
        """A BDHS pair for each waiting up-rated answer without a rejected partner (online_rl.bdhs)."""
        import io

        from PIL import Image

        from online_rl.bdhs import BDHSSampler

        sampler = BDHSSampler(policy, processor, seed=self.settings.seed + len(self.store.list_adapters()))
        pairs = []
        for generation, event_ids in self.bdhs_candidates:
            data = self.store.get_image(generation.image_hashes[0])
            if data is None:
                continue
            pair = sampler.pair(generation, Image.open(io.BytesIO(data)).convert("RGB"), event_ids)
            if pair is not None:
                pairs.append(pair)
        return pairs

    def _say_no_judge_once(self) -> None:
        """With no judge configured, logs once that prompts about images without ShapesWorld facts make no online
        pairs (when there are such prompts)."""
        if self.pair_judge is not None or self._said_no_judge:
            return
        from online_rl.logged_prompts import open_prompts
        from training.shapes_world import ShapesWorld

        count = len(open_prompts(self.store, ShapesWorld()))
        if count:
            self._said_no_judge = True
            log_phase(
                "online",
                judge="none",
                prompts_without_shapes_facts=count,
                note="no judge configured (--judge-url, --judge-model): these prompts make no online pairs",
            )

    def holdout_rewards(self, pairs: list[PreferencePair], adapter_path: str) -> list[float]:
        """The implicit DPO reward margin of each pair under a version's adapter, in-process, on the base model the
        rounds train (loaded once and kept)."""
        return self.preference_trainer().implicit_rewards(pairs, adapter_path, self.settings.beta)

    # ---- training ----------------------------------------------------------------------------------------------
    def preference_trainer(self):
        """The DPO / Dense DPO runner (`online_rl.dpo_runner`): the base model, loaded once onto the GPU when there
        is one (bf16 autocast there), and kept between rounds."""
        if self._runner is None:
            from online_rl.dpo_runner import PreferenceTrainer, RoundConfig

            self._runner = PreferenceTrainer(
                self.settings.model, RoundConfig.from_settings(self.settings), self.store.get_image
            )
        return self._runner

    def load_policy(self):
        """The round's policy: the promoted version's adapter (trainable) on the base model, or a fresh LoRA; with its
        processor and the promoted version."""
        runner = self.preference_trainer()
        promoted = self.store.promoted_version(self.settings.public_alias)
        adapter = self.store.get_adapter(promoted) if promoted else None
        self._parent_path = adapter.path if adapter is not None else None
        return runner.wrap(self._parent_path), runner.processor, promoted

    def train(self, policy, processor, pairs: list[PreferencePair]) -> tuple[dict[str, float], int]:
        """`epochs` passes of DPO or Dense DPO over the pairs on the policy `load_policy` gave; the final epoch's mean
        metrics, and the step count."""
        output = self.preference_trainer().train_round(pairs, parent_adapter=self._parent_path)
        return output.metrics, output.steps

    # ---- one round -----------------------------------------------------------------------------------------------
    def run_round(self, pairs: list[PreferencePair]) -> RoundResult | None:
        """Trains, publishes and gates one version; None when the waiting events support no pair at all."""
        from online_rl.adapters import publish_adapter

        started = time.monotonic()
        settings = self.settings
        self.rounds += 1
        deliveries = list(self.deliveries)
        log_phase(
            "read",
            round=self.rounds,
            events=len(deliveries),
            pairs=len(pairs),
            sources=dict(Counter(pair.source for pair in pairs)),
            bdhs_candidates=len(self.bdhs_candidates),
        )
        phase_started = time.monotonic()
        policy, processor, parent = self.load_policy()
        if self.bdhs_candidates:
            bdhs = self.bdhs_pairs(policy, processor)
            pairs = pairs + bdhs
            log_phase("bdhs", round=self.rounds, pairs=len(bdhs), seconds=time.monotonic() - phase_started)
        if not pairs:  # BDHS made nothing of the waiting answers: they support no pair, so they are done with
            self.store.ack_events(settings.group, [d.delivery_id for d in deliveries])
            log_phase("read", round=self.rounds, outcome="no_pairs", acknowledged=len(deliveries))
            self.metrics.rounds.labels(outcome="no_pairs").inc()
            self.deliveries, self.bdhs_candidates, self.first_pair_at = [], [], None
            return None
        if settings.online_share > 0:
            from online_rl.online_pairs import mixed_pairs, online_pairs

            rng = random.Random(f"{settings.seed}-{len(self.store.list_adapters())}")
            self._say_no_judge_once()
            pairs = mixed_pairs(
                pairs,
                lambda n: online_pairs(
                    policy,
                    processor,
                    self.store,
                    n,
                    rng,
                    settings.online_samples,
                    adapter_version=parent,
                    judge=self.pair_judge,
                ),
                rng,
                settings.online_share,
            )
        sources = dict(Counter(pair.source for pair in pairs))
        phase_started = time.monotonic()
        train_metrics, steps = self.train(policy, processor, pairs)
        seconds = time.monotonic() - phase_started
        self.metrics.phase_seconds.labels(phase="train").observe(seconds)
        log_phase(
            "train", round=self.rounds, pairs=len(pairs), sources=sources, steps=steps, **train_metrics, seconds=seconds
        )
        delivery_ids = [d.delivery_id for d in deliveries]
        adapter = publish_adapter(
            self.store,
            policy,
            settings.adapter_dir,
            settings.model,
            algorithm=settings.algorithm,
            parent_version=parent,
            feedback_range=(delivery_ids[0], delivery_ids[-1]),
            num_feedback_events=len(deliveries),
            ack=(settings.group, delivery_ids),
            pair_sources=sources,
            notes=f"{len(pairs)} pairs; " + ", ".join(f"{k}={v:.4f}" for k, v in train_metrics.items()),
        )
        self.deliveries, self.bdhs_candidates, self.first_pair_at = [], [], None
        self.event_times[adapter.version] = [d.event.created for d in deliveries]
        for source, count in sources.items():
            self.metrics.pairs.labels(source=source).inc(count)
        log_phase(
            "publish", round=self.rounds, version=adapter.name, parent=version_label(parent), events=len(deliveries)
        )
        outcome, result, reasons = self.gate_version(adapter)
        return RoundResult(
            adapter.version,
            outcome,
            len(pairs),
            len(deliveries),
            result,
            train_metrics,
            time.monotonic() - started,
            sources,
            reasons,
        )

    def run_ppo_round(self) -> RoundResult | None:
        """Fact-RLHF PPO on prompts from recent traffic (`training.ppo`), from the promoted version's adapter, then
        the same publishing path and gate as a DPO round; None when too few distinct prompts have been logged."""
        from online_rl.adapters import publish_adapter
        from online_rl.logged_prompts import traffic_prompts
        from training.ppo import PPOConfig, PPOTrainer

        started = time.monotonic()
        settings = self.settings
        self.rounds += 1
        prompts = traffic_prompts(self.store)
        if len(prompts) < settings.ppo_min_prompts:
            log_phase(
                "read", round=self.rounds, algorithm="ppo", prompts=len(prompts), waiting_for=settings.ppo_min_prompts
            )
            return None
        parent = self.store.promoted_version(settings.public_alias)
        adapter = self.store.get_adapter(parent) if parent else None
        config = PPOConfig(
            model=settings.model,
            reward_model=str(settings.reward_model),
            init_adapter=adapter.path if adapter else None,
            steps=settings.ppo_steps,
            rollout_batch=settings.ppo_rollout_batch,
            lora_rank=settings.lora_rank,
            learning_rate=settings.ppo_learning_rate,
            seed=settings.seed + len(self.store.list_adapters()),
            eval_every=0,
            final_eval_images=0,
        )
        trainer = PPOTrainer(config)
        trainer.schedule(config.steps)
        rng = random.Random(config.seed)
        history = [
            trainer.step(rng.sample(prompts, min(len(prompts), config.rollout_batch))) for _ in range(config.steps)
        ]
        train_metrics = {k: history[-1][k] for k in ("rm_score", "reward", "kl_to_reference") if k in history[-1]}
        train_metrics["rm_score_first"] = history[0]["rm_score"]
        log_phase(
            "train", round=self.rounds, algorithm="ppo", prompts=len(prompts), steps=config.steps, **train_metrics
        )
        published = publish_adapter(
            self.store,
            trainer.unwrapped_policy,
            settings.adapter_dir,
            settings.model,
            algorithm="ppo",
            parent_version=parent,
            notes=f"ppo: {config.steps} steps x {config.rollout_batch} of {len(prompts)} recent prompts, reward model "
            f"{settings.reward_model}; " + ", ".join(f"{k}={v:.4f}" for k, v in train_metrics.items()),
        )
        log_phase("publish", round=self.rounds, version=published.name, parent=version_label(parent))
        outcome, result, reasons = self.gate_version(published)
        return RoundResult(
            published.version,
            outcome,
            0,
            0,
            result,
            train_metrics,
            time.monotonic() - started,
            {"ppo_prompts": len(prompts)},
            reasons,
        )

    # ---- gate, canary, promotion --------------------------------------------------------------------------------
    def gate_version(self, adapter: AdapterVersion) -> tuple[str, GateResult | None, list[str]]:
        """Gates a published version against what the alias serves now; promotes it, puts it on canary, rejects it,
        or marks it gate_failed (gated again later). Returns the outcome, the gate's result and the reasons."""
        from alignloop.client import CALL_ERRORS

        settings, alias = self.settings, self.settings.public_alias
        promoted = self.store.promoted_version(alias)
        if adapter.parent_version != promoted:  # the alias moved since it was trained: its parent is gone
            reason = f"superseded: trained from {version_label(adapter.parent_version)}, the alias serves "
            reason += f"{version_label(promoted)} now"
            return self._reject(adapter, [reason], {"passed": False, "reasons": [reason]}, None)
        baseline = (f"{alias}@v{promoted}" if promoted else "base", version_label(promoted))
        try:
            problems = self.served_checker(adapter) if self.served_checker is not None else []
            if problems:
                reason = f"not served as trained: {problems[0]}" + (
                    f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                )
                return self._reject(
                    adapter, [reason], {"passed": False, "reasons": [reason], "served_check": problems}, None
                )
            result = self.gate.compare((f"{alias}@v{adapter.version}", adapter.name), baseline)
        except CALL_ERRORS as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()
            self.store.update_adapter(adapter.version, status="gate_failed", gate={"error": reason, "at": time.time()})
            self.metrics.rounds.labels(outcome="gate_failed").inc()
            log_phase(
                "gate",
                version=adapter.name,
                decision="gate_failed",
                error=reason,
                retry_in_s=settings.gate_retry_interval_s,
            )
            return "gate_failed", None, [reason]
        self.metrics.phase_seconds.labels(phase="gate").observe(result.seconds)
        for name, difference in result.decision.differences.items():
            value = result.candidate.get(name, difference.candidate)
            self.metrics.gate_metric.labels(version=adapter.name, metric=name).set(value)
        summary = "; ".join(
            f"{d.metric} {d.baseline:.3f}->{d.candidate:.3f} [{d.low:+.3f},{d.high:+.3f}]"
            for d in result.decision.differences.values()
        )
        record = result.record(baseline[1])
        fields = {
            d.metric: f"{d.baseline:.3f}->{d.candidate:.3f}[{d.low:+.3f},{d.high:+.3f}]"
            for d in result.decision.differences.values()
        }
        if not result.passed:
            log_phase(
                "gate",
                version=adapter.name,
                baseline=baseline[1],
                decision="rejected",
                **fields,
                reasons=result.reasons,
                seconds=result.seconds,
                baseline_cached=result.baseline_cached,
            )
            return self._reject(adapter, result.reasons, record, result)
        self.store.update_adapter(adapter.version, metrics=result.candidate, gate=record)
        try:
            if settings.canary_share > 0:
                self.store.set_canary(
                    alias, adapter.version, settings.canary_share, actor="trainer", reason=f"gate passed: {summary}"
                )
                self.store.update_adapter(adapter.version, status="canary")
                outcome = "canary"
            else:
                self.promote(
                    alias, adapter.version, expected=promoted, actor="trainer", reason=f"gate passed: {summary}"
                )
                self.observe_served(adapter.version)
                outcome = "promoted"
        except ConflictError as error:  # the alias moved meanwhile (an admin), or staging refused the version
            return self._reject(adapter, [f"not promoted: {error}"], record, result)
        self.metrics.rounds.labels(outcome=outcome).inc()
        self.metrics.last_round.set(time.time())
        log_phase(
            "gate",
            version=adapter.name,
            baseline=baseline[1],
            decision=outcome,
            **fields,
            seconds=result.seconds,
            baseline_cached=result.baseline_cached,
        )
        return outcome, result, []

    def _check_served_through_gateway(self, adapter: AdapterVersion) -> list[str]:
        """Greedy answers of `llava-rlhf@vN` through the gateway against transformers + PEFT's on a few probes."""
        from online_rl.served_check import check_served_exactly

        started = time.monotonic()
        mismatches = check_served_exactly(
            self.settings.gateway_url,
            f"{self.settings.public_alias}@v{adapter.version}",
            adapter.path,
            self.settings.model,
            api_key=self.settings.api_key.get_secret_value(),
        )
        log_phase("served_check", version=adapter.name, mismatches=len(mismatches), seconds=time.monotonic() - started)
        return [m.reason or f"probe {m.probe}: served {m.served!r}, expected {m.expected!r}" for m in mismatches]

    def _reject(self, adapter: AdapterVersion, reasons: list[str], record: dict, result: GateResult | None):
        notes = f"{adapter.notes}; rejected: {'; '.join(reasons)}"
        metrics = result.candidate if result is not None else None
        self.store.update_adapter(adapter.version, status="rejected", notes=notes, gate=record, metrics=metrics)
        self.metrics.rounds.labels(outcome="rejected").inc()
        self.metrics.last_round.set(time.time())
        if result is None:
            log_phase("gate", version=adapter.name, decision="rejected", reasons=reasons)
        return "rejected", result, reasons

    def observe_served(self, version: int) -> None:
        """Feedback-to-served latency of the events a newly promoted version was trained on (when this process
        trained it)."""
        served_at = time.time()
        for created in self.event_times.pop(version, []):
            self.metrics.feedback_to_served.observe(max(0.0, served_at - created))

    def gate_pending(self) -> list[tuple[int, str]]:
        """Gates every version a crash left ungated (candidate) and, after `gate_retry_interval_s`, every version whose
        gate failed; returns (version, outcome) for each."""
        gated = []
        for adapter in self.store.list_adapters():
            if (
                adapter.status == "gate_failed"
                and time.time() - adapter.gate.get("at", 0) < self.settings.gate_retry_interval_s
            ):
                continue
            if adapter.status in UNGATED:
                log_phase("gate", version=adapter.name, pending=adapter.status)
                outcome, _, _ = self.gate_version(adapter)
                gated.append((adapter.version, outcome))
        return gated

    def warm_baseline(self) -> str | None:
        """Scores what the alias serves now, when the gateway is up and the score is not cached, so that the next
        gate has only its candidate to score; returns the label it scored."""
        from alignloop.client import GatewayClient

        promoted = self.store.promoted_version(self.settings.public_alias)
        label = version_label(promoted)
        if self.gate.is_cached(label):
            return None
        client = GatewayClient(self.settings.gateway_url, self.settings.api_key.get_secret_value(), timeout_s=10)
        try:
            if not client.ready():
                return None
        finally:
            client.close()
        started = time.monotonic()
        self.gate.scores(f"{self.settings.public_alias}@v{promoted}" if promoted else "base", label)
        log_phase("warm", version=label, seconds=time.monotonic() - started)
        return label

    def update_gauges(self) -> None:
        self.metrics.backlog.set(self.store.pending_count(self.settings.group))
        self.metrics.ungated.set(sum(a.status in UNGATED for a in self.store.list_adapters()))

    def run_forever(self, stop=None) -> None:
        """Gates what a crash left ungated, then polls and runs a round whenever one is due, looks at the canary and
        gates failed versions again, until `stop()` is true. With algorithm "ppo", a PPO round runs every
        `ppo_interval_s` on recent traffic instead (feedback events are left to a DPO worker). A round that fails
        is logged and retried; the loop never ends on its own."""
        from alignloop.client import CALL_ERRORS

        settings = self.settings
        if settings.metrics_port:
            self.metrics.serve(settings.metrics_host, settings.metrics_port)
        log_phase(
            "start",
            algorithm=settings.algorithm,
            store=settings.store_url.split("?")[0],
            gateway=settings.gateway_url,
            canary_share=settings.canary_share,
        )
        last_ppo, failures = float("-inf"), 0
        while not (stop and stop()):
            try:
                self.gate_pending()
                decision = self.canary.check()
                if decision is not None and decision.action == "promote":
                    self.observe_served(self.store.promoted_version(settings.public_alias) or 0)
                ran = False
                if settings.algorithm == "ppo":
                    if time.monotonic() - last_ppo >= settings.ppo_interval_s:
                        self.run_ppo_round()
                        last_ppo, ran = time.monotonic(), True
                else:
                    pairs = self.poll()
                    if self.round_due(pairs):
                        self.run_round(pairs)
                        ran = True
                self.update_gauges()
                failures = 0
                if ran:
                    continue
                if self.warm_baseline():
                    continue
            except (*CALL_ERRORS, OSError) as error:  # the gateway or the store is unreachable: say so, retry
                failures += 1
                logger.warning(
                    "phase=error error=%s message=%r failures=%d",
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                    failures,
                )
            except Exception:  # a bug: the traceback, then carry on
                failures += 1
                logger.exception("phase=error unexpected failures=%d", failures)
            time.sleep(
                min(settings.poll_interval_s * (2 ** min(failures, 5)), 60.0) if failures else settings.poll_interval_s
            )
