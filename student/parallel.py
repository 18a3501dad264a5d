"""How the student is spread over torchrun's ranks: DDP (a whole copy per rank) or FSDP2 (each rank holds 1/N of
every parameter, gradient and optimizer state), and activation checkpointing per block.

    torchrun --nproc-per-node 8 student/train.py --logits data/cache --student Qwen/Qwen2.5-Omni-7B --parallel fsdp
    torchrun --nproc-per-node 2 student/train.py --config configs/demo.toml --parallel fsdp     # CPU: gloo

FSDP2 (`torch.distributed.fsdp.fully_shard`) is applied to every transformer block of the student (the LM's decoder
layers and the audio tower's encoder layers: transformers' `GradientCheckpointingLayer`s, and the composed student's
`nn.TransformerEncoderLayer`s), then to the root (the objective, which holds the student and computes its losses:
what is not in a block, embeddings, the LM head, norms, the projector, is sharded with the root). Frozen blocks are
sharded too, so they cost 1/N of their memory. On a GPU with `--precision bf16` parameters are all-gathered in bf16
and gradients reduced in fp32 (`MixedPrecisionPolicy`); on CPU (gloo) everything is fp32. The same code path on
both, only the backend differs.

Activation checkpointing (`--activation-checkpointing`) keeps only each block's input in the forward pass and
recomputes the block in the backward pass (non-reentrant checkpoint, which replays dropout's RNG): the same losses,
less activation memory.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

PARALLEL_CHOICES = ("ddp", "fsdp")


def is_block(module: nn.Module) -> bool:
    """A transformer block: a unit to shard and to checkpoint."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, (GradientCheckpointingLayer, nn.TransformerEncoderLayer))


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, outermost only (a block inside a block is part of it)."""
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if is_block(module):
            found.append(module)
            inside.add(name)
    return found


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer block of `model` (non-reentrant: dropout's RNG is replayed, so losses are
    unchanged); the number of blocks wrapped. A checkpointed block's state_dict keys are unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing as apply_ac,
        checkpoint_wrapper,
    )

    n = len(blocks(model))
    apply_ac(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
             check_fn=is_block)  # fmt: skip
    return n


def mixed_precision(device: torch.device, bf16: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and bf16:  # bf16 all-gathers and compute, fp32 gradient reduction
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(objective: nn.Module, device: torch.device, bf16: bool) -> int:
    """FSDP2 over `objective` (which holds the student): each transformer block, then the root. Returns the blocks
    sharded."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(device, bf16)
    found = blocks(objective)
    for block in found:
        fully_shard(block, mp_policy=mp)
    fully_shard(objective, mp_policy=mp)
    return len(found)


def wrap(objective: nn.Module, parallel: str, world: int, device: torch.device, bf16: bool) -> nn.Module:
    """The objective as the loop runs it: itself (one process), under DDP, or sharded with FSDP2 (in place)."""
    if parallel == "fsdp":
        shard(objective, device, bf16)
        return objective
    if world > 1:
        # the CTC head runs only while aligning, the T channel only while fine-tuning: unused parameters
        return torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    return objective


def no_sync(objective: nn.Module, last: bool):
    """A context in which a micro-batch's backward skips the gradient reduction (all but the last of a step)."""
    import contextlib

    if last:
        return contextlib.nullcontext()
    if isinstance(objective, torch.nn.parallel.DistributedDataParallel):
        return objective.no_sync()
    if hasattr(objective, "set_requires_gradient_sync"):  # an FSDP2 module

        @contextlib.contextmanager
        def skip():
            objective.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                objective.set_requires_gradient_sync(True)

        return skip()
    return contextlib.nullcontext()
