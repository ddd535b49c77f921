"""Where and how a stage computes: the device, the CPU thread count and the precision."""
from __future__ import annotations

import os

import torch

from stages.lib.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"train.device is {name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)


def set_threads(requested: int, local_processes: int = 1) -> int:
    """Fix torch's CPU thread count for the whole run and return it: `requested` (the `threads` param)
    when > 0, else the cores this process may run on (its CPU affinity: `taskset` narrows it) divided
    among the processes of this machine. Never what other jobs are doing: a different thread count
    changes float rounding, and results must not depend on what else runs."""
    if requested:
        threads = requested
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        threads = max(1, cores // local_processes)
    torch.set_num_threads(threads)
    return threads


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether training (train.precision) or evaluate's inference (evaluate.precision) runs under
    bfloat16 autocast. auto: on GPUs and CPUs with native bf16 arithmetic (AVX512-BF16 or AMX; there it
    is ~1.7× faster than float32 for these nets), float32 elsewhere; bf16 forces it (emulated, slowly,
    on a CPU without native bf16)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
