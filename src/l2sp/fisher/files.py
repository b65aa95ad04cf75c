"""Fisher dictionaries on disk (safetensors + JSON metadata) and their checks against a model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from l2sp.errors import L2SPError
from l2sp.io import load_tensors, save_tensors
from l2sp.reference import strip_prefix

FORMAT = "l2sp.fisher/1"


class FisherDict(dict):
    """``{parameter name: diagonal Fisher tensor}`` carrying ``.metadata`` (method, examples, ...)."""

    def __init__(
        self, tensors: Mapping[str, Tensor] | Iterable = (), metadata: Mapping[str, Any] | None = None
    ):
        super().__init__(tensors)
        self.metadata: dict[str, Any] = dict(metadata or {})


def _validate(fisher: Mapping[str, Tensor]) -> None:
    """A non-empty {name: tensor} with finite values F_j >= 0, else L2SPError."""
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

    ``fisher.metadata`` (from :func:`~l2sp.fisher.estimate`) is included; keyword arguments
    (e.g. ``source_dataset=``) win.
    """
    _validate(fisher)
    meta: dict[str, Any] = dict(getattr(fisher, "metadata", {}) or {})
    meta.update(metadata)
    meta.update(format=FORMAT, names=list(fisher), shapes={n: list(t.shape) for n, t in fisher.items()})
    return save_tensors(path, fisher, {k: json.dumps(v, default=str) for k, v in meta.items()})


def _decode(raw: Mapping[str, str]) -> dict[str, Any]:
    """Metadata values parsed as JSON (kept as strings when they are not JSON)."""
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return meta


def load(path: str | os.PathLike, model: nn.Module | None = None) -> FisherDict:
    """Read a file written by :func:`save`; with ``model`` (the source model), check names and shapes."""
    tensors, raw = load_tensors(path)
    meta = _decode(raw)
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


def _shapes(expected: nn.Module | Mapping[str, Sequence[int] | Tensor]) -> dict[str, tuple[int, ...]]:
    """{name without wrapper prefix: shape} of a model's trainable parameters or of a mapping's values."""
    if isinstance(expected, nn.Module):
        return {strip_prefix(n): tuple(p.shape) for n, p in expected.named_parameters() if p.requires_grad}
    return {strip_prefix(n): tuple(v.shape if isinstance(v, Tensor) else v) for n, v in expected.items()}


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
    shapes = _shapes(expected)
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
