"""Diagonal Fisher information of a classifier on its source task (the paper's estimator, exact and fast).

    F_j = (1/m) Σ_i Σ_k f_k(x_i) (∂ log f_k(x_i) / ∂w_j)²          (method="exact")

``mc`` replaces the inner expectation by ``samples`` labels drawn from the model's own prediction (unbiased);
``empirical`` uses the true label only (offered for comparison: it is *not* the Fisher). The square is taken
per example, never on a batch-averaged gradient.

Two backends compute the per-example gradients, both in eval mode (BatchNorm running statistics):
- ``hooks``: one batched forward recording each layer's input; per label column, one backward to the input
  whose tensor hooks collect the gradient at every Linear / Conv / BatchNorm / LayerNorm / GroupNorm output;
  per-example weight gradients from the layer formulas (im2col + batched matmul, or the batch-as-groups
  convolution), squared layer by layer. Needs every trainable parameter to sit in such a layer.
- ``func``: ``torch.func`` (``vmap`` over examples of a ``vjp`` shared by that example's label columns), for
  any model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2sp.errors import L2SPError
from l2sp.io import load_tensors, save_tensors
from l2sp.reference import strip_prefix

__all__ = ["METHODS", "FisherDict", "check_matches", "class_weights", "estimate", "load", "save", "summary"]

METHODS = ("exact", "mc", "empirical")
BACKENDS = ("auto", "hooks", "func")
FORMAT = "l2sp.fisher/1"


class FisherDict(dict):
    """``{parameter name: diagonal Fisher tensor}`` carrying ``.metadata`` (method, examples, ...)."""

    def __init__(
        self, tensors: Mapping[str, Tensor] | Iterable = (), metadata: Mapping[str, Any] | None = None
    ):
        super().__init__(tensors)
        self.metadata: dict[str, Any] = dict(metadata or {})


# --------------------------------------------------------------------------------------------- label columns
def class_weights(p: Tensor) -> Tensor:
    """w_c = p_c (1 − 2 p_c + Σ_k p_k²) = p_c ‖e_c − p‖²: predicts class c's share of the example's Fisher."""
    return p * (1 - 2 * p + (p * p).sum(-1, keepdim=True))


def _columns(
    p: Tensor,
    y: Tensor | None,
    method: str,
    samples: int,
    classes: int | None,
    tail_samples: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Label columns per example: (class index (B, m), weight (B, m), predicted captured share (B,) or None).

    The estimate of example n is Σ_j weight[n, j] · (∂ log p_{index[n, j]}(x_n) / ∂w)².
    """
    B, K = p.shape
    if method == "empirical":
        return y.view(B, 1), torch.ones(B, 1, dtype=p.dtype, device=p.device), None
    if method == "mc":
        idx = torch.multinomial(p, samples, replacement=True, generator=generator)
        return idx, torch.full((B, samples), 1.0 / samples, dtype=p.dtype, device=p.device), None
    if classes is None or classes >= K:
        return torch.arange(K, device=p.device).expand(B, K), p, None
    w = class_weights(p).clamp_min(0)
    top = w.topk(classes, dim=-1).indices
    total = w.sum(-1)
    kept = w.gather(1, top).sum(-1)
    share = torch.where(total > 0, kept / total.clamp_min(torch.finfo(p.dtype).tiny), torch.ones_like(total))
    idx, wt = [top], [p.gather(1, top)]
    if tail_samples > 0:
        tail = w.scatter(1, top, 0.0)
        mass = tail.sum(-1, keepdim=True)
        has_tail = mass.squeeze(-1) > 0
        q = torch.where(
            has_tail[:, None],
            tail / mass.clamp_min(torch.finfo(p.dtype).tiny),
            torch.full_like(tail, 1.0 / K),
        )
        draw = torch.multinomial(q, tail_samples, replacement=True, generator=generator)
        qd = q.gather(1, draw)
        # importance weight p_c / (r q_c): unbiased for the tail sum Σ_{c ∉ top} p_c g_c²
        iw = torch.where(
            has_tail[:, None], p.gather(1, draw) / (tail_samples * qd.clamp_min(1e-300)), torch.zeros_like(qd)
        )
        idx.append(draw)
        wt.append(iw)
    return torch.cat(idx, 1), torch.cat(wt, 1), share


# ------------------------------------------------------------------------------------------- hooks backend
class _Unsupported(Exception):
    """The hooks backend cannot handle this model or this forward pass."""


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_WEIGHT = {
    nn.Conv1d: torch.nn.grad.conv1d_weight,
    nn.Conv2d: torch.nn.grad.conv2d_weight,
    nn.Conv3d: torch.nn.grad.conv3d_weight,
}
_MATMUL = (nn.Linear, *_CONVS)
_BLOCK_BYTES = 1 << 20  # CPU: per-example gradients computed and squared in blocks of about this size
_UNFOLD_BELOW = 32  # on CPU, im2col + bmm beats the grouped convolution below this many output positions
_SUPPORTED = {nn.Linear, *_CONVS, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm}


def _hooks_plan(model: nn.Module) -> dict[nn.Module, dict[str, str]] | str:
    """{module: {"weight"/"bias": parameter name}} covering every trainable parameter, or why that fails."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    plan: dict[nn.Module, dict[str, str]] = {}
    for mname, mod in model.named_modules():
        own = {a: p for a, p in mod.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        if type(mod) not in _SUPPORTED:  # exact types: a subclass may compute something else
            return f"{type(mod).__name__} ({mname or 'model'}) holds trainable parameters"
        if set(own) - {"weight", "bias"}:
            return f"{mname} has parameters other than weight/bias"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is None:
            return f"{mname} has no running statistics (examples would interact)"
        # a tied parameter appears under several modules: its per-example gradient sums over all its uses
        plan[mod] = {a: names[id(p)] for a, p in own.items()}
    return plan


def _accelerated(t: Tensor) -> bool:
    """On a GPU: im2col for every 1-D/2-D convolution and whole chunks at once (no cache blocking)."""
    return t.device.type != "cpu"


def _sumsq(g: Tensor) -> Tensor:
    """Σ_n g_n² over the leading (example) dimension (faster on CPU than einsum, vector_norm or a matmul)."""
    return (g * g).sum(0)


def _pad(mod: nn.Module, a: Tensor) -> Tensor:
    """Pad ``a`` as the convolution ``mod`` does before convolving without padding ('same', other modes)."""
    if mod.padding == "valid":
        return a
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    return F.pad(a, mod._reversed_padding_repeated_twice, mode=mode)


def _per_sample(mod: nn.Module, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    """Per-example gradients {attr: (n, *param.shape)} of ``mod`` from its input ``a``, output grad ``d``."""
    n = a.shape[0]
    out: dict[str, Tensor] = {}
    if isinstance(mod, nn.Linear):
        a3, d3 = a.reshape(n, -1, a.shape[-1]), d.reshape(n, -1, d.shape[-1])
        out["weight"] = torch.bmm(d3.transpose(1, 2), a3)
        out["bias"] = d3.sum(1)
    elif isinstance(mod, _CONVS):
        pre = isinstance(mod.padding, str) or mod.padding_mode != "zeros"
        a = _pad(mod, a) if pre else a
        pad = 0 if pre else mod.padding
        T = math.prod(d.shape[2:])
        if not isinstance(mod, nn.Conv3d) and (_accelerated(a) or T < _UNFOLD_BELOW):
            # im2col: G_n = Σ_t d_{n,:,t} u_{n,:,t}ᵀ
            pd = (0,) * (a.dim() - 2) if pre else tuple(mod.padding)
            if isinstance(mod, nn.Conv1d):
                a, k, dil, st, pd = (
                    a.unsqueeze(2),
                    (1, *mod.kernel_size),
                    (1, *mod.dilation),
                    (1, *mod.stride),
                    (0, *pd),
                )
            else:
                k, dil, st = mod.kernel_size, mod.dilation, mod.stride
            u = F.unfold(a, k, dilation=dil, padding=pd, stride=st)  # (n, C_in·k, T)
            g = mod.groups  # example n, group j: G = D Uᵀ, one batched matmul over (n, j)
            w = torch.bmm(d.reshape(n * g, -1, T), u.view(n * g, -1, T).transpose(1, 2))
        else:
            # the batch becomes groups of one convolution: the weight gradient of group i is example i's
            w = _CONV_WEIGHT[type(mod)](
                a.reshape(1, -1, *a.shape[2:]),
                (n * mod.out_channels, *mod.weight.shape[1:]),
                d.reshape(1, -1, *d.shape[2:]),
                stride=mod.stride,
                padding=pad,
                dilation=mod.dilation,
                groups=n * mod.groups,
            )
        out["weight"] = w.reshape(n, *mod.weight.shape)
        out["bias"] = d.reshape(n, d.shape[1], -1).sum(-1)
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        # Σ_s d (a − μ)/σ = (Σ_s d·a − μ Σ_s d)/σ, with no normalised copy of the activations
        a3, d3 = a.reshape(n, a.shape[1], -1), d.reshape(n, d.shape[1], -1)
        sd = d3.sum(-1)
        out["weight"] = ((d3 * a3).sum(-1) - mod.running_mean.to(a.dtype) * sd) * torch.rsqrt(
            mod.running_var.to(a.dtype) + mod.eps
        )
        out["bias"] = sd
    elif isinstance(mod, nn.LayerNorm):
        xh = F.layer_norm(a, mod.normalized_shape, None, None, mod.eps)
        dims = tuple(range(1, a.dim() - len(mod.normalized_shape)))
        out["weight"] = (d * xh).sum(dims) if dims else d * xh
        out["bias"] = d.sum(dims) if dims else d
    elif isinstance(mod, nn.GroupNorm):
        xh = F.group_norm(a, mod.num_groups, None, None, mod.eps)
        dims = tuple(range(2, a.dim()))
        out["weight"] = (d * xh).sum(dims) if dims else d * xh
        out["bias"] = d.sum(dims) if dims else d
    return out


class _HooksEngine:
    """Batched forward capturing each layer's input; per-example gradients from layer-wise formulas.

    A tensor hook on every layer output receives ∂(cotangent · logits)/∂output during one backward pass to the
    input; tensor hooks see the value before any later in-place op (ReLU(inplace=True), +=): no copies.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: dict[nn.Module, dict[str, str]],
        acc: dict[str, Tensor],
        autocast: torch.dtype | None,
    ):
        self.model, self.plan, self.acc, self.autocast = model, plan, acc, autocast
        self.calls: list[tuple[nn.Module, Tensor, int]] = []
        self.grads: list[Tensor | None] = []

    def _hook(self, mod: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not isinstance(output, Tensor) or not inputs or not isinstance(inputs[0], Tensor):
            raise _Unsupported(f"{type(mod).__name__} did not map one tensor to one tensor")
        i = len(self.calls)
        self.calls.append((mod, inputs[0], inputs[0]._version))
        if output.requires_grad:  # else (called under no_grad) the layer contributes no gradient
            output.register_hook(lambda g: self.grads.__setitem__(i, g))

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise _Unsupported("the inputs are not floating point")
        self.calls = []
        self.x = x.detach().requires_grad_(True)  # the backward runs to the input, through every layer
        handles = [m.register_forward_hook(self._hook) for m in self.plan]
        try:
            with torch.enable_grad(), _autocast(x.device, self.autocast):
                logits = self.model(self.x)
        finally:
            for h in handles:
                h.remove()
        if any(a._version != v for _, a, v in self.calls):
            raise _Unsupported("a layer input was modified in place after the layer used it")
        return logits

    def accumulate(self, logits: Tensor, cot: _Cotangents) -> None:
        """Adds Σ_j Σ_n (per-example gradient of column j)² to ``acc``."""
        acc_dtype = self._acc_dtype
        uses: dict[str, int] = {}
        for mod, *_ in self.calls:
            for name in self.plan[mod].values():
                uses[name] = uses.get(name, 0) + 1
        for j in range(cot.columns):
            self.grads = [None] * len(self.calls)
            # retain_graph=True even on the last column: releasing saved tensors during a backward with tensor
            # hooks measured ~2x slower on CPU; the graph is dropped below instead
            torch.autograd.grad(logits, self.x, cot.column(j).to(logits.dtype), retain_graph=True)
            pending: dict[str, Tensor] = {}
            for (mod, a, _), d in zip(self.calls, self.grads):
                if d is None:
                    continue
                names = self.plan[mod]
                if (
                    isinstance(mod, nn.Linear)
                    and a.dim() == 2
                    and all(uses[nm] == 1 for nm in names.values())
                ):
                    # Σ_n (d_n ⊗ a_n)² = (d²)ᵀ (a²): no per-example tensor at all
                    d2, a2 = d.to(acc_dtype) ** 2, a.detach().to(acc_dtype) ** 2
                    if "weight" in names:
                        self.acc[names["weight"]] += d2.T @ a2
                    if "bias" in names:
                        self.acc[names["bias"]] += d2.sum(0)
                    continue
                # matmul-like layers in the autocast dtype (both operands alike); normalisations in acc_dtype
                ct = self.autocast if self.autocast is not None and isinstance(mod, _MATMUL) else acc_dtype
                a, d = a.detach().to(ct), d.to(ct)
                shared = any(uses[nm] > 1 for nm in names.values())
                n = a.shape[0]
                if shared or _accelerated(a):
                    step = n
                else:  # blocks of examples whose per-example gradients stay in cache: ~5x faster on CPU
                    numel = sum(p.numel() for p in mod.parameters(recurse=False))
                    step = max(1, _BLOCK_BYTES // (4 * numel))
                for s in range(0, n, step):
                    ps = _per_sample(mod, a[s : s + step], d[s : s + step])
                    for attr, name in names.items():
                        g = ps[attr].to(acc_dtype)
                        if not shared:
                            self.acc[name] += _sumsq(g)
                        else:  # a tied parameter: sum its per-example gradients over all uses, then square
                            pending[name] = pending[name] + g if name in pending else g
            for name, g in pending.items():
                self.acc[name] += _sumsq(g)
        self.calls, self.grads, self.x = [], [], None

    @property
    def _acc_dtype(self) -> torch.dtype:
        return next(iter(self.acc.values())).dtype


# -------------------------------------------------------------------------------------------- func backend
class _FuncEngine:
    """``vmap`` over examples of one ``vjp`` per example, ``vmap``-ed over that example's label columns."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        acc: dict[str, Tensor],
        autocast: torch.dtype | None,
        chunk_size: int,
    ):
        self.model, self.acc, self.autocast, self.chunk_size = model, acc, autocast, chunk_size
        named = dict(model.named_parameters())
        self.params = {n: named[n].detach() for n in names}
        self.others = {n: t.detach() for n, t in model.named_parameters() if n not in self.params}
        self.others.update({n: b for n, b in model.named_buffers()})

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad(), _autocast(x.device, self.autocast):
            return self.model(x)

    def accumulate(self, x: Tensor, cot: _Cotangents) -> None:
        from torch.func import functional_call, vjp, vmap

        model, others, autocast, acc_dtype = self.model, self.others, self.autocast, self._acc_dtype

        def one(xi: Tensor, ci: Tensor) -> dict[str, Tensor]:
            def logits(params: dict[str, Tensor]) -> Tensor:
                with _autocast(xi.device, autocast):
                    return functional_call(model, (params, others), (xi.unsqueeze(0),)).squeeze(0)

            out, pull = vjp(logits, self.params)
            (g,) = vmap(pull)(ci.to(out.dtype))
            return {n: (t.to(acc_dtype) ** 2).sum(0) for n, t in g.items()}

        step = max(1, self.chunk_size // cot.columns)  # at most chunk_size per-example gradients at once
        for s in range(0, x.shape[0], step):
            sq = vmap(one)(x[s : s + step], cot.rows(s, s + step))
            for n, t in sq.items():
                self.acc[n] += t.sum(0)

    @property
    def _acc_dtype(self) -> torch.dtype:
        return next(iter(self.acc.values())).dtype


# ------------------------------------------------------------------------------------------------ estimate
def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else _Null()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _unpack(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    if isinstance(batch, Mapping) and isinstance(batch.get("x", batch.get("input")), Tensor):
        return batch.get("x", batch.get("input")), batch.get("y", batch.get("label"))
    raise L2SPError(
        f"cannot read a batch of type {type(batch).__name__}; pass a DataLoader of (x, y) or of x"
    )


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise L2SPError(f"{name} must be an integer >= {minimum}, got {value!r}")


def estimate(
    model: nn.Module,
    data: Iterable,
    *,
    method: str = "exact",
    samples: int = 1,
    max_examples: int | None = None,
    classes: int | None = None,
    tail_samples: int = 1,
    chunk_size: int = 64,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> FisherDict:
    """Diagonal Fisher F_j = (1/m) Σ_i Σ_k f_k(x_i) (∂ log f_k(x_i)/∂w_j)² over the examples of ``data``.

    - ``method="exact"``: all K classes per example (K per-example backward passes). With ``classes=c < K``,
      the c classes of largest w_k = p_k(1 − 2p_k + Σp²) are kept exactly and ``tail_samples`` more are drawn
      from the rest with probability ∝ w_k and importance-weighted (unbiased; ``tail_samples=0`` truncates).
      The predicted captured share Σ_kept w / Σ w is reported in ``.metadata["predicted_share"]``.
    - ``method="mc"``: ``samples`` labels drawn per example from the model's prediction (unbiased).
    - ``method="empirical"``: the true label's squared per-example gradient (not the Fisher; for comparison).

    ``data``: iterable of ``(x, y, ...)`` or of ``x`` batches; ``max_examples`` caps the number of inputs.
    The model runs in eval mode and is returned in the mode it came in. ``chunk_size`` bounds the number of
    per-example gradients held at once. Returns float ``dtype`` tensors on ``device`` keyed like
    ``model.named_parameters()`` (trainable parameters only), as a :class:`FisherDict` with ``.metadata``.
    """
    if method not in METHODS:
        raise L2SPError(f"unknown Fisher method {method!r}; choose one of {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise L2SPError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_int("samples", samples, 1)
    _check_int("max_examples", max_examples, 1, allow_none=True)
    _check_int("classes", classes, 1, allow_none=True)
    _check_int("tail_samples", tail_samples, 0)
    _check_int("chunk_size", chunk_size, 1)
    if samples != 1 and method != "mc":
        raise L2SPError(f"samples={samples} is for method='mc'; use method='mc' or drop samples")
    if classes is not None and method != "exact":
        raise L2SPError(f"classes={classes} is for method='exact'; use method='exact' or drop classes")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise L2SPError(
            "the model has no trainable parameters (requires_grad=True); unfreeze the ones to estimate"
        )
    names = [n for n, _ in trainable]
    model_device = trainable[0][1].device
    acc_dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in trainable) else torch.float32
    acc = {n: torch.zeros(p.shape, dtype=acc_dtype, device=model_device) for n, p in trainable}

    plan = _hooks_plan(model)
    if backend == "hooks" and isinstance(plan, str):
        raise L2SPError(f"backend='hooks' cannot handle this model: {plan}; use backend='func'")
    use_hooks = backend == "hooks" or (backend == "auto" and not isinstance(plan, str))
    engines: dict[bool, Any] = {}

    def engine(hooks: bool) -> Any:
        if hooks not in engines:
            engines[hooks] = (
                _HooksEngine(model, plan, acc, autocast)
                if hooks
                else _FuncEngine(model, names, acc, autocast, chunk_size)
            )
        return engines[hooks]

    total = max_examples
    if total is None:
        try:
            total = len(data.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            total = None
    from tqdm.auto import tqdm

    if isinstance(data, Tensor):  # one batch of inputs
        data = [data]
    n_seen, shares, columns = 0, [], 0
    was_training = model.training
    model.eval()
    try:
        with tqdm(
            total=total,
            desc=f"fisher ({method})",
            unit="ex",
            disable=None if progress is None else not progress,
            leave=False,
        ) as bar:
            for bi, batch in enumerate(data):
                x, y = _unpack(batch)
                if max_examples is not None:
                    x = x[: max_examples - n_seen]
                    y = None if y is None else y[: max_examples - n_seen]
                if method == "empirical" and y is None:
                    raise L2SPError("method='empirical' needs true labels; pass a DataLoader of (x, y)")
                for s in range(0, len(x), chunk_size):
                    xs = x[s : s + chunk_size].to(model_device, non_blocking=True)
                    ys = None if y is None else y[s : s + chunk_size].to(model_device, non_blocking=True)
                    while True:
                        eng = engine(use_hooks)
                        try:
                            logits = eng.forward(xs)
                            cot, share = _cotangents(
                                logits, ys, bi, method, samples, classes, tail_samples, generator, acc_dtype
                            )
                            eng.accumulate(logits if use_hooks else xs, cot)
                            del logits  # frees the graph before the next chunk's forward
                            break
                        except _Unsupported as exc:
                            if backend == "hooks":
                                raise L2SPError(f"backend='hooks' failed: {exc}; use backend='func'") from exc
                            use_hooks = False
                    columns = cot.columns
                    if share is not None:
                        shares.append(share)
                n_seen += len(x)
                bar.update(len(x))
                if max_examples is not None and n_seen >= max_examples:
                    break
    finally:
        model.train(was_training)
    if n_seen == 0:
        raise L2SPError("the data yielded no examples; pass a non-empty DataLoader of source inputs")
    meta: dict[str, Any] = {
        "method": method,
        "examples": n_seen,
        "columns_per_example": columns,
        "backend": "hooks" if use_hooks else "func",
    }
    if method == "mc":
        meta["samples"] = samples
    if method == "exact" and classes is not None:
        meta.update(classes=classes, tail_samples=tail_samples)
        if shares:
            meta["predicted_share"] = float(torch.cat(shares).mean())
    out = {n: (t / n_seen).to(device=device, dtype=dtype) for n, t in acc.items()}
    return FisherDict(out, meta)


def _cotangents(
    logits: Tensor,
    y: Tensor | None,
    batch_index: int,
    method: str,
    samples: int,
    classes: int | None,
    tail_samples: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> tuple[_Cotangents, Tensor | None]:
    """Cotangents √w_j (e_{c_j} − p) on the logits (a backward gives √w_j ∂ log p_{c_j}/∂w), and the share."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise L2SPError(
            "the model must return logits of shape (batch, classes); wrap it to select its output"
        )
    z = logits.detach().to(dtype)
    if not torch.isfinite(z).all():
        raise L2SPError(
            f"the model produced NaN/Inf logits on batch {batch_index}; check that batch's inputs "
            "and the model's weights"
        )
    p = torch.softmax(z, -1)
    B, K = p.shape
    if y is not None and method == "empirical":
        y = y.long().view(-1)
        if y.numel() != B or bool(((y < 0) | (y >= K)).any()):
            raise L2SPError(
                f"labels of batch {batch_index} are not class indices in [0, {K}); "
                "pass integer labels of the source task"
            )
    idx, w, share = _columns(p, y, method, samples, classes, tail_samples, generator)
    return _Cotangents(idx, w.clamp_min(0).sqrt(), p), share


class _Cotangents:
    """Cotangents √w_j (e_{c_j} − p) on the logits, built per label column (never all m·B·K at once)."""

    def __init__(self, idx: Tensor, sw: Tensor, p: Tensor):
        self.idx, self.sw, self.p = idx, sw, p
        self.columns = idx.shape[1]

    def column(self, j: int) -> Tensor:
        """(B, K) for column j."""
        c = self.p * -self.sw[:, j : j + 1]
        return c.scatter_add_(1, self.idx[:, j : j + 1], self.sw[:, j : j + 1])

    def rows(self, start: int, stop: int) -> Tensor:
        """(b, m, K) for examples start..stop, every column."""
        sw, idx = self.sw[start:stop], self.idx[start:stop]
        c = self.p[start:stop, None, :] * -sw[..., None]
        return c.scatter_add_(2, idx[..., None], sw[..., None])


# --------------------------------------------------------------------------------------------- file format
def _validate(fisher: Mapping[str, Tensor]) -> None:
    if not fisher:
        raise L2SPError("the Fisher dictionary is empty; estimate it with l2sp.fisher.estimate first")
    for n, t in fisher.items():
        if not isinstance(t, Tensor):
            raise L2SPError(f"fisher[{n!r}] is a {type(t).__name__}, not a tensor; pass {{name: tensor}}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise L2SPError(
                f"fisher[{n!r}] has negative, NaN or Inf values; a diagonal Fisher is finite and >= 0"
            )


def save(path: str | os.PathLike, fisher: Mapping[str, Tensor], **metadata: Any) -> Path:
    """Write ``fisher`` as safetensors, atomically, with JSON metadata (method, examples, names, shapes, ...).

    ``fisher.metadata`` (from :func:`estimate`) is included; keyword arguments (e.g. ``source_dataset=``) win.
    """
    _validate(fisher)
    meta: dict[str, Any] = dict(getattr(fisher, "metadata", {}) or {})
    meta.update(metadata)
    meta.update(format=FORMAT, names=list(fisher), shapes={n: list(t.shape) for n, t in fisher.items()})
    return save_tensors(path, fisher, {k: json.dumps(v, default=str) for k, v in meta.items()})


def load(path: str | os.PathLike, model: nn.Module | None = None) -> FisherDict:
    """Read a file written by :func:`save`; with ``model`` (the source model), check names and shapes."""
    tensors, raw = load_tensors(path)
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    shapes = meta.get("shapes")
    if isinstance(shapes, dict):
        for n, t in tensors.items():
            if n in shapes and list(t.shape) != list(shapes[n]):
                raise L2SPError(
                    f"{path}: tensor {n!r} has shape {list(t.shape)} but its metadata says "
                    f"{shapes[n]}; the file is corrupt, re-create it"
                )
    fisher = FisherDict({n: tensors[n] for n in meta.get("names", tensors) if n in tensors} or tensors, meta)
    _validate(fisher)
    if model is not None:
        check_matches(fisher, model)
    return fisher


def check_matches(
    fisher: Mapping[str, Tensor],
    expected: nn.Module | Mapping[str, Sequence[int] | Tensor],
    *,
    require: Iterable[str] | None = None,
) -> None:
    """Check that ``fisher`` fits ``expected`` (a model, or {name: shape or tensor}), else raise L2SPError.

    Every Fisher name must exist in ``expected`` with the same shape, and every name of ``require`` (default:
    trainable parameters of a model, all names of a mapping) must be in ``fisher``. Wrapper prefixes
    (``module.``, ``_orig_mod.``) are ignored.
    """
    if isinstance(expected, nn.Module):
        trainable = [(n, p) for n, p in expected.named_parameters() if p.requires_grad]
        shapes = {strip_prefix(n): tuple(p.shape) for n, p in trainable}
    else:
        shapes = {
            strip_prefix(n): tuple(v.shape if isinstance(v, Tensor) else v) for n, v in expected.items()
        }
    have = {strip_prefix(n): tuple(t.shape) for n, t in fisher.items()}
    unknown = sorted(set(have) - set(shapes))
    if unknown:
        raise L2SPError(
            f"Fisher entries {unknown[:3]}{' ...' if len(unknown) > 3 else ''} match no trainable "
            "parameter of the model; estimate the Fisher on this (source) model"
        )
    bad = [f"{n} {list(have[n])} vs {list(shapes[n])}" for n in have if have[n] != shapes[n]]
    if bad:
        raise L2SPError(
            f"Fisher shapes differ from the model's: {'; '.join(bad[:3])}; estimate the Fisher on "
            "this (source) model"
        )
    need = set(shapes) if require is None else {strip_prefix(n) for n in require}
    missing = sorted(need - set(have))
    if missing:
        raise L2SPError(
            f"the Fisher lacks {len(missing)} parameter(s), e.g. {missing[:3]}; estimate it on a "
            "model holding them"
        )


# ---------------------------------------------------------------------------------------------- statistics
def summary(
    fisher: Mapping[str, Tensor], quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)
) -> list[dict[str, Any]]:
    """Per tensor: name, shape, numel, mean, min, max and the given quantiles ("q0.25", ...) of its values."""
    import numpy as np

    rows = []
    for n, t in fisher.items():
        v = t.detach().to("cpu", torch.float64).reshape(-1).numpy()
        row: dict[str, Any] = {"name": n, "shape": list(t.shape), "numel": int(v.size)}
        if v.size:
            row.update(mean=float(v.mean()), min=float(v.min()), max=float(v.max()))
            qs = np.quantile(v, list(quantiles))
            row.update({f"q{q:g}": float(x) for q, x in zip(quantiles, qs)})
        rows.append(row)
    return rows
