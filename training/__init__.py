"""Everything that trains or scores a model offline: ShapesWorld (the synthetic scene world with exact ground truth),
the tiny LLaVA, loss components, the recipes (`sft`, `reward_model`, `ppo`, run by `alignloop train`), the LoRA layout
and atomic adapter writing (`lora`), and evaluation (`evaluation/`: metrics, the ShapesWorld benchmark, MMHal-Bench,
the rule judge, chat-model backends). `training/experiments/` holds one folder per experiment with its report.
"""
