"""The gate's suites on real data, chosen by the trainer's `gate_suites` setting (comma-separated, default `shapes`).

- `shapes`: held-out ShapesWorld scenes (`online_rl.gate.gateway_scorer`): CHAIR_s, object recall and
  POPE-adversarial accuracy of the bundled world.
- `pope`: the official POPE question files with their images (`training.evaluation.pope`): each setting's accuracy
  and F1 over all settings, scored per image; a version that starts answering "yes" to absent objects loses
  precision, hence F1.
- `mmhal`: MMHal-Bench's questions and images, rated 0-6 by an OpenAI-compatible judge with MMHal's rating prompt
  (`training.evaluation.mmhal`): the mean rating and the hallucination rate (share rated below 3), per question.
- `chair`: CHAIR on images with COCO-style object annotations (`training.evaluation.chair`): CHAIR_s and object
  recall of detailed descriptions, per image.
- `feedback-holdout`: the held-out slice of the store's own preference pairs (`online_rl.holdout`), never trained
  on: the share of pairs a version's implicit DPO reward ranks right, per pair. It needs no benchmark files.

The benchmark suites answer through the gateway, as the `shapes` suite does; `feedback-holdout` scores in-process.
Each suite loads and checks its files when the trainer starts, so a missing image or a malformed file is one line
then, not a failed gate later.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from online_rl.gate import DEFAULT_SUITE, ScorerSuite
from online_rl.holdout import held_out_pairs, pair_key, ranking_tallies
from online_rl.pairs import PreferencePair
from online_rl.schema import ADAPTER_NAME_PATTERN
from online_rl.store.base import FeedbackStore
from training.evaluation.models import ChatModel
from training.evaluation.paired import GateMetric, ratio

SUITE_NAMES: tuple[str, ...] = ("shapes", "pope", "mmhal", "chair", "feedback-holdout")
Answerer = Callable[[str], ChatModel]  # served model name -> a chat model that answers as it
RewardFn = Callable[[Sequence[PreferencePair], str], list[float]]  # pairs, adapter dir -> implicit reward margins


def gateway_answerer(gateway_url: str, api_key: str, concurrency: int = 8) -> Answerer:
    """Answers as a served model name through the gateway (service key, `eval` client mark, greedy)."""

    def answerer(model_name: str) -> ChatModel:
        from training.evaluation.models import OpenAIChatModel

        return OpenAIChatModel(f"{gateway_url}/v1", model_name, api_key, concurrency=concurrency)

    return answerer


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PopeSuite:
    name = "pope"

    def __init__(
        self,
        files: Sequence[Path],
        image_dir: Path,
        answerer: Answerer,
        images: int = 0,
        question_suffix: str = "",
        margin: float = 0.0,
        fixed: dict | None = None,
    ):
        from training.evaluation.pope import POPE_MAX_TOKENS, first_images, load_pope

        self.items = first_images(load_pope(files, image_dir), images)
        self.answerer, self.question_suffix = answerer, question_suffix
        settings = list(dict.fromkeys(item.setting for item in self.items))
        self.metrics = (
            *(GateMetric(f"{s}_accuracy", f"POPE {s} accuracy", True, margin) for s in settings),
            GateMetric("f1", "POPE F1", True, margin),
        )
        questions = [(i.setting, i.question_id, i.image, i.question, i.label) for i in self.items]
        self._with = {
            **(fixed or {}),
            "suite": self.name,
            "questions": digest(questions),
            "suffix": question_suffix,
            "max_tokens": POPE_MAX_TOKENS,
        }

    def scored_with(self) -> dict:
        return self._with

    def score(self, model_name: str, label: str) -> dict:
        from training.evaluation.pope import evaluate_pope

        return evaluate_pope(self.answerer(model_name), self.items, self.question_suffix, progress=False)


class MMHalSuite:
    name = "mmhal"

    def __init__(
        self,
        questions: Path,
        image_dir: Path,
        answerer: Answerer,
        judge,
        max_tokens: int = 512,
        score_margin: float = 0.0,
        fixed: dict | None = None,
    ):
        """`judge`: an `OpenAIJudge` (training.evaluation.mmhal), asked with MMHal's rating prompt."""
        from training.evaluation.mmhal import load_mmhal

        self.items = load_mmhal(questions, image_dir)
        self.answerer, self.judge, self.max_tokens = answerer, judge, max_tokens
        self.metrics = (
            GateMetric("average_score", "MMHal average rating", True, score_margin),
            GateMetric("hallucination_rate", "MMHal hallucination rate", False),
        )
        entries = [(i.question_type, i.image_id, i.question, i.gt_answer, i.image_content) for i in self.items]
        self._with = {
            **(fixed or {}),
            "suite": self.name,
            "questions": digest(entries),
            "judge": judge.model,
            "max_tokens": max_tokens,
        }

    def scored_with(self) -> dict:
        return self._with

    def score(self, model_name: str, label: str) -> dict:
        from training.evaluation.mmhal import evaluate_mmhal

        self.judge.check()  # a judge that is down fails the gate before any answer is asked
        report = evaluate_mmhal(
            self.items, self.judge, self.answerer(model_name), self.max_tokens, progress=False, per_scene=True
        )
        return {key: value for key, value in report.items() if key != "records"} | {
            "ratings": [record["rating"] for record in report["records"]]
        }


class ChairSuite:
    name = "chair"

    def __init__(
        self,
        annotations: Sequence[Path],
        image_dir: Path,
        answerer: Answerer,
        images: int = 500,
        max_tokens: int = 512,
        chair_margin: float = 0.0,
        recall_margin: float = 0.02,
        fixed: dict | None = None,
    ):
        from training.evaluation.chair import CHAIR_PROMPT, load_chair

        self.items = load_chair(annotations, image_dir, images)
        self.answerer, self.max_tokens = answerer, max_tokens
        self.metrics = (
            GateMetric("chair_s", "CHAIR_s (annotated images)", False, chair_margin),
            GateMetric("object_recall", "object recall (annotated images)", True, recall_margin),
        )
        self._with = {
            **(fixed or {}),
            "suite": self.name,
            "images": digest([(i.image, sorted(i.objects)) for i in self.items]),
            "prompt": CHAIR_PROMPT,
            "max_tokens": max_tokens,
        }

    def scored_with(self) -> dict:
        return self._with

    def score(self, model_name: str, label: str) -> dict:
        from training.evaluation.chair import evaluate_chair

        return evaluate_chair(self.answerer(model_name), self.items, max_tokens=self.max_tokens, progress=False)


class FeedbackHoldoutSuite:
    """The held-out slice of the store's pairs. What it scores changes as feedback arrives, so `scored_with` names
    the slice (a digest of its pairs): a cached score of another slice is not used, and the baseline is scored again
    on the new slice."""

    name = "feedback-holdout"

    def __init__(
        self,
        store: FeedbackStore,
        rewards: RewardFn,
        share: float = 0.1,
        max_pairs: int = 1000,
        beta: float = 0.1,
        margin: float = 0.0,
        fixed: dict | None = None,
        scoring: dict | None = None,
    ):
        """`scoring` names how `rewards` scores a pair (the algorithm, Dense DPO's gamma): part of what a score
        depends on."""
        self.store, self.rewards = store, rewards
        self.share, self.max_pairs, self.beta = share, max_pairs, beta
        self.metrics = (GateMetric("reward_accuracy", "held-out feedback ranking accuracy", True, margin),)
        self.fixed = {**(fixed or {}), "scoring": scoring or {"algorithm": "dpo"}}
        self._events: int | None = None
        self.pairs: list[PreferencePair] = []

    def scored_with(self) -> dict:
        events = self.store.count_events()
        if events != self._events:  # read the slice again only when feedback arrived
            self.pairs, self._events = held_out_pairs(self.store, self.share, self.max_pairs), events
        return {
            **self.fixed,
            "suite": self.name,
            "share": self.share,
            "beta": self.beta,
            "pairs": digest([pair_key(pair) for pair in self.pairs]),
            "num_pairs": len(self.pairs),
        }

    def score(self, model_name: str, label: str) -> dict:
        if self._events is None:
            self.scored_with()
        pairs = list(self.pairs)
        match = ADAPTER_NAME_PATTERN.match(label)
        if match is None or not pairs:  # the base model is its own reference: every margin is exactly 0
            margins = [0.0] * len(pairs)
        else:
            adapter = self.store.get_adapter(int(match.group(1)))
            if adapter is None:
                raise ValueError(f"{label} is not in the registry")
            margins = self.rewards(pairs, adapter.path)
        tallies = ranking_tallies([pair_key(pair) for pair in pairs], margins)
        return {
            "reward_accuracy": ratio(tallies["reward_accuracy"]),
            "reward_margin": ratio(tallies["reward_margin"]),
            "num_pairs": len(pairs),
            "per_scene": tallies,
        }


def build_suites(
    settings,
    store: FeedbackStore,
    shapes: ScorerSuite,
    answerer: Answerer,
    rewards: RewardFn,
    judge_factory: Callable[[], Any] | None = None,
) -> list:
    """The suites `settings.gate_suites` names (`TrainerSettings`), each with its files and margins; raises
    ValueError naming the setting a suite lacks."""
    fixed = {key: value for key, value in shapes.fixed.items() if key == "base_model"}
    suites = []
    for name in settings.gate_suites:
        if name == DEFAULT_SUITE:
            suites.append(shapes)
        elif name == "pope":
            _require(name, gate_pope_files=settings.gate_pope_files, gate_pope_image_dir=settings.gate_pope_image_dir)
            suites.append(
                PopeSuite(
                    settings.gate_pope_files,
                    settings.gate_pope_image_dir,
                    answerer,
                    settings.gate_pope_images,
                    settings.gate_pope_question_suffix,
                    settings.gate_pope_margin,
                    fixed,
                )
            )
        elif name == "mmhal":
            _require(
                name,
                gate_mmhal_questions=settings.gate_mmhal_questions,
                gate_mmhal_image_dir=settings.gate_mmhal_image_dir,
                judge_url=settings.judge_url,
                judge_model=settings.judge_model,
            )
            judge = judge_factory() if judge_factory is not None else None
            suites.append(
                MMHalSuite(
                    settings.gate_mmhal_questions,
                    settings.gate_mmhal_image_dir,
                    answerer,
                    judge,
                    settings.gate_mmhal_max_tokens,
                    settings.gate_mmhal_score_margin,
                    fixed,
                )
            )
        elif name == "chair":
            _require(
                name,
                gate_chair_annotations=settings.gate_chair_annotations,
                gate_chair_image_dir=settings.gate_chair_image_dir,
            )
            suites.append(
                ChairSuite(
                    settings.gate_chair_annotations,
                    settings.gate_chair_image_dir,
                    answerer,
                    settings.gate_chair_images,
                    settings.gate_chair_max_tokens,
                    settings.gate_chair_margin,
                    settings.gate_recall_margin,
                    fixed,
                )
            )
        elif name == "feedback-holdout":
            suites.append(
                FeedbackHoldoutSuite(
                    store,
                    rewards,
                    settings.gate_holdout_share,
                    settings.gate_holdout_max_pairs,
                    settings.beta,
                    settings.gate_holdout_margin,
                    fixed,
                    scoring={
                        "algorithm": settings.algorithm,
                        "gamma": settings.gamma if settings.algorithm == "dense-dpo" else None,
                        "normalize": settings.algorithm == "dense-dpo" and settings.dense_normalize,
                    },
                )
            )
        else:
            raise ValueError(f"unknown gate suite {name!r}: choose from {', '.join(SUITE_NAMES)}")
    return suites


def _require(suite: str, **values: Any) -> None:
    missing = [name for name, value in values.items() if not value]
    if missing:
        flags = " and ".join("--" + name.replace("_", "-") for name in missing)
        raise ValueError(f"the {suite} gate suite needs {flags}")
