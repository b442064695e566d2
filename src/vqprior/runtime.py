"""Device, precision and seeding: one place that decides where and how tensors run."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .config import ComputeParams
from .errors import ParamsError


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which bf16 matmuls and convolutions still run natively
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512", "AVX10_2_512", "DEFAULT", "ALL")


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively (about 5x fp32 on such CPUs). Without them bf16 is emulated
    and several times slower than fp32, so it is never chosen there. A cap on oneDNN's kernels
    (`ONEDNN_MAX_CPU_ISA=AVX2`, how an AVX2-only machine is measured on a newer CPU) counts as their absence."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap and not cap.startswith(_BF16_ISAS):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """"fp32" or "bf16" for `requested` ("auto", "fp32" or "bf16") on `device`: auto is bf16 only where the hardware
    runs it natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32" or "bf16"
    compile: bool = False
    channels_last: bool = False  # on CUDA: convolutions in NHWC, the layout tensor cores read without a transpose

    def optimise(self, *modules: torch.nn.Module) -> None:
        """Channels-last convolution weights where set (the activations follow them), then torch.compile where asked,
        both in place (parameter names unchanged, so checkpoints stay interchangeable)."""
        for module in modules:
            if self.channels_last and any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
                module.to(memory_format=torch.channels_last)
            if self.compile:
                module.compile()

    def autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def resolve_runtime(p: ComputeParams) -> Runtime:
    if p.threads:
        torch.set_num_threads(p.threads)
    if p.device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(p.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ParamsError("compute.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is None:  # each rank of a multi-GPU run has its own GPU
        device = torch.device("cuda", torch.cuda.current_device())
    precision = resolve_precision(p.precision, device)
    return Runtime(device=device, precision=precision, compile=p.compile, channels_last=device.type == "cuda")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
