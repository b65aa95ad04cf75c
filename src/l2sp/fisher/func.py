"""The ``func`` engine, for any model: ``torch.func.vmap`` over examples of one ``vjp`` per example.

Each example's forward is shared by its label columns: the ``vjp`` pull-back is ``vmap``-ed over the
cotangents √w_j (e_{c_j} − p), giving √w_j ∂ log p_{c_j}/∂w per column; the squares are summed in the
accumulation dtype. Buffers (BatchNorm running statistics) are passed to ``functional_call``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from l2sp.fisher.base import autocast
from l2sp.fisher.columns import Cotangents


class FuncEngine:
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
        self.acc_dtype = next(iter(acc.values())).dtype
        named = dict(model.named_parameters())
        self.params = {n: named[n].detach() for n in names}
        self.others = {n: t.detach() for n, t in model.named_parameters() if n not in self.params}
        self.others.update({n: b for n, b in model.named_buffers()})

    def forward(self, x: Tensor) -> Tensor:
        """The logits, without a graph (the per-example passes run inside ``accumulate``)."""
        with torch.no_grad(), autocast(x.device, self.autocast):
            return self.model(x)

    def _squares(self, xi: Tensor, ci: Tensor) -> dict[str, Tensor]:
        """Σ_j (√w_j ∂ log p_{c_j}(x_i)/∂w)² for one example ``xi`` and its cotangents ``ci`` (m, K)."""
        model, others, amp = self.model, self.others, self.autocast

        def logits(params: dict[str, Tensor]) -> Tensor:
            with autocast(xi.device, amp):
                return torch.func.functional_call(model, (params, others), (xi.unsqueeze(0),)).squeeze(0)

        out, pull = torch.func.vjp(logits, self.params)
        (g,) = torch.func.vmap(pull)(ci.to(out.dtype))
        return {n: (t.to(self.acc_dtype) ** 2).sum(0) for n, t in g.items()}

    def accumulate(self, x: Tensor, logits: Tensor, cot: Cotangents) -> None:
        """Adds Σ_j Σ_n (per-example gradient of column j)² to ``acc`` (``logits``: unused)."""
        step = max(1, self.chunk_size // cot.columns)  # at most chunk_size per-example gradients at once
        acc = [self.acc[n] for n in self.params]
        for s in range(0, x.shape[0], step):
            sq = torch.func.vmap(self._squares)(x[s : s + step], cot.rows(s, s + step))
            torch._foreach_add_(acc, [sq[n].sum(0) for n in self.params])
