"""MatMamba-Vision: patches -> nested Mamba2 blocks -> class token (a suffix) -> head."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .backbone import NestedStack, WidthSpec, init_weights
from .config import MatMambaVisionConfig
from .pretrained import PretrainedMixin

# Wavelength scale of the fixed sin-cos position code (as in the Transformer paper).
SINCOS_BASE = 10000.0


@functools.lru_cache(maxsize=16)
def sincos_2d(grid_h: int, grid_w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos position code (grid_h * grid_w, dim) on `device`; any grid size, no parameters.

    Cached per device, so a forward never copies it from the host (which a CUDA graph cannot capture).
    """
    if device is not None and device.type != "cpu":
        return sincos_2d(grid_h, grid_w, dim).to(device)
    quarter = dim // 4
    freqs = SINCOS_BASE ** (-torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32),
                            torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    ay, ax = ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs  # (N, quarter)
    code = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return nn.functional.pad(code, (0, dim - code.shape[1]))


class MatMambaVision(PretrainedMixin, nn.Module):
    """Image classifier over non-overlapping patches, class token appended last (Mamba is causal)."""

    config_class = MatMambaVisionConfig

    def __init__(self, config: MatMambaVisionConfig, max_width: int | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.patch_embed = nn.Conv2d(config.in_chans, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.backbone = NestedStack(config, max_width)
        self.norm_f = nn.RMSNorm(d, eps=config.block.norm_eps)
        self.head = nn.Linear(d, config.n_classes)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, images: torch.Tensor, mrl_level: int | None = None, *,
                widths: WidthSpec | None = None) -> torch.Tensor:
        """images: (batch, in_chans, H, W), H and W multiples of patch_size -> logits (batch, n_classes)."""
        cfg = self.config
        if images.dim() != 4 or images.shape[1] != cfg.in_chans:
            raise ValueError(f"expected images (batch, {cfg.in_chans}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % cfg.patch_size or images.shape[3] % cfg.patch_size or images.shape[2] == 0:
            raise ValueError(f"image sides must be positive multiples of patch_size {cfg.patch_size}, "
                             f"got {tuple(images.shape[2:])}")
        spec = self.backbone.resolve_widths(mrl_level, widths)
        patches = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # (B, d, H/p, W/p)
        gh, gw = patches.shape[2:]
        tokens = patches.flatten(2).transpose(1, 2)  # (B, N, d)
        tokens = tokens + sincos_2d(gh, gw, cfg.d_model, tokens.device).to(tokens.dtype)
        tokens = torch.cat([tokens, self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens)], dim=1)
        h = self.backbone(tokens, spec)[:, -1]  # the class token, last in the sequence: (B, d)
        return self.head(self.norm_f(h.to(self.norm_f.weight.dtype)))
