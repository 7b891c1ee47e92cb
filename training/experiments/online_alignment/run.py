"""Online alignment experiment: what N simulated feedback events do to the bundled SFT model, per kind of feedback.

For each arm the same loop runs, in-process and on CPU:
1. the served version (the SFT model, then whatever the gate promoted) answers the simulated users of
   `alignloop simulate` (online_rl/simulator.py), sampling at `--temperature`, each question answered 1 + r times
   (the demo's Regenerate) so that thumbs can pair a right answer with a wrong one; the answers and the feedback are
   written to a real SQLite store exactly as the gateway writes them;
2. the online worker (online_rl/trainer.py, unchanged) reads the events, builds the arm's pairs, trains a LoRA
   version with Dense DPO (+ the chosen answers' NLL), publishes it and gates it on held-out validation images;
3. every version is scored on the held-out test split.
The arms: corrections only, thumbs only, preferences only (every user asks for two answers at once and picks the
better), BDHS only (up-rated answers get a BDHS rejected answer), mixed (every source, a quarter of the users'
interactions two-answer preferences, plus Mixed-DPO: half the slots get a judged online pair sampled from the
policy), and mixed again with 30% of the raters adversarial (thumbs and preferences reversed, corrupting
"corrections"), where the gate has to keep the served model from getting worse. Every arm sees the same scenes and
questions; the first round's events are identical across the corrections, thumbs and BDHS arms.

Two anchors are measured in the same run: the SFT model itself, and offline DPO, which trains one version on as many
pairs as the mixed arm used, taken from a fixed dataset instead of the model's own answers (ShapesWorld train scenes:
the clean description against the noisy one that names the missing partner, and the right presence answer against
the wrong one).

It runs in-process (no gateway, no vLLM) because it compares training signals; the loop's moving parts are tested by
tests/integration/test_online_loop.py and measured by bench/online_loop.py. The trainer, pair builders, BDHS
sampler, judge, simulator and benchmark are the production ones. The results and the commands that wrote them are in
this folder's README.md.

    .venv/bin/python -m training.experiments.online_alignment.run --events 300 --rounds 2 --test-images 300 \\
        --gate-images 100 --work-dir runs/oa --tag arms      # results/<today>-arms.json and .png
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import logging
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from alignloop.client import Answer, image_data_url
from online_rl.gate import metrics
from online_rl.pairs import PreferencePair
from online_rl.schema import (
    IMAGE_REF_PREFIX,
    FactsRecord,
    FeedbackEvent,
    GenerationRecord,
    PreferenceEvent,
    hash_user_id,
)
from online_rl.simulator import FeedbackSimulator, SimulatorSettings
from online_rl.store import FeedbackStore, open_store
from online_rl.trainer import OnlineTrainer, TrainerSettings
from training.evaluation.models import TransformersChatModel
from training.evaluation.shapes_bench import evaluate_shapes
from training.shapes_world import DESCRIBE_PROMPT, ShapesWorld
from training.tiny_llava import load_checkpoint

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"

HEADLINE = (
    "chair_s",
    "chair_i",
    "object_recall",
    "pope_adversarial_accuracy",
    "pope_random_accuracy",
    "attribute_accuracy",
    "count_accuracy",
)
MIXED = {
    "pair_sources": frozenset({"correction", "thumbs", "preference", "bdhs"}),
    "bdhs_per_round": 1000,
    "online_share": 0.5,
}
MIXED_USERS = {"preference_share": 0.25}  # a quarter of the interactions ask for two answers and pick one
# arm -> (trainer settings, simulator settings) that differ from the defaults
ARMS = {
    "corrections": ({"pair_sources": frozenset({"correction"}), "bdhs_per_round": 0}, {}),
    "thumbs": ({"pair_sources": frozenset({"thumbs"}), "bdhs_per_round": 0}, {}),
    "preferences": ({"pair_sources": frozenset({"preference"}), "bdhs_per_round": 0}, {"preference_share": 1.0}),
    "bdhs": ({"pair_sources": frozenset({"bdhs"}), "bdhs_per_round": 1000}, {}),
    "mixed": (MIXED, MIXED_USERS),
    "mixed-30%-adversarial": (MIXED, MIXED_USERS | {"adversarial_share": 0.3}),
}
SALT = "online-alignment-experiment"


# ---- the served model ------------------------------------------------------------------------------------------
def load_version(base_model: str, adapter_path: str | None):
    """The base model with a LoRA version merged in (or the base itself), and its processor, ready to answer."""
    model, processor = load_checkpoint(base_model)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    return model.eval(), processor


class InProcessGateway:
    """The part of the gateway the simulator talks to (`stream_chat`, `stream_choices`, `models`, `feedback`,
    `preference`, `facts`), answered by a model in memory and recorded in the store the way serve/ records it:
    messages with images as sha256 refs, the answering version on the generation and on its feedback."""

    def __init__(self, store: FeedbackStore, model, processor, version: int | None, alias: str = "llava-rlhf"):
        self.store, self.model, self.processor, self.version, self.alias = store, model, processor, version, alias
        self.generator = torch.Generator().manual_seed(0)

    def models(self) -> list[str]:
        return [self.alias]

    def stream_chat(
        self, model: str, messages: list[dict], max_tokens: int, temperature: float, user: str | None = None
    ) -> Iterator[Answer]:
        for answers in self.stream_choices(model, messages, max_tokens, temperature, user):
            yield answers[0]

    def stream_choices(
        self,
        model: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        user: str | None = None,
        n: int = 1,
    ) -> Iterator[list[Answer]]:
        """`n` sampled answers to one prompt, each recorded as its own generation."""
        stored, images = [], []
        for message in messages:
            parts = []
            for part in message["content"]:
                if part["type"] == "image_url":
                    data = base64.b64decode(part["image_url"]["url"].partition(",")[2])
                    images.append(data)
                    parts.append(
                        {"type": "image_url", "image_url": {"url": IMAGE_REF_PREFIX + self.store.put_image(data)}}
                    )
                else:
                    parts.append(part)
            stored.append({**message, "content": parts})
        answers = []
        for _ in range(n):
            text = self._generate(stored, images, max_tokens, temperature)
            record = GenerationRecord(
                id=f"chatcmpl-{uuid.uuid4().hex}",
                alias=model,
                adapter_version=self.version,
                messages=stored,
                sampling={"temperature": temperature, "max_tokens": max_tokens},
                response=text,
                finish_reason="stop",
                user_id=hash_user_id(user or "anonymous", SALT),
            )
            self.store.add_generation(record)
            version = f"v{self.version}" if self.version else "base"
            answers.append(Answer(model=model, text=text, response_id=record.id, version=version, finish_reason="stop"))
        yield answers

    def _generate(self, messages: list[dict], images: list[bytes], max_tokens: int, temperature: float) -> str:
        from PIL import Image

        tokenizer = self.processor.tokenizer
        template = [
            {"role": m["role"], "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
            for m in messages
        ]
        prompt = self.processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        inputs = self.processor(images=pictures, text=[prompt], return_tensors="pt")
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        )
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
            )
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    def feedback(
        self,
        response_id: str,
        rating: int | None = None,
        correction: str | None = None,
        comment: str | None = None,
        facts: list[str] | None = None,
        user: str | None = None,
    ) -> dict:
        event = self.store.add_feedback(
            FeedbackEvent(
                generation_id=response_id,
                rating=rating,
                correction=correction,
                comment=comment,
                facts=facts,
                user_id=hash_user_id(user or "anonymous", SALT),
                adapter_version=self.version,
            )
        )
        return {"id": event.id}

    def preference(self, first_id: str, second_id: str, preferred_id: str, user: str | None = None) -> dict:
        event = self.store.add_preference(
            PreferenceEvent(
                generation_ids=(first_id, second_id),
                preferred_id=preferred_id,
                user_id=hash_user_id(user or "anonymous", SALT),
                adapter_versions=(self.version, self.version),
            )
        )
        return {"id": event.id}

    def facts(self, image_sha256: str, caption: str | None = None, facts: list[str] | None = None) -> dict:
        record = self.store.add_facts(
            FactsRecord(image_sha256=image_sha256, caption=caption, facts=facts or [], source="user")
        )
        return {"id": record.id}


# ---- scoring ---------------------------------------------------------------------------------------------------
class VersionScorer:
    """Scores `base` and `llava-rlhf@vN` in-process on a ShapesWorld split, with the adapters of one store."""

    def __init__(self, base_model: str, store: FeedbackStore, split: str, images: int):
        self.base_model, self.store, self.split, self.images = base_model, store, split, images

    def __call__(self, model_name: str) -> dict:
        path = None
        if model_name != "base":
            path = str(self.store.get_adapter(int(model_name.rpartition("@v")[2])).path)
        return report(self.base_model, path, self.split, self.images)


def score(base_model: str, adapter_path: str | None, split: str, images: int) -> dict[str, float]:
    return metrics(report(base_model, adapter_path, split, images))


def report(base_model: str, adapter_path: str | None, split: str, images: int) -> dict:
    """The benchmark's report of a version, with the per-scene tallies the paired gate compares."""
    model, processor = load_version(base_model, adapter_path)
    chat_model = TransformersChatModel.from_loaded(model, processor, batch_size=32)
    return evaluate_shapes(chat_model, ShapesWorld(), split, images, progress=False, per_scene=True)


def headline(metrics: dict[str, float]) -> dict[str, float]:
    return {key: round(metrics[key], 4) for key in HEADLINE}


# ---- arms ------------------------------------------------------------------------------------------------------
def run_arm(name: str, args: argparse.Namespace, work_dir: Path) -> dict:
    """One arm: `rounds` rounds of events_per_round simulated events, a version trained and gated after each."""
    started = time.monotonic()
    arm_dir = work_dir / name
    arm_dir.mkdir(parents=True)
    events_per_round = args.events // args.rounds
    rounds = []
    with open_store(f"sqlite:///{arm_dir / 'store.db'}") as store:
        settings = TrainerSettings(
            model=args.model,
            adapter_dir=arm_dir / "adapters",
            eval_split="validation",
            eval_images=args.gate_images,
            round_min_pairs=1,
            seed=args.seed,
            sft_weight=args.sft_weight,
            learning_rate=args.learning_rate,
            beta=args.beta,
            epochs=args.epochs,
            correction_end_weight=args.correction_end_weight,
            **ARMS[name][0],
        )
        trainer = OnlineTrainer(
            settings, store, scorer=VersionScorer(args.model, store, "validation", args.gate_images)
        )
        for number in range(args.rounds):
            promoted = store.promoted_version(settings.public_alias)
            served = store.get_adapter(promoted) if promoted else None
            model, processor = load_version(args.model, str(served.path) if served else None)
            simulator = FeedbackSimulator(
                SimulatorSettings(
                    events=events_per_round,
                    start=10_000 + args.seed * 100_000 + number * 10 * events_per_round,  # each seed its own scenes
                    seed=args.seed + number,
                    temperature=args.temperature,
                    regenerations=args.regenerations,
                    correction_share=args.correction_share,
                    correction_style=args.correction_style,
                    concurrency=1,
                    **ARMS[name][1],
                ),
                InProcessGateway(store, model, processor, promoted),
            )
            simulation = simulator.run().to_dict()
            pairs = trainer.poll()
            result = trainer.run_round(pairs)
            entry = {
                "round": number + 1,
                "served_version": promoted,
                "events": simulation["events"],
                "events_by_kind": simulation["events_by_kind"],
                "served_answers": simulation["answers_by_version"],
            }
            if result is not None:
                adapter = store.get_adapter(result.version)
                entry |= {
                    "version": result.version,
                    "promoted": result.promoted,
                    "pairs": result.pairs,
                    "pair_sources": result.pair_sources,
                    "gate_reasons": result.reasons,
                    "validation": headline(result.gate.candidate) if result.gate else None,
                    "train": {k: round(v, 4) for k, v in result.train_metrics.items()},
                    "test": headline(score(args.model, str(adapter.path), "test", args.test_images)),
                }
            rounds.append(entry)
            logger.info("%s round %d: %s", name, number + 1, json.dumps(entry.get("test")))
        promoted = store.promoted_version(settings.public_alias)
    final = next((r["test"] for r in reversed(rounds) if r.get("version") == promoted), None)
    return {
        "arm": name,
        "rounds": rounds,
        "promoted_version": promoted,
        "pairs": sum(r.get("pairs", 0) for r in rounds),
        "final_served_test": final,
        "seconds": round(time.monotonic() - started, 1),
    }


def offline_pairs(store: FeedbackStore, count: int, rng: random.Random) -> list[PreferencePair]:
    """`count` pairs from a fixed dataset (ShapesWorld train scenes), not from the policy: for a scene with a missing
    partner, the clean description over the noisy one; otherwise the right presence answer over the wrong one."""
    world, pairs, index = ShapesWorld(), [], 50_000
    popular = world.popular_shapes()
    while len(pairs) < count:
        scene = world.scene("train", index)
        index += 1
        sha = store.put_image(_png(world.render(scene)))
        ref = {"type": "image_url", "image_url": {"url": IMAGE_REF_PREFIX + sha}}
        if world.missing_partners(scene) and rng.random() < 0.5:
            question, chosen, rejected = (
                DESCRIBE_PROMPT,
                world.description(scene, noisy=False),
                world.description(scene, noisy=True),
            )
        else:
            probes = [item for item in world.benchmark_items(scene, popular) if item.kind == "presence"]
            item = rng.choice(probes)
            question, chosen = item.question, item.answer
            rejected = "No." if chosen == "Yes." else "Yes."
        messages = ({"role": "user", "content": [ref, {"type": "text", "text": question}]},)
        pairs.append(PreferencePair(messages, chosen, rejected, "preference", None, None, ()))
    return pairs


def _png(image) -> bytes:
    return base64.b64decode(image_data_url(image).partition(",")[2])


def run_offline(args: argparse.Namespace, work_dir: Path, count: int) -> dict:
    from online_rl.adapters import publish_adapter

    started = time.monotonic()
    arm_dir = work_dir / "offline-dpo"
    arm_dir.mkdir(parents=True)
    with open_store(f"sqlite:///{arm_dir / 'store.db'}") as store:
        settings = TrainerSettings(
            model=args.model,
            adapter_dir=arm_dir / "adapters",
            seed=args.seed,
            sft_weight=args.sft_weight,
            learning_rate=args.learning_rate,
            beta=args.beta,
            epochs=args.epochs,
        )
        trainer = OnlineTrainer(settings, store, scorer=VersionScorer(args.model, store, "validation", 1))
        pairs = offline_pairs(store, count, random.Random(args.seed))
        policy, processor, _ = trainer.load_policy()
        train_metrics, _ = trainer.train(policy, processor, pairs)
        adapter = publish_adapter(
            store, policy, settings.adapter_dir, args.model, "dense-dpo", notes=f"{len(pairs)} offline pairs"
        )
        test = headline(score(args.model, str(adapter.path), "test", args.test_images))
    return {
        "arm": "offline-dpo",
        "pairs": len(pairs),
        "train": {k: round(v, 4) for k, v in train_metrics.items()},
        "final_served_test": test,
        "seconds": round(time.monotonic() - started, 1),
    }


# ---- report ----------------------------------------------------------------------------------------------------
def verdict(sft: dict, arm: dict | None) -> dict:
    """The issue's target: CHAIR_s at least 40% lower than the SFT model's, object recall within 2 points."""
    if arm is None:
        return {"chair_s_relative_change": None, "recall_change_points": None, "target_met": False}
    relative = (arm["chair_s"] - sft["chair_s"]) / sft["chair_s"] if sft["chair_s"] else None
    recall = (arm["object_recall"] - sft["object_recall"]) * 100
    met = relative is not None and relative <= -0.40 and recall >= -2.0
    return {
        "chair_s_relative_change": round(relative, 3) if relative is not None else None,
        "recall_change_points": round(recall, 2),
        "target_met": met,
    }


def mean_interval(values: list[float], confidence: float = 0.95) -> dict:
    """The mean of per-seed values and its Student-t interval (the values themselves when there is one seed)."""
    from scipy import stats

    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": round(mean, 4), "low": None, "high": None, "values": values}
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * stats.sem(values)
    return {"mean": round(mean, 4), "low": round(mean - half, 4), "high": round(mean + half, 4), "values": values}


def summary(sft: dict, runs: list[dict]) -> dict:
    """Per arm (and offline DPO): each headline metric of the served model at the end, and CHAIR_s's change against
    the SFT model, as means over the seeds with 95% intervals."""
    served: dict[str, list[dict]] = {}
    for run in runs:
        for result in run["arms"]:
            served.setdefault(result["arm"], []).append(result["final_served_test"])
        served.setdefault("offline-dpo", []).append(run["offline_dpo"]["final_served_test"])
    table = {}
    for arm, finals in served.items():
        table[arm] = {key: mean_interval([final[key] for final in finals]) for key in HEADLINE}
        table[arm]["chair_s_relative_change"] = (  # none when the SFT model never hallucinates on these images
            mean_interval([round((final["chair_s"] - sft["chair_s"]) / sft["chair_s"], 4) for final in finals])
            if sft["chair_s"]
            else None
        )
        table[arm]["recall_change_points"] = mean_interval(
            [round((final["object_recall"] - sft["object_recall"]) * 100, 2) for final in finals]
        )
    return table


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (
        ("chair_s", "CHAIR_s (lower is better)"),
        ("object_recall", "object recall"),
        ("pope_adversarial_accuracy", "POPE-adversarial accuracy"),
    )
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for axis, (key, title) in zip(axes, metrics, strict=True):
        axis.axhline(report["sft"][key], color="black", linestyle="--", label="SFT")
        axis.axhline(report["offline_dpo"]["final_served_test"][key], color="grey", linestyle=":", label="offline DPO")
        for arm in report["arms"]:
            trained = [r for r in arm["rounds"] if "test" in r]
            if not trained:
                continue
            rounds = [0] + [r["round"] for r in trained]
            (line,) = axis.plot(
                rounds, [report["sft"][key]] + [r["test"][key] for r in trained], marker="", label=arm["arm"]
            )
            for r in trained:  # filled: promoted; hollow: rejected by the gate (never served)
                axis.plot(
                    r["round"],
                    r["test"][key],
                    marker="o",
                    color=line.get_color(),
                    markerfacecolor=line.get_color() if r["promoted"] else "white",
                )
        axis.set_xticks(range(report["rounds"] + 1))
        axis.set_title(title)
        axis.set_xlabel(f"round ({report['events_per_round']} events each)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seed = f", seed {report['seeds'][0]} of {len(report['seeds'])}" if len(report.get("seeds", [])) > 1 else ""
    figure.suptitle(
        f"Online alignment of the bundled model{seed}: every trained version on {report['test_images']} test "
        "images (filled: promoted by the gate, hollow: rejected)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/shapes-llava")
    parser.add_argument("--events", type=int, default=300, help="simulated feedback events per arm (N)")
    parser.add_argument("--rounds", type=int, default=3, help="training rounds the events are split into")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated: " + ", ".join(ARMS))
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of served answers")
    parser.add_argument("--regenerations", type=int, default=1, help="extra rated answers per question")
    parser.add_argument("--correction-share", type=float, default=0.5)
    parser.add_argument(
        "--correction-style",
        choices=("complete", "delete"),
        default="complete",
        help="how simulated users correct a hallucinated object: replace it, describing every counted object, or "
        "delete its sentence",
    )
    parser.add_argument("--sft-weight", type=float, default=TrainerSettings().sft_weight)
    parser.add_argument("--learning-rate", type=float, default=TrainerSettings().learning_rate)
    parser.add_argument("--beta", type=float, default=TrainerSettings().beta)
    parser.add_argument("--epochs", type=int, default=TrainerSettings().epochs)
    parser.add_argument("--gate-images", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="the seed of a single run (see --seeds)")
    parser.add_argument(
        "--seeds", help="comma-separated seeds: every arm runs once per seed (users, scenes, sampling, training)"
    )
    parser.add_argument(
        "--correction-end-weight",
        type=float,
        default=TrainerSettings().correction_end_weight,
        help="Dense DPO weight of a correction's end-of-answer token (the trainer's correction_end_weight)",
    )
    parser.add_argument("--work-dir", help="where stores and adapters go (default: a temporary directory)")
    parser.add_argument("--tag", default="arms", help="names the result files: results/<date>-<tag>.json and .png")
    parser.add_argument("--output", help="the JSON report (default: this folder's results/<today>-<tag>.json)")
    parser.add_argument("--plot", help="the PNG plot (default: results/<today>-<tag>.png)")
    args = parser.parse_args(argv)
    stem = RESULTS / f"{datetime.date.today().isoformat()}-{args.tag}"
    args.output = args.output or f"{stem}.json"
    args.plot = args.plot or f"{stem}.png"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    arms = [arm.strip() for arm in args.arms.split(",")]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [args.seed]
    started = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory() as temporary:
        sft = headline(score(args.model, None, "test", args.test_images))
        for seed in seeds:
            args.seed = seed
            torch.manual_seed(seed)
            work_dir = Path(args.work_dir or temporary) / f"seed-{seed}"
            results = [run_arm(arm, args, work_dir) for arm in arms]
            for result in results:  # nothing promoted: the alias still serves the SFT model
                result["final_served_test"] = result["final_served_test"] or sft
            by_arm = {r["arm"]: r["pairs"] for r in results}
            pair_count = by_arm.get("mixed") or max(by_arm.values(), default=0) or args.events // 2
            offline = run_offline(args, work_dir, pair_count)
            runs.append({"seed": seed, "arms": results, "offline_dpo": offline})
    results, offline = runs[0]["arms"], runs[0]["offline_dpo"]
    report = {
        "what": "online alignment of the bundled SFT model from simulated feedback, per feedback kind, against "
        "the SFT model and offline DPO on as many pairs; metrics on held-out ShapesWorld test images",
        "command": "python -m training.experiments.online_alignment.run " + " ".join(argv or sys.argv[1:]),
        "events_per_arm": args.events,
        "rounds": args.rounds,
        "events_per_round": args.events // args.rounds,
        "test_images": args.test_images,
        "gate_images": args.gate_images,
        "settings": {
            key: getattr(args, key)
            for key in (
                "temperature",
                "regenerations",
                "correction_share",
                "correction_style",
                "sft_weight",
                "learning_rate",
                "beta",
                "epochs",
                "correction_end_weight",
            )
        },
        "seeds": seeds,
        "summary": summary(sft, runs),
        "sft": sft,
        "runs": [
            {
                "seed": run["seed"],
                "offline_dpo": run["offline_dpo"] | {"target": verdict(sft, run["offline_dpo"]["final_served_test"])},
                "arms": [r | {"target": verdict(sft, r["final_served_test"])} for r in run["arms"]],
            }
            for run in runs
        ],
        "offline_dpo": offline | {"target": verdict(sft, offline["final_served_test"])},
        "arms": [result | {"target": verdict(sft, result["final_served_test"])} for result in results],
        "seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(report, indent=1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")
    plot(report, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
