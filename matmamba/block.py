"""The nested MatMamba2 block: a Mamba2 mixer whose inner width can be cut at run time."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import MatMamba2Config
from .nesting import NestedDims, nested_dims, nested_ranges, take


@dataclass
class StateTrace:
    """What a block read in one chunk (``forward(..., keep_states=True)``), enough to rewind inside it.

    A few KB per layer for a chunk of drafted tokens: the chunk's scan inputs and the states before it,
    not a state per position; ``BlockState.rewind`` computes the one state it needs.
    """

    conv_window: torch.Tensor  # (batch, conv_dim, d_conv + L): the conv state before the chunk, then its L inputs
    # The chunked path (mamba-ssm's scan) keeps the scan's inputs and the state before the chunk:
    ssm_before: torch.Tensor | None = None  # (batch, nheads, headdim, d_state) fp32: the SSM state before the chunk
    x: torch.Tensor | None = None  # (batch, L, nheads, headdim): the scan's inputs
    dt: torch.Tensor | None = None  # (batch, L, nheads), raw (before dt_bias and softplus)
    B: torch.Tensor | None = None  # (batch, L, ngroups, d_state)
    A: torch.Tensor | None = None  # (nheads,)
    dt_bias: torch.Tensor | None = None  # (nheads,)
    # ... the short-chunk path (`MatMamba2.chunk_prenorm`) the state after every position, which its scan kernel
    # has in registers anyway: (L, batch, nheads, headdim, d_state) fp32, 128 KB a position for the shipped LM.
    states: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.states.shape[0] if self.states is not None else self.x.shape[1]


@dataclass
class BlockState:
    """Recurrent state of one block at one width (constant size per sequence)."""

    conv: torch.Tensor  # (batch, conv_dim, d_conv): the last d_conv pre-conv inputs
    ssm: torch.Tensor  # (batch, nheads, headdim, d_state), fp32
    width: int
    trace: StateTrace | None = None  # set by forward(..., keep_states=True); consumed by rewind

    def clone(self) -> BlockState:
        """An independent copy (no trace)."""
        return BlockState(self.conv.clone(), self.ssm.clone(), self.width)

    def copy_(self, other: BlockState) -> None:
        """Overwrite this state with ``other`` (same width and batch)."""
        if other.width != self.width:
            raise ValueError(f"cannot copy a width-{other.width} state into a width-{self.width} state")
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)
        self.trace = None

    def rewind(self, keep: int | torch.Tensor) -> None:
        """Go back to the state after the first ``keep`` (1..L) positions of the last traced chunk.

        ``keep`` may be a 0-dim int64 tensor on the state's device, for a CUDA graph that decides it on the
        device (speculative verification's accepted prefix): the same arithmetic then runs for every value,
        with no read-back, and the caller guarantees 1 <= keep <= L.
        """
        trace = self.trace
        if trace is None:
            raise ValueError("rewind needs the trace of the last chunk: run forward(..., keep_states=True) first")
        if isinstance(keep, torch.Tensor):
            self._rewind_on_device(trace, keep)
            return
        if not 1 <= keep <= trace.length:
            raise ValueError(f"keep must be in 1..{trace.length} (the traced chunk's length), got {keep}")
        d_conv = self.conv.shape[-1]
        self.trace = None
        if keep == trace.length:  # the state is already at the end of the chunk
            return
        self.conv.copy_(trace.conv_window[:, :, keep:keep + d_conv])
        if trace.states is not None:
            self.ssm.copy_(trace.states[keep - 1])
            return
        self.ssm.copy_(kernels.ssd_state_after(trace.x, trace.dt, trace.A, trace.B, trace.dt_bias, trace.ssm_before,
                                               keep))

    def _rewind_on_device(self, trace: StateTrace, keep: torch.Tensor) -> None:
        """``rewind`` with a device-side ``keep``: static shapes, so one CUDA graph serves every value."""
        if keep.dim() != 0 or keep.dtype != torch.int64:
            raise TypeError(f"a tensor keep must be 0-dim int64, got {keep.dtype} of shape {tuple(keep.shape)}")
        self.trace = None
        if trace.states is not None:  # one kernel: copies of what the chunk recorded
            kernels.rewind_select_triton([self.ssm], [trace.states], [self.conv], [trace.conv_window], keep)
            return
        d_conv = self.conv.shape[-1]
        window = keep + torch.arange(d_conv, device=keep.device)  # (d_conv,) positions in the conv window
        self.conv.copy_(trace.conv_window.index_select(2, window))
        if self.ssm.is_cuda:  # one kernel; it keeps the scan's own final state when keep == L
            kernels.ssd_rewind_triton(self.ssm, trace.ssm_before, trace.x, trace.dt, trace.A, trace.B, trace.dt_bias,
                                      keep)
            return
        after = kernels.ssd_state_after(trace.x, trace.dt, trace.A, trace.B, trace.dt_bias, trace.ssm_before, keep)
        # keep == L: the scan's own final state, as the host path keeps it
        self.ssm.copy_(torch.where(keep == trace.length, self.ssm, after))


@dataclass(frozen=True)
class BlockSlices:
    """The parameters one width uses, ready for the kernels."""

    dims: NestedDims
    in_proj_w: torch.Tensor  # (2*di + d_bc + h, d_model)
    in_proj_b: torch.Tensor | None
    conv_w: torch.Tensor  # (conv_dim, d_conv)
    conv_b: torch.Tensor | None
    dt_bias: torch.Tensor  # (h,)
    A: torch.Tensor  # (h,) = -exp(A_log), fp32
    D: torch.Tensor  # (h,)
    norm_w: torch.Tensor  # (di,)
    out_proj_w: torch.Tensor  # (d_model, di)
    out_proj_b: torch.Tensor | None


class MatMamba2(nn.Module):
    """Mamba2 mixer with Matryoshka-nested inner width.

    `MatMamba2(d_model=512, d_state=128)` or `MatMamba2(config=MatMamba2Config(...))`.
    Parameter names match mamba-ssm's `Mamba2`, so its checkpoints load unchanged.
    `max_width` < d_model builds only the first channels (a partially loaded edge block).
    """

    def __init__(self, d_model: int | None = None, *, config: MatMamba2Config | None = None,
                 max_width: int | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            if d_model is None:
                raise TypeError("MatMamba2 needs d_model=... or config=MatMamba2Config(...)")
            config = MatMamba2Config(d_model=d_model, **kwargs)
        elif d_model is not None or kwargs:
            raise TypeError("pass either config=... or keyword sizes, not both")
        self.config = cfg = config
        self.max_width = cfg.check_width(max_width if max_width is not None else cfg.d_model)
        full = nested_dims(cfg, self.max_width)
        self.d_model = cfg.d_model
        # Compatibility with the original MatMamba code: set mixnmatch=True and
        # mixnmatch_dims=w to make every call of this block use width w.
        self.mixnmatch = False
        self.mixnmatch_dims = self.max_width
        self.in_proj = nn.Linear(cfg.d_model, full.in_proj_dim, bias=cfg.bias)
        self.conv1d = nn.Conv1d(full.conv_dim, full.conv_dim, cfg.d_conv, groups=full.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(full.nheads))
        self.A_log = nn.Parameter(torch.empty(full.nheads))
        self.D = nn.Parameter(torch.ones(full.nheads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(full.d_inner))
        self.out_proj = nn.Linear(full.d_inner, cfg.d_model, bias=cfg.bias)
        self._slice_cache: dict[int, tuple[tuple, BlockSlices]] = {}
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        """Mamba2 initialisation of dt_bias (inverse softplus of log-uniform dt) and A."""
        cfg, h = self.config, self.dt_bias.numel()
        u = torch.rand(h, generator=generator)
        dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        lo, hi = cfg.A_init_range
        self.A_log.copy_(torch.empty(h).uniform_(lo, hi, generator=generator).log())
        self.D.fill_(1.0)

    # ------------------------------------------------------------ widths and slices

    def resolve_width(self, mrl_level: int | None = None, width: int | None = None) -> int:
        """The width a call uses: explicit width, else the mixnmatch attributes, else d_model // level."""
        if width is not None and mrl_level is not None:
            raise ValueError("give mrl_level or width, not both")
        if width is None:
            if mrl_level is None and self.mixnmatch:
                width = int(self.mixnmatch_dims)
            else:
                width = self.config.width_for_level(1 if mrl_level is None else mrl_level)
        self.config.check_width(width)
        if width > self.max_width:
            raise ValueError(f"width {width} exceeds this block's loaded width {self.max_width}")
        return width

    def _params(self) -> dict[str, torch.Tensor | None]:
        return {
            "in_proj.weight": self.in_proj.weight, "in_proj.bias": self.in_proj.bias,
            "conv1d.weight": self.conv1d.weight[:, 0], "conv1d.bias": self.conv1d.bias,
            "dt_bias": self.dt_bias, "A_log": self.A_log, "D": self.D,
            "norm.weight": self.norm.weight, "out_proj.weight": self.out_proj.weight,
        }

    def _build_slices(self, width: int) -> BlockSlices:
        params = self._params()
        cut = {
            name: None if params[name] is None else take(params[name], dim, ranges)
            for name, (dim, ranges) in nested_ranges(self.config, width, self.max_width).items()
        }
        return BlockSlices(
            dims=nested_dims(self.config, width),
            in_proj_w=cut["in_proj.weight"], in_proj_b=cut["in_proj.bias"],
            conv_w=cut["conv1d.weight"], conv_b=cut["conv1d.bias"],
            dt_bias=cut["dt_bias"], A=-torch.exp(cut["A_log"].float()), D=cut["D"],
            norm_w=cut["norm.weight"], out_proj_w=cut["out_proj.weight"], out_proj_b=self.out_proj.bias,
        )

    def slices(self, width: int) -> BlockSlices:
        """Parameters for `width`. Under autograd they are rebuilt each call (so gradients flow);
        in inference they are built once per width and reused until a weight changes."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self._build_slices(width)
        # (inference tensors, e.g. a model built under inference_mode, keep no version counter)
        key = tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in self.parameters())
        hit = self._slice_cache.get(width)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                built = self._build_slices(width)
                contiguous = {f.name: getattr(built, f.name) for f in fields(built)}
                for name, value in contiguous.items():
                    if isinstance(value, torch.Tensor):
                        contiguous[name] = value.contiguous()
                hit = (key, BlockSlices(**contiguous))
            self._slice_cache[width] = hit
        return hit[1]

    def allocate_state(self, batch: int, width: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> BlockState:
        dims = nested_dims(self.config, self.resolve_width(width=width))
        device = device or self.out_proj.weight.device
        dtype = dtype or self.out_proj.weight.dtype
        return BlockState(
            conv=torch.zeros(batch, dims.conv_dim, dims.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch, dims.nheads, dims.headdim, dims.d_state, device=device, dtype=torch.float32),
            width=width,
        )

    # ------------------------------------------------------------ compute

    def forward(self, u: torch.Tensor, mrl_level: int | None = None, *, width: int | None = None,
                state: BlockState | None = None, keep_states: bool = False) -> torch.Tensor:
        """u: (batch, length, d_model) -> (batch, length, d_model).

        With `state`, the sequence continues from it and it is updated to the end of u.
        `keep_states` (with `state`) also records the state after every position in `state.trace`,
        so that `state.rewind(t)` can return to the state after the first t positions.
        """
        if keep_states and state is None:
            raise ValueError("keep_states needs a state to continue from (allocate_state)")
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"expected input (batch, length, {self.d_model}), got {tuple(u.shape)}")
        width = self.resolve_width(mrl_level, width)
        if state is not None and state.width != width:
            raise ValueError(f"state was allocated for width {state.width}, the call uses width {width}")
        s = self.slices(width)
        d = s.dims
        zxbcdt = F.linear(u, s.in_proj_w, s.in_proj_b)  # (B, L, 2*di + d_bc + h)
        if state is None and kernels.fused_path_available(u, d.conv_dim):
            return self._fused(zxbcdt, s)
        z, xbc, dt = torch.split(zxbcdt, [d.d_inner, d.conv_dim, d.nheads], dim=-1)
        history = None if state is None else state.conv[:, :, 1:].clone()
        initial = None if state is None else state.ssm
        window = None
        if state is not None:
            window = torch.cat([state.conv, xbc.transpose(1, 2).to(state.conv.dtype)], dim=-1)  # (B, conv, d_conv+L)
            state.conv.copy_(window[:, :, -d.d_conv:])
        xbc = kernels.causal_conv(xbc, s.conv_w, s.conv_b, history)
        x, B, C = torch.split(xbc, [d.d_inner, d.d_bc // 2, d.d_bc // 2], dim=-1)
        x = x.unflatten(-1, (d.nheads, d.headdim))  # (B, L, h, p)
        B = B.unflatten(-1, (d.ngroups, d.d_state))  # (B, L, g, n)
        y, final = kernels.ssd_scan(x, dt, s.A, B, C.unflatten(-1, (d.ngroups, d.d_state)), s.D, s.dt_bias,
                                    self.config.chunk_size, initial_states=initial)
        if state is not None:
            trace = StateTrace(window, initial.clone(), x, dt, B, s.A, s.dt_bias) if keep_states else None
            state.ssm.copy_(final)
            state.trace = trace
        y = kernels.gated_rmsnorm(y.flatten(-2), z, s.norm_w, self.config.norm_eps, d.ngroups,
                                  self.config.norm_before_gate)
        return F.linear(y, s.out_proj_w, s.out_proj_b)

    def _fused(self, zxbcdt: torch.Tensor, s: BlockSlices) -> torch.Tensor:
        cfg = self.config
        return kernels.fused_block(
            zxbcdt, conv1d_weight=s.conv_w, conv1d_bias=s.conv_b, dt_bias=s.dt_bias, A=s.A, D=s.D,
            chunk_size=cfg.chunk_size, activation="silu", rmsnorm_weight=s.norm_w, rmsnorm_eps=cfg.norm_eps,
            outproj_weight=s.out_proj_w, outproj_bias=s.out_proj_b, headdim=s.dims.headdim,
            ngroups=s.dims.ngroups, norm_before_gate=cfg.norm_before_gate,
        )

    def step(self, u: torch.Tensor, state: BlockState) -> torch.Tensor:
        """One token: u (batch, d_model) -> (batch, d_model); updates `state` in place."""
        s = self.slices(state.width)
        return self._step(kernels.decode_linear(u, s.in_proj_w, s.in_proj_b), s, state)

    def step_prenorm(self, h: torch.Tensor, residual: torch.Tensor | None, norm: nn.RMSNorm, residual_in_fp32: bool,
                     state: BlockState) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm residual block's decode step: ``step(norm(residual + h))`` (residual None: the first block).

        Returns (this mixer's output, residual + h). Where ``kernels.use_add_rmsnorm_gemv`` allows it, the add,
        the norm, in_proj and the conv step are one kernel; otherwise `kernels.add_rmsnorm`, then `step`'s
        projection.
        """
        s = self.slices(state.width)
        if kernels.use_add_rmsnorm_gemv(h, residual, s.in_proj_w):
            conv = kernels.ConvStep(state.conv, s.conv_w, s.conv_b, s.dims.d_inner)
            zxbcdt, residual = kernels.add_rmsnorm_gemv_triton(h, residual, norm.weight, norm.eps, residual_in_fp32,
                                                              s.in_proj_w, s.in_proj_b, conv)
            return self._step(zxbcdt, s, state, conv_done=True), residual
        normed, residual = kernels.add_rmsnorm(h, residual, norm, residual_in_fp32)
        return self._step(kernels.decode_linear(normed, s.in_proj_w, s.in_proj_b), s, state), residual

    def short_chunk_ok(self, h: torch.Tensor, width: int) -> bool:
        """Whether `chunk_prenorm` runs on a chunk h (L, d_model) at this width (`kernels.use_short_chunk`, one norm
        group with the gate before the norm, as `gated_gemv_triton` takes it)."""
        s = self.slices(width)
        return (s.dims.ngroups == 1 and not self.config.norm_before_gate and h.dtype == s.out_proj_w.dtype
                and kernels.use_short_chunk(h, s.in_proj_w) and kernels.use_short_chunk(h, s.out_proj_w))

    def chunk_prenorm(self, h: torch.Tensor, residual: torch.Tensor | None, norm: nn.RMSNorm, residual_in_fp32: bool,
                      state: BlockState, window: torch.Tensor | None = None,
                      states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`step_prenorm` over a short chunk of one sequence: h (L, d_model), the L positions in order, from
        ``state``; updates it to the end of the chunk and records the state after every position in its trace
        (``keep_states``), for `BlockState.rewind`. Three kernels, as a decode step's: the add + norm + in_proj with
        the chunk's causal conv in its epilogue (`kernels.ConvChunk`), the scan over the positions
        (`kernels.ssd_chunk_triton`), the gated norm + out_proj. Where `short_chunk_ok` says so. ``window``
        (1, conv_dim, d_conv + L) and ``states`` (L, *state.ssm.shape) fp32: buffers for the trace (allocated here
        when None)."""
        s = self.slices(state.width)
        d = s.dims
        length = h.shape[0]
        if window is None:
            window = torch.empty(1, d.conv_dim, d.d_conv + length, device=h.device, dtype=state.conv.dtype)
        conv = kernels.ConvChunk(state.conv, s.conv_w, s.conv_b, d.d_inner, window)
        zxbcdt, residual = kernels.add_rmsnorm_gemv_triton(h, residual, norm.weight, norm.eps, residual_in_fp32,
                                                          s.in_proj_w, s.in_proj_b, conv)
        z, xbc, dt = torch.split(zxbcdt, [d.d_inner, d.conv_dim, d.nheads], dim=-1)
        if states is None:
            states = torch.empty(length, *state.ssm.shape, device=h.device, dtype=torch.float32)
        y = kernels.ssd_chunk_triton(state.ssm, xbc, dt, s.A, s.D, s.dt_bias, d.ngroups, states)
        state.trace = StateTrace(window, states=states)
        tiling = kernels.normed_gemv_tiling(length, d.d_inner, positions=True)
        return kernels.gated_gemv_triton(y, z, s.norm_w, self.config.norm_eps, s.out_proj_w, s.out_proj_b,
                                         tiling), residual

    def _step(self, zxbcdt: torch.Tensor, s: BlockSlices, state: BlockState, conv_done: bool = False) -> torch.Tensor:
        """The rest of a decode step after in_proj: zxbcdt (batch, 2*di + d_bc + h) -> (batch, d_model).
        ``conv_done``: in_proj's kernel has run the conv step on the xBC rows (`kernels.ConvStep`)."""
        state.trace = None
        d = s.dims
        z, xbc, dt = torch.split(zxbcdt, [d.d_inner, d.conv_dim, d.nheads], dim=-1)
        if not conv_done:
            xbc = kernels.causal_conv_step(state.conv, xbc, s.conv_w, s.conv_b)
        x, B, C = torch.split(xbc, [d.d_inner, d.d_bc // 2, d.d_bc // 2], dim=-1)
        y = kernels.ssd_step(
            state.ssm, x.unflatten(-1, (d.nheads, d.headdim)), dt, s.A,
            B.unflatten(-1, (d.ngroups, d.d_state)), C.unflatten(-1, (d.ngroups, d.d_state)), s.D, s.dt_bias,
        )
        y = y.flatten(-2)
        if kernels.use_gated_gemv(y, z, s.out_proj_w, d.ngroups, self.config.norm_before_gate):
            return kernels.gated_gemv_triton(y, z, s.norm_w, self.config.norm_eps, s.out_proj_w, s.out_proj_b)
        y = kernels.gated_rmsnorm(y, z, s.norm_w, self.config.norm_eps, d.ngroups, self.config.norm_before_gate)
        return kernels.decode_linear(y, s.out_proj_w, s.out_proj_b)
