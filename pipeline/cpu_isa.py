"""One instruction set for CPU arithmetic on every machine: the same seeded build gives the same model anywhere.

torch's CPU kernels (ATen), MKL's matrix products and oneDNN each pick their code path by the CPU's instruction set,
and the paths sum in different orders. The machines this project runs on differ between sessions (AVX2 only,
AVX-512, AMX), and the same commit's toy teacher came out different on two of them (eval exact match 95.7% on an
AVX-512 machine, 97.8% on an AVX2 one: docs/results.md, 2026-12-02). So, before torch loads, each library is capped
at AVX2, which every x86-64 machine of this project has (MKL in its strict reproducible mode, which does not depend
on the thread count). `SPEECHKD_CPU_ISA=native` lets them choose (faster on some machines; results then differ by
machine). GPU kernels are not affected; neither are other architectures than x86-64, nor a variable already set.

Every package of the project calls `pin()` first thing (its __init__), so any entry point pins before torch loads;
`describe()` is what a build report records.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings

ENV = "SPEECHKD_CPU_ISA"
CHOICES = ("avx2", "native")
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def choice() -> str:
    value = os.environ.get(ENV, "avx2").strip().lower() or "avx2"
    if value not in CHOICES:
        raise SystemExit(f"{ENV}={value!r}: must be one of {', '.join(CHOICES)} (avx2, the default: the same results "
                         f"on every x86-64 machine; native: each library's fastest path on this one)")  # fmt: skip
    return value


def applies() -> bool:
    return choice() == "avx2" and platform.machine().lower() in ("x86_64", "amd64")


def pin() -> None:
    """Cap the CPU libraries at AVX2 (unless SPEECHKD_CPU_ISA=native, or a variable is set already)."""
    if not applies():
        return
    unset = [key for key in PINS if key not in os.environ]
    if unset and "torch" in sys.modules:
        warnings.warn(f"torch was imported before speechkd could pin its CPU instruction set ({', '.join(unset)} "
                      f"unset): results may differ by machine; import a speechkd package first, or set {ENV}=native "
                      f"to accept that", stacklevel=2)  # fmt: skip
    for key in unset:
        os.environ[key] = PINS[key]


def in_effect() -> str:
    """'avx2' where the pin applies, else 'native'."""
    return "avx2" if applies() else "native"


def describe() -> dict:
    """The CPU arithmetic in effect (for a build report): the pin, the machine's ISA as torch uses it, its threads."""
    import torch

    return {"cpu_isa": in_effect(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "processor": cpu_info()[0], "torch_threads": torch.get_num_threads(),
            **{key: os.environ.get(key) for key in PINS}}  # fmt: skip


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its instruction-set flags, as /proc/cpuinfo gives them (elsewhere: platform's
    processor name and no flags)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags
