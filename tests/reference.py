"""An independent Mamba2 block built from mamba-ssm's own reference functions.

It slices the weights for a nested width with its own index arithmetic (not the
library's helper), so agreement checks both the kernels and the nesting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from matmamba.block import MatMamba2
from matmamba.kernels import import_mamba_ssm


def reference_weights(block: MatMamba2, width: int) -> dict[str, torch.Tensor]:
    cfg = block.config
    dm, di = cfg.expand * block.max_width, cfg.expand * width
    hm, h = dm // cfg.headdim, di // cfg.headdim
    bc = 2 * cfg.ngroups * cfg.d_state
    w_in = block.in_proj.weight
    rows = list(range(di)) + list(range(dm, dm + di)) + list(range(2 * dm, 2 * dm + bc + h))
    conv_rows = list(range(di)) + list(range(dm, dm + bc))
    assert w_in.shape[0] == 2 * dm + bc + hm
    return {
        "in_proj": w_in[rows],
        "conv_w": block.conv1d.weight[conv_rows, 0],
        "conv_b": block.conv1d.bias[conv_rows],
        "dt_bias": block.dt_bias[:h],
        "A": -torch.exp(block.A_log[:h].float()),
        "D": block.D[:h],
        "norm": block.norm.weight[:di],
        "out_proj": block.out_proj.weight[:, :di],
    }


def reference_forward(block: MatMamba2, u: torch.Tensor, width: int) -> torch.Tensor:
    """u: (batch, length, d_model) -> (batch, length, d_model), in fp32 on CPU.

    mamba-ssm's reference scan needs whole chunks: u is zero-padded at the end and the
    output cut back (causal, so padding never reaches earlier positions).
    """
    length = u.shape[1]
    u = F.pad(u, (0, 0, 0, (-length) % block.config.chunk_size))
    ssd = import_mamba_ssm("ops.triton.ssd_combined")
    norm = import_mamba_ssm("ops.triton.layernorm_gated")
    cfg, w = block.config, reference_weights(block, width)
    di, bc = cfg.expand * width, cfg.ngroups * cfg.d_state
    h = di // cfg.headdim
    zxbcdt = u @ w["in_proj"].T
    z, xbc, dt = zxbcdt.split([di, di + 2 * bc, h], dim=-1)
    conv = F.conv1d(F.pad(xbc.transpose(1, 2), (cfg.d_conv - 1, 0)), w["conv_w"][:, None], w["conv_b"],
                    groups=xbc.shape[-1])
    xbc = F.silu(conv).transpose(1, 2)
    x, B, C = xbc.split([di, bc, bc], dim=-1)
    y = ssd.ssd_chunk_scan_combined_ref(
        x.unflatten(-1, (h, cfg.headdim)), dt, w["A"], B.unflatten(-1, (cfg.ngroups, cfg.d_state)),
        C.unflatten(-1, (cfg.ngroups, cfg.d_state)), cfg.chunk_size, D=w["D"], dt_bias=w["dt_bias"],
        dt_softplus=True,
    )
    y = norm.rms_norm_ref(y.flatten(-2), w["norm"], None, z=z, eps=cfg.norm_eps, group_size=di // cfg.ngroups,
                          norm_before_gate=cfg.norm_before_gate)
    return (y @ w["out_proj"].T)[:, :length]
