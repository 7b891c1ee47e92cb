"""Fact-RLHF PPO (LLaVA-RLHF, docs/papers.md §1) on a LoRA policy, `alignloop train ppo`; the online worker runs the
same loop on prompts from recent traffic (`online_rl.trainer`, algorithm "ppo").

Four models, one backbone checkpoint:
- the policy: the SFT model with a LoRA (fresh, or a published version's to continue from);
- the reference: the same policy with its adapter disabled, i.e. the SFT model;
- the reward model: a trained `training.reward_model` (fact-augmented or plain), frozen;
- the value model: a copy of the reward model's LoRA, trainable, with a zero-initialised per-token head.

One step: sample a batch of prompts, generate one answer each in-process (`training.rollouts`, temperature 1), score
it: reward = reward_scale x RM score + length penalty + symbolic bonus (multiple choice, yes/no with a known answer),
on the last token, plus the clamped per-token KL penalty against the reference; GAE (gamma = lambda = 1), advantages
whitened per batch; then `ppo_epochs` passes of clipped policy and value losses over minibatches. The formulas are
`training.ppo_losses`; this module only wires them.

Rollouts are generated in-process, not through the serving vLLM: that gives the exact token ids the losses need,
and at this model size it is faster than publishing the adapter to vLLM every step (bench/ppo_rollouts.py).

On ShapesWorld prompts every rollout is also scored against the scene, which neither the policy nor the reward model
sees: `true_hallucination` (the share of descriptions naming an object that is not there) and `true_recall` (the
share of present objects named), logged beside the RM score, so a reward model that is being hacked shows as a
rising score over truth that does not improve (e.g. answers that avoid hallucinating by saying less).

Multi-process: launched with `torchrun --nproc_per_node N -m training.ppo ...`, each process samples and scores its
share of the rollout batch and the policy's and value model's gradients are averaged: by accelerate's DDP (the
default; every process holds whole copies of the policy, value and reward models) or, with `--sharding fsdp`, by
FSDP2 with all three sharded over the processes (`training.sharding`; sampling and evaluation then run in lockstep
on every process). CI runs both with 2 gloo processes on CPU. `--mixed-precision bf16` runs the policy's and value
model's training passes under autocast, the weights staying fp32 (with DDP; `bench/fact_rlhf_recipes.py` times it).

    alignloop train ppo --reward-model runs/reward-fact --output-dir runs/ppo-fact
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from alignloop.settings import DEFAULT_MODEL
from training.evaluation.judge import ShapesRuleJudge
from training.ppo_losses import (
    gae,
    kl_penalty,
    length_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    symbolic_bonus,
    token_rewards,
    whiten,
)
from training.rollouts import Prompt, Rollouts, generate
from training.sharding import SHARDINGS, gathered_state_dict, is_sharded, ready_to_generate, shard

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PPOPrompt:
    """A prompt to roll out, what the reward needs about it, and (ShapesWorld) the scene to judge it by."""

    prompt: Prompt
    facts: tuple[str, ...]
    kind: str  # description / presence / multiple_choice / other
    truth: str | None = None  # the known answer, for the symbolic bonus
    choices: tuple[str, ...] = ()
    scene: object | None = None  # training.shapes_world.Scene when the ground truth is known
    item: object | None = None  # training.shapes_world.QAItem for `scene`


@dataclasses.dataclass
class PPOConfig:
    output_dir: str = dataclasses.field(default="runs/ppo", metadata={"help": "Where the policy adapter and logs go."})
    model: str = dataclasses.field(default=DEFAULT_MODEL, metadata={"help": "The SFT checkpoint."})
    reward_model: str = dataclasses.field(default="runs/reward-fact", metadata={"help": "A trained reward model."})
    init_adapter: str | None = dataclasses.field(default=None, metadata={"help": "Start the policy from this LoRA."})
    steps: int = dataclasses.field(default=40, metadata={"help": "Rollout batches (PPO iterations)."})
    rollout_batch: int = dataclasses.field(default=32, metadata={"help": "Prompts per rollout batch, all processes."})
    minibatch: int = dataclasses.field(default=8, metadata={"help": "Rollouts per gradient step."})
    ppo_epochs: int = dataclasses.field(default=2, metadata={"help": "Passes over each rollout batch (paper: 2)."})
    lora_rank: int = dataclasses.field(default=64, metadata={"help": "Policy LoRA rank (paper: 64)."})
    learning_rate: float = dataclasses.field(default=3e-5, metadata={"help": "Policy and value lr (paper: 3e-5)."})
    warmup_steps: int = dataclasses.field(default=5, metadata={"help": "Linear warm-up, then cosine (paper: 5)."})
    kl_beta: float = dataclasses.field(default=0.1, metadata={"help": "Per-token KL penalty weight (paper: 0.1)."})
    clip: float = dataclasses.field(default=0.2, metadata={"help": "Policy and value clip range (paper: 0.2)."})
    value_coef: float = dataclasses.field(default=0.1, metadata={"help": "Value-loss coefficient (paper: 0.1)."})
    gamma: float = dataclasses.field(default=1.0, metadata={"help": "GAE discount (paper: 1)."})
    lam: float = dataclasses.field(default=1.0, metadata={"help": "GAE lambda (paper: 1)."})
    reward_scale: float = dataclasses.field(default=10.0, metadata={"help": "RM score multiplier (paper: 10)."})
    length_penalty_scale: float = dataclasses.field(default=10.0, metadata={"help": "x tokens/max (paper: 10)."})
    no_eos_penalty: float = dataclasses.field(default=8.0, metadata={"help": "For a cut-off answer (paper: 8)."})
    choice_bonus: float = dataclasses.field(default=2.0, metadata={"help": "Right multiple-choice letter (paper: 2)."})
    no_bonus: float = dataclasses.field(default=0.5, metadata={"help": "+/- for yes/no when the truth is no (0.5)."})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "Rollout sampling temperature (paper: 1)."})
    description_share: float = dataclasses.field(
        default=0.5,
        metadata={"help": "ShapesWorld prompts: share of detailed descriptions (the rest: short questions)."},
    )
    eval_every: int = dataclasses.field(default=10, metadata={"help": "Steps between held-out evaluations; 0: none."})
    eval_images: int = dataclasses.field(default=100, metadata={"help": "Validation images per evaluation."})
    final_eval_images: int = dataclasses.field(default=500, metadata={"help": "Test images before and after; 0: none."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seeds the LoRA, the prompts and the sampling."})
    threads: int = dataclasses.field(default=0, metadata={"help": "torch threads per process; 0 keeps the default."})
    cpu: bool = dataclasses.field(default=False, metadata={"help": "Train on CPU even when there is a GPU."})
    mixed_precision: str | None = dataclasses.field(
        default=None, metadata={"help": "no, bf16 or fp16 (autocast, fp32 weights); default: accelerate's, else no."}
    )
    sharding: str = dataclasses.field(
        default="ddp", metadata={"help": "Over several processes: ddp (whole copies) or fsdp (training.sharding)."}
    )


# ---- prompts ----------------------------------------------------------------------------------------------------
def shapes_prompts(
    world, split: str, start: int, count: int, rng: random.Random, description_share: float = 0.5
) -> list[PPOPrompt]:
    """`count` prompts on scenes start..: a detailed description, or one short question with a known answer
    (presence probes, half of them about an absent co-occurring partner where there is one, and multiple choice)."""
    from training.evaluation.models import user_turn
    from training.evaluation.shapes_bench import max_tokens_for
    from training.shapes_world import DESCRIBE_PROMPT, SHAPES, QAItem

    prompts = []
    for scene in world.scenes(split, count, start):
        if rng.random() < description_share:
            item = QAItem("description", DESCRIBE_PROMPT, world.description(scene, noisy=False))
        else:
            missing = sorted({partner for _, partner in world.missing_partners(scene)})
            absent = [shape for shape in SHAPES if shape not in scene.shapes]
            short = [item for item in world.questions(scene, rng) if item.kind == "multiple_choice"]
            short.append(
                world.presence_item(rng.choice(missing or absent), False)
                if rng.random() < 0.5 and absent
                else world.presence_item(rng.choice(sorted(scene.shapes)), True)
            )
            item = rng.choice(short)
        prompt = Prompt(tuple(user_turn(item.question)), world.render(scene), max_tokens_for(item))
        prompts.append(
            PPOPrompt(prompt, tuple(world.facts(scene)), item.kind, item.answer, item.choices or (), scene, item)
        )
    return prompts


# ---- the loss side ----------------------------------------------------------------------------------------------
def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as `generate` gives them to a left-padded prompt, so scoring sees what sampling saw."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def response_logps(policy, rollouts: Rollouts) -> torch.Tensor:
    """(batch, response_len) log-probabilities of the sampled response tokens under `policy`."""
    mask = rollouts.attention_mask
    logits = policy(
        input_ids=rollouts.sequences,
        attention_mask=mask,
        position_ids=_position_ids(mask),
        pixel_values=rollouts.pixel_values,
    ).logits
    prompt_length = rollouts.prompt_ids.shape[1]
    logits = logits[:, prompt_length - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, rollouts.response_ids.unsqueeze(-1)).squeeze(-1)


def response_values(value_model, rollouts: Rollouts) -> torch.Tensor:
    """(batch, response_len) values of the states before each response token."""
    mask = rollouts.attention_mask
    values = value_model(
        rollouts.sequences, mask, rollouts.pixel_values, per_token=True, position_ids=_position_ids(mask)
    )
    prompt_length = rollouts.prompt_ids.shape[1]
    return values[:, prompt_length - 1 : -1].float()


def sequence_rewards(
    rm_scores: torch.Tensor, rollouts: Rollouts, prompts: Sequence[PPOPrompt], config: PPOConfig
) -> torch.Tensor:
    """reward_scale x RM score + length penalty + symbolic bonus, one per rollout."""
    budgets = torch.tensor([p.prompt.max_new_tokens for p in prompts], dtype=torch.float32)
    penalty = length_penalty(
        rollouts.response_lengths, rollouts.ended, budgets, config.length_penalty_scale, config.no_eos_penalty
    )
    bonus = torch.tensor(
        [
            symbolic_bonus(p.kind, p.truth or "", text, p.choices, config.choice_bonus, config.no_bonus)
            for p, text in zip(prompts, rollouts.texts, strict=True)
        ]
    )
    return config.reward_scale * rm_scores + penalty + bonus


def rollout_truth(prompts: Sequence[PPOPrompt], texts: Sequence[str]) -> dict[str, float]:
    """What ground truth says of the rollouts it can grade, by the benchmark's own metrics: for descriptions, the
    share naming an object that is not there (`true_hallucination`, CHAIR_s) and the share of present objects named
    (`true_recall`); for short answers, the share that is right."""
    from training.evaluation.metrics import chair_scores

    judge = ShapesRuleJudge()
    descriptions = [
        (p.scene, text)
        for p, text in zip(prompts, texts, strict=True)
        if p.scene is not None and p.kind == "description"
    ]
    correct = [
        judge.judge(p.scene, p.item, text).correct
        for p, text in zip(prompts, texts, strict=True)
        if p.scene is not None and p.kind != "description"
    ]
    report = {}
    if descriptions:
        chair = chair_scores([text for _, text in descriptions], [scene for scene, _ in descriptions])
        report["true_hallucination"], report["true_recall"] = chair["chair_s"], chair["object_recall"]
    if correct:
        report["short_answer_accuracy"] = sum(correct) / len(correct)
    return report


STEP_STATS = (
    "policy_loss",
    "value_loss",
    "clip_fraction",
    "approx_kl",
    "rm_score",
    "rm_score_descriptions",
    "reward",
    "kl_to_reference",
    "response_tokens",
    "ended",
    "true_hallucination",
    "true_recall",
    "short_answer_accuracy",
)


class PPOTrainer:
    """Holds the four models and runs PPO steps on batches of prompts; `run` is the whole offline recipe."""

    def __init__(self, config: PPOConfig, accelerator=None):
        from accelerate import Accelerator

        from training.reward_model import RewardEncoder, load_reward_model, require_reward_model
        from training.reward_prompt import DEFAULT_FACT_PLACEMENT

        if config.sharding not in SHARDINGS:
            raise ValueError(f"--sharding must be one of {', '.join(SHARDINGS)}, not {config.sharding!r}")
        require_reward_model(config.reward_model)  # before loading anything: a wrong path fails at once
        self.config = config
        self.accelerator = accelerator or Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
        self.sharded = is_sharded(self.accelerator, config.sharding)
        torch.manual_seed(config.seed)
        policy, self.processor = self._new_policy()
        self.reward_model, _, reward_meta = load_reward_model(config.reward_model, config.model)
        self.reward_model.to(self.accelerator.device)
        self.rm_encoder = RewardEncoder(
            self.processor,
            with_facts=reward_meta["with_facts"],
            facts_placement=reward_meta.get("facts_placement", DEFAULT_FACT_PLACEMENT),
        )
        self.with_facts = reward_meta["with_facts"]
        value_model, _, _ = load_reward_model(config.reward_model, config.model, trainable=True, zero_head=True)
        if self.sharded:  # the policy's root unit is its LLaVA model: `generate` calls that one's forward, not PEFT's
            device = self.accelerator.device
            shard(policy.to(device).get_base_model(), policy)
            ready_to_generate(policy, device)
            shard(value_model.to(device), value_model.backbone)
            shard(self.reward_model, self.reward_model.backbone)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        value_trainable = [p for p in value_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable + value_trainable, lr=config.learning_rate)
        if self.sharded:
            self.policy, self.value_model = policy, value_model
        else:
            self.policy, self.value_model, self.optimizer = self.accelerator.prepare(
                policy, value_model, self.optimizer
            )
        self.rng = random.Random(f"{config.seed}-{self.accelerator.process_index}")
        self.fact_rng = random.Random(f"{config.seed}-facts-{self.accelerator.process_index}")
        self.scheduler = None

    def _new_policy(self):
        """(the SFT model with a fresh or `init_adapter` policy LoRA, processor), unsharded, on the CPU."""
        from peft import PeftModel, get_peft_model

        from training.lora import language_model_lora
        from training.tiny_llava import load_checkpoint

        base, processor = load_checkpoint(self.config.model)
        if self.config.init_adapter:
            return PeftModel.from_pretrained(base, self.config.init_adapter, is_trainable=True), processor
        return get_peft_model(base, language_model_lora(rank=self.config.lora_rank)), processor

    @property
    def unwrapped_policy(self):
        return self.policy if self.sharded else self.accelerator.unwrap_model(self.policy)

    def save_policy(self, directory: Path) -> None:
        """The policy LoRA in PEFT's layout (all processes call it; process 0 writes; sharded, the weights are
        gathered into an unsharded copy first)."""
        if not self.sharded:
            if self.accelerator.is_main_process:
                self.unwrapped_policy.save_pretrained(str(directory), safe_serialization=True)
            return
        state = gathered_state_dict(self.policy)
        if self.accelerator.is_main_process:
            policy, _ = self._new_policy()
            policy.load_state_dict(state)
            policy.save_pretrained(str(directory), safe_serialization=True)

    def schedule(self, total_steps: int) -> None:
        from transformers import get_cosine_schedule_with_warmup

        updates = total_steps * self.config.ppo_epochs * max(1, self._local_batch() // self.config.minibatch)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, self.config.warmup_steps, max(updates, 1))

    def _local_batch(self) -> int:
        return max(1, self.config.rollout_batch // self.accelerator.num_processes)

    def rm_scores(self, prompts: Sequence[PPOPrompt], texts: Sequence[str]) -> torch.Tensor:
        from training.reward_model import score_rows

        rows = [(p.prompt.messages, text, p.facts, p.prompt.image) for p, text in zip(prompts, texts, strict=True)]
        return score_rows(self.reward_model, self.rm_encoder, rows, self.fact_rng)

    def step(self, prompts: Sequence[PPOPrompt]) -> dict[str, float]:
        """One PPO iteration on this process's prompts; returns its statistics (averaged over processes)."""
        config, device = self.config, self.accelerator.device
        policy = self.unwrapped_policy
        rollouts = generate(
            policy, self.processor, [p.prompt for p in prompts], config.temperature, synced=self.sharded
        )
        rm = self.rm_scores(prompts, rollouts.texts)
        rewards = sequence_rewards(rm, rollouts, prompts, config)
        rollouts = rollouts.to(device)
        mask = rollouts.response_mask.float()
        with torch.no_grad():
            old_logps = response_logps(policy, rollouts)
            with policy.disable_adapter():
                reference_logps = response_logps(policy, rollouts)
            old_values = response_values(self.value_model, rollouts)
        kl = kl_penalty(old_logps, reference_logps, config.kl_beta)
        token_reward = token_rewards(rewards.to(device), kl, mask)
        advantages, returns = gae(token_reward, old_values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask)
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": []}
        self.policy.train()
        self.value_model.train()
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(self.rng.randrange(2**31)))
            for start in range(0, len(prompts), config.minibatch):
                rows = order[start : start + config.minibatch].to(device)
                batch = _select(rollouts, rows)
                logps = response_logps(self.policy, batch)
                policy_loss, policy_stats = ppo_policy_loss(
                    logps, old_logps[rows], advantages[rows], mask[rows], config.clip
                )
                values = response_values(self.value_model, batch)
                value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], config.clip)
                self.accelerator.backward(policy_loss + config.value_coef * value_loss)
                self.accelerator.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                stats["policy_loss"].append(policy_loss.item())
                stats["value_loss"].append(value_loss.item())
                stats["clip_fraction"].append(policy_stats["clip_fraction"])
                stats["approx_kl"].append(policy_stats["approx_kl"])
        descriptions = torch.tensor([p.kind == "description" for p in prompts])
        local = {key: sum(values) / len(values) for key, values in stats.items()}
        local |= {
            "rm_score": float(rm.mean()),
            "reward": float(rewards.mean()),
            "kl_to_reference": float(masked_mean(old_logps - reference_logps, mask)),
            "response_tokens": float(rollouts.response_lengths.float().mean()),
            "ended": float(rollouts.ended.float().mean()),
        } | rollout_truth(prompts, rollouts.texts)
        if descriptions.any():
            local["rm_score_descriptions"] = float(rm[descriptions].mean())
        return self._mean_over_processes(local)

    def _mean_over_processes(self, stats: dict[str, float]) -> dict[str, float]:
        """Each statistic averaged over the processes that have it (a process may have drawn no description)."""
        if self.accelerator.num_processes == 1:
            return stats
        values = torch.tensor(
            [stats.get(k, float("nan")) for k in STEP_STATS], dtype=torch.float64, device=self.accelerator.device
        )
        gathered = self.accelerator.gather(values.unsqueeze(0)).reshape(self.accelerator.num_processes, -1)
        present = ~gathered.isnan()
        return {
            key: float(gathered[:, i][present[:, i]].mean()) for i, key in enumerate(STEP_STATS) if present[:, i].any()
        }

    def evaluate(self, split: str, images: int) -> dict[str, float]:
        """ShapesWorld benchmark of the current policy, in-process: on the main process, or sharded on every
        process together (each computes the same report)."""
        from training.evaluation.models import TransformersChatModel
        from training.evaluation.shapes_bench import evaluate_shapes
        from training.shapes_world import ShapesWorld

        chat = TransformersChatModel.from_loaded(
            self.unwrapped_policy, self.processor, batch_size=32, synced=self.sharded
        )
        report = evaluate_shapes(chat, ShapesWorld(), split, images, progress=False)
        self.unwrapped_policy.train()
        keys = (
            "chair_s",
            "chair_i",
            "object_recall",
            "pope_random_accuracy",
            "pope_adversarial_accuracy",
            "attribute_accuracy",
            "multiple_choice_accuracy",
        )
        return {key: float(report[key]) for key in keys if key in report}

    def run(self) -> dict:
        """The offline recipe on ShapesWorld train-split prompts: steps, curves, before/after on the test split."""
        from training.shapes_world import ShapesWorld

        config, accelerator = self.config, self.accelerator
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        world, main = ShapesWorld(), accelerator.is_main_process
        evaluates = main or self.sharded  # a sharded policy answers only with every process taking part
        self.schedule(config.steps)
        before = self.evaluate("test", config.final_eval_images) if evaluates and config.final_eval_images else {}
        started, history = time.monotonic(), []
        local, rank = self._local_batch(), accelerator.process_index
        with (output_dir / "metrics.jsonl").open("w") as metrics_file:
            for step in range(1, config.steps + 1):
                first = (step - 1) * config.rollout_batch + rank * local  # every process its own scenes
                prompts = shapes_prompts(world, "train", first, local, self.rng, config.description_share)
                record = {"step": step, **{k: round(v, 5) for k, v in self.step(prompts).items()}}
                if evaluates and config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                    record["eval"] = self.evaluate("validation", config.eval_images)
                record["elapsed_s"] = round(time.monotonic() - started, 1)
                history.append(record)
                if main:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    logger.info(
                        "ppo step %d %s",
                        step,
                        {k: record[k] for k in ("rm_score", "reward", "kl_to_reference") if k in record},
                    )
        minutes = (time.monotonic() - started) / 60
        summary = {}
        accelerator.wait_for_everyone()
        after = self.evaluate("test", config.final_eval_images) if evaluates and config.final_eval_images else {}
        self.save_policy(output_dir / "adapter")
        if main:
            summary = {
                "reward_model": config.reward_model,
                "with_facts": self.with_facts,
                "steps": config.steps,
                "processes": accelerator.num_processes,
                "sharding": "fsdp" if self.sharded else "ddp",
                "mixed_precision": accelerator.mixed_precision,
                "device": str(accelerator.device),
                "train_minutes": round(minutes, 2),
                "test_images": config.final_eval_images,
                "before": before,
                "after": after,
                "config": dataclasses.asdict(config),
            }
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.wait_for_everyone()
        return summary


def _select(rollouts: Rollouts, rows: torch.Tensor) -> Rollouts:
    picked = {f.name: getattr(rollouts, f.name)[rows] for f in dataclasses.fields(rollouts) if f.name != "texts"}
    return Rollouts(**picked, texts=[rollouts.texts[i] for i in rows.tolist()])


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    from training.recipe_args import recipe_parser

    parser = recipe_parser(PPOConfig, prog, __doc__.split("\n\n")[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    summary = PPOTrainer(config).run()
    if summary:
        print(json.dumps({"before": summary["before"], "after": summary["after"]}))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
