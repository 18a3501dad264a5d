"""Tokenizer compatibility between the cache (the teacher's tokenizer) and the student: not identity, the same ids.

A cache's token ids (its responses, its top-k or drawn ids) must mean the same tokens to the student. Qwen2.5-Omni's
tokenizer is Qwen2.5's plus audio/vision special tokens, so a whole-tokenizer hash differs although every id the
teacher emits means the same token to both. The rule, decided here once and recorded in the run:

- every ordinary (non-special) token of the teacher has the same id in the student;
- every special token the teacher's chat template or its responses use (the end of turn, the turn markers) too;
- the student's extra ids (beyond the teacher's vocabulary: audio placeholders) are fine;
- a teacher special token the template and responses do not use, whose id means something else to the student (a
  multimodal model can reuse a reserved id for `<|AUDIO|>`), is **dropped from the KD targets' support**: the
  student is never trained toward it (its target probability is set to 0 and the rest renormalized), and the
  dropped entries are counted in the run's report; a cached *response* token that is one is refused;
- anything else is refused in one line naming the first id that differs and both tokens.

The comparison is over the two vocabularies (id -> token), no walk over the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.errors import InputMismatch
from pipeline.fingerprint import tokenizer_sha256


class TokenizerMismatch(InputMismatch):
    pass


@dataclass
class VocabCheck:
    """What was decided about the cache's ids and the student's tokenizer (written to the run directory)."""

    identical: bool  # the same tokenizer hash: nothing to check
    teacher_vocab: int
    student_vocab: int
    student_extra_ids: int = 0  # ids the student has beyond the teacher's vocabulary (never in the cache)
    dropped: dict[int, list[str]] = field(default_factory=dict)  # id -> [teacher token, student token]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dropped"] = {str(k): v for k, v in self.dropped.items()}
        return d

    def summary(self) -> str:
        if self.identical:
            return "the student's tokenizer is the teacher's"
        text = (f"the student's tokenizer extends the teacher's ({self.teacher_vocab} ids the same, "
                f"{self.student_extra_ids} of its own)")  # fmt: skip
        if self.dropped:
            ids = ", ".join(f"{i} ({t!r} -> {s!r})" for i, (t, s) in sorted(self.dropped.items()))
            text += f"; {len(self.dropped)} teacher special id(s) mean other tokens to it and are dropped from the " \
                    f"KD targets: {ids}"
        return text


def _id_to_token(tokenizer) -> dict[int, str]:
    return {i: t for t, i in tokenizer.get_vocab().items()}


def _special_ids(tokenizer) -> set[int]:
    specials = set(tokenizer.all_special_ids)
    specials.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return specials


def template_special_ids(tokenizer) -> set[int]:
    """The special ids a chat exchange rendered with `tokenizer`'s template contains (a system, user and assistant
    turn when the template takes a system turn, else user and assistant), and the end of turn."""
    used = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}]  # fmt: skip
    for conversation in (turns, turns[1:]):
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses a system turn: try without it
            continue
        used.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return used & _special_ids(tokenizer)


def check_vocab(teacher_tokenizer, student_tokenizer, cache_dir=None) -> VocabCheck:
    """The rule above for a teacher's and a student's tokenizers; TokenizerMismatch naming the first id that
    differs (and both tokens) when they are not compatible."""
    where = f" (the cache at {cache_dir})" if cache_dir else ""
    if tokenizer_sha256(teacher_tokenizer) == tokenizer_sha256(student_tokenizer):
        n = len(teacher_tokenizer)
        return VocabCheck(True, n, n)
    teacher, student = _id_to_token(teacher_tokenizer), _id_to_token(student_tokenizer)
    used = template_special_ids(teacher_tokenizer)
    teacher_specials = _special_ids(teacher_tokenizer)
    check = VocabCheck(False, len(teacher), len(student), student_extra_ids=len(set(student) - set(teacher)))
    for i in sorted(teacher):
        ours = student.get(i)
        if ours == teacher[i]:
            continue
        if i in teacher_specials and i not in used:
            check.dropped[i] = [teacher[i], ours if ours is not None else "(none)"]
            continue
        what = "the special token" if i in teacher_specials else "the token"
        raise TokenizerMismatch(f"token id {i} is {what} {teacher[i]!r} to the teacher{where} but {ours!r} to the "
                                f"student: the cache's ids would mean other tokens. Use a student whose tokenizer "
                                f"extends the teacher's (the same ids for every token the teacher uses), or re-cache "
                                f"with a teacher whose tokenizer the student shares")  # fmt: skip
    return check
