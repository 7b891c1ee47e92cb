"""Fact-RLHF experiment: SFT, then reward models with and without facts, then PPO against each, on the bundled model.

0. With `--chat-steps N` and/or `--read-steps N`, the SFT model is first trained that many more steps in the SFT
   recipe's chat stage (long chats, ~280 tokens) and read stage (questions answered from the scene's facts given as
   text), and everything below runs on that model (the SFT+); `--no-ppo` stops after the reward models.
1. Reward-model pairs: the SFT model samples answers on ShapesWorld train scenes (and validation scenes for held-out
   pairs), ranked by ground truth (`training.reward_data`); both reward models train on exactly these pairs.
2. Three reward models (`training.reward_model`) on the same pairs: fact-augmented with the scene's facts in the
   rating turn after the answer (the paper's placement and the recipe's default), fact-augmented with the facts
   before the answer, and plain (`--reward-arms` picks; PPO needs the first and the last). Reported: accuracy on
   the held-out pairs, overall and per kind; with `--rm-seeds 0 1 ...` each is trained once per seed, on the same
   pairs (reward-model accuracy moves by a few points from seed to seed on this data), and the mean is reported.
3. Two PPO runs (`training.ppo`), identical but for the reward model (a fact RM, `--ppo-fact-arm`, or the plain
   one): the same seed, prompts and hyperparameters.
   Every step logs the mean RM score of the rollouts and their true hallucination rate (the judge's verdict against
   the scene, which neither the policy nor a plain RM sees); every `--eval-every` steps the policy is scored on
   validation images. Before and after: CHAIR_s, CHAIR_i, object recall, POPE on the test split.
4. Reward hacking shows as an RM score that climbs while the truth does not improve: fewer hallucinations bought
   by naming fewer of the objects that are there counts. The plot draws RM score, true hallucination and true
   recall against the step for each run, and the RM score against the rollouts' recall.

The result files and the commands that wrote them are in this folder's README.md.

    .venv/bin/python -m training.experiments.fact_rlhf.run              # results/<today>-ppo.json and .png
    .venv/bin/python -m training.experiments.fact_rlhf.run --reward-arms fact_before_answer plain --read-steps 700 \\
        --no-ppo --workdir runs/fact-rlhf-read700 --tag read-700
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from pathlib import Path

from training.shapes_world import WorldConfig

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"
# Reward-model arms: (with facts, where they go). PPO runs against "fact" and "plain".
REWARD_ARMS = {
    "fact": (True, "rating_turn"),
    "fact_before_answer": (True, "before_answer"),
    "plain": (False, "rating_turn"),
}
# What the report keeps of each reward-model arm's summary.
REWARD_MODEL_REPORT = (
    "held_out",
    "train_pairs",
    "minutes",
    "held_out_by_seed",
    "mean_accuracy",
    "mean_balanced_accuracy",
    "kind_weights",
)


def sft_plus_model(args) -> str:
    """The SFT model the experiment starts from: `--model` itself, or (with `--chat-steps N` and/or `--read-steps N`)
    `--model` after those steps of the SFT recipe's chat and read stages, saved in `<workdir>/sft-plus` and reused
    from there with `--reuse`.

    These stages are the experiment's SFT+ (LLaVA-RLHF trains its RLHF stages on LLaVA-SFT+, not on the first SFT
    model): the bundled model saw conversations of at most ~150 tokens, and a reward prompt with facts is ~275 (the
    chat stage); and its language model never learned anything from text that the image did not also show, which a
    LLaVA's pretrained LLM brings and a reward model reading facts needs (the read stage)."""
    if not (args.chat_steps or args.read_steps):
        return args.model
    from training.sft import SFTConfig, train

    directory = Path(args.workdir) / "sft-plus"
    summary_file = directory / "training_summary.json"
    if args.reuse and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        config = summary["config"]
        trained = (
            config["init"],
            summary["chat_steps"],
            summary.get("read_steps", 0),
            config.get("read_description_share", 1 / 3),
            config.get("read_quiz_share", 0.0),
        )
        if trained == (args.model, args.chat_steps, args.read_steps, args.read_description_share, args.read_quiz_share):
            return str(directory)
    summary = train(
        SFTConfig(
            output_dir=str(directory),
            init=args.model,
            steps=0,
            chat_steps=args.chat_steps,
            read_steps=args.read_steps,
            read_description_share=args.read_description_share,
            read_quiz_share=args.read_quiz_share,
            seed=args.seed,
        )
    )
    logger.info(
        "SFT+: %d chat and %d read steps in %.1f minutes, validation loss %s",
        summary["chat_steps"],
        summary["read_steps"],
        summary["minutes"],
        summary["val_loss"],
    )
    return str(directory)


def reward_models(args) -> dict:
    """Trains (or, with --reuse, reads) each reward-model arm once per seed in --rm-seeds and scores every model on
    the same held-out pairs; returns each arm's summary: the first seed's model (the one PPO uses), plus every
    seed's held-out accuracy and their mean when there are several."""
    runs = {}  # seed-major, so that every arm's first model is there (and logged) before any second seed's
    for index, seed in enumerate(args.rm_seeds):
        for arm in args.reward_arms:
            run = runs[arm, seed] = reward_model_run(args, arm, seed, first=index == 0)
            logger.info("reward model %s, seed %d: held-out accuracy %.4f", arm, seed, run["held_out"]["accuracy"])
    summaries = {}
    for arm in args.reward_arms:
        by_seed = {seed: runs[arm, seed] for seed in args.rm_seeds}
        summary = by_seed[args.rm_seeds[0]]
        if len(by_seed) > 1:
            summary["held_out_by_seed"] = {str(seed): run["held_out"] for seed, run in by_seed.items()}
            for key in ("accuracy", "balanced_accuracy"):
                summary[f"mean_{key}"] = round(sum(r["held_out"][key] for r in by_seed.values()) / len(by_seed), 4)
        summaries[arm] = summary
    return summaries


def reward_model_run(args, arm: str, seed: int, first: bool) -> dict:
    """One reward model: `reward-<arm>` for the first seed (PPO's), `reward-<arm>-seed<N>` for the others."""
    from training.reward_data import load_pairs
    from training.reward_model import META_FILE, RewardConfig, RewardEncoder, load_reward_model, pair_accuracy, train

    with_facts, placement = REWARD_ARMS[arm]
    pairs_dir = Path(args.workdir) / "reward-pairs"
    directory = Path(args.workdir) / (f"reward-{arm}" if first else f"reward-{arm}-seed{seed}")
    saved = json.loads((directory / META_FILE).read_text()) if (directory / META_FILE).is_file() else {}
    facts_dropout = args.rm_facts_dropout if with_facts else 0.0
    trained_as_asked = (
        saved.get("balance_kinds", False) == args.rm_balance_kinds
        and saved.get("pixel_noise_std", WorldConfig.pixel_noise_std) == args.rm_pixel_noise
        and saved.get("facts_dropout", 0.0) == facts_dropout
    )
    if args.reuse and saved and trained_as_asked:  # scored again: the pairs may have been sampled since
        summary = saved
        model, processor, _ = load_reward_model(directory, args.model)
        summary["held_out"] = pair_accuracy(
            model, RewardEncoder(processor, with_facts, placement), load_pairs(pairs_dir / "validation"), seed
        )
        return summary
    config = RewardConfig(
        output_dir=str(directory),
        model=args.model,
        with_facts=with_facts,
        facts_placement=placement,
        pairs_dir=str(pairs_dir),
        train_scenes=args.rm_train_scenes,
        eval_scenes=args.rm_eval_scenes,
        pixel_noise_std=args.rm_pixel_noise,
        epochs=args.rm_epochs,
        balance_kinds=args.rm_balance_kinds,
        facts_dropout=facts_dropout,
        seed=seed,
        pairs_seed=args.seed,
    )
    return train(config)  # its summary holds the held-out accuracy on the same pairs


def ppo_runs(args) -> dict:
    from training.ppo import PPOConfig, PPOTrainer

    runs = {}
    for arm, reward_arm in (("fact", args.ppo_fact_arm), ("plain", "plain")):
        directory = Path(args.workdir) / f"ppo-{reward_arm}"
        if args.reuse and (directory / "summary.json").is_file():
            summary = json.loads((directory / "summary.json").read_text())
        else:
            config = PPOConfig(
                output_dir=str(directory),
                model=args.model,
                reward_model=str(Path(args.workdir) / f"reward-{reward_arm}"),
                steps=args.ppo_steps,
                rollout_batch=args.rollout_batch,
                learning_rate=args.learning_rate,
                lora_rank=args.lora_rank,
                description_share=args.description_share,
                eval_every=args.eval_every,
                eval_images=args.eval_images,
                final_eval_images=args.test_images,
                seed=args.seed,
            )
            summary = PPOTrainer(config).run()
        summary["curve"] = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        summary["reward_arm"] = reward_arm
        runs[arm] = summary
    return runs


def relative_change(before: float, after: float) -> float | None:
    return round((after - before) / before, 4) if before else None


def report(args, rewards: dict, runs: dict, minutes: float) -> dict:
    results = {
        "what": __doc__.split("\n\n")[0],
        "model": args.model,
        "minutes": round(minutes, 1),
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "plot", "tag")},
        "reward_models": {arm: {k: s[k] for k in REWARD_MODEL_REPORT if k in s} for arm, s in rewards.items()},
        "ppo": {},
    }
    if args.model != args.base_model:
        plus = json.loads((Path(args.model) / "training_summary.json").read_text())
        results["sft_plus"] = {
            "from": args.base_model,
            "chat_steps": plus["chat_steps"],
            "read_steps": plus.get("read_steps", 0),
            "read_description_share": plus["config"].get("read_description_share", 1 / 3),
            "read_quiz_share": plus["config"].get("read_quiz_share", 0.0),
            "minutes": plus["minutes"],
            "val_loss": plus["val_loss"],
        }
    for arm, run in runs.items():
        before, after = run["before"], run["after"]
        curve = run["curve"]
        first, last = curve[: max(1, len(curve) // 5)], curve[-max(1, len(curve) // 5) :]

        def mean(rows: list[dict], key: str) -> float:
            return round(sum(r[key] for r in rows if key in r) / max(1, sum(key in r for r in rows)), 4)

        results["ppo"][arm] = {
            "reward_model": run["reward_arm"],
            "train_minutes": run["train_minutes"],
            "test_before": before,
            "test_after": after,
            "chair_s_relative_change": relative_change(before["chair_s"], after["chair_s"]),
            "object_recall_change": round(after["object_recall"] - before["object_recall"], 4),
            "rollout_rm_score_first_fifth": mean(first, "rm_score_descriptions"),
            "rollout_rm_score_last_fifth": mean(last, "rm_score_descriptions"),
            "rollout_true_hallucination_first_fifth": mean(first, "true_hallucination"),
            "rollout_true_hallucination_last_fifth": mean(last, "true_hallucination"),
            "rollout_true_recall_first_fifth": mean(first, "true_recall"),
            "rollout_true_recall_last_fifth": mean(last, "true_recall"),
            "curve": [
                {
                    k: r[k]
                    for k in (
                        "step",
                        "rm_score_descriptions",
                        "true_hallucination",
                        "true_recall",
                        "reward",
                        "kl_to_reference",
                        "response_tokens",
                        "eval",
                    )
                    if k in r
                }
                for r in curve
            ],
        }
    return results


def plot(results: dict, path: str) -> None:
    """RM score, true hallucination and true recall against the step, per run; then RM score against recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    colors = {"fact": "tab:blue", "plain": "tab:red"}
    for arm, run in results["ppo"].items():
        curve = [r for r in run["curve"] if "rm_score_descriptions" in r and "true_recall" in r]
        steps = [r["step"] for r in curve]
        evals = [r for r in run["curve"] if "eval" in r]
        color = colors[arm]
        axes[0].plot(steps, [r["rm_score_descriptions"] for r in curve], color=color, label=f"{arm} RM")
        for axis, key, metric in (
            (axes[1], "true_hallucination", "chair_s"),
            (axes[2], "true_recall", "object_recall"),
        ):
            axis.plot(steps, [r[key] for r in curve], color=color, alpha=0.3, label=f"{arm} RM: rollouts")
            axis.plot(
                [0] + [r["step"] for r in evals],
                [run["test_before"][metric]] + [r["eval"][metric] for r in evals],
                "o-",
                color=color,
                label=f"{arm} RM: held-out images",
            )
        axes[3].scatter(
            [r["true_recall"] for r in curve],
            [r["rm_score_descriptions"] for r in curve],
            c=steps,
            cmap="Blues" if arm == "fact" else "Reds",
            s=16,
            label=f"{arm} RM",
        )
    titles = (
        "RM score of the rollouts' descriptions",
        "true hallucination (CHAIR_s)",
        "true object recall",
        "RM score against true recall (darker: later)",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xlabel("PPO step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[3].set_xlabel("object recall of the rollout descriptions")
    axes[3].set_ylabel("RM score")
    figure.suptitle(
        "Fact-RLHF PPO on the bundled model, fact-augmented vs plain reward model (held-out points: step 0 "
        "on 500 test images, then 100 validation images)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/shapes-llava")
    parser.add_argument(
        "--chat-steps",
        type=int,
        default=0,
        help="first train --model for this many steps of the SFT recipe's chat stage (long multi-turn "
        "chats) and run the experiment on the result; 0: on --model as it is",
    )
    parser.add_argument(
        "--read-steps",
        type=int,
        default=0,
        help="first train --model (after any chat steps) for this many steps of the SFT recipe's read "
        "stage (questions answered from the scene's facts given as text) and run the experiment "
        "on the result; 0: none",
    )
    parser.add_argument(
        "--read-description-share",
        type=float,
        default=1 / 3,
        help="read stage: share of the reading conversations that are a description (the rest are short questions)",
    )
    parser.add_argument(
        "--read-quiz-share",
        type=float,
        default=0.0,
        help="read stage: share of the reading conversations that are attribute quizzes (which color "
        "goes with which shape, ...), before the description share applies to the rest",
    )
    parser.add_argument("--workdir", default="runs/fact-rlhf", help="reward models, PPO runs and the pair cache")
    parser.add_argument("--reuse", action="store_true", help="reuse finished reward models and PPO runs in --workdir")
    parser.add_argument("--rm-train-scenes", type=int, default=2000)
    parser.add_argument("--rm-eval-scenes", type=int, default=600)
    parser.add_argument("--rm-epochs", type=int, default=3)
    parser.add_argument(
        "--rm-balance-kinds",
        action="store_true",
        help="weight the reward models' loss so every kind of pair weighs the same",
    )
    parser.add_argument(
        "--rm-facts-dropout",
        type=float,
        default=0.0,
        help="share of the training pairs a fact reward model rates without their facts",
    )
    parser.add_argument(
        "--rm-pixel-noise",
        type=float,
        default=WorldConfig.pixel_noise_std,
        help="pixel noise of the reward-model pairs' images (default: ShapesWorld's); PPO and the "
        "evaluations keep ShapesWorld's",
    )
    parser.add_argument(
        "--reward-arms",
        nargs="+",
        choices=list(REWARD_ARMS),
        default=list(REWARD_ARMS),
        help="reward models to train and score (PPO needs --ppo-fact-arm's and plain)",
    )
    parser.add_argument(
        "--rm-seeds",
        type=int,
        nargs="+",
        help="train each reward model once per seed and report every accuracy and the mean; PPO uses "
        "the first seed's (default: --seed only)",
    )
    parser.add_argument("--no-ppo", action="store_true", help="stop after the reward models (their accuracy only)")
    parser.add_argument(
        "--ppo-fact-arm",
        choices=[arm for arm, (with_facts, _) in REWARD_ARMS.items() if with_facts],
        default="fact",
        help="the fact-augmented reward model the fact PPO run uses",
    )
    parser.add_argument("--ppo-steps", type=int, default=90)
    parser.add_argument("--rollout-batch", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1.5e-4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--description-share",
        type=float,
        default=0.5,
        help="share of rollouts that are detailed descriptions (CHAIR's kind of answer)",
    )
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="ppo", help="names the result files: results/<date>-<tag>.json and .png")
    parser.add_argument("--output", help="the JSON report (default: this folder's results/<today>-<tag>.json)")
    parser.add_argument("--plot", help="the PNG plot of the PPO runs (default: results/<today>-<tag>.png)")
    args = parser.parse_args(argv)
    stem = RESULTS / f"{datetime.date.today().isoformat()}-{args.tag}"
    args.output = args.output or f"{stem}.json"
    args.plot = args.plot or f"{stem}.png"
    args.rm_seeds = args.rm_seeds or [args.seed]
    if not args.no_ppo and not {args.ppo_fact_arm, "plain"} <= set(args.reward_arms):
        parser.error(
            f"--reward-arms must include {args.ppo_fact_arm} and plain: the PPO runs use them (or add --no-ppo)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    started = time.monotonic()
    args.base_model, args.model = args.model, sft_plus_model(args)
    rewards = reward_models(args)
    runs = {} if args.no_ppo else ppo_runs(args)
    results = report(args, rewards, runs, (time.monotonic() - started) / 60)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot and runs:
        plot(results, args.plot)
    print(
        json.dumps(
            {
                "reward_models": {a: r["held_out"]["accuracy"] for a, r in results["reward_models"].items()},
                "ppo": {a: {k: v for k, v in r.items() if k != "curve"} for a, r in results["ppo"].items()},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
