"""pipeline.cpu_isa: every package pins torch's CPU libraries to AVX2 before torch loads, so a seeded build gives the
same weights on every machine, whatever its instruction set and thread count."""

import os
import platform
import subprocess
import sys

import pytest

from pipeline.cpu_isa import PINS

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pin is x86-64's")

# A few AdamW steps of a tiny Llama (the toy teacher's class) from a seed; prints the capability torch uses and a
# digest of the weights. (Not every op is thread-count independent: a torch.nn.TransformerEncoderLayer's training
# differs between 1 and 2 threads even when pinned; the toy teacher's Llama does not.)
TRAIN = """
import hashlib, sys
import {package}
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(int(sys.argv[1])); torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
ids = torch.randint(0, 256, (8, 32))
for _ in range(4):
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step(); optim.zero_grad()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(torch.backends.cpu.get_cpu_capability(), digest)
"""


def run(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in PINS}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**environ, **env})  # fmt: skip


def test_a_seeded_llama_training_is_the_same_at_any_thread_count_and_avx2_unless_native():
    pinned = [run(TRAIN.format(package="toy"), str(n)) for n in (1, 2)]
    assert all(p.returncode == 0 for p in pinned), pinned[0].stderr[-2000:]
    (cap1, digest1), (cap2, digest2) = (p.stdout.split() for p in pinned)
    assert cap1 == cap2 and cap1 in ("AVX2", "DEFAULT")  # never AVX512, whatever this machine has
    assert digest1 == digest2  # bit-identical at 1 and 2 threads
    native = run(TRAIN.format(package="toy"), "2", SPEECHKD_CPU_ISA="native")
    assert native.returncode == 0, native.stderr[-2000:]
    native_cap, native_digest = native.stdout.split()
    assert native_cap == run("import torch; print(torch.backends.cpu.get_cpu_capability())").stdout.strip()
    if native_cap not in ("AVX2", "DEFAULT"):  # on an AVX-512 machine the native path sums otherwise
        assert native_digest != digest1


@pytest.mark.parametrize("package", ["pipeline", "student", "toy", "bench"])
def test_every_package_pins_before_torch_loads(package):
    out = run(f"import sys, os, {package}; print('torch' in sys.modules, os.environ['ATEN_CPU_CAPABILITY'], "
              f"os.environ['MKL_CBWR'], os.environ['ONEDNN_MAX_CPU_ISA'])")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "avx2", "AVX2,STRICT", "AVX2"]  # set, and before torch loaded


def test_a_bad_choice_is_one_line_naming_the_variable():
    bad = run("import pipeline", SPEECHKD_CPU_ISA="avx9")
    assert bad.returncode == 1 and "SPEECHKD_CPU_ISA='avx9': must be one of avx2, native" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert run("import os, pipeline; print(os.environ.get('MKL_CBWR'))", SPEECHKD_CPU_ISA="native").stdout.strip() == "None"
