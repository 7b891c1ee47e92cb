"""Pair builders on hand-made events and records, with a dict as the generation lookup (no store)."""

from online_rl.pairs import build_pairs, net_ratings, pairs_from_corrections, pairs_from_preferences, pairs_from_thumbs
from online_rl.schema import FeedbackEvent, GenerationRecord, PreferenceEvent

SHA = "a" * 64


def generation(gid: str, response: str, question: str = "Describe the image.", version: int | None = None):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"sha256:{SHA}"}},
                {"type": "text", "text": question},
            ],
        }
    ]
    return GenerationRecord(
        id=gid, alias="llava-rlhf", adapter_version=version, messages=messages, response=response, user_id="u-1"
    )


RECORDS = {
    "g1": generation("g1", "A red star and a moon.", version=1),
    "g2": generation("g2", "A red star.", version=2),
    "g3": generation("g3", "A blue star and a moon.", version=2),
    "g4": generation("g4", "Yes.", question="Is there a moon?"),
}


def fb(gid: str, rating=None, correction=None, user="u-1", eid=None):
    return FeedbackEvent(
        generation_id=gid, rating=rating, correction=correction, user_id=user, **({"id": eid} if eid else {})
    )


def test_a_correction_is_chosen_over_the_answer_it_corrects():
    pairs = pairs_from_corrections([fb("g1", -1, "A red star.", eid="e1"), fb("g2", 1)], RECORDS.get)
    assert [(p.chosen, p.rejected, p.source, p.rejected_generation_id, p.event_ids) for p in pairs] == [
        ("A red star.", "A red star and a moon.", "correction", "g1", ("e1",))
    ]
    assert pairs[0].image_hashes == [SHA] and pairs[0].adapter_version == 1


def test_a_correction_that_changes_nothing_makes_no_pair():
    assert pairs_from_corrections([fb("g2", None, " A red star. ")], RECORDS.get) == []


def test_thumbs_pair_up_and_down_answers_to_the_same_prompt():
    events = [fb("g1", -1, eid="e1"), fb("g2", 1, eid="e2"), fb("g3", -1, eid="e3"), fb("g4", 1, eid="e4")]
    pairs = pairs_from_thumbs(events, RECORDS.get)
    assert [(p.chosen_generation_id, p.rejected_generation_id, p.event_ids) for p in pairs] == [
        ("g2", "g1", ("e2", "e1")),
        ("g2", "g3", ("e2", "e3")),
    ]  # g4 answers another prompt and has no partner


def test_conflicting_thumbs_cancel_out():
    events = [fb("g1", -1, user="a"), fb("g1", 1, user="b"), fb("g2", 1)]
    assert net_ratings(events)["g1"][0] == 0
    assert pairs_from_thumbs(events, RECORDS.get) == []


def test_pairs_per_prompt_are_capped():
    events = [fb("g1", -1), fb("g3", -1), fb("g2", 1)]
    assert len(pairs_from_thumbs(events, RECORDS.get, max_pairs_per_prompt=1)) == 1


def test_a_preference_names_chosen_and_rejected():
    event = PreferenceEvent(generation_ids=("g1", "g2"), preferred_id="g2", user_id="u-1", id="p1")
    (pair,) = pairs_from_preferences([event], RECORDS.get)
    assert (pair.chosen, pair.rejected, pair.source, pair.event_ids) == (
        "A red star.",
        "A red star and a moon.",
        "preference",
        ("p1",),
    )


def test_unknown_generations_are_skipped():
    assert build_pairs([fb("gone", -1, "x"), fb("gone", 1)], RECORDS.get) == []


def test_dense_weights_mark_the_tokens_a_correction_changed():
    from online_rl.pairs import correction_token_weights

    rejected = [1, 2, 3, 4, 5, 6]
    chosen = [1, 2, 3, 9, 5, 6]  # one token replaced; the run [5, 6] after it is shorter than min_match
    chosen_w, rejected_w = correction_token_weights(chosen, rejected, gamma=5.0, min_match=3)
    assert rejected_w == [1, 1, 1, 5, 5, 5] and chosen_w == [1, 1, 1, 5, 5, 5]
    # A deleted sentence: only the deleted tokens of the original change; the corrected answer is all unchanged.
    chosen_w, rejected_w = correction_token_weights([7, 7, 7, 8, 8, 8], [7, 7, 7, 1, 2, 8, 8, 8], gamma=2.0)
    assert rejected_w == [1, 1, 1, 2, 2, 1, 1, 1] and chosen_w == [1] * 6
    assert correction_token_weights([], [1, 2], gamma=3.0) == ([], [3.0, 3.0])


def test_answers_to_raw_text_prompts_never_become_pairs():
    """/v1/completions records (a raw prompt, no chat template) are rated like any answer, but the trainers train on
    chat prompts: build_pairs leaves them out, whatever the feedback."""

    def completion(gid: str, response: str) -> GenerationRecord:
        return GenerationRecord(
            id=gid, alias="base", messages=[], prompt="There is a", response=response, user_id="u-1"
        )

    records = {"c1": completion("c1", " red star."), "c2": completion("c2", " blue moon.")}
    chat = GenerationRecord(
        id="m1", alias="base", messages=[{"role": "user", "content": "There is a"}], response="x", user_id="u-1"
    )
    assert records["c1"].prompt_hash == records["c2"].prompt_hash != chat.prompt_hash
    assert records["c1"].question == "There is a"
    events = [
        fb("c1", 1),
        fb("c2", -1, correction="A red star."),
        PreferenceEvent(generation_ids=("c1", "c2"), preferred_id="c1", user_id="u-1"),
    ]
    assert pairs_from_thumbs(events[:2], records.get)  # the builders themselves would pair them
    assert build_pairs(events, records.get) == []


def test_a_down_rated_yes_or_no_is_paired_with_its_opposite():
    from training.evaluation.metrics import opposite_answer

    assert [opposite_answer(a) for a in ("Yes.", "no", " No! ", "Yes, a moon.", "A moon.")] == [
        "No.",
        "yes",
        "Yes!",
        None,
        None,
    ]
    records = {**RECORDS, "g5": generation("g5", "No.", question="Is there a star?")}
    pairs = build_pairs([fb("g4", -1, eid="e4"), fb("g5", 1, eid="e5"), fb("g1", -1, eid="e1")], records.get)
    assert [(p.chosen, p.rejected, p.source, p.chosen_generation_id, p.event_ids) for p in pairs] == [
        ("No.", "Yes.", "thumbs", None, ("e4",))  # a down-rated description has no opposite; an up-rated "No." no pair
    ]
    # A down-rated "Yes." already rejected by a correction or a thumbs pair is not paired twice.
    corrected = build_pairs([fb("g4", -1, "No.", eid="e6")], RECORDS.get)
    assert [(p.chosen, p.source) for p in corrected] == [("No.", "correction")]


def test_the_end_token_of_a_deleting_correction_can_weigh_as_unchanged():
    from online_rl.pairs import correction_token_weights

    # rejected: A B C D E <end>; the correction deletes "D E": the diff leaves <end> as a changed token
    rejected, chosen = [1, 2, 3, 4, 5, 9], [1, 2, 3, 9]
    assert correction_token_weights(chosen, rejected, 5.0) == ([1, 1, 1, 5], [1, 1, 1, 5, 5, 5])
    assert correction_token_weights(chosen, rejected, 5.0, end_weight=1.0) == ([1, 1, 1, 1], [1, 1, 1, 5, 5, 1])
    assert correction_token_weights(chosen, rejected, 5.0, end_weight=0.0) == ([1, 1, 1, 0], [1, 1, 1, 5, 5, 0])
