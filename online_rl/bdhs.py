"""Bias-Driven Hallucination Sampling (BDHS, arXiv 2407.02477; docs/papers.md §3): a rejected answer for a good
answer that has none, made by the policy itself with the image almost hidden.

For a reference (chosen) answer, e.g. one a user rated up:
1. mask about 99% of the image tokens at random (a token is kept only if u ~ U(0,1) >= 1 - keep_prob); masked
   tokens are removed from attention, so the model answers mostly from its language prior;
2. cut each reference sentence at a random word and let the masked model complete it, conditioned on the true
   earlier sentences rather than on its own; a sentence that starts with yes/no has that word flipped with
   probability `flip_prob` before completion;
3. if the result is too similar to the reference (cosine of sentence embeddings > `max_similarity`), try again with
   a new mask; after `tries` tries, keep an unguided masked generation.
The completions carry exactly the model's typical hallucinations, which DPO then pushes down.

The sentence embedding defaults to the policy's own language model (mean of its last hidden states over the text):
no hub is reachable here, and any `embed(texts) -> tensor` (a sentence-transformers model, say) can replace it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from online_rl.pairs import GenerationLookup, PreferencePair, net_ratings
from online_rl.schema import FeedbackEvent, GenerationRecord
from training.evaluation.judge import split_sentences

_YES_NO = {"yes": "No", "no": "Yes"}
Embedder = Callable[[Sequence[str]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class BDHSConfig:
    keep_prob: float = 0.01  # share of image tokens left visible
    flip_prob: float = 0.5  # chance to flip a leading yes/no
    max_similarity: float = 0.97  # cosine above which a sample is too close to the reference
    tries: int = 5
    max_new_tokens: int = 48  # per completed sentence (and for the unguided fallback, per answer: x4)


def sentence_prefix(sentence: str, rng: random.Random, flip_prob: float) -> str:
    """Where the guided completion of `sentence` starts: its leading yes/no flipped (with probability flip_prob),
    else its first k words for a random k that leaves at least one word to write."""
    words = sentence.split()
    head = words[0].rstrip(",.!?").lower() if words else ""
    if head in _YES_NO and rng.random() < flip_prob:
        return _YES_NO[head] + words[0][len(head) :]
    return " ".join(words[: rng.randrange(len(words))])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


class LanguageModelEmbedder:
    """Sentence embeddings from a LLaVA's language model: the mean of its last hidden states over the text."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        vectors = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            vectors.append(hidden[0].mean(dim=0))
        return torch.stack(vectors)


class BDHSSampler:
    def __init__(
        self, policy, processor, config: BDHSConfig | None = None, seed: int = 0, embed: Embedder | None = None
    ):
        self.policy = policy
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config or BDHSConfig()
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.embed = embed or LanguageModelEmbedder(policy, self.tokenizer)

    def masked_inputs(self, messages: Sequence[dict], image: Image.Image, answer_prefix: str) -> dict:
        """The prompt plus `answer_prefix`, with all but ~keep_prob of the image tokens out of attention."""
        prompt = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        text = prompt + (" " + answer_prefix if answer_prefix else "")
        inputs = self.processor(images=[image], text=[text], return_tensors="pt")
        is_image = inputs["input_ids"] == self.image_token_id
        keep = torch.rand(is_image.shape, generator=self.generator) >= 1 - self.config.keep_prob
        inputs["attention_mask"] = torch.where(is_image & ~keep, 0, inputs["attention_mask"])
        return inputs

    @torch.no_grad()
    def complete(
        self,
        messages: Sequence[dict],
        image: Image.Image,
        answer_prefix: str,
        max_new_tokens: int,
        one_sentence: bool = False,
    ) -> str:
        """The masked policy's continuation of `answer_prefix` (greedy), as text; with `one_sentence`, generation
        stops at the first sentence end (only the first sentence of a guided completion is kept)."""
        inputs = self.masked_inputs(messages, image, answer_prefix)
        was_training = self.policy.training
        self.policy.eval()
        stop = {"stop_strings": [".", "!", "?"], "tokenizer": self.tokenizer} if one_sentence else {}
        output = self.policy.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **stop
        )
        self.policy.train(was_training)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def guided(self, messages: Sequence[dict], image: Image.Image, reference: str) -> str:
        """One guided try: every sentence cut and completed after the true sentences before it."""
        sentences = split_sentences(reference)
        written = []
        for index, sentence in enumerate(sentences):
            before = " ".join(sentences[:index])
            prefix = sentence_prefix(sentence, self.rng, self.config.flip_prob)
            answer_prefix = " ".join(part for part in (before, prefix) if part)
            continuation = self.complete(messages, image, answer_prefix, self.config.max_new_tokens, one_sentence=True)
            completed = (
                (prefix + continuation)
                if not prefix or continuation[:1] in ",.!?"
                else f"{prefix} {continuation.lstrip()}"
            )
            first = split_sentences(completed)
            written.append(first[0] if first else sentence)
        return " ".join(written)

    def rejected(self, messages: Sequence[dict], image: Image.Image, reference: str) -> tuple[str, bool]:
        """(a rejected answer, whether it was guided); unguided after `tries` samples too close to the reference."""
        reference_vector = self.embed([reference])[0]
        for _ in range(self.config.tries):
            sample = self.guided(messages, image, reference)
            if (
                sample.strip() != reference.strip()
                and cosine(self.embed([sample])[0], reference_vector) <= self.config.max_similarity
            ):
                return sample, True
        return self.complete(messages, image, "", 4 * self.config.max_new_tokens).strip(), False

    def pair(
        self, generation: GenerationRecord, image: Image.Image, event_ids: tuple[str, ...] = ()
    ) -> PreferencePair | None:
        """The generation's answer as chosen against a BDHS sample as rejected; None if they come out the same."""
        rejected, _ = self.rejected(generation.messages, image, generation.response.strip())
        if not rejected or rejected == generation.response.strip():
            return None
        return PreferencePair(
            messages=tuple(generation.messages),
            chosen=generation.response.strip(),
            rejected=rejected,
            source="bdhs",
            chosen_generation_id=generation.id,
            rejected_generation_id=None,
            event_ids=event_ids,
            adapter_version=generation.adapter_version,
        )


def unpartnered_good_answers(
    events: Sequence[FeedbackEvent], lookup: GenerationLookup, paired: Sequence[PreferencePair]
) -> list[tuple[GenerationRecord, tuple[str, ...]]]:
    """Up-rated answers (net rating > 0) with one image that no feedback pair already uses as chosen: BDHS's inputs."""
    used = {pair.chosen_generation_id for pair in paired if pair.chosen_generation_id}
    good = []
    for generation_id, (total, event_ids) in net_ratings([e for e in events if isinstance(e, FeedbackEvent)]).items():
        if total <= 0 or generation_id in used:
            continue
        generation = lookup(generation_id)
        if generation is not None and generation.response.strip() and len(generation.image_hashes) == 1:
            good.append((generation, tuple(event_ids)))
    return good
