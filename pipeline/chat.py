"""Prompt/response tokenization through a model's chat template.

The one place that decides which token ids are "the prompt" and which are "the
response" for a sample; the teacher cache and the student both go through it,
so cached positions and student positions line up by construction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]  # chat-templated user turn + the assistant header
    response_ids: list[int]  # the response, ending with the end-of-turn token

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def render_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def render_user_turn(template_owner, prompt: str | None) -> str:
    """A user turn and the assistant header in the template of a multimodal processor (or tokenizer) that takes
    content parts: the typed `prompt` as a text part, or with `prompt` None one audio part (the processor expands its
    placeholder to the clip's length). What a pretrained speech LLM student reads before the cached response."""
    part = {"type": "audio"} if prompt is None else {"type": "text", "text": prompt}
    return template_owner.apply_chat_template([{"role": "user", "content": [part]}], tokenize=False,
                                              add_generation_prompt=True)  # fmt: skip


def end_of_turn(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: speechkd needs one to mark the end of a response")
    return tokenizer.eos_token


def response_text(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """(templated prompt text, templated response text ending with end-of-turn)."""
    prompt_text = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the prompt differently with and without the answer; "
            "speechkd cannot tell where the response starts"
        )
    tail = full[len(prompt_text) :]
    eot = end_of_turn(tokenizer)
    cut = tail.find(eot, len(response))
    tail = tail[: cut + len(eot)] if cut >= 0 else tail + eot
    return prompt_text, tail


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, prompt: str, response: str) -> EncodedPair:
    prompt_text, tail = response_text(tokenizer, prompt, response)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return EncodedPair(prompt_ids, response_ids)


def normalize_answer(text: str) -> str:
    """Exact-match normalization: case, surrounding space and a final period."""
    return " ".join(text.strip().lower().split()).rstrip(".")


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after `normalize_answer`."""
    if not references:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)
