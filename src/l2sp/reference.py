"""The starting point w0 and the partition of a model's parameters into S (shared), S̄ (novel) and free.

A trainable parameter of the model belongs to **S** when the source holds an entry with the same name (after
stripping wrapper prefixes such as ``module.`` or ``_orig_mod.``) and the same shape; every other trainable
parameter is in **S̄** (the new head, new layers). When the source is an :func:`snapshot` of the same model,
a parameter object created after it (a replaced head with as many classes as the old one) is in S̄ too.
With ``include="weights"`` only the weight tensors of convolution and linear layers of S are penalized (the
authors' code); the other shared parameters are *free*.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from l2sp.errors import L2SPError
from l2sp.io import load_state_dict

Source = Mapping[str, torch.Tensor] | nn.Module | str | os.PathLike
Include = Literal["all", "weights"]

_WRAPPER = re.compile(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def strip_prefix(name: str) -> str:
    """``"module._orig_mod.layer1.0.conv1.weight"`` -> ``"layer1.0.conv1.weight"`` (DDP, compile, FSDP wrappers)."""
    while True:
        stripped = _WRAPPER.sub(r"\1", name)
        if stripped == name:
            return name
        name = stripped


# id(copy) -> (copy, parameter it was taken from), both weakly held: which object each snapshot tensor copied
_ORIGIN: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _record_origin(copy: torch.Tensor, param: torch.Tensor) -> None:
    key = id(copy)
    _ORIGIN[key] = (weakref.ref(copy), weakref.ref(param))
    weakref.finalize(copy, _ORIGIN.pop, key, None)


def copied_from(copy: torch.Tensor, param: torch.Tensor) -> bool | None:
    """True if ``copy`` was taken from ``param`` by :func:`snapshot`, False if from another object (alive or
    not), None if unknown (a tensor that no snapshot made, e.g. loaded from a file)."""
    entry = _ORIGIN.get(id(copy))
    if entry is None or entry[0]() is not copy:
        return None
    return entry[1]() is param


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``module``'s parameters and buffers, keyed by their (unwrapped) names.

    Take it *before* replacing the classifier: the new head then falls into S̄, by shape or, when it has as
    many classes as the old one, because it is a new parameter object (the copies remember their origin).
    The copies never share storage with the module, so training cannot move them.
    """
    if not isinstance(module, nn.Module):
        raise L2SPError(f"snapshot() takes an nn.Module, got {type(module).__name__}")
    out = {}
    for k, v in module.state_dict(keep_vars=True).items():
        out[strip_prefix(k)] = copy = v.detach().clone()
        if isinstance(v, nn.Parameter):
            _record_origin(copy, v)
    return out


def load_source(source: Source) -> dict[str, torch.Tensor]:
    """The reference weights as ``{unwrapped name: tensor}`` from a state dict, a module or a checkpoint file.

    Files: ``.safetensors``, or ``.pt``/``.pth``/``.bin`` loaded with ``torch.load(weights_only=True)``.
    Tensors are detached but not copied (the regularizer copies what it keeps).
    """
    if isinstance(source, nn.Module):
        items = source.state_dict(keep_vars=True).items()
    elif isinstance(source, str | os.PathLike):
        items = load_state_dict(source).items()
    elif isinstance(source, Mapping):
        items = source.items()
    else:
        raise L2SPError(
            f"source must be a state dict, an nn.Module or a checkpoint path, got {type(source).__name__}"
        )
    out = {}
    for k, v in items:
        if not isinstance(v, torch.Tensor):
            raise L2SPError(f"source entry {k!r} is a {type(v).__name__}, not a tensor; pass a state dict")
        out[strip_prefix(str(k))] = v.detach() if v.requires_grad else v  # keep snapshot tensors' identity
    return out


def weight_names(model: nn.Module) -> set[str]:
    """Names of the weight tensors of convolution and linear layers (the authors' ``include="weights"``)."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)
    return {f"{m_name}.weight" if m_name else "weight"
            for m_name, m in model.named_modules() if isinstance(m, kinds)}


@dataclass(frozen=True)
class Partition:
    """Which trainable parameters are penalized how: ``shared`` (S, with their w0), ``novel`` (S̄), ``free``."""

    shared: list[tuple[str, nn.Parameter, torch.Tensor]]
    novel: list[tuple[str, nn.Parameter]]
    free: list[tuple[str, nn.Parameter]]


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device:
        return False
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return False


def partition(model: nn.Module, source: Mapping[str, torch.Tensor] | None, include: Include = "all") -> Partition:
    """Split the trainable parameters of ``model`` into S (matched in ``source`` by name and shape), S̄ and free.

    ``source=None`` puts every trainable parameter in S with reference 0 (plain L2 on the whole model).
    """
    if include not in ("all", "weights"):
        raise L2SPError(f"include must be 'all' or 'weights', got {include!r}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise L2SPError("the model has no trainable parameter (all have requires_grad=False); nothing to penalize")
    weights = {strip_prefix(n) for n in weight_names(model)} if include == "weights" else None
    # with a snapshot of this very model, a parameter created after it (a new head) is novel whatever its
    # shape; a snapshot of another model object (a copy) gives no such information: names and shapes decide
    origins = {} if source is None else {n: copied_from(source[strip_prefix(n)], p)
                                         for n, p in params if strip_prefix(n) in source}
    same_objects = any(origins.values())
    shared, novel, free = [], [], []
    for name, p in params:
        key = strip_prefix(name)
        ref = None if source is None else source.get(key)
        replaced = same_objects and origins.get(name) is False
        if source is None or (ref is not None and tuple(ref.shape) == tuple(p.shape) and not replaced):
            if ref is not None and _shares_storage(ref, p):
                raise L2SPError(
                    f"source tensor {key!r} shares storage with the live parameter, so the penalty would "
                    "always be 0; pass l2sp.snapshot(model) taken before training, or a checkpoint file"
                )
            if weights is not None and key not in weights:
                free.append((name, p))
            else:
                shared.append((name, p, ref))
        else:
            novel.append((name, p))
    if source is not None and not shared and not free:
        model_ex = ", ".join(f"{strip_prefix(n)} {tuple(p.shape)}" for n, p in params[:2])
        src_ex = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(source.items())[:2]) or "nothing"
        raise L2SPError(
            f"no parameter of the model matches the source by name and shape (model has {model_ex}, ...; "
            f"source has {src_ex}, ...): wrong checkpoint? pass the pre-trained weights of this architecture"
        )
    return Partition(shared, novel, free)
