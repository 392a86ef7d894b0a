"""The LoRAMoE layer: a frozen linear plus N LoRA experts mixed per token by a softmax router.

    w(x) = softmax(W_g x)                                   (fp32, per token)
    y    = W0 x + b + (alpha / r) * sum_i w_i(x) B_i A_i dropout(x)

The experts are stored stacked, A = [A_1; ...; A_N] (N*r x in) and B = [B_1 ... B_N] (out x N*r), so the
sum over experts is two matrix products whatever N is: h = dropout(x) A^T, scale the i-th r-block of h by
w_i(x), then h B^T. That costs what one LoRA of rank N*r costs; no Python loop over experts.

What else keeps it at that cost (each measured in BENCHMARKS.md): the scaling and the residual add ride on the
output GEMM (addmm_ into the base output, no full-size temporary), and a custom autograd Function saves x, a
1-byte dropout mask, h and the router weights instead of every intermediate.

Under torch.compile the same forward and backward run as opaque operators (``loramoe::experts`` and its
backward, `torch.library.custom_op`): the compiler neither traces an in-place update of a Function's input (a
source of silent wrong gradients, PyTorch #180642) nor re-chooses what is saved for backward; it adds the base
output itself, where it can fuse the add into the next elementwise op.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import LoraMoeConfig
from .quantization import check_base_layer

_HALF = (torch.bfloat16, torch.float16)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the expert products: autocast's when it is on; else the input's when a half-precision base
    feeds fp32 adapters (fp32 master weights, products at the base's speed and activation size, as under autocast);
    else the adapter weights'. The router's softmax is fp32 whatever this is."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if x.dtype in _HALF and weight.dtype == torch.float32:
        return x.dtype
    return weight.dtype


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # the check is cheaper than a no-op dispatch (decoding: T = 1)


def _dropout_keep(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A Bernoulli(1 - p) keep mask (bool) shaped like ``x``, and the drop probability it really used.

    torch.rand costs one generator call per entry; here every 64-bit draw gives four 16-bit lanes, which makes the
    mask ~2.5x cheaper on CPU (it was the largest single cost of a training step after the GEMMs). p is rounded to
    a multiple of 2^-16 (0.05 -> 0.0500031); scaling by 1 / (1 - p_used) keeps E[dropout(x)] = x exact.
    """
    if torch.compiler.is_compiling():  # the compiler generates and compares random numbers in one fused kernel
        return torch.rand(x.shape, device=x.device) >= p, p
    k = round(p * 65536)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    return bits.view(torch.int16)[: x.numel()].view(x.shape) >= k - 32768, k / 65536


def _mask_as(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as 0/1 in ``dtype``. Through uint8: on CPU that cast is vectorised and ~5x faster than bool's,
    and products with a float mask are several times faster than with a bool one."""
    return keep.view(torch.uint8).to(dtype)


def _experts_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    router: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward maths on 2-D tensors (x: [T, in], all in one dtype). Returns (y, weights, h).

    h = dropout(x) A^T (``keep``: the dropout mask, None without dropout); hs = h * (router weight of each r-block's
    expert); y = residual + scale * hs B^T, accumulated in place into ``residual`` when given (the residual add and
    the scaling ride on the output GEMM: no full-size temporary).
    """
    t, n, r = x.shape[0], router.shape[0], lora_A.shape[0] // router.shape[0]
    logits = F.linear(x, router)
    h = F.linear(x if keep is None else x * _mask_as(keep, x.dtype), lora_A)  # [T, N*r]
    # [T, N], in fp32 as in the reference (fp64 stays fp64)
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    hs = (h.view(t, n, r) * _cast(weights, h.dtype).view(t, n, 1)).view(t, n * r)
    if residual is None:
        return F.linear(hs * scale, lora_B), weights, h
    return residual.view(t, lora_B.shape[0]).addmm_(hs, lora_B.t(), alpha=scale), weights, h


def _experts_backward(
    saved: tuple[torch.Tensor, ...], scale: float, needs: tuple[bool, ...], grad_out: torch.Tensor,
    grad_weights: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (x, router, A, B; None where ``needs`` says not needed) of `_experts_forward`, from what it saved:
    x, the dropout mask, router, A, B, h and the router weights. ``grad_weights`` is the gradient reaching the
    router weights from a loss on them (the LBC)."""
    x, keep, router, lora_A, lora_B, h, weights = saved
    need_x, need_router, need_A, need_B = needs
    t, n, dtype = x.shape[0], router.shape[0], h.dtype
    r = h.shape[1] // n
    gate = (weights * scale).to(dtype).view(t, n, 1)
    h3 = h.view(t, n, r)
    grad_y = grad_out.reshape(t, lora_B.shape[0])
    # (hs^T grad_y)^T rather than grad_y^T hs: the same product, ~3x faster on MKL (grad_y is read row-wise).
    grad_B = ((h3 * gate).view(t, n * r).T @ grad_y).T if need_B else None
    grad_hs = (grad_y @ lora_B).view(t, n, r)
    grad_h = (grad_hs * gate).view(t, n * r)
    grad_w = grad_weights + (grad_hs * h3).sum(-1, dtype=weights.dtype) * scale  # d loss / d weights
    grad_logits = (weights * (grad_w - (grad_w * weights).sum(-1, keepdim=True))).to(dtype)  # softmax backward
    if keep is not None:
        keep = _mask_as(keep, dtype)
    grad_x = grad_router = grad_A = None
    if need_router:
        grad_router = grad_logits.T @ x
    if need_A:
        grad_A = grad_h.T @ (x if keep is None else x * keep)
    if need_x:
        grad_x = grad_h @ lora_A
        if keep is not None:
            grad_x.mul_(keep)
        grad_x.addmm_(grad_logits, router)
    return grad_x, grad_router, grad_A, grad_B


class _MixExperts(torch.autograd.Function):
    """`_experts_forward` with a hand-written backward that keeps only x, the dropout mask (1 byte per entry
    rather than a dropped copy of x), h (T x N*r) and the router weights (T x N); the rest is recomputed.

    The router weights are a second output, so a loss on them (the LBC) reaches the router through this backward.
    """

    @staticmethod
    def forward(ctx, x, residual, router, lora_A, lora_B, keep, scale):
        y, weights, h = _experts_forward(x, residual, router, lora_A, lora_B, keep, scale)
        if residual is not None:
            ctx.mark_dirty(residual)
            y = residual
        ctx.save_for_backward(x, keep, router, lora_A, lora_B, h, weights)
        ctx.scale = scale
        return y, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_weights):
        need_x, need_residual, *need_weights = ctx.needs_input_grad[:5]
        grad_x, grad_router, grad_A, grad_B = _experts_backward(
            ctx.saved_tensors, ctx.scale, (need_x, *need_weights), grad_out, grad_weights
        )
        return grad_x, grad_out if need_residual else None, grad_router, grad_A, grad_B, None, None


# Under torch.compile: the same forward and backward as two opaque operators. The compiler traces only their fake
# (shape) functions and `_save_for_op_backward`; what runs is this file's code, also when a compiled graph comes
# from PyTorch's on-disk cache (a traced backward would be cached: an edited formula could then be served stale).
@torch.library.custom_op(
    "loramoe::experts", mutates_args=(),
    schema="(Tensor x, Tensor router, Tensor lora_A, Tensor lora_B, Tensor? keep, float scale) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def _mix_experts_op(x, router, lora_A, lora_B, keep, scale):
    """`_experts_forward` without a residual: (scale * hs B^T, router weights, h)."""
    return _experts_forward(x, None, router, lora_A, lora_B, keep, scale)


@_mix_experts_op.register_fake
def _(x, router, lora_A, lora_B, keep, scale):
    weights_dtype = torch.promote_types(x.dtype, torch.float32)
    t = x.shape[0]
    return x.new_empty(t, lora_B.shape[0]), x.new_empty(t, router.shape[0], dtype=weights_dtype), x.new_empty(t, lora_A.shape[0])


@torch.library.custom_op(
    "loramoe::experts_backward", mutates_args=(),
    schema="(Tensor grad_out, Tensor grad_weights, Tensor x, Tensor? keep, Tensor router, Tensor lora_A, "
           "Tensor lora_B, Tensor h, Tensor weights, float scale, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)",
)  # fmt: skip
def _mix_experts_backward_op(grad_out, grad_weights, x, keep, router, lora_A, lora_B, h, weights, scale, needs):
    """`_experts_backward`; a gradient that is not needed comes back empty (an operator returns tensors)."""
    saved = (x, keep, router, lora_A, lora_B, h, weights)
    grads = _experts_backward(saved, scale, tuple(needs), grad_out, grad_weights)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_mix_experts_backward_op.register_fake
def _(grad_out, grad_weights, x, keep, router, lora_A, lora_B, h, weights, scale, needs):
    grad_B = x.new_empty(lora_B.shape[::-1]).T  # the layout `_experts_backward` gives it
    grads = (x.new_empty(x.shape), x.new_empty(router.shape), x.new_empty(lora_A.shape), grad_B)
    return tuple(g if need else x.new_empty(0) for g, need in zip(grads, needs))


def _save_for_op_backward(ctx, inputs, output):
    x, router, lora_A, lora_B, keep, scale = inputs
    _, weights, h = output
    ctx.save_for_backward(x, keep, router, lora_A, lora_B, h, weights)
    ctx.scale = scale
    ctx.mark_non_differentiable(h)


def _op_backward(ctx, grad_out, grad_weights, _grad_h):
    x, keep, router, lora_A, lora_B, h, weights = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    grads = _mix_experts_backward_op(grad_out, grad_weights, x, keep, router, lora_A, lora_B, h, weights, ctx.scale,
                                     needs)  # fmt: skip
    return *(g if need else None for g, need in zip(grads, needs)), None, None


_mix_experts_op.register_autograd(_op_backward, setup_context=_save_for_op_backward)


def _inplace_root(residual: torch.Tensor) -> torch.Tensor | None:
    """The tensor that owns ``residual``'s memory, when updating it in place is safe and cheap; else None.

    A linear's output on 3-D input is a reshaping view of a 2-D product. Autograd handles an in-place update of
    a view by copying the whole gradient in backward (CopySlices), so the update goes to the owner, and the
    caller reshapes the result afresh.

    A view made inside a custom autograd Function (bitsandbytes' int8 matmul returns one, and its 4-bit matmul
    with a bias) has an owner outside the graph: updating that owner would bypass the Function's backward and
    lose the base's input gradient.
    """
    root = residual._base if residual._is_view() else residual
    if (root.is_leaf and root.requires_grad) or root.requires_grad != residual.requires_grad:
        return None
    same_memory = root.numel() == residual.numel() and root.storage_offset() == residual.storage_offset()
    if not (same_memory and root.is_contiguous() and residual.is_contiguous()):
        return None
    return root


def mix_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router: torch.Tensor,
    scaling: float,
    dropout: nn.Module,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, weights)``: y = residual + the experts' summed contribution [..., out] (just the contribution
    when ``residual`` is None), and the router weights [..., N] (fp32, or fp64 for fp64 inputs; differentiable
    w.r.t. router and x, so a loss on them trains the router).

    The router reads the un-dropped input; dropout (one mask shared by all experts) applies to the expert branch
    only. ``residual`` (the base layer's output) is updated in place when its dtype is the compute dtype and it
    owns its memory: the residual add then costs nothing beyond the output product. Under torch.compile the
    experts run as the operator ``loramoe::experts`` and the compiler adds the residual.
    """
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        raise TypeError(f"mix_experts takes an nn.Dropout or nn.Identity as dropout, not {type(dropout).__name__}.")
    dtype = _compute_dtype(x, lora_A)
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = _cast(x.reshape(-1, d_in), dtype)
    router, lora_A, lora_B = _cast(router, dtype), _cast(lora_A, dtype), _cast(lora_B, dtype)
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    keep = None  # bool mask: a quarter of the bytes of a dropped copy of x
    if p > 0:
        keep, p = _dropout_keep(x2, p)
    scale = scaling / (1.0 - p)

    root = None
    if torch.compiler.is_compiling():
        y, weights, _ = _mix_experts_op(x2, router, lora_A, lora_B, keep, scale)
    else:
        if residual is not None and residual.dtype == dtype:
            root = _inplace_root(residual)
        args = (x2, root, router, lora_A, lora_B, keep, scale)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
            y, weights = _MixExperts.apply(*args)
        else:
            y, weights, _ = _experts_forward(*args)
    y = y.view(*lead, lora_B.shape[0])
    if residual is not None and root is None:
        y = residual + y.to(residual.dtype)
    return y, weights.view(*lead, router.shape[0])


class LoraMoeLayer(BaseTunerLayer):
    """Adapter state of one wrapped linear; `Linear` below adds the forward."""

    adapter_layer_names = ("loramoe_A", "loramoe_B", "loramoe_router")
    other_param_names = ("r", "num_experts", "scaling", "loramoe_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.num_experts: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.loramoe_dropout = nn.ModuleDict({})
        self.loramoe_A = nn.ParameterDict({})
        self.loramoe_B = nn.ParameterDict({})
        self.loramoe_router = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        # Where router weights go during a forward; None (the default) costs one `if` per call.
        self._blc_sink: list[torch.Tensor] | None = None
        self._capture_sink: list[torch.Tensor] | None = None

        base = self.get_base_layer()
        check_base_layer(base, "base_layer")
        if isinstance(base, nn.Linear):  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear subclasses
            self.in_features, self.out_features = base.in_features, base.out_features
        else:  # GPT-2's Conv1D: weight is (in, out)
            self.in_features, self.out_features = base.weight.shape

    def update_layer(self, adapter_name: str, config: LoraMoeConfig) -> None:
        n, r = config.num_experts, config.r
        self.r[adapter_name] = r
        self.num_experts[adapter_name] = n
        self.scaling[adapter_name] = config.scaling
        self.loramoe_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.loramoe_A[adapter_name] = nn.Parameter(torch.empty(n * r, self.in_features))
        self.loramoe_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, n * r))
        self.loramoe_router[adapter_name] = nn.Parameter(torch.empty(n, self.in_features))
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Reference initialisation: each A_i and W_g kaiming-uniform(a=sqrt(5)), B zero."""
        # Stacking keeps fan_in = in_features, so one call draws each A_i exactly as the reference does.
        nn.init.kaiming_uniform_(self.loramoe_A[adapter_name], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.loramoe_router[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.loramoe_B[adapter_name])
        else:
            nn.init.normal_(self.loramoe_B[adapter_name], std=0.02)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "LoRAMoE cannot be merged into the base weights: the router mixes the experts per token."
        )


class Linear(nn.Module, LoraMoeLayer):
    """A frozen `nn.Linear` or `Conv1D` with LoRAMoE experts. The base weight is used in place, never copied."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraMoeConfig, **kwargs: Any) -> None:
        super().__init__()
        LoraMoeLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the experts' mixture. The base output tensor is updated in place (see `mix_experts`),
        so a forward hook on the base layer that keeps its output sees the sum."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.loramoe_A:
                continue
            result, weights = mix_experts(
                x,
                self.loramoe_A[name],
                self.loramoe_B[name],
                self.loramoe_router[name],
                self.scaling[name],
                self.loramoe_dropout[name],
                residual=result,
            )
            if self._blc_sink is not None:
                self._blc_sink.append(weights)
            if self._capture_sink is not None:
                self._capture_sink.append(weights.detach())
        return result

    def __repr__(self) -> str:
        return "loramoe." + super().__repr__()
