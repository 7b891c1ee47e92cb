"""BDHS: where sentences are cut, which image tokens are masked, the similarity retry and its unguided fallback
(on the bundled model), and which answers get a BDHS partner."""

from __future__ import annotations

import random

import pytest
import torch

from online_rl.bdhs import BDHSConfig, BDHSSampler, sentence_prefix, unpartnered_good_answers
from online_rl.pairs import PreferencePair
from online_rl.schema import FeedbackEvent, GenerationRecord
from tests.online_rl.store_helpers import image_message
from training.evaluation.judge import split_sentences
from training.shapes_world import DESCRIBE_PROMPT, ShapesWorld

SHA = "ab" * 32


def test_sentences_are_cut_before_their_last_word_and_yes_no_is_flipped():
    assert split_sentences(" Yes. There is a star!  Is it red? ") == ["Yes.", "There is a star!", "Is it red?"]
    sentence = "A small red star is at the top left."
    words = sentence.split()
    prefixes = {sentence_prefix(sentence, random.Random(seed), flip_prob=1.0) for seed in range(200)}
    assert prefixes == {" ".join(words[:k]) for k in range(len(words))}  # every cut, never the whole sentence
    assert sentence_prefix("Yes, there is a star.", random.Random(0), flip_prob=1.0) == "No,"
    assert sentence_prefix("no.", random.Random(0), flip_prob=1.0) == "Yes."
    unflipped = {sentence_prefix("Yes, there is.", random.Random(s), flip_prob=0.0) for s in range(50)}
    assert unflipped == {"", "Yes,", "Yes, there"}


@pytest.fixture(scope="module")
def bundled(bundled_model):
    from training.tiny_llava import load_checkpoint

    return load_checkpoint(bundled_model)


@pytest.fixture
def scene_image():
    world = ShapesWorld()
    scene = world.scene("test", 11)
    return world.render(scene), world.description(scene, noisy=False)


def test_about_one_image_token_in_a_hundred_stays_visible(bundled, scene_image):
    model, processor = bundled
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE_PROMPT}]}]
    sampler = BDHSSampler(model, processor, BDHSConfig(keep_prob=0.01), seed=0)
    image_id = sampler.image_token_id
    visible, total = 0, 0
    for _ in range(40):
        inputs = sampler.masked_inputs(messages, scene_image[0], "There are")
        is_image = inputs["input_ids"][0] == image_id
        visible += int(inputs["attention_mask"][0][is_image].sum())
        total += int(is_image.sum())
        assert bool(inputs["attention_mask"][0][~is_image].all())  # text is never masked
    assert total > 0 and visible / total < 0.04
    everything = BDHSSampler(model, processor, BDHSConfig(keep_prob=1.0)).masked_inputs(messages, scene_image[0], "")
    assert bool(everything["attention_mask"].all())


class CountingEmbedder:
    def __init__(self, same: bool):
        self.same, self.calls = same, 0

    def __call__(self, texts):
        self.calls += 1
        vector = torch.ones(4) if self.same else torch.tensor([1.0, 0, 0, 0]) * (-1) ** self.calls
        return torch.stack([vector for _ in texts])


def test_a_sample_too_close_to_the_reference_is_retried_then_replaced_by_an_unguided_one(bundled, scene_image):
    model, processor = bundled
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE_PROMPT}]}]
    image, truth = scene_image
    close = CountingEmbedder(same=True)
    sample, guided = BDHSSampler(model, processor, BDHSConfig(tries=3), seed=0, embed=close).rejected(
        messages, image, truth
    )
    assert not guided and sample and close.calls == 1 + 3  # the reference, then every try
    far = CountingEmbedder(same=False)
    sample, guided = BDHSSampler(model, processor, seed=0, embed=far).rejected(messages, image, truth)
    assert guided and far.calls == 2 and sample != truth
    assert len(split_sentences(sample)) == len(split_sentences(truth))  # one completed sentence per sentence


def test_a_flipped_yes_becomes_the_rejected_answer(bundled, scene_image):
    model, processor = bundled
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a star in the image?"}]}
    ]
    sampler = BDHSSampler(model, processor, BDHSConfig(flip_prob=1.0), seed=0, embed=CountingEmbedder(same=False))
    sample, guided = sampler.rejected(messages, scene_image[0], "Yes.")
    assert guided and sample.startswith("No")


def _generation(gid: str, response: str = "Red.", prompt: str = "What color is the star?") -> GenerationRecord:
    return GenerationRecord(
        id=gid, alias="llava-rlhf", messages=image_message(SHA, prompt), response=response, user_id="u"
    )


def test_only_up_rated_answers_without_a_partner_get_bdhs():
    generations = {
        g.id: g
        for g in [
            _generation("up"),
            _generation("paired"),
            _generation("tied"),
            _generation("down"),
            _generation("empty", response=" "),
        ]
    }
    events = [
        FeedbackEvent(generation_id="up", rating=1, user_id="a"),
        FeedbackEvent(generation_id="paired", rating=1, user_id="a"),
        FeedbackEvent(generation_id="tied", rating=1, user_id="a"),
        FeedbackEvent(generation_id="tied", rating=-1, user_id="b"),
        FeedbackEvent(generation_id="down", rating=-1, user_id="a"),
        FeedbackEvent(generation_id="empty", rating=1, user_id="a"),
    ]
    paired = [PreferencePair((), "Red.", "Blue.", "thumbs", "paired", "other", ())]
    good = unpartnered_good_answers(events, generations.get, paired)
    assert [(g.id, ids) for g, ids in good] == [("up", (events[0].id,))]
