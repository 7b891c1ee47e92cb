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
4. gate it: score `llava-rlhf@vN` through the gateway with `alignloop eval`'s ShapesWorld benchmark on a held-out
   split, against the version it would replace. It is promoted (compare-and-set on the alias, so a concurrent
   admin change wins) only if CHAIR_s and POPE-adversarial do not regress beyond a tolerance and object recall does
   not fall by more than 2 points; otherwise it is marked rejected and the next round starts again from the
   promoted version. The metrics go into the registry either way.

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
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from alignloop.settings import ClientSettings, ModelSettings
from online_rl.pairs import PairSource, PreferencePair, build_pairs
from online_rl.schema import Delivery
from online_rl.store import ConflictError, FeedbackStore

logger = logging.getLogger(__name__)

GATE_METRICS = ("chair_s", "pope_adversarial_accuracy", "object_recall")
ALL_PAIR_SOURCES = ("correction", "thumbs", "preference", "bdhs")


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
    chair_tolerance: float = Field(default=0.02, ge=0, description="gate: how much CHAIR_s may rise")
    pope_tolerance: float = Field(default=0.02, ge=0, description="gate: how much POPE-adversarial may fall")
    recall_tolerance: float = Field(default=0.02, ge=0, description="gate: how much object recall may fall")
    poll_interval_s: float = Field(default=2.0, gt=0, description="seconds between reads of the feedback stream")

    @field_validator("pair_sources", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


@dataclasses.dataclass
class GateDecision:
    passed: bool
    candidate: dict[str, float]
    baseline: dict[str, float]
    reasons: list[str]


def gate(candidate: dict[str, float], baseline: dict[str, float], settings: TrainerSettings) -> GateDecision:
    """Promote only if hallucination does not regress beyond the tolerances and recall holds within 2 points."""
    reasons = []
    if candidate["chair_s"] > baseline["chair_s"] + settings.chair_tolerance:
        reasons.append(f"CHAIR_s rose {baseline['chair_s']:.3f} -> {candidate['chair_s']:.3f}")
    if candidate["pope_adversarial_accuracy"] < baseline["pope_adversarial_accuracy"] - settings.pope_tolerance:
        reasons.append(
            f"POPE-adversarial fell {baseline['pope_adversarial_accuracy']:.3f} -> "
            f"{candidate['pope_adversarial_accuracy']:.3f}"
        )
    if candidate["object_recall"] < baseline["object_recall"] - settings.recall_tolerance:
        reasons.append(f"object recall fell {baseline['object_recall']:.3f} -> {candidate['object_recall']:.3f}")
    return GateDecision(not reasons, candidate, baseline, reasons)


@dataclasses.dataclass
class RoundResult:
    version: int
    promoted: bool
    pairs: int
    events: int
    decision: GateDecision
    train_metrics: dict[str, float]
    seconds: float
    pair_sources: dict[str, int] = dataclasses.field(default_factory=dict)  # pairs per source (correction, ...)


class OnlineTrainer:
    def __init__(self, settings: TrainerSettings, store: FeedbackStore, scorer=None):
        """`scorer(model_name) -> metrics` scores a served model name; by default through the gateway."""
        self.settings = settings
        self.store = store
        self.scorer = scorer or self._score_through_gateway
        self.deliveries: list[Delivery] = []
        self.bdhs_candidates: list = []  # (generation, event ids) of up-rated answers without a rejected partner
        self.first_pair_at: float | None = None
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

    # ---- training ----------------------------------------------------------------------------------------------
    def load_policy(self):
        """The policy to train: the promoted version's adapter on the base model, or a fresh LoRA."""
        from peft import PeftModel, get_peft_model

        from training.lora import language_model_lora
        from training.tiny_llava import load_checkpoint

        model, processor = load_checkpoint(self.settings.model)
        promoted = self.store.promoted_version(self.settings.public_alias)
        adapter = self.store.get_adapter(promoted) if promoted else None
        if adapter is not None:
            policy = PeftModel.from_pretrained(model, adapter.path, is_trainable=True)
        else:
            policy = get_peft_model(model, language_model_lora(rank=self.settings.lora_rank))
        return policy, processor, promoted

    def train(self, policy, processor, pairs: list[PreferencePair]) -> dict[str, float]:
        import torch

        from online_rl.dpo import PreferenceLossConfig, preference_loss
        from online_rl.preference_batch import PreferenceEncoder

        settings = self.settings
        torch.manual_seed(settings.seed)
        dense = settings.algorithm == "dense-dpo"
        encoder = PreferenceEncoder(processor, dense_gamma=settings.gamma if dense else None)
        loss_config = PreferenceLossConfig(
            beta=settings.beta, normalize=dense and settings.dense_normalize, sft_weight=settings.sft_weight
        )
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=settings.learning_rate)
        order = random.Random(settings.seed)
        policy.train()
        history: list[dict[str, float]] = []
        for _ in range(settings.epochs):
            shuffled = order.sample(pairs, len(pairs))
            for start in range(0, len(shuffled), settings.batch_pairs):
                batch = encoder.collate(shuffled[start : start + settings.batch_pairs], self.store.get_image)
                loss, metrics = preference_loss(policy, batch, loss_config)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history.append(metrics)
        policy.eval()
        last = history[-max(1, len(history) // settings.epochs) :]  # the final epoch
        return {key: sum(m[key] for m in last) / len(last) for key in last[0]}

    # ---- gate ----------------------------------------------------------------------------------------------------
    def _score_through_gateway(self, model_name: str) -> dict[str, float]:
        from training.evaluation.models import OpenAIChatModel
        from training.evaluation.shapes_bench import evaluate_shapes
        from training.shapes_world import ShapesWorld

        served = OpenAIChatModel(
            f"{self.settings.gateway_url}/v1", model_name, self.settings.api_key.get_secret_value()
        )
        report = evaluate_shapes(
            served, ShapesWorld(), self.settings.eval_split, self.settings.eval_images, progress=False
        )
        return {key: float(value) for key, value in report.items() if isinstance(value, int | float)}

    def baseline_metrics(self, promoted: int | None) -> dict[str, float]:
        """The metrics of what the alias serves now: stored with its version, or measured (and for the base model,
        measured every time, since the base has no registry record)."""
        if promoted is not None:
            adapter = self.store.get_adapter(promoted)
            if adapter is not None and all(key in adapter.metrics for key in GATE_METRICS):
                return adapter.metrics
            metrics = self.scorer(f"{self.settings.public_alias}@v{promoted}")
            self.store.update_adapter(promoted, metrics=metrics)
            return metrics
        return self.scorer("base")

    # ---- one round -----------------------------------------------------------------------------------------------
    def run_round(self, pairs: list[PreferencePair]) -> RoundResult | None:
        """Trains, publishes and gates one version; None when the waiting events support no pair at all."""
        from online_rl.adapters import publish_adapter

        started = time.monotonic()
        settings = self.settings
        policy, processor, parent = self.load_policy()
        if self.bdhs_candidates:
            pairs = pairs + self.bdhs_pairs(policy, processor)
        if not pairs:  # BDHS made nothing of the waiting answers: they support no pair, so they are done with
            self.store.ack_events(settings.group, [d.delivery_id for d in self.deliveries])
            logger.info("no pairs from %d events; acknowledged them", len(self.deliveries))
            self.deliveries, self.bdhs_candidates, self.first_pair_at = [], [], None
            return None
        if settings.online_share > 0:
            from online_rl.online_pairs import mixed_pairs, online_pairs

            rng = random.Random(f"{settings.seed}-{len(self.store.list_adapters())}")
            pairs = mixed_pairs(
                pairs,
                lambda n: online_pairs(
                    policy, processor, self.store, n, rng, settings.online_samples, adapter_version=parent
                ),
                rng,
                settings.online_share,
            )
        train_metrics = self.train(policy, processor, pairs)
        deliveries = list(self.deliveries)
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
            notes=f"{len(pairs)} pairs ({sum(p.source == 'online' for p in pairs)} online, "
            f"{sum(p.source == 'bdhs' for p in pairs)} bdhs); "
            + ", ".join(f"{k}={v:.4f}" for k, v in train_metrics.items()),
        )
        self.deliveries, self.bdhs_candidates, self.first_pair_at = [], [], None
        logger.info("published %s from %d pairs (%d events)", adapter.name, len(pairs), len(deliveries))
        promoted, decision = self.gate_and_promote(adapter, parent)
        return RoundResult(
            adapter.version,
            promoted,
            len(pairs),
            len(deliveries),
            decision,
            train_metrics,
            time.monotonic() - started,
            dict(Counter(pair.source for pair in pairs)),
        )

    def run_ppo_round(self) -> RoundResult | None:
        """Fact-RLHF PPO on prompts from recent traffic (`training.ppo`), from the promoted version's adapter, then
        the same publishing path and gate as a DPO round; None when too few distinct prompts have been logged."""
        from online_rl.adapters import publish_adapter
        from online_rl.logged_prompts import traffic_prompts
        from training.ppo import PPOConfig, PPOTrainer

        started = time.monotonic()
        settings = self.settings
        prompts = traffic_prompts(self.store)
        if len(prompts) < settings.ppo_min_prompts:
            logger.info("ppo: %d distinct recent prompts, waiting for %d", len(prompts), settings.ppo_min_prompts)
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
        train_metrics = {
            key: history[-1][key] for key in ("rm_score", "reward", "kl_to_reference") if key in history[-1]
        }
        train_metrics["rm_score_first"] = history[0]["rm_score"]
        published = publish_adapter(
            self.store,
            trainer.unwrapped_policy,
            settings.adapter_dir,
            settings.model,
            algorithm="ppo",
            parent_version=parent,
            notes=f"ppo: {config.steps} steps x {config.rollout_batch} of {len(prompts)} "
            f"recent prompts, reward model {settings.reward_model}; "
            + ", ".join(f"{k}={v:.4f}" for k, v in train_metrics.items()),
        )
        logger.info("published %s from %d ppo steps", published.name, config.steps)
        promoted, decision = self.gate_and_promote(published, parent)
        return RoundResult(
            published.version,
            promoted,
            0,
            0,
            decision,
            train_metrics,
            time.monotonic() - started,
            {"ppo_prompts": len(prompts)},
        )

    def gate_and_promote(self, adapter, parent: int | None) -> tuple[bool, GateDecision]:
        """Scores the new version against the one it would replace; promotes it (compare-and-set) or rejects it."""
        settings = self.settings
        baseline = self.baseline_metrics(parent)
        candidate = self.scorer(f"{settings.public_alias}@v{adapter.version}")
        decision = gate(candidate, baseline, settings)
        self.store.update_adapter(adapter.version, metrics=candidate)
        promoted = False
        if decision.passed:
            try:
                self.store.promote(
                    settings.public_alias,
                    adapter.version,
                    expected=parent,
                    actor="trainer",
                    reason=f"gate passed on {settings.eval_split} ({settings.eval_images} images)",
                )
                promoted = True
            except ConflictError as error:  # the alias moved meanwhile (an admin): keep their choice
                logger.warning("not promoting %s: %s", adapter.name, error)
                self.store.update_adapter(adapter.version, status="rejected", notes=f"alias moved meanwhile: {error}")
        else:
            self.store.update_adapter(
                adapter.version, status="rejected", notes=f"{adapter.notes}; rejected: {'; '.join(decision.reasons)}"
            )
        logger.info(
            "%s %s: %s",
            adapter.name,
            "promoted" if promoted else "rejected",
            "; ".join(decision.reasons) or "gate passed",
        )
        return promoted, decision

    def run_forever(self, stop=None) -> None:
        """Polls, and runs a round whenever one is due, until `stop()` is true. With algorithm "ppo", a PPO round
        runs every `ppo_interval_s` on recent traffic instead (feedback events are left to a DPO worker)."""
        last_ppo = float("-inf")
        while not (stop and stop()):
            if self.settings.algorithm == "ppo":
                if time.monotonic() - last_ppo >= self.settings.ppo_interval_s:
                    self.run_ppo_round()
                    last_ppo = time.monotonic()
                time.sleep(self.settings.poll_interval_s)
                continue
            pairs = self.poll()
            if self.round_due(pairs):
                self.run_round(pairs)
            else:
                time.sleep(self.settings.poll_interval_s)
