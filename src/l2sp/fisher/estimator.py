"""``estimate``: the loop over the source data, choosing an engine and accumulating Σ_n Σ_j w_j g_{n,j}²."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from l2sp.errors import L2SPError
from l2sp.fisher.base import Engine, Unsupported
from l2sp.fisher.columns import METHODS, Cotangents, LabelSpec
from l2sp.fisher.files import FisherDict
from l2sp.fisher.func import FuncEngine
from l2sp.fisher.hooks import HooksEngine, hooks_plan

BACKENDS = ("auto", "hooks", "func")


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
    per-example gradients held at once. ``backend``: "hooks" (layer formulas), "func" (``torch.func``, any
    model) or "auto" (hooks where the model allows). Returns float ``dtype`` tensors on ``device`` keyed like
    ``model.named_parameters()`` (trainable parameters only), as a :class:`FisherDict` with ``.metadata``.
    """
    spec = _label_spec(method, samples, classes, tail_samples, generator)
    _check_options(backend, max_examples, chunk_size)
    acc = _Accumulator(model, backend, autocast, chunk_size)
    was_training = model.training
    model.eval()
    try:
        with _progress_bar(data, max_examples, method, progress) as bar:
            for batch_index, x, y in _batches(data, max_examples):
                acc.add_batch(batch_index, x, y, spec)
                bar.update(len(x))
    finally:
        model.train(was_training)
    return acc.result(spec, device, dtype)


# ---------------------------------------------------------------------------------------------- arguments
def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise L2SPError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _label_spec(
    method: str, samples: int, classes: int | None, tail_samples: int, generator: torch.Generator | None
) -> LabelSpec:
    """The label-column options, checked (one-line L2SPError for a bad or misplaced option)."""
    if method not in METHODS:
        raise L2SPError(f"unknown Fisher method {method!r}; choose one of {', '.join(METHODS)}")
    _check_int("samples", samples, 1)
    _check_int("classes", classes, 1, allow_none=True)
    _check_int("tail_samples", tail_samples, 0)
    if samples != 1 and method != "mc":
        raise L2SPError(f"samples={samples} is for method='mc'; use method='mc' or drop samples")
    if classes is not None and method != "exact":
        raise L2SPError(f"classes={classes} is for method='exact'; use method='exact' or drop classes")
    return LabelSpec(method, samples, classes, tail_samples, generator)


def _check_options(backend: str, max_examples: int | None, chunk_size: int) -> None:
    if backend not in BACKENDS:
        raise L2SPError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_int("max_examples", max_examples, 1, allow_none=True)
    _check_int("chunk_size", chunk_size, 1)


# ------------------------------------------------------------------------------------------------- data
def _unpack(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(inputs, labels or None) from a tensor, an (x, y, ...) sequence or an {"x"/"input", "y"/"label"} dict."""
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


def _batches(data: Iterable | Tensor, max_examples: int | None) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """(batch index, x, y) cut to ``max_examples`` inputs in all; no batch is read past that count."""
    seen = 0
    for index, batch in enumerate([data] if isinstance(data, Tensor) else data):  # a tensor: one batch
        x, y = _unpack(batch)
        if max_examples is not None:
            x = x[: max_examples - seen]
            y = None if y is None else y[: max_examples - seen]
        yield index, x, y
        seen += len(x)
        if max_examples is not None and seen >= max_examples:
            return


def _progress_bar(data: Iterable, max_examples: int | None, method: str, progress: bool | None) -> Any:
    """A tqdm bar over examples (shown on a terminal when ``progress`` is None)."""
    from tqdm.auto import tqdm

    total = max_examples
    if total is None:
        try:
            total = len(data.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            total = None
    disable = None if progress is None else not progress
    return tqdm(total=total, desc=f"fisher ({method})", unit="ex", disable=disable, leave=False)


# --------------------------------------------------------------------------------------------- accumulate
class _Accumulator:
    """Σ_n Σ_j w_{n,j} g_{n,j}² per trainable parameter, with the hooks engine where the model allows it."""

    def __init__(self, model: nn.Module, backend: str, autocast: torch.dtype | None, chunk_size: int):
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise L2SPError(
                "the model has no trainable parameters (requires_grad=True); unfreeze the ones to estimate"
            )
        self.model, self.backend, self.autocast, self.chunk_size = model, backend, autocast, chunk_size
        self.names = [n for n, _ in trainable]
        self.device = trainable[0][1].device
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in trainable) else torch.float32
        self.acc = {n: torch.zeros(p.shape, dtype=self.dtype, device=self.device) for n, p in trainable}
        self.plan = hooks_plan(model)
        if backend == "hooks" and isinstance(self.plan, str):
            raise L2SPError(f"backend='hooks' cannot handle this model: {self.plan}; use backend='func'")
        self.use_hooks = backend == "hooks" or (backend == "auto" and not isinstance(self.plan, str))
        self.engines: dict[bool, Engine] = {}
        self.examples, self.columns, self.shares = 0, 0, []

    def engine(self) -> Engine:
        if self.use_hooks not in self.engines:
            self.engines[self.use_hooks] = (
                HooksEngine(self.model, self.plan, self.acc, self.autocast)
                if self.use_hooks
                else FuncEngine(self.model, self.names, self.acc, self.autocast, self.chunk_size)
            )
        return self.engines[self.use_hooks]

    def add_batch(self, batch_index: int, x: Tensor, y: Tensor | None, spec: LabelSpec) -> None:
        """Accumulates the batch in chunks of ``chunk_size`` examples."""
        if spec.method == "empirical" and y is None:
            raise L2SPError("method='empirical' needs true labels; pass a DataLoader of (x, y)")
        for s in range(0, len(x), self.chunk_size):
            xs = x[s : s + self.chunk_size].to(self.device, non_blocking=True)
            ys = None if y is None else y[s : s + self.chunk_size].to(self.device, non_blocking=True)
            cot, share = self._chunk(batch_index, xs, ys, spec)
            self.columns = cot.columns
            if share is not None:
                self.shares.append(share)
        self.examples += len(x)

    def _chunk(
        self, batch_index: int, x: Tensor, y: Tensor | None, spec: LabelSpec
    ) -> tuple[Cotangents, Tensor | None]:
        """One forward and the column backward passes; falls back to func when hooks cannot run (auto)."""
        while True:
            engine = self.engine()
            try:
                logits = engine.forward(x)
                cot, share = spec.cotangents(logits, y, batch_index, self.dtype)
                engine.accumulate(x, logits, cot)
                return cot, share
            except Unsupported as exc:
                if self.backend == "hooks":
                    raise L2SPError(f"backend='hooks' failed: {exc}; use backend='func'") from exc
                self.use_hooks = False

    def result(self, spec: LabelSpec, device: str | torch.device, dtype: torch.dtype) -> FisherDict:
        """F = acc / m as ``dtype`` on ``device``, with the metadata of the estimate."""
        if self.examples == 0:
            raise L2SPError("the data yielded no examples; pass a non-empty DataLoader of source inputs")
        meta: dict[str, Any] = {
            "method": spec.method,
            "examples": self.examples,
            "columns_per_example": self.columns,
            "backend": "hooks" if self.use_hooks else "func",
        }
        if spec.method == "mc":
            meta["samples"] = spec.samples
        if spec.method == "exact" and spec.classes is not None:
            meta.update(classes=spec.classes, tail_samples=spec.tail_samples)
            if self.shares:
                meta["predicted_share"] = float(torch.cat(self.shares).mean())
        out = {n: (t / self.examples).to(device=device, dtype=dtype) for n, t in self.acc.items()}
        return FisherDict(out, meta)
