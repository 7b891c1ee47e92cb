"""Preference pairs from feedback: the small, pure builders that turn stored judgements into chosen/rejected pairs.

- corrections: chosen = the user's corrected text, rejected = the answer it corrects (RLHF-V);
- thumbs: for one prompt (same messages and images), an answer rated up against one rated down. A generation's
  rating is the sum of its thumbs, so conflicting raters cancel out. A down-rated bare "Yes." or "No." with no
  up-rated partner is paired with its opposite: for a yes/no question, a thumbs-down says which answer is right;
- preferences: an arena comparison names its chosen and rejected generation directly.

Builders take events and a lookup of generation records and return `PreferencePair`s; nothing here touches a store.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from online_rl.schema import FeedbackEvent, GenerationRecord, PreferenceEvent, image_refs
from training.evaluation.metrics import opposite_answer

PairSource = Literal["correction", "thumbs", "preference", "bdhs", "online"]
GenerationLookup = Callable[[str], GenerationRecord | None]


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A chosen and a rejected answer to one prompt. `messages` are the stored prompt (images as sha256 refs)."""

    messages: tuple[dict, ...]
    chosen: str
    rejected: str
    source: PairSource
    chosen_generation_id: str | None  # None when the chosen text is a user's correction
    rejected_generation_id: str | None
    event_ids: tuple[str, ...]
    adapter_version: int | None = None  # the version that wrote the rejected answer

    @property
    def image_hashes(self) -> list[str]:
        return image_refs(list(self.messages))


def pairs_from_corrections(events: Iterable[FeedbackEvent], lookup: GenerationLookup) -> list[PreferencePair]:
    pairs = []
    for event in events:
        if not isinstance(event, FeedbackEvent) or not event.correction:
            continue
        generation = lookup(event.generation_id)
        if generation is None or event.correction.strip() == generation.response.strip():
            continue
        pairs.append(
            PreferencePair(
                messages=tuple(generation.messages),
                chosen=event.correction,
                rejected=generation.response,
                source="correction",
                chosen_generation_id=None,
                rejected_generation_id=generation.id,
                event_ids=(event.id,),
                adapter_version=generation.adapter_version,
            )
        )
    return pairs


def correction_token_weights(
    chosen: Sequence[int], rejected: Sequence[int], gamma: float, min_match: int = 3, end_weight: float | None = None
) -> tuple[list[float], list[float]]:
    """Dense DPO token weights for a correction pair (RLHF-V): a token-level diff of the corrected answer (chosen)
    against the original (rejected). Tokens inside a matching run of at least `min_match` tokens are unchanged and
    weigh 1; every other token, in either answer, was changed and weighs `gamma`. Returns (chosen, rejected).

    With `end_weight`, the end-of-answer token both answers close with weighs that instead (the diff marks it changed
    whenever a correction deletes the answer's last words)."""
    chosen_weights, rejected_weights = [gamma] * len(chosen), [gamma] * len(rejected)
    matcher = difflib.SequenceMatcher(None, list(rejected), list(chosen), autojunk=False)
    for block in matcher.get_matching_blocks():
        if block.size >= min_match:
            rejected_weights[block.a : block.a + block.size] = [1.0] * block.size
            chosen_weights[block.b : block.b + block.size] = [1.0] * block.size
    if end_weight is not None and chosen and rejected and chosen[-1] == rejected[-1]:
        chosen_weights[-1] = rejected_weights[-1] = end_weight
    return chosen_weights, rejected_weights


def net_ratings(events: Iterable[FeedbackEvent]) -> dict[str, tuple[int, list[str]]]:
    """Per generation id: the sum of its thumbs and the ids of the events that rated it."""
    totals: dict[str, tuple[int, list[str]]] = {}
    for event in events:
        if isinstance(event, FeedbackEvent) and event.rating is not None:
            total, ids = totals.get(event.generation_id, (0, []))
            totals[event.generation_id] = (total + event.rating, [*ids, event.id])
    return totals


def pairs_from_thumbs(
    events: Iterable[FeedbackEvent], lookup: GenerationLookup, max_pairs_per_prompt: int = 4
) -> list[PreferencePair]:
    """Pairs every up-rated answer of a prompt with every down-rated one (up to `max_pairs_per_prompt`)."""
    by_prompt: dict[str, dict[int, list[tuple[GenerationRecord, list[str]]]]] = defaultdict(lambda: {1: [], -1: []})
    for generation_id, (total, event_ids) in net_ratings(events).items():
        generation = lookup(generation_id)
        if generation is None or total == 0:
            continue
        by_prompt[generation.prompt_hash][1 if total > 0 else -1].append((generation, event_ids))
    pairs = []
    for rated in by_prompt.values():
        combos = [
            (up, down)
            for up, down in itertools.product(rated[1], rated[-1])
            if up[0].response.strip() != down[0].response.strip()
        ]
        for (up, up_events), (down, down_events) in combos[:max_pairs_per_prompt]:
            pairs.append(
                PreferencePair(
                    messages=tuple(up.messages),
                    chosen=up.response,
                    rejected=down.response,
                    source="thumbs",
                    chosen_generation_id=up.id,
                    rejected_generation_id=down.id,
                    event_ids=tuple(up_events + down_events),
                    adapter_version=down.adapter_version,
                )
            )
    return pairs


def pairs_from_down_rated_yes_no(
    events: Iterable[FeedbackEvent], lookup: GenerationLookup, already_rejected: set[str]
) -> list[PreferencePair]:
    """A down-rated bare yes/no answer that no thumbs pair rejects already, against its opposite (source thumbs)."""
    pairs = []
    for generation_id, (total, event_ids) in net_ratings(events).items():
        if total >= 0 or generation_id in already_rejected:
            continue
        generation = lookup(generation_id)
        opposite = opposite_answer(generation.response) if generation is not None else None
        if opposite is None:
            continue
        pairs.append(
            PreferencePair(
                messages=tuple(generation.messages),
                chosen=opposite,
                rejected=generation.response,
                source="thumbs",
                chosen_generation_id=None,
                rejected_generation_id=generation.id,
                event_ids=tuple(event_ids),
                adapter_version=generation.adapter_version,
            )
        )
    return pairs


def pairs_from_preferences(events: Iterable[PreferenceEvent], lookup: GenerationLookup) -> list[PreferencePair]:
    pairs = []
    for event in events:
        if not isinstance(event, PreferenceEvent):
            continue
        chosen, rejected = lookup(event.preferred_id), lookup(event.rejected_id)
        if chosen is None or rejected is None or chosen.response.strip() == rejected.response.strip():
            continue
        pairs.append(
            PreferencePair(
                messages=tuple(chosen.messages),
                chosen=chosen.response,
                rejected=rejected.response,
                source="preference",
                chosen_generation_id=chosen.id,
                rejected_generation_id=rejected.id,
                event_ids=(event.id,),
                adapter_version=rejected.adapter_version,
            )
        )
    return pairs


def chat_records(lookup: GenerationLookup) -> GenerationLookup:
    """The lookup, blind to records of raw text completions (`GenerationRecord.prompt` set)."""

    def chat_only(generation_id: str) -> GenerationRecord | None:
        generation = lookup(generation_id)
        return generation if generation is not None and generation.prompt is None else None

    return chat_only


def build_pairs(events: list[FeedbackEvent | PreferenceEvent], lookup: GenerationLookup) -> list[PreferencePair]:
    """Every pair the stored feedback supports: corrections, then thumbs, then explicit preferences.

    Answers to raw text prompts (/v1/completions) are left out: the trainers train on chat prompts."""
    lookup = chat_records(lookup)
    feedback = [e for e in events if isinstance(e, FeedbackEvent)]
    preferences = [e for e in events if isinstance(e, PreferenceEvent)]
    corrections = pairs_from_corrections(feedback, lookup)
    thumbs = pairs_from_thumbs(feedback, lookup)
    covered = {p.rejected_generation_id for p in corrections + thumbs if p.rejected_generation_id}
    return (
        corrections
        + thumbs
        + pairs_from_down_rated_yes_no(feedback, lookup, covered)
        + pairs_from_preferences(preferences, lookup)
    )
