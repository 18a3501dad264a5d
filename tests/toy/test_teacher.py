import json

import numpy as np
import pytest
import torch

from pipeline.chat import encode_pair
from toy.teacher import BUILD_REPORT, is_built


def test_builder_saves_a_complete_hf_model(tiny_teacher):
    assert is_built(tiny_teacher)
    report = json.loads((tiny_teacher / BUILD_REPORT).read_text())
    assert report["epochs"] >= 1 and 0.0 <= report["eval_accuracy"] <= 1.0
    assert report["history"] and report["history"][-1]["loss"] < 20


def test_chat_template_ends_responses_with_end_of_turn(tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    pair = encode_pair(tok, "What is the capital of Foo?", "The capital of Foo is Bar.")
    assert pair.response_ids[-1] == tok.eos_token_id
    assert tok.decode(pair.response_ids, skip_special_tokens=True) == "The capital of Foo is Bar."
    # Tokenizing prompt and response apart gives the same ids as tokenizing them together.
    joint = tok(tok.decode(pair.input_ids), add_special_tokens=False)["input_ids"]
    assert joint == pair.input_ids


@pytest.mark.slow
def test_transformers_and_vllm_score_the_same_tokens(tiny_teacher, vllm_engine, tiny_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    seqs = [encode_pair(tok, r["prompt"], r["response"]).input_ids for r in tiny_rows[:8]]
    k = 5
    outs = vllm_engine.generate(
        [TokensPrompt(prompt_token_ids=s) for s in seqs],
        SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True),
        use_tqdm=False,
    )
    for seq, out in zip(seqs, outs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        flat = out.prompt_logprobs
        assert flat.end_indices[0] == flat.start_indices[0]  # position 0 has no logprobs
        start = flat.start_indices[1]
        ids = np.array(flat.token_ids[start:]).reshape(len(seq) - 1, k + 1)
        lps = np.array(flat.logprobs[start:]).reshape(len(seq) - 1, k + 1)
        assert (ids[:, 0] == np.array(seq[1:])).all()  # column 0: the actual next token
        expected = ref[:-1].gather(1, torch.from_numpy(ids)).numpy()
        np.testing.assert_allclose(lps, expected, atol=1e-4, rtol=0)
        # columns 1..k are the top-k in order
        top = ref[:-1].topk(k, dim=-1)
        np.testing.assert_allclose(lps[:, 1:], top.values.numpy(), atol=1e-4, rtol=0)
