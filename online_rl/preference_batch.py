"""Preference pairs as model inputs: the chat-template text of prompt plus response, image tokens expanded, labels on
the final response only, and a weight per response token (1 for DPO; gamma on corrected tokens for Dense DPO).

A batch holds the chosen responses in its first half and the rejected ones in its second half, each row with its
own copy of the prompt and image, so one forward pass scores both sides.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from online_rl.pairs import PreferencePair, correction_token_weights
from training.losses import IGNORE_INDEX
from training.tiny_llava import image_token_count

ImageLoader = Callable[[str], bytes | None]


@dataclasses.dataclass(frozen=True)
class EncodedResponse:
    input_ids: list[int]
    labels: list[int]
    weights: list[float]


class PreferenceEncoder:
    """Encodes pairs for a LLaVA processor (the tiny model's or a real llava-hf one)."""

    def __init__(self, processor, dense_gamma: float | None = None, end_weight: float | None = None):
        """`dense_gamma`: weight of changed tokens in correction pairs (Dense DPO); None weighs every token 1.
        `end_weight`: weight of a correction pair's end-of-answer token (`correction_token_weights`)."""
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.image_seq_length = image_token_count(processor)
        self.dense_gamma = dense_gamma
        self.end_weight = end_weight

    def encode(self, messages: Sequence[dict], response: str) -> EncodedResponse:
        """The prompt messages (OpenAI format, images as any image part) followed by `response` as the next turn.

        The response is stripped: the template puts one space after "ASSISTANT:", and a served answer keeps the
        leading space of its first token, which would otherwise make chosen and rejected differ where they do not.
        """
        response = response.strip()
        prompt = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        text = self.tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if not text.startswith(prompt):
            raise ValueError("the chat template does not extend the prompt with the response")
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, labels = [], []
        for token_id, (start, _) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            if token_id == self.image_token_id:
                input_ids += [token_id] * self.image_seq_length
                labels += [IGNORE_INDEX] * self.image_seq_length
                continue
            input_ids.append(token_id)
            labels.append(token_id if start >= len(prompt) else IGNORE_INDEX)
        weights = [1.0 if label != IGNORE_INDEX else 0.0 for label in labels]
        return EncodedResponse(input_ids, labels, weights)

    def encode_pair(self, pair: PreferencePair) -> tuple[EncodedResponse, EncodedResponse]:
        chosen, rejected = self.encode(pair.messages, pair.chosen), self.encode(pair.messages, pair.rejected)
        if self.dense_gamma is None or pair.source != "correction":
            return chosen, rejected
        chosen_tokens = [t for t in chosen.labels if t != IGNORE_INDEX]
        rejected_tokens = [t for t in rejected.labels if t != IGNORE_INDEX]
        chosen_dense, rejected_dense = correction_token_weights(
            chosen_tokens, rejected_tokens, self.dense_gamma, end_weight=self.end_weight
        )
        return _reweigh(chosen, chosen_dense), _reweigh(rejected, rejected_dense)

    def collate(self, pairs: Sequence[PreferencePair], load_image: ImageLoader) -> dict[str, torch.Tensor]:
        """A padded batch: rows [chosen_0..chosen_n, rejected_0..rejected_n], with `pixel_values` per row."""
        encoded = [self.encode_pair(pair) for pair in pairs]
        rows = [chosen for chosen, _ in encoded] + [rejected for _, rejected in encoded]
        images = [_pair_image(pair, load_image) for pair in pairs]
        length = max(len(row.input_ids) for row in rows)
        batch_size = len(rows)
        input_ids = torch.full((batch_size, length), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        weights = torch.zeros((batch_size, length), dtype=torch.float32)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        for index, row in enumerate(rows):
            n = len(row.input_ids)
            input_ids[index, :n] = torch.tensor(row.input_ids)
            labels[index, :n] = torch.tensor(row.labels)
            weights[index, :n] = torch.tensor(row.weights)
            attention_mask[index, :n] = 1
        pixel_values = self.processor.image_processor(images + images, return_tensors="pt")["pixel_values"]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "token_weights": weights,
            "pixel_values": pixel_values,
        }


def _reweigh(encoded: EncodedResponse, response_weights: list[float]) -> EncodedResponse:
    weights = iter(response_weights)
    return dataclasses.replace(
        encoded, weights=[next(weights) if label != IGNORE_INDEX else 0.0 for label in encoded.labels]
    )


def _pair_image(pair: PreferencePair, load_image: ImageLoader) -> Image.Image:
    hashes = pair.image_hashes
    if len(hashes) != 1:
        raise ValueError(f"a training pair needs exactly one image, this one has {len(hashes)}")
    data = load_image(hashes[0])
    if data is None:
        raise ValueError(f"image sha256:{hashes[0]} is not in the store")
    return Image.open(io.BytesIO(data)).convert("RGB")
