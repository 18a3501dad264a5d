"""Conversations through a model's chat template: which token ids are context and which are the scored response.

The one place that decides it, for the teacher's cache and for both kinds of student, so the cached positions and
the student's positions line up by construction. A sample is a conversation (`conversation`): its `messages`
(system, user and assistant turns), or a plain prompt and response (one user turn, one assistant turn).
`segments` renders one through a chat template, prefix by prefix, and cuts it into `Piece`s:

- "text": context (template markup, the system prompt, user turns, assistant turns that are not distilled);
- "speech": a spoken user turn, in its place (a spoken channel);
- "response": a scored assistant turn, ending with the end-of-turn token: the final one with `turns="last"`, every
  one with `turns="all"`; one with no text is the response the teacher writes (a conversation ending in a user turn).

Each piece is tokenized on its own (`token_ids`), by the teacher and by the student alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
TURNS = ("last", "all")  # which assistant turns are distilled (--turns)
SPEAK = ("last-user", "all-user")  # which user turns are spoken (--speak)
_SLOT = "\u2047SPEECH{}\u2047"  # stands for a spoken user turn's content while a template renders


class TemplateMismatch(ValueError):
    """A chat template whose rendering of a conversation's beginning is not a prefix of the whole: speechkd cannot
    tell where a turn starts."""


def conversation(sample: dict) -> list[dict]:
    """A sample's turns: its `messages`, or a user turn (its prompt) and, when it has one, an assistant turn."""
    messages = sample.get("messages") or ""
    if messages:
        return json.loads(messages) if isinstance(messages, str) else [dict(m) for m in messages]
    turns = [{"role": "user", "content": sample["prompt"]}]
    if sample.get("response"):
        turns.append({"role": "assistant", "content": sample["response"]})
    return turns


def to_score(messages: list[dict], responses: str = "dataset") -> list[dict]:
    """The conversation the teacher scores: with teacher-written responses (`responses` not "dataset") the final
    assistant turn is the teacher's to write, so the dataset's is dropped."""
    if responses != "dataset" and messages and messages[-1]["role"] == "assistant":
        return messages[:-1]
    return messages


def spoken_turns(messages: list[dict], speak: str = "last-user") -> list[int]:
    """The indices of the user turns a spoken channel hears: the last one, or (`all-user`) every one."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    return users if speak == "all-user" else users[-1:]


def last_user_text(messages: list[dict]) -> str:
    """The last user turn's text: a sample's `prompt`."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def end_of_turn(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: speechkd needs one to mark the end of a response")
    return tokenizer.eos_token


@dataclass(frozen=True)
class Piece:
    kind: str  # "text" | "speech" | "response" (see the module docstring)
    text: str | None  # the text ("speech": None; "response": None when the teacher writes it)
    turn: int  # the message index of a speech or response piece (-1 for text)


def _render(owner, messages: list[dict], generation_prompt: bool, parts: bool) -> str:
    if parts:  # a multimodal processor's template: content as parts, a spoken turn as one audio part
        messages = [{"role": m["role"], "content": [{"type": "audio"} if m.get("spoken") else
                                                    {"type": "text", "text": m["content"]}]} for m in messages]  # fmt: skip
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def segments(owner, messages: list[dict], turns: str = "last", spoken: tuple[int, ...] | list[int] = (),
             parts: bool = False) -> list[Piece]:  # fmt: skip
    """The conversation cut into pieces (see the module docstring), in order; their texts concatenated are the
    template's rendering. `owner`: a tokenizer, or with `parts` a multimodal processor whose template takes content
    parts (a spoken turn is then an audio part inside a text piece, which the processor expands; no speech piece);
    `spoken`: the user turns rendered as speech. A conversation ending in a user turn ends with one more scored
    piece without text: the response the teacher writes."""
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    eot = end_of_turn(getattr(owner, "tokenizer", owner))
    shown = [dict(m) for m in messages]
    for u in spoken:
        if shown[u]["role"] != "user":
            raise ValueError(f"turn {u} is a {shown[u]['role']} turn; only user turns are spoken")
        shown[u] = {"role": "user", "content": _SLOT.format(u), "spoken": True}
    assistants = [i for i, m in enumerate(shown) if m["role"] == "assistant"]
    if shown and shown[-1]["role"] == "assistant":
        scored = assistants if turns == "all" else assistants[-1:]
    else:  # the teacher writes the final turn
        scored = (assistants if turns == "all" else []) + [len(shown)]
    pieces: list[Piece] = []
    consumed = ""
    for a in scored:
        before = _render(owner, shown[:a], True, parts)
        if not before.startswith(consumed):
            raise TemplateMismatch("the chat template renders a conversation's beginning differently inside the "
                                   "whole; speechkd cannot tell where a turn starts")  # fmt: skip
        pieces.extend(_context_pieces(before[len(consumed):], [] if parts else spoken))
        if a == len(shown):
            pieces.append(Piece("response", None, a))
            break
        full = _render(owner, shown[: a + 1], False, parts)
        if not full.startswith(before):
            raise TemplateMismatch("the chat template renders the prompt differently with and without the answer; "
                                   "speechkd cannot tell where the response starts")  # fmt: skip
        tail = full[len(before):]
        cut = tail.find(eot, len(shown[a]["content"]))
        response = tail[: cut + len(eot)] if cut >= 0 else tail + eot
        pieces.append(Piece("response", response, a))
        consumed = before + response
    return pieces


def _context_pieces(text: str, spoken) -> list[Piece]:
    """A stretch of context, split at the speech slots in it."""
    out, rest = [], text
    for u in sorted(spoken):
        slot = _SLOT.format(u)
        if slot in rest:
            head, rest = rest.split(slot, 1)
            if head:
                out.append(Piece("text", head, -1))
            out.append(Piece("speech", None, u))
    if rest:
        out.append(Piece("text", rest, -1))
    if any("\u2047SPEECH" in p.text for p in out if p.kind == "text"):
        raise TemplateMismatch("a spoken turn appears more than once in the chat template's rendering")
    return out


def token_ids(tokenizer, text: str | None) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@dataclass(frozen=True)
class EncodedConversation:
    """A conversation as the teacher scores it: each piece's token ids, in order ("text" or "response"). A last
    response piece without ids is the one the teacher writes (`open_end`)."""

    pieces: list[tuple[str, list[int]]]
    open_end: bool = False

    @property
    def input_ids(self) -> list[int]:
        return [i for _, ids in self.pieces for i in ids]

    @property
    def response_ids(self) -> list[int]:
        """The scored tokens, every scored turn's, in order."""
        return [i for kind, ids in self.pieces if kind == "response" for i in ids]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(start, length) in input_ids of each scored turn (the written one: its start, length 0)."""
        out, pos = [], 0
        for kind, ids in self.pieces:
            if kind == "response":
                out.append((pos, len(ids)))
            pos += len(ids)
        return out

    @property
    def prompt_ids(self) -> list[int]:
        """Everything before the first scored token."""
        return self.input_ids[: self.spans[0][0]]

    def with_written(self, ids: list[int]) -> "EncodedConversation":
        """The conversation with its open end's response (the teacher's ids) filled in."""
        if not self.open_end:
            raise ValueError("this conversation has no response for the teacher to write")
        return EncodedConversation(self.pieces[:-1] + [("response", list(ids))], False)

    def truncated(self, max_len: int) -> "EncodedConversation | None":
        """Cut to `max_len` tokens inside the last scored turn (at least one of its tokens kept); None when the cut
        would fall before it."""
        start, length = self.spans[-1]
        keep = max_len - start
        if keep < 1:
            return None
        return EncodedConversation(self.pieces[:-1] + [("response", self.pieces[-1][1][:keep])], False)


def encode_conversation(tokenizer, messages: list[dict], turns: str = "last") -> EncodedConversation:
    """The teacher's tokens of a conversation (each piece tokenized on its own, as the student does)."""
    pieces = segments(tokenizer, messages, turns)
    open_end = pieces[-1].kind == "response" and pieces[-1].text is None
    return EncodedConversation([(p.kind, token_ids(tokenizer, p.text)) for p in pieces], open_end)


# --- the single-turn case: one user turn, one assistant turn --------------------------------------------------


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]  # chat-templated user turn + the assistant header
    response_ids: list[int]  # the response, ending with the end-of-turn token

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def render_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip


def render_user_turn(template_owner, prompt: str | None) -> str:
    """A user turn and the assistant header in the template of a multimodal processor (or tokenizer) that takes
    content parts: the typed `prompt` as a text part, or with `prompt` None one audio part (the processor expands its
    placeholder to the clip's length). What a pretrained speech LLM reads before its answer."""
    part = {"type": "audio"} if prompt is None else {"type": "text", "text": prompt}
    return template_owner.apply_chat_template([{"role": "user", "content": [part]}], tokenize=False,
                                              add_generation_prompt=True)  # fmt: skip


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return token_ids(tokenizer, render_prompt(tokenizer, prompt))


def encode_pair(tokenizer, prompt: str, response: str) -> EncodedPair:
    """A prompt and its response: `encode_conversation` of the two turns."""
    enc = encode_conversation(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant",
                                                                                "content": response}])  # fmt: skip
    return EncodedPair(enc.prompt_ids, enc.response_ids)


def normalize_answer(text: str) -> str:
    """Exact-match normalization: case, surrounding space and a final period."""
    return " ".join(text.strip().lower().split()).rstrip(".")


def answer_matches(prediction: str, reference: str) -> bool:
    """The exact-match rule: equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions that match their reference (`answer_matches`)."""
    if not references:
        return 0.0
    return sum(answer_matches(p, r) for p, r in zip(predictions, references)) / len(references)
