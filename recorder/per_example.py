"""Per-example gradient contributions of one module call, from its inputs and output gradient.

Given the output gradient g = ∂L/∂y of the loss that was actually backpropagated, each example's
share of a parameter's .grad follows in closed form for the common layers (so loss reduction,
scaling and accumulation come out right by construction). Weight matrices stay factored as
c_i = Σ_t left_t ⊗ right_t, so projections never need the full per-example gradient.
Other modules fall back to torch.func: vmap over examples of the gradient of ⟨module(x_i), g_i⟩.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from attrib.schemas import projection


@dataclass
class Dense:
    """Per-example contributions given in full: values (B, *shape)."""

    values: torch.Tensor

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    def slice(self, start: int, stop: int) -> Dense:
        return Dense(self.values[start:stop])

    def dense(self) -> torch.Tensor:
        return self.values

    def total(self) -> torch.Tensor:
        return self.values.sum(0)

    def kron(self, r_l: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
        b = self.values.shape[0]
        c = self.values.reshape(b, r_l.shape[1], r_r.shape[1])
        return (r_l @ c @ r_r.T).reshape(b, -1)


@dataclass
class Outer:
    """c_i = Σ_t left[i, t] ⊗ right[i, t], reshaped to `shape`.

    left is (B, T, m), or with `ids` (B, T) the one-hot rows of an (m = vocabulary) identity.
    """

    left: torch.Tensor | None
    right: torch.Tensor  # (B, T, n)
    shape: tuple[int, ...]
    ids: torch.Tensor | None = None
    vocab: int = 0

    @property
    def rows(self) -> int:
        return self.right.shape[0]

    def with_dense_left(self) -> Outer:
        """The same contributions with an Embedding's index rows as one-hot left factors."""
        if self.ids is None:
            return self
        return Outer(F.one_hot(self.ids, self.vocab).to(self.right.dtype), self.right,
                     self.shape)

    def slice(self, start: int, stop: int) -> Outer:
        return Outer(None if self.left is None else self.left[start:stop],
                     self.right[start:stop], self.shape,
                     None if self.ids is None else self.ids[start:stop], self.vocab)

    def dense(self) -> torch.Tensor:
        b, _, n = self.right.shape
        if self.ids is None:
            out = self.left.transpose(1, 2) @ self.right
        else:
            out = self.right.new_zeros(b, self.vocab, n)
            out.scatter_add_(1, self.ids.unsqueeze(-1).expand(-1, -1, n), self.right)
        return out.reshape(b, *self.shape)

    def total(self) -> torch.Tensor:
        n = self.right.shape[-1]
        right = self.right.reshape(-1, n)
        if self.ids is None:
            return (self.left.reshape(-1, self.left.shape[-1]).T @ right).reshape(self.shape)
        out = right.new_zeros(self.vocab, n)
        return out.index_add_(0, self.ids.reshape(-1), right).reshape(self.shape)

    def kron(self, r_l: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
        left = r_l.T[self.ids] if self.ids is not None else self.left @ r_l.T  # (B, T, k_l)
        return (left.transpose(1, 2) @ (self.right @ r_r.T)).reshape(self.right.shape[0], -1)

    def kron_sum(self, r_l: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
        """Σ_i of kron's rows without them: Σ_i Σ_t (R_l l_it)(R_r r_it)ᵀ is one product of
        the factors' projections over all (example, token) pairs."""
        n = self.right.shape[-1]
        left = (r_l.T[self.ids.reshape(-1)] if self.ids is not None
                else self.left.reshape(-1, self.left.shape[-1]) @ r_l.T)  # (B·T, k_l)
        return (left.T @ (self.right.reshape(-1, n) @ r_r.T)).reshape(-1)


PerExample = Dense | Outer
LOW_RANK_OVERSAMPLE, LOW_RANK_ITERATIONS = 4, 2


def low_rank(c: Outer, rank: int) -> Outer:
    """Each example's best rank-`rank` approximation of C_i = Σ_t l_t ⊗ r_t = L_iᵀ R_i, as
    `rank` factor pairs, without forming C_i: randomized range finding with power iterations
    (Halko, Martinsson & Tropp 2011), then an exact SVD of the small projected matrix."""
    # (B, T, m), (B, T, n); half precision has no QR/SVD kernels: those run in float32
    left, right = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                   for t in (c.left, c.right))
    k = min(rank + LOW_RANK_OVERSAMPLE, left.shape[1])
    g = torch.Generator(device=right.device).manual_seed(0)
    omega = torch.randn(right.shape[-1], k, generator=g, device=right.device, dtype=right.dtype)

    def times(vectors: torch.Tensor) -> torch.Tensor:  # C_i V: (B, n, k) → (B, m, k)
        return left.transpose(1, 2) @ (right @ vectors)

    def times_transposed(vectors: torch.Tensor) -> torch.Tensor:  # C_iᵀ U: → (B, n, k)
        return right.transpose(1, 2) @ (left @ vectors)

    basis = torch.linalg.qr(times(omega.expand(left.shape[0], -1, -1))).Q
    for _ in range(LOW_RANK_ITERATIONS):
        basis = torch.linalg.qr(times(torch.linalg.qr(times_transposed(basis)).Q)).Q
    small = times_transposed(basis).transpose(1, 2)  # Qᵀ C_i: (B, k, n)
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    new_left = (basis @ u[..., :rank]) * s[:, None, :rank]  # (B, m, r)
    return Outer(new_left.transpose(1, 2), vh[:, :rank], c.shape)


def project(c: PerExample, shape: tuple[int, ...], kind: str, k: int, seed: int, name: str
            ) -> torch.Tensor:
    """(B, k) projection of the contributions, by the contract in schemas/projection.py (the
    split a new recording fits to the shape)."""
    factors = _kron_factors(shape, kind, k, seed, name, _values(c))
    if factors is not None:
        return c.kron(*factors)
    return projection.project(c.dense(), shape, kind, k, seed, name)  # kron unsplit: dense


def project_sum(c: PerExample, shape: tuple[int, ...], kind: str, k: int, seed: int, name: str
                ) -> torch.Tensor:
    """(k,) projection of Σ_i c_i, as project(...).sum(0) up to rounding, without the rows
    (the step's check sketch of factored rows). Dense rows: their sum, projected once."""
    factors = (_kron_factors(shape, kind, k, seed, name, c.right) if isinstance(c, Outer)
               else None)
    if factors is not None:
        return c.kron_sum(*factors)
    return project_tensor(c.total(), kind, k, seed, name)


def project_tensor(values: torch.Tensor, kind: str, k: int, seed: int, name: str
                   ) -> torch.Tensor:
    """(k,) projection R v of one tensor shaped as the parameter (the step's gradient, for
    the check Σ_i R c_i = R G): project() of it as a single row."""
    return project(Dense(values[None]), tuple(values.shape), kind, k, seed, name)[0]


def _values(c: PerExample) -> torch.Tensor:
    return c.right if isinstance(c, Outer) else c.values


def _kron_factors(shape: tuple[int, ...], kind: str, k: int, seed: int, name: str,
                  like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """R_l, R_r on `like`'s device and dtype; None where the projection is dense."""
    return _kron_factors_on(shape, kind, k, seed, name, like.device, like.dtype)


def release_factors() -> None:
    """Drop the cached factors (a recording's close: on a GPU they hold device memory)."""
    _kron_factors_on.cache_clear()


@lru_cache(maxsize=1024)
def _kron_factors_on(shape: tuple[int, ...], kind: str, k: int, seed: int, name: str,
                     device: torch.device, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One lookup per module call instead of the split, the matrix view, two cached Gaussians
    and two casts (~50 µs of Python per call: the GPT's 15 projected tensors called it 30 times
    a step)."""
    split = projection.split_for(kind, k, shape)
    if split is None:
        return None
    return tuple(r.to(device, dtype) for r in
                 projection.kron_factors(seed, name, split, *projection.matrix_view(shape)))


# -- closed-form rules ------------------------------------------------------------------------
# A rule takes (module, args, kwargs, grad_output) for one call whose batch is dim 0 and returns
# {local parameter name: PerExample}.

Rule = Callable[[nn.Module, tuple, dict, torch.Tensor], dict[str, PerExample]]


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, *, n) → (B, T, n): leading non-batch dims are summed over like tokens."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def linear_rule(module: nn.Linear, args, kwargs, g):
    a, g3 = _tokens(args[0].detach()), _tokens(g)
    out: dict[str, PerExample] = {"weight": Outer(g3, a, tuple(module.weight.shape))}
    if module.bias is not None:
        out["bias"] = Dense(g3.sum(1))
    return out


def hf_conv1d_rule(module: nn.Module, args, kwargs, g):
    """Hugging Face's Conv1D (GPT-2): y = x W + b with W (in, out), a Linear transposed."""
    a, g3 = _tokens(args[0].detach()), _tokens(g)
    return {"weight": Outer(a, g3, tuple(module.weight.shape)), "bias": Dense(g3.sum(1))}


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, recognised without importing transformers."""
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith(
        "transformers") and getattr(module, "weight", None) is not None
        and tuple(module.weight.shape) == (getattr(module, "nx", None),
                                            getattr(module, "nf", None)))


MHA_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")


def mha_supported(module: nn.MultiheadAttention) -> bool:
    """The configurations mha_rule covers: one packed in_proj_weight, no bias_k/bias_v or zero
    attention, no attention dropout (a recompute would draw other dropout masks)."""
    return (module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn
            and module.dropout == 0.0)


def mha_rule(module: nn.MultiheadAttention, args, kwargs, g):
    """nn.MultiheadAttention in closed form. The attention is recomputed once for the batch by
    PyTorch's own F.multi_head_attention_forward (so masks and causality mean what they mean
    there) on q, k, v projected outside it (identity projections inside) and with an identity
    output projection; one backward of the output gradient then gives every example's dq, dk,
    dv (examples don't interact in attention) and the attention output o. The projections
    are Linears: in_proj_weight gets Σ_t [dq_t; dk_t; dv_t] ⊗ [x_q,t; x_k,t; x_v,t] block by
    block, out_proj.weight Σ_t g_t ⊗ o_t."""
    call = {**dict(zip(MHA_ARGUMENTS, args)), **kwargs}
    inputs = [call[n].detach() for n in ("query", "key", "value")]
    if inputs[0].dim() != 3:
        raise ValueError("unbatched MultiheadAttention input (2-d query) is not supported")
    if module.batch_first:  # F.multi_head_attention_forward takes (T, B, d)
        inputs, g = [x.transpose(0, 1) for x in inputs], g.transpose(0, 1)
    d = module.embed_dim
    weight = module.in_proj_weight.detach()
    bias = module.in_proj_bias.detach() if module.in_proj_bias is not None else None
    eye, zeros = torch.eye(d, dtype=g.dtype, device=g.device), g.new_zeros(3 * d)
    with torch.enable_grad():
        qkv = [F.linear(x, w, None if bias is None else b).requires_grad_()
               for x, w, b in zip(inputs, weight.chunk(3), (bias.chunk(3) if bias is not None
                                                            else (None,) * 3))]
        o, _ = F.multi_head_attention_forward(
            *qkv, d, module.num_heads, None, zeros, None, None, False, 0.0, eye, zeros[:d],
            training=False, key_padding_mask=call.get("key_padding_mask"), need_weights=False,
            attn_mask=call.get("attn_mask"), use_separate_proj_weight=True, q_proj_weight=eye,
            k_proj_weight=eye, v_proj_weight=eye, is_causal=bool(call.get("is_causal")))
        grads = torch.autograd.grad(o, qkv, g @ module.out_proj.weight.detach())
    first = [t.transpose(0, 1) for t in (*grads, *inputs, o.detach(), g)]  # batch first
    dq, dk, dv, xq, xk, xv, attended, g = first
    blank = torch.zeros_like(dq)
    left = torch.cat([torch.cat(parts, -1) for parts in
                      ((dq, blank, blank), (blank, dk, blank), (blank, blank, dv))], 1)
    out: dict[str, PerExample] = {
        "in_proj_weight": Outer(left, torch.cat([xq, xk, xv], 1), tuple(weight.shape)),
        "out_proj.weight": Outer(g, attended, tuple(module.out_proj.weight.shape))}
    if bias is not None:
        out["in_proj_bias"] = Dense(torch.cat([dq.sum(1), dk.sum(1), dv.sum(1)], -1))
    if module.out_proj.bias is not None:
        out["out_proj.bias"] = Dense(g.sum(1))
    return out


def embedding_rule(module: nn.Embedding, args, kwargs, g):
    ids = args[0].reshape(args[0].shape[0], -1)
    g3 = _tokens(g)
    if module.padding_idx is not None:  # torch gives the padding row no gradient
        g3 = g3 * (ids != module.padding_idx).unsqueeze(-1)
    return {"weight": Outer(None, g3, tuple(module.weight.shape), ids=ids,
                            vocab=module.num_embeddings)}


def layer_norm_rule(module: nn.LayerNorm, args, kwargs, g):
    x = args[0].detach()
    dims = len(module.normalized_shape)
    normalized = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    batch_dims = tuple(range(1, x.dim() - dims))
    out: dict[str, PerExample] = {}
    if module.weight is not None:  # in place: a second activation-sized buffer per call
        # cost more in page faults than the multiplication itself (2026-12-01)
        products = normalized.mul_(g)
        out["weight"] = Dense(products.sum(batch_dims) if batch_dims else products)
    if module.bias is not None:
        out["bias"] = Dense(g.sum(batch_dims) if batch_dims else g)
    return out


def conv_rule(module: nn.Conv1d | nn.Conv2d, args, kwargs, g):
    x = args[0].detach()
    if isinstance(module, nn.Conv1d):
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, dilation, padding, stride = ((1, *module.kernel_size), (1, *module.dilation),
                                             (0, *module.padding), (1, *module.stride))
    else:
        kernel, dilation, padding, stride = (module.kernel_size, module.dilation, module.padding,
                                             module.stride)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C·k, L)
    g3 = g.reshape(g.shape[0], g.shape[1], -1)  # (B, C_out, L)
    out: dict[str, PerExample] = {
        "weight": Outer(g3.transpose(1, 2), patches.transpose(1, 2), tuple(module.weight.shape))}
    if module.bias is not None:
        out["bias"] = Dense(g3.sum(2))
    return out


def _conv_supported(module: nn.Module) -> bool:
    return (module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


RULES: dict[type, Rule] = {nn.Linear: linear_rule, nn.Embedding: embedding_rule,
                           nn.LayerNorm: layer_norm_rule, nn.Conv1d: conv_rule,
                           nn.Conv2d: conv_rule}


# the tensors each rule hands over as dense factors (an Outer without ids): Factored stores them
FACTORED: dict[Rule, tuple[str, ...]] = {
    linear_rule: ("weight",), conv_rule: ("weight",), hf_conv1d_rule: ("weight",),
    mha_rule: ("in_proj_weight", "out_proj.weight"), embedding_rule: ("weight",)}


def closed_form_rule(module: nn.Module) -> Rule | None:
    """The closed-form rule for a module, or None when it needs the generic path."""
    rule = RULES.get(type(module))
    if rule is None and isinstance(module, nn.Linear):  # subclasses that keep F.linear
        rule = linear_rule
    if rule is None and is_hf_conv1d(module):
        rule = hf_conv1d_rule
    if rule is conv_rule and not _conv_supported(module):
        return None
    if rule is embedding_rule and (module.sparse or module.scale_grad_by_freq
                                   or module.max_norm is not None):
        return None
    return rule


# -- generic fallback --------------------------------------------------------------------------
UNBATCHED_KWARGS = frozenset({"attn_mask", "mask", "src_mask", "tgt_mask", "memory_mask"})


def batch_dim(module: nn.Module) -> int:
    """Where the examples are in a module's inputs and outputs (1 for a MultiheadAttention or
    recurrent layer that is not batch_first)."""
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and not module.batch_first:
        return 1
    return 0


def generic_contributions(module: nn.Module, names: list[str], args: tuple, kwargs: dict,
                          g: torch.Tensor, batch: int) -> dict[str, PerExample]:
    """Per-example gradients of `names` (module-relative) by vmap over examples of
    ∇_θ ⟨module(x_i), g_i⟩. Tensor inputs with `batch` rows in the batch dim are split per
    example; the rest (masks, flags) are shared."""
    bdim = batch_dim(module)
    params = {n: module.get_parameter(n).detach() for n in names}

    def batched(name: str | None, value: Any) -> bool:
        if not isinstance(value, torch.Tensor) or name in UNBATCHED_KWARGS:
            return False
        dim = 0 if name is not None else bdim  # key_padding_mask-style kwargs are batch-first
        return value.dim() > dim and value.shape[dim] == batch

    arg_dims = tuple(bdim if batched(None, a) else None for a in args)
    kw_names = [k for k, v in kwargs.items() if batched(k, v)]
    fixed_kwargs = {k: v for k, v in kwargs.items() if k not in kw_names}

    def inner(theta, one_args, one_kwargs, one_g):
        full_args = [a.unsqueeze(d) if d is not None else a for a, d in zip(one_args, arg_dims)]
        full_kwargs = {**fixed_kwargs, **{k: v.unsqueeze(0) for k, v in one_kwargs.items()}}
        out = functional_call(module, theta, tuple(full_args), full_kwargs, strict=False)
        out = out[0] if isinstance(out, tuple) else out
        return (out.squeeze(bdim) * one_g).sum()

    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    per = vmap(grad(inner), in_dims=(None, arg_dims, dict.fromkeys(kw_names, 0), bdim))(
        params, detached, {k: kwargs[k].detach() for k in kw_names}, g)
    return {n: Dense(v) for n, v in per.items()}

