"""Choosing and naming the torch device, shared by the cloud service and the edge worker."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str) -> torch.device:
    """"auto" -> the visible GPU when there is one, else the CPU; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device; use 'cpu' or 'auto'")
    return resolved


def describe_device(device: torch.device) -> str:
    """E.g. "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def use_ieee_fp32() -> None:
    """Make fp32 math on CUDA IEEE fp32 for this process: no TF32 in cuBLAS, cuDNN or Triton dots.

    By default cuDNN convolutions and Triton ``tl.dot`` (mamba-ssm's chunked scan) round fp32 inputs
    to TF32 (10-bit mantissa), while a decode step's elementwise math stays fp32, so a chunked pass
    and step-by-step decoding disagree in the third digit and greedy ties flip. Call before the first
    kernel compiles: Triton reads ``TRITON_F32_DEFAULT`` when it compiles a kernel.
    """
    os.environ["TRITON_F32_DEFAULT"] = "ieee"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
