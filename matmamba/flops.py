"""Parameter and FLOP counts per nested width or Mix'n'Match spec, derived from the config."""

from __future__ import annotations

from collections.abc import Sequence

from .config import MatMambaLMConfig, MatMambaVisionConfig, ModelConfig
from .nesting import nested_dims

# A multiply-add is two FLOPs.
FLOPS_PER_MAC = 2
# Recurrent SSM per token and channel-state pair: decay (1 mul), input outer product
# (dt*x*B: 2 mul + 1 add), output contraction with C (1 mul + 1 add).
SSM_FLOPS_PER_STATE = 6


def block_params(config: ModelConfig, width: int) -> int:
    """Parameters one residual block uses at `width` (its RMSNorm included)."""
    cfg, d = config.block, nested_dims(config.block, width)
    in_proj = cfg.d_model * d.in_proj_dim + (d.in_proj_dim if cfg.bias else 0)
    conv = d.conv_dim * cfg.d_conv + (d.conv_dim if cfg.conv_bias else 0)
    heads = 3 * d.nheads  # dt_bias, A_log, D
    out_proj = d.d_inner * cfg.d_model + (cfg.d_model if cfg.bias else 0)
    return in_proj + conv + heads + d.d_inner + out_proj + cfg.d_model


def block_flops_per_token(config: ModelConfig, width: int) -> int:
    """Forward FLOPs of one block per token at `width` (recurrent form of the SSM)."""
    cfg, d = config.block, nested_dims(config.block, width)
    matmul = FLOPS_PER_MAC * cfg.d_model * (d.in_proj_dim + d.d_inner)
    conv = FLOPS_PER_MAC * d.conv_dim * cfg.d_conv
    ssm = SSM_FLOPS_PER_STATE * d.d_inner * d.d_state
    return matmul + conv + ssm


def _outer_params(config: ModelConfig) -> int:
    d = config.d_model
    if isinstance(config, MatMambaLMConfig):
        head = 0 if config.tie_embeddings else config.padded_vocab_size * d
        return config.padded_vocab_size * d + head + d
    assert isinstance(config, MatMambaVisionConfig)
    patch = config.in_chans * config.patch_size**2 * d + d
    return patch + d + d + (d * config.n_classes + config.n_classes)


def _outer_flops_per_token(config: ModelConfig) -> int:
    d = config.d_model
    if isinstance(config, MatMambaLMConfig):
        return FLOPS_PER_MAC * d * config.padded_vocab_size
    return FLOPS_PER_MAC * config.in_chans * config.patch_size**2 * d


def count_params(config: ModelConfig, widths: Sequence[int]) -> int:
    """Parameters a model uses at per-layer `widths` (embedding, head and norms included)."""
    return _outer_params(config) + sum(block_params(config, w) for w in widths)


def count_flops(config: ModelConfig, widths: Sequence[int], tokens: int) -> int:
    """Forward FLOPs for `tokens` tokens (for vision: patches + 1 class token; head counted once)."""
    per_token = sum(block_flops_per_token(config, w) for w in widths) + _outer_flops_per_token(config)
    if isinstance(config, MatMambaVisionConfig):
        return per_token * tokens + FLOPS_PER_MAC * config.d_model * config.n_classes
    return per_token * tokens


def vision_tokens(config: MatMambaVisionConfig, height: int | None = None, width: int | None = None) -> int:
    h, w = height or config.image_size, width or config.image_size
    return (h // config.patch_size) * (w // config.patch_size) + 1


def flops_per_item(config: ModelConfig, width: int) -> int:
    """Forward FLOPs of one item with every layer at `width`: one image for vision, one token for an LM."""
    widths = [width] * config.n_layer
    tokens = vision_tokens(config) if isinstance(config, MatMambaVisionConfig) else 1
    return count_flops(config, widths, tokens)
