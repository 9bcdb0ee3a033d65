"""Dense products for the model's layers, with the gradients XLA:CPU runs fast.

On the CPU, XLA's YNNPACK dot kernels take (f32, f32) -> f32 and (bf16, bf16) -> f32 with row-major operands and
the left operand contracted on its minor axis (``IsDotSupportedByYnn``, xla/backends/cpu/ynn_support.cc); any other
dot runs in Eigen, and in bfloat16 is first converted to float32 (on an AMX Xeon ~200-250 GFLOP/s against
~1,000-1,400). So here: products accumulate in float32 (``_dot_f32``), a weight gradient x^T g reads a row-major
copy of x^T (``transposed_copy``), and x @ w^T is one dot (``matmul_t``). Elsewhere (GPU, TPU) plain products.
Tested: tests/test_model.py (gradients equal autodiff of the plain product; every dot of a bf16 step in bf16).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

_layout_copies: bool | None = None  # None: on when the process has one device (``layout_copies``)


@contextlib.contextmanager
def layout_copies(enabled: bool):
    """Force the layout-constrained copies on or off for what is traced inside (tests; the default is on when
    the process has a single device: under a multi-device mesh the constraint is not partitioned, XLA gathers the
    whole operand onto every device, and ``transposed_copy`` falls back to an optimization-barrier copy)."""
    global _layout_copies
    before, _layout_copies = _layout_copies, enabled
    try:
        yield
    finally:
        _layout_copies = before


def _use_layout_copies() -> bool:
    if jax.default_backend() != "cpu":
        return False
    return _layout_copies if _layout_copies is not None else jax.device_count() == 1


def _row_major(x):
    """x, constrained to a row-major layout on the CPU (see ``layout_copies``)."""
    if not _use_layout_copies():
        return x
    return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))


def transposed_copy(x):
    """x with its last two axes swapped, on the CPU as a row-major copy. A dot contracting its left operand's
    leading (non-minor) axis -- x^T g for a weight gradient -- is not taken by XLA:CPU's YNNPACK kernels; a plain
    transpose gets folded back into the dot (layout assignment makes it a bitcast), and the dot runs in Eigen:
    in float32 ~2.4x slower at the LM-head shape on an AVX2 Xeon, in bfloat16 converted to float32 first (~200
    against ~1,000 GFLOP/s on an AMX Xeon). The layout constraint makes the copy real; with several devices an
    optimization barrier stands in (``layout_copies``), which is not the same: XLA:CPU expands barriers before
    layout assignment and fusion, so there the dot may still get the transposed operand (correct, not the fast
    path). Elsewhere (GPU, TPU) a transpose."""
    xt = x.transpose((*range(x.ndim - 2), x.ndim - 1, x.ndim - 2))
    if jax.default_backend() != "cpu":
        return xt
    return _row_major(xt) if _use_layout_copies() else jax.lax.optimization_barrier(xt)


def _dot_f32(a, b, contract=(1, 0)):
    """a @ b (or, with ``contract=(1, 1)``, a @ b.T without a transpose op), accumulated and returned in float32.
    XLA:CPU runs a bfloat16 dot that returns bfloat16 on a slow path (~230 GFLOP/s on an AMX Xeon against
    ~1,000-1,400 for the same dot returning float32: AMX tiles), so the CPU's dense-layer products ask for float32
    and round afterwards."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def to_residual(x):
    """A value saved for the backward pass, as stored: on the CPU a bfloat16 array is kept as its uint16 bits. A
    scan over layers stacks each layer's residuals with a dynamic-update-slice, and XLA:CPU normalizes a bfloat16
    one to float32 over the whole stacked buffer (convert, update, convert back: the full [L, ...] buffer every
    layer); on uint16 it is an in-place update of one slice. ``from_residual`` undoes it (a bitcast either way)."""
    if x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def from_residual(x):
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


@jax.custom_vjp
def _matmul_cpu(x, ws):
    return tuple(_dot_f32(x, w).astype(x.dtype) for w in ws)


def _matmul_cpu_fwd(x, ws):
    # the residual is x^T, copied here (``transposed_copy``) rather than in the backward: there, with the layers in
    # a scan, XLA fuses the transpose with the read of the stacked residual into a generic loop ~10x slower than
    # its transpose kernel (issue #2 shape, bfloat16: ~200 of ~1,200 ms per step). One copy for all the weights
    # that read x (q, k, v; gate, up): saved once, not once per product.
    return _matmul_cpu(x, ws), (to_residual(transposed_copy(x)), tuple(map(to_residual, ws)))


def _matmul_cpu_bwd(res, gs):
    xt, ws = from_residual(res[0]), tuple(map(from_residual, res[1]))
    # dX = sum_i g_i w_i^T, each one dot (no transpose op), summed in float32; dW = x^T g from a row-major copy of
    # x^T (``transposed_copy``: the copy is the size of x; the dot that reads it runs on YNNPACK instead of Eigen).
    # Measured on an AMX Xeon, issue #2 shape, layers in a Python loop: bfloat16 930 -> 1,419 tokens/s; float32
    # unchanged (875 vs 883).
    dx = sum(_dot_f32(g, w, contract=(1, 1)) for g, w in zip(gs, ws))
    return dx.astype(xt.dtype), tuple(_dot_f32(xt, g).astype(w.dtype) for g, w in zip(gs, ws))


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N, D] @ w [D, F] for the dense layers, in x's dtype. On the CPU it accumulates in float32 (``_dot_f32``)
    and its gradient computes dW as a row-major matmul (``_matmul_cpu_bwd``); elsewhere it is the plain product
    (autodiff's transposed dot is the fast one there, and GPU/TPU bfloat16 dots accumulate in float32 anyway)."""
    return matmuls(x, (w,))[0]


def matmuls(x: jax.Array, ws) -> tuple[jax.Array, ...]:
    """(x @ w for w in ws): ``matmul`` for several weights reading the same x, whose backward saves x (as x^T)
    once and sums dX in float32."""
    if jax.default_backend() == "cpu":
        assert x.ndim == 2 and all(w.ndim == 2 for w in ws), (x.shape, [w.shape for w in ws])
        return _matmul_cpu(x, tuple(ws))
    return tuple(x @ w for w in ws)


@jax.custom_vjp
def _matmul_t_cpu(x, w):
    return _dot_f32(x, w, contract=(1, 1)).astype(x.dtype)


def _matmul_t_cpu_fwd(x, w):
    return _matmul_t_cpu(x, w), (to_residual(transposed_copy(x)), to_residual(w))  # x^T as in ``_matmul_cpu_fwd``


def _matmul_t_cpu_bwd(res, g):
    xt, w = map(from_residual, res)
    # dW [V, D] = (x^T g)^T: the dot reads a copy of x^T (small) rather than of g^T (logits-sized) and writes a
    # row-major [D, V], transposed once (SmolLM2 head in bf16: 113 vs 195 ms for the g^T form)
    dw = _row_major(_dot_f32(xt, g)).T
    return _dot_f32(g, w).astype(xt.dtype), dw.astype(w.dtype)


_matmul_t_cpu.defvjp(_matmul_t_cpu_fwd, _matmul_t_cpu_bwd)


def matmul_t(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N, D] @ w.T for w [F, D] (the tied LM head: the embedding [V, D]), in x's dtype; on the CPU as one dot
    contracting both minor axes (``x @ w.T`` hands XLA:CPU a column-major right operand, which in bfloat16 it
    converts to float32 first) with the gradient computed the way ``matmul``'s is."""
    if jax.default_backend() == "cpu":
        assert x.ndim == 2 and w.ndim == 2, (x.shape, w.shape)
        return _matmul_t_cpu(x, w)
    return x @ w.T


@jax.custom_vjp
def _swiglu_cpu(gate, up):
    return jax.nn.silu(gate) * up


def _swiglu_cpu_fwd(gate, up):
    return _swiglu_cpu(gate, up), (to_residual(gate), to_residual(up))


def _swiglu_cpu_bwd(res, g):
    gate, up = map(from_residual, res)
    dts = gate.dtype, up.dtype
    gate, up, g = gate.astype(jnp.float32), up.astype(jnp.float32), g.astype(jnp.float32)
    s = jax.nn.sigmoid(gate)
    # d silu(x) / dx = s (1 + x (1 - s))
    return (g * up * s * (1 + gate * (1 - s))).astype(dts[0]), (g * gate * s).astype(dts[1])


_swiglu_cpu.defvjp(_swiglu_cpu_fwd, _swiglu_cpu_bwd)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, the MLP's gated activation. On the CPU with its own VJP: it saves only gate and up (as
    ``to_residual``; autodiff saved silu(gate) and the sigmoid too) and computes its gradient in float32."""
    if jax.default_backend() == "cpu":
        return _swiglu_cpu(gate, up)
    return jax.nn.silu(gate) * up
