"""The held-out slice of the store's own preference pairs: never trained on, and what the `feedback-holdout` gate
suite scores versions on.

A pair is held out when the sha256 of its prompt hash, chosen and rejected text falls in the lowest `share` of the
hash range, so the slice is the same in every round and every process, and a pair joins it the moment it exists.
The trainer leaves held-out pairs out of training (their events are acknowledged with the round that read them).

A version is scored by its implicit DPO reward on each held-out pair (Rafailov et al. 2023): the margin
beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))], with pi the base model with
the version's adapter and ref the base model (the adapter disabled), computed in-process with transformers + PEFT
(`online_rl.preference_batch` encodes the pairs, `training.losses` scores them). log pi(y) is the score the trainer's
algorithm optimises: the summed log-probability for DPO; for Dense DPO its weighted score (corrected tokens weigh
gamma, divided by the summed weights when `dense_normalize`), since a version trained on that score can rank a pair
right by it and wrong by the plain sum (a short corrected answer against a longer original, for one). A version
ranks a pair right when its margin is positive; a margin of exactly 0 (the base model on every pair, its own
reference) counts half, so the base model sits at chance, 0.5, and a version must not rank the held-out pairs worse
than its baseline does.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

from online_rl.pairs import PreferencePair, build_pairs
from online_rl.schema import prompt_hash
from online_rl.store.base import FeedbackStore

ImageLoader = Callable[[str], bytes | None]
_RANGE = 16**12


def pair_key(pair: PreferencePair) -> str:
    """The pair's stable identity: sha256 of its prompt hash, chosen and rejected text (stripped)."""
    text = "\n".join((prompt_hash(list(pair.messages)), pair.chosen.strip(), pair.rejected.strip()))
    return hashlib.sha256(text.encode()).hexdigest()


def is_held_out(pair: PreferencePair, share: float) -> bool:
    """Whether the pair is in the held-out slice of `share` (0 to 1) of all pairs."""
    return int(pair_key(pair)[:12], 16) < share * _RANGE


def all_pairs(store: FeedbackStore, page: int = 1000) -> list[PreferencePair]:
    """Every preference pair the store's feedback supports, over the whole event stream."""
    events, after = [], None
    while True:
        batch = store.list_events(after=after, limit=page)
        events += [event for _, event in batch]
        if len(batch) < page:
            break
        after = batch[-1][0]
    return build_pairs(events, store.get_generation)


def held_out_pairs(store: FeedbackStore, share: float, max_pairs: int = 1000) -> list[PreferencePair]:
    """The held-out pairs with one image that the store still has, each once, ordered by their key; at most
    `max_pairs` of them (the lowest keys, so the slice only grows at its low end)."""
    kept: dict[str, PreferencePair] = {}
    for pair in all_pairs(store):
        if len(pair.image_hashes) != 1 or not is_held_out(pair, share):
            continue
        key = pair_key(pair)
        if key not in kept and store.image_info(pair.image_hashes[0]) is not None:
            kept[key] = pair
    return [kept[key] for key in sorted(kept)][:max_pairs]


def implicit_reward_margins(
    base,
    processor,
    pairs: Sequence[PreferencePair],
    load_image: ImageLoader,
    adapter_path: str | Path,
    beta: float,
    dense_gamma: float | None = None,
    normalize: bool = False,
    batch_pairs: int = 4,
    end_weight: float | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
):
    """The implicit reward margin of each pair under the adapter at `adapter_path` on `base`, against `base` itself,
    with DPO's score (`dense_gamma` None, no `normalize`) or Dense DPO's. Returns (margins, base): the base model
    comes back with the adapter taken off again (PEFT's `unload`)."""
    import torch
    from peft import PeftModel

    from online_rl.dpo import reference_scores, sequence_scores
    from online_rl.preference_batch import PreferenceEncoder
    from training.losses import dpo_loss

    encoder = PreferenceEncoder(processor, dense_gamma=dense_gamma, end_weight=end_weight)
    device = next(base.parameters()).device
    policy = PeftModel.from_pretrained(base, str(adapter_path))
    policy.eval()
    margins: list[float] = []
    try:
        for start in range(0, len(pairs), batch_pairs):
            chunk = list(pairs[start : start + batch_pairs])
            batch = {k: v.to(device) for k, v in encoder.collate(chunk, load_image).items()}
            with torch.no_grad(), autocast():
                scores = sequence_scores(policy, batch, normalize)
                reference = reference_scores(policy, batch, normalize)
            n = len(chunk)
            _, chosen, rejected = dpo_loss(scores[:n], scores[n:], reference[:n], reference[n:], beta)
            margins += (chosen - rejected).float().tolist()
    finally:
        base = policy.unload()
    return margins, base


def ranking_tallies(keys: Sequence[str], margins: Sequence[float]) -> dict:
    """Per pair: reward_accuracy [1 if the margin is positive, 0.5 if it is 0, else 0; 1] and reward_margin
    [margin; 1], for the paired gate; pairs are keyed by the first 16 hex digits of their key."""
    return {
        "scenes": [key[:16] for key in keys],
        "reward_accuracy": [[1.0 if m > 0 else 0.5 if m == 0 else 0.0, 1] for m in margins],
        "reward_margin": [[float(m), 1] for m in margins],
    }
