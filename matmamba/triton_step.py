"""Triton kernels of the decode step, imported only where Triton is (CUDA): see matmamba/kernels.py."""

import triton
import triton.language as tl


@triton.jit
def conv_window(state_ptr, x_ptr, w_ptr, b_ptr, c, s_c, s_w, w_c, w_w,
                WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr):
    """SiLU(conv) of channels c over (the state's last WIDTH - 1 inputs, x), rounded to x's dtype."""
    acc = tl.load(x_ptr + c).to(tl.float32) * tl.load(w_ptr + c * w_c + (WIDTH - 1) * w_w).to(tl.float32)
    for k in tl.static_range(WIDTH - 1):
        v = tl.load(state_ptr + c * s_c + (k + 1) * s_w).to(tl.float32)
        acc += v * tl.load(w_ptr + c * w_c + k * w_w).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    out = acc * tl.sigmoid(acc)
    return out.to(x_ptr.dtype.element_ty).to(tl.float32)  # as the two-kernel path stores it


@triton.jit
def shift_in(state_ptr, x_ptr, c, s_c, s_w, mask, WIDTH: tl.constexpr):
    """Drop the oldest input of channels c from the conv state and append x."""
    for k in tl.static_range(WIDTH - 1):
        v = tl.load(state_ptr + c * s_c + (k + 1) * s_w, mask=mask)
        tl.store(state_ptr + c * s_c + k * s_w, v, mask=mask)
    x = tl.load(x_ptr + c, mask=mask)
    tl.store(state_ptr + c * s_c + (WIDTH - 1) * s_w, x.to(state_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_ssm_step_kernel(xbc_ptr, conv_ptr, w_ptr, cb_ptr, dt_ptr, dtb_ptr, a_ptr, d_ptr, ssm_ptr, y_ptr,
                         count_ptr, nheads, d_inner, x_b, dt_b, c_b, c_c, c_w, w_c, w_w, s_b, s_h, s_p, s_n, y_b,
                         HEADDIM: tl.constexpr, DSTATE: tl.constexpr, NGROUPS: tl.constexpr,
                         WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One program per (sequence, head); see matmamba.kernels.conv_ssm_step_triton."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    group = head // (nheads // NGROUPS)
    xbc = xbc_ptr + row * x_b
    conv = conv_ptr + row * c_b
    p = tl.arange(0, HEADDIM)
    n = tl.arange(0, DSTATE)
    cx = head * HEADDIM + p
    x = conv_window(conv, xbc, w_ptr, cb_ptr, cx, c_c, c_w, w_c, w_w, WIDTH, HAS_BIAS)
    B = conv_window(conv, xbc, w_ptr, cb_ptr, d_inner + group * DSTATE + n, c_c, c_w, w_c, w_w, WIDTH, HAS_BIAS)
    C = conv_window(conv, xbc, w_ptr, cb_ptr, d_inner + (NGROUPS + group) * DSTATE + n, c_c, c_w, w_c, w_w,
                    WIDTH, HAS_BIAS)
    shift_in(conv, xbc, cx, c_c, c_w, cx >= 0, WIDTH)  # this head's own channels
    dt = tl.load(dt_ptr + row * dt_b + head).to(tl.float32) + tl.load(dtb_ptr + head).to(tl.float32)
    dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, as selective_state_update
    decay = tl.exp(tl.load(a_ptr + head).to(tl.float32) * dt)
    state_ptrs = ssm_ptr + row * s_b + head * s_h + p[:, None] * s_p + n[None, :] * s_n
    state = tl.load(state_ptrs) * decay + (B * dt)[None, :] * x[:, None]
    tl.store(state_ptrs, state)
    y = tl.sum(state * C[None, :], axis=1) + x * tl.load(d_ptr + head).to(tl.float32)
    tl.store(y_ptr + row * y_b + cx, y.to(y_ptr.dtype.element_ty))
    # Every program of this row has read the B / C conv state once the counter reaches nheads:
    # the one that takes it there shifts that state and resets the counter for the next step.
    before = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
    last = (before + n * 0) == nheads - 1
    for g in tl.static_range(2 * NGROUPS):
        shift_in(conv, xbc, d_inner + g * DSTATE + n, c_c, c_w, last, WIDTH)
    tl.store(count_ptr + row + n * 0, n * 0, mask=last & (n == 0))
