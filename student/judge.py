"""Greedy answers and judgments from a text LLM served by vLLM: the teacher's typed answers, and a local judge.

The judge (`--judge HF_ID`, default: the cache's teacher) reads each open-ended question and an answer and gives a
1-5 rating (JUDGE_PROMPT, our own wording of VoiceBench's rubric), or for reference-based QA (sd-qa) whether the
answer is correct given the reference (JUDGE_QA_PROMPT). Greedy, so a re-run judges the same. Every raw judgment is
kept (judge.jsonl in the run directory) beside the parsed score; one that cannot be parsed is counted, not dropped
and not guessed (a question and answer longer than the judge's context is one such, marked in judge.jsonl).
"""

from __future__ import annotations

import re

from pipeline.chat import encode_prompt
from student.scorers import Scored

JUDGE_PROMPT = """You are grading a voice assistant's answer. The user asked (a transcript of their speech):
{prompt}

The assistant answered:
{response}

Rate the answer on a scale of 1 to 5:
1: irrelevant, incorrect, or does not address the question.
2: somewhat relevant, but inaccurate or incomplete.
3: relevant and mostly accurate, but padded with details that do not help.
4: relevant, accurate and concise.
5: exactly the information asked for, accurate and direct.
Reply with the number only."""

JUDGE_QA_PROMPT = """Question: {prompt}
Reference answer: {reference}
Candidate answer: {response}

Is the candidate answer correct, given the question and the reference answer? Reply with Yes or No only."""


def parse_rating(text: str) -> int | None:
    """The first rating 1-5 a judgment gives (as a standalone digit), or None."""
    m = re.search(r"(?<![\d.])([1-5])(?![\d.]\d)", text)
    return int(m.group(1)) if m else None


def parse_verdict(text: str) -> int | None:
    """1 for a judgment that says yes first, 0 for no, None for neither."""
    m = re.search(r"\b(yes|no)\b", text.lower())
    return None if m is None else int(m.group(1) == "yes")


class Generator:
    """Greedy completions of chat prompts by one vLLM engine (the teacher, the judge: the same one when they are
    the same model)."""

    def __init__(self, llm, tokenizer):
        self.llm, self.tokenizer = llm, tokenizer

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str | None]:
        """Greedy answers, each at most `max_new_tokens` and what the context has room for; None for a prompt the
        model's context cannot hold with room for one token (the caller counts it: nothing is guessed)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        limit = self.llm.llm_engine.model_config.max_model_len
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        fits = [i for i, ids in enumerate(encoded) if len(ids) < limit]
        params = [SamplingParams(temperature=0.0, max_tokens=min(max_new_tokens, limit - len(encoded[i])))
                  for i in fits]  # fmt: skip
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=encoded[i]) for i in fits], params, use_tqdm=False)
        answers: list[str | None] = [None] * len(prompts)
        for i, o in zip(fits, outs):
            answers[i] = o.outputs[0].text.strip()
        return answers


def judge(generator: Generator, scorer: str, prompts: list[str], answers: list[str], references: list[str | None],
          max_new_tokens: int = 16, template: str | None = None) -> tuple[Scored, list[str]]:  # fmt: skip
    """Judge every answer: (the scores, 1-5 or 1/0 with NaN for an unparseable judgment, and the raw judgments).
    `template`: another wording than JUDGE_PROMPT / JUDGE_QA_PROMPT, with the same {prompt}, {response} (and
    {reference}) fields and the same kind of reply."""
    if scorer == "judge-qa":
        form, parse = template or JUDGE_QA_PROMPT, parse_verdict
    else:
        form, parse = template or JUDGE_PROMPT, parse_rating
    asks = [form.replace("{prompt}", p).replace("{response}", a).replace("{reference}", r or "")
            for p, a, r in zip(prompts, answers, references)]  # fmt: skip
    raw = generator.answer(asks, max_new_tokens)
    out = Scored([])
    for text in raw:
        value = None if text is None else parse(text)
        out.unscored += value is None
        out.values.append(float("nan") if value is None else float(value))
        out.details.append({"judgment": text, "parsed": value, **({"error": "longer than the judge's context"}
                                                                   if text is None else {})})  # fmt: skip
    return out, raw
