"""The ``hooks`` engine: per-example gradients from layer formulas, fed by one batched forward.

A forward hook on every parameterised layer records its input; per label column, one backward of the logits'
cotangent to the network input fills tensor hooks on the layer outputs with ∂(cotangent · logits)/∂output.
The per-example weight gradients then follow from the layer (G_n = D_n U_nᵀ for a Linear or, via im2col or the
batch-as-groups convolution, a Conv; Σ_s d·x̂ for the normalisations) and are squared layer by layer. Tensor
hooks see the value before any later in-place op (ReLU(inplace=True), +=): no copies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2sp.fisher.base import Unsupported, autocast
from l2sp.fisher.columns import Cotangents

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

Plan = dict[nn.Module, dict[str, str]]


def hooks_plan(model: nn.Module) -> Plan | str:
    """{module: {"weight"/"bias": parameter name}} covering every trainable parameter, or why that fails."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    plan: Plan = {}
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


# ------------------------------------------------------------------------------ per-example layer gradients
def _pad(mod: nn.Module, a: Tensor) -> Tensor:
    """Pad ``a`` as the convolution ``mod`` does before convolving without padding ('same', other modes)."""
    if mod.padding == "valid":
        return a
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    return F.pad(a, mod._reversed_padding_repeated_twice, mode=mode)


def _linear(mod: nn.Linear, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    """G_n = Σ_t d_{n,t} a_{n,t}ᵀ, b_n = Σ_t d_{n,t} (t: any positions between batch and features)."""
    n = a.shape[0]
    a3, d3 = a.reshape(n, -1, a.shape[-1]), d.reshape(n, -1, d.shape[-1])
    return {"weight": torch.bmm(d3.transpose(1, 2), a3), "bias": d3.sum(1)}


def _conv_unfold(mod: nn.Module, a: Tensor, d: Tensor, pre: bool) -> Tensor:
    """im2col: G_n = Σ_t d_{n,:,t} u_{n,:,t}ᵀ, one batched matmul over (example, group)."""
    n, T = a.shape[0], math.prod(d.shape[2:])
    pd = (0,) * (a.dim() - 2) if pre else tuple(mod.padding)
    if isinstance(mod, nn.Conv1d):
        a, k, dil, st, pd = a.unsqueeze(2), (1, *mod.kernel_size), (1, *mod.dilation), (1, *mod.stride), (0, *pd)
    else:
        k, dil, st = mod.kernel_size, mod.dilation, mod.stride
    u = F.unfold(a, k, dilation=dil, padding=pd, stride=st)  # (n, C_in·k, T)
    g = mod.groups
    return torch.bmm(d.reshape(n * g, -1, T), u.view(n * g, -1, T).transpose(1, 2))


def _conv_grouped(mod: nn.Module, a: Tensor, d: Tensor, pre: bool) -> Tensor:
    """The batch becomes groups of one convolution: the weight gradient of group i is example i's."""
    n = a.shape[0]
    return _CONV_WEIGHT[type(mod)](
        a.reshape(1, -1, *a.shape[2:]),
        (n * mod.out_channels, *mod.weight.shape[1:]),
        d.reshape(1, -1, *d.shape[2:]),
        stride=mod.stride,
        padding=0 if pre else mod.padding,
        dilation=mod.dilation,
        groups=n * mod.groups,
    )


def _conv(mod: nn.Module, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    """Per-example Conv1d/2d/3d gradients: im2col on GPU or for few output positions, else grouped conv."""
    n = a.shape[0]
    pre = isinstance(mod.padding, str) or mod.padding_mode != "zeros"  # pad here, convolve unpadded
    a = _pad(mod, a) if pre else a
    if not isinstance(mod, nn.Conv3d) and (_accelerated(a) or math.prod(d.shape[2:]) < _UNFOLD_BELOW):
        w = _conv_unfold(mod, a, d, pre)
    else:
        w = _conv_grouped(mod, a, d, pre)
    return {"weight": w.reshape(n, *mod.weight.shape), "bias": d.reshape(n, d.shape[1], -1).sum(-1)}


def _batch_norm(mod: nn.Module, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    """γ_n = Σ_s d (a − μ)/σ = (Σ_s d·a − μ Σ_s d)/σ with running μ, σ (no normalised copy); β_n = Σ_s d."""
    n = a.shape[0]
    a3, d3 = a.reshape(n, a.shape[1], -1), d.reshape(n, d.shape[1], -1)
    sd = d3.sum(-1)
    rstd = torch.rsqrt(mod.running_var.to(a.dtype) + mod.eps)
    return {"weight": ((d3 * a3).sum(-1) - mod.running_mean.to(a.dtype) * sd) * rstd, "bias": sd}


def _normalisation(mod: nn.Module, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    """LayerNorm / GroupNorm: γ_n = Σ d·x̂, β_n = Σ d over the non-parameter dimensions of example n."""
    if isinstance(mod, nn.LayerNorm):
        xh = F.layer_norm(a, mod.normalized_shape, None, None, mod.eps)
        dims = tuple(range(1, a.dim() - len(mod.normalized_shape)))
    else:
        xh = F.group_norm(a, mod.num_groups, None, None, mod.eps)
        dims = tuple(range(2, a.dim()))
    if not dims:
        return {"weight": d * xh, "bias": d}
    return {"weight": (d * xh).sum(dims), "bias": d.sum(dims)}


def per_sample(mod: nn.Module, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    """Per-example gradients {attr: (n, *param.shape)} of ``mod`` from its input ``a``, output grad ``d``."""
    if isinstance(mod, nn.Linear):
        return _linear(mod, a, d)
    if isinstance(mod, _CONVS):
        return _conv(mod, a, d)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return _batch_norm(mod, a, d)
    return _normalisation(mod, a, d)


# ------------------------------------------------------------------------------------------------- engine
class HooksEngine:
    """Batched forward capturing each layer's input; per-example gradients from layer-wise formulas."""

    def __init__(self, model: nn.Module, plan: Plan, acc: dict[str, Tensor], autocast: torch.dtype | None):
        self.model, self.plan, self.acc, self.autocast = model, plan, acc, autocast
        self.acc_dtype = next(iter(acc.values())).dtype
        self.calls: list[tuple[nn.Module, Tensor, int]] = []
        self.grads: list[Tensor | None] = []

    def _hook(self, mod: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not isinstance(output, Tensor) or not inputs or not isinstance(inputs[0], Tensor):
            raise Unsupported(f"{type(mod).__name__} did not map one tensor to one tensor")
        i = len(self.calls)
        self.calls.append((mod, inputs[0], inputs[0]._version))
        if output.requires_grad:  # else (called under no_grad) the layer contributes no gradient
            output.register_hook(lambda g: self.grads.__setitem__(i, g))

    def forward(self, x: Tensor) -> Tensor:
        """The logits, recording every planned layer's input (raises Unsupported when that cannot work)."""
        if not x.is_floating_point():
            raise Unsupported("the inputs are not floating point")
        self.calls = []
        self.x = x.detach().requires_grad_(True)  # the backward runs to the input, through every layer
        handles = [m.register_forward_hook(self._hook) for m in self.plan]
        try:
            with torch.enable_grad(), autocast(x.device, self.autocast):
                logits = self.model(self.x)
        finally:
            for h in handles:
                h.remove()
        if any(a._version != v for _, a, v in self.calls):
            raise Unsupported("a layer input was modified in place after the layer used it")
        return logits

    def accumulate(self, x: Tensor, logits: Tensor, cot: Cotangents) -> None:
        """Adds Σ_j Σ_n (per-example gradient of column j)² to ``acc`` (``x``: unused, the forward kept it)."""
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
                if d is not None:
                    self._add_layer(mod, a.detach(), d, uses, pending)
            for name, g in pending.items():
                self.acc[name] += _sumsq(g)
        self.calls, self.grads, self.x = [], [], None

    def _add_layer(
        self, mod: nn.Module, a: Tensor, d: Tensor, uses: dict[str, int], pending: dict[str, Tensor]
    ) -> None:
        """Adds Σ_n g_n² of ``mod``'s parameters to ``acc``, or (a tied parameter) its g_n to ``pending``."""
        names = self.plan[mod]
        shared = any(uses[nm] > 1 for nm in names.values())
        if isinstance(mod, nn.Linear) and a.dim() == 2 and not shared:
            # Σ_n (d_n ⊗ a_n)² = (d²)ᵀ (a²): no per-example tensor at all
            d2, a2 = d.to(self.acc_dtype) ** 2, a.to(self.acc_dtype) ** 2
            if "weight" in names:
                self.acc[names["weight"]] += d2.T @ a2
            if "bias" in names:
                self.acc[names["bias"]] += d2.sum(0)
            return
        # matmul-like layers in the autocast dtype (both operands alike); normalisations in acc_dtype
        ct = self.autocast if self.autocast is not None and isinstance(mod, _MATMUL) else self.acc_dtype
        a, d = a.to(ct), d.to(ct)
        n = a.shape[0]
        if shared or _accelerated(a):
            step = n
        else:  # blocks of examples whose per-example gradients stay in cache: ~5x faster on CPU
            step = max(1, _BLOCK_BYTES // (4 * sum(p.numel() for p in mod.parameters(recurse=False))))
        for s in range(0, n, step):
            ps = per_sample(mod, a[s : s + step], d[s : s + step])
            for attr, name in names.items():
                g = ps[attr].to(self.acc_dtype)
                if not shared:
                    self.acc[name] += _sumsq(g)
                else:  # a tied parameter: sum its per-example gradients over all uses, then square
                    pending[name] = pending[name] + g if name in pending else g
