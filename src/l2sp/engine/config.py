"""Typed run configuration: dataclasses, YAML presets (``base:`` inheritance) and ``key=value`` overrides.

A config is resolved from a preset name (``src/l2sp/configs/NAME.yaml``), a YAML path, a dict or a
:class:`Config`; then dotted overrides (``reg.alpha=0.1``) are applied, values parsed as YAML scalars.
Unknown keys or values raise :class:`~l2sp.errors.L2SPError` naming the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from l2sp.errors import L2SPError


def reg_kinds() -> tuple[str, ...]:
    """Valid ``reg.kind`` values: "none" (no penalty) and every registered penalty (``penalty_names()``)."""
    from l2sp.penalties import penalty_names

    return ("none", *penalty_names())


def reg_modes() -> tuple[str, ...]:
    """Valid ``reg.mode`` values: ``l2sp.optim.MODES``."""
    from l2sp.optim import MODES

    return tuple(MODES)


@dataclass
class ModelConfig:
    """The network. ``weights``: None (random init), a torchvision weights name ("DEFAULT",
    "IMAGENET1K_V2"), "pretrained" (timm), or a local checkpoint file (.pt/.pth with weights_only,
    .safetensors).
    ``arch``: "small_resnet", a torchvision name ("resnet101"), or "timm:NAME"."""

    arch: str = "small_resnet"
    weights: str | None = None
    options: dict = field(default_factory=dict)  # extra constructor arguments (small_resnet widths...)
    replace_head: bool = True  # new classifier for the target classes (S̄)
    head_std: float = 0.01  # new head: weight ~ N(0, head_std²), bias = 0


@dataclass
class DataConfig:
    """The target task, built by ``l2sp.data.build_task`` (see the data contract)."""

    task: str = "fashion-mnist-target"
    root: str | None = None
    n_per_class: int | None = None
    val_per_class: int | None = None
    split_seed: int = 0
    image_size: int | None = None
    resize: int | None = None
    keep_aspect: bool = False
    ten_crop: bool = False
    normalization: Literal["train-mean", "imagenet", "half", "none"] = "train-mean"
    blur: bool = True
    options: dict = field(default_factory=dict)
    source_task: str | None = None  # the pre-training task (analyses, Fisher), if built-in
    source_root: str | None = None  # its folder (default: data.root)
    source_options: dict = field(default_factory=dict)  # its extra build_task options
    num_workers: int = 0
    on_device: bool = False  # decode once, keep uint8 images on the run's device, augment there


@dataclass
class RegConfig:
    """The penalty Ω (``l2sp.regularizer``); "none" trains without any penalty."""

    kind: str = "l2-sp"  # "none" or a registered penalty (reg_kinds())
    alpha: float = 0.1
    beta: float = 0.01
    include: Literal["all", "weights"] = "all"
    fisher: str | None = None  # safetensors file from `l2sp fisher`
    mode: str = "coupled"  # l2sp.optim.MODES: coupled | decoupled | proximal


@dataclass
class OptimConfig:
    """SGD with momentum (or AdamW), iteration-based; lr·gamma^(#milestones passed) or poly (1 - t/T)^power."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0  # only for parameters the regularizer does not penalize
    batch_size: int = 64
    steps: int = 9000
    schedule: Literal["step", "poly", "constant"] = "step"
    milestones: list = field(default_factory=lambda: [6000])
    gamma: float = 0.1
    power: float = 0.9
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw


@dataclass
class RunTrainConfig:
    """How any run executes: seed, device, precision, logging and checkpoints (every task's ``train``)."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = True
    compile: bool = False  # torch.compile (CUDA only; ignored on CPU)
    log_every: int = 50
    ckpt_every: int = 1000  # 0: only the final checkpoint
    tensorboard: bool = True
    save_checkpoint: bool = True  # full training state (resume); False keeps dirs small
    save_model: bool = True  # final weights as model.safetensors
    quiet: bool = False


@dataclass
class TrainConfig(RunTrainConfig):
    """Classification runs: also freezing, BatchNorm mode and validation during training."""

    freeze: int = 0  # first k blocks: parameters and BN statistics fixed
    bn: Literal["train", "frozen"] = "train"  # frozen: every BN uses its running statistics
    eval_every: int = 0  # validation accuracy during training (0: never)


@dataclass
class EvalConfig:
    batch_size: int = 256
    splits: list = field(default_factory=lambda: ["val", "test"])


class RunConfig:
    """What every run config (classification, segmentation) has: ``name``, ``out``, ``train.seed``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        """``out``, or ``runs/NAME/seedSEED``."""
        return Path(self.out) if self.out else Path("runs") / self.name / f"seed{self.train.seed}"


@dataclass
class Config(RunConfig):
    name: str = "run"
    out: str | None = None  # run directory (default runs/NAME/seedSEED)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# keys that do not change the numbers a run produces: a resumed run may differ in these
NON_SEMANTIC = {
    "out",
    "train.quiet",
    "train.tensorboard",
    "train.log_every",
    "train.ckpt_every",
    "train.eval_every",
    "train.save_checkpoint",
    "train.save_model",
    "data.num_workers",
    "data.root",
    "eval.batch_size",
}


def _valid(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Coerce ``value`` to the annotated type ``hint`` or raise an L2SPError naming the valid values."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise L2SPError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(key, value, a)
            except L2SPError as exc:
                errors.append(str(exc))
        raise L2SPError(errors[0] if errors else f"{key}={value!r} has the wrong type")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif hint in (dict, list):
        if isinstance(value, hint):
            return copy.deepcopy(value)
        if hint is list and isinstance(value, tuple | int | float):
            return list(value) if isinstance(value, tuple) else [value]
    else:
        return value
    raise L2SPError(f"{key}={value!r} should be of type {getattr(hint, '__name__', hint)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict, validating every key and value."""
    if not isinstance(data, dict):
        raise L2SPError(f"section {prefix.rstrip('.') or 'config'} should be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            where = prefix.rstrip(".") or "the config"
            raise L2SPError(f"unknown key {prefix}{key} in {where}; valid keys: {_valid(cls)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def preset_names(task: str = "classification") -> list[str]:
    """Names of the shipped presets for ``task`` (``l2sp presets``: classification; ``l2sp segment --list``:
    segmentation, the presets whose top-level ``task:`` says so): the YAML files not starting with ``_`` and the
    dataset × penalty matrix (:func:`preset_matrix`)."""
    root = resources.files("l2sp") / "configs"
    files = (p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_"))
    return sorted(n for n in {*files, *preset_matrix()} if preset_task(n) == task)


def preset_task(name: str) -> str:
    """The task a shipped preset is for: its top-level ``task:`` (``base:`` resolved), else "classification"."""
    return str(_read_yaml(name).get("task", "classification"))


@functools.cache
def preset_matrix() -> dict[str, tuple[str, str, str | None]]:
    """The generated presets: ``PREFIX-PENALTY[-VARIANT]`` -> (dataset base, penalty, variant or None).

    A dataset base ``_NAME.yaml`` declares ``presets: {prefix, penalties: [...], variants: [...], fisher}``;
    the preset is that base, then ``_penalty-PENALTY.yaml``, then ``_variant-VARIANT.yaml``, and, for a penalty
    that needs a Fisher, ``reg.fisher = presets.fisher``. Adding a dataset is one file."""
    root = resources.files("l2sp") / "configs"
    out: dict[str, tuple[str, str, str | None]] = {}
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if not (p.name.startswith("_") and p.name.endswith(".yaml")):
            continue
        spec = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("presets")
        if not spec:
            continue
        for pen in spec["penalties"]:
            for var in (None, *spec.get("variants", ())):
                out[f"{spec['prefix']}-{pen}" + (f"-{var}" if var else "")] = (p.name[:-5], pen, var)
    return out


def _compose(name: str) -> dict:
    """A preset of the matrix: dataset base + penalty layer (+ variant layer), Fisher file from the base."""
    from l2sp.penalties import get_penalty

    base, pen, var = preset_matrix()[name]
    spec = yaml.safe_load((resources.files("l2sp") / "configs" / f"{base}.yaml").read_text(encoding="utf-8"))
    data = _deep_merge(_read_yaml(base), _read_yaml(f"_penalty-{pen}"))
    if var is not None:
        data = _deep_merge(data, _read_yaml(f"_variant-{var}"))
    if get_penalty(data["reg"]["kind"]).needs_fisher:
        data["reg"]["fisher"] = spec["presets"]["fisher"]
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise L2SPError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise L2SPError(f"cannot read config file {path} ({exc.strerror})") from exc


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise L2SPError(f"key {key!r} appears twice in one section (line {key_node.start_mark.line + 1}); "
                                "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(source: str | Path, seen: tuple = ()) -> dict:
    """Read a preset or YAML file, resolving ``base:`` (a preset name or a path relative to the file)."""
    text, where = None, None
    path = Path(str(source)).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise L2SPError(
                f"config file {path} does not exist; give a preset name ({_preset_hint()}) or a path"
            )
        text, where, key = _read_text(path), path, str(path.resolve())
    else:
        res = resources.files("l2sp") / "configs" / f"{source}.yaml"
        if not res.is_file() and str(source) in preset_matrix():
            return _compose(str(source))
        if not res.is_file():
            raise L2SPError(
                f"unknown preset {source!r}; valid presets: {_preset_hint()} (or give a YAML path)"
            )
        text, where, key = res.read_text(encoding="utf-8"), None, f"preset:{source}"
    if key in seen:
        raise L2SPError(f"{source}: the 'base' chain loops back to it; remove the cycle")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except L2SPError as exc:
        raise L2SPError(f"{source}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise L2SPError(f"{source}: invalid YAML ({str(exc).splitlines()[0]}); fix the file") from exc
    if not isinstance(data, dict):
        raise L2SPError(f"{source}: a config must be a YAML mapping of sections (model, data, reg, ...)")
    data.pop("presets", None)  # a dataset base's matrix declaration (preset_matrix), not a config key
    base = data.pop("base", None)
    if base is not None:
        if where is not None and (where.parent / str(base)).is_file():
            base = where.parent / str(base)
        data = _deep_merge(_read_yaml(base, (*seen, key)), data)
    return data


def _preset_hint() -> str:
    names = preset_names()
    return ", ".join(names[:8]) + (
        f", ... ({len(names)} in all, see `l2sp presets`)" if len(names) > 8 else ""
    )


def parse_overrides(items: list[str] | dict | None) -> dict:
    """``["reg.alpha=0.1", "optim.milestones=[10, 20]"]`` -> ``{"reg.alpha": 0.1, ...}`` (YAML scalars)."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        if "=" not in item:
            raise L2SPError(f"override {item!r} is not key=value; write e.g. reg.alpha=0.1")
        key, _, text = item.partition("=")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise L2SPError(f"override {item!r}: value is not valid YAML; quote strings") from exc
    return out


def apply_overrides(data: dict, overrides: dict, root: type | None = None) -> dict:
    """Set dotted keys in a nested dict; an unknown section or key raises an L2SPError with the valid ones.

    ``root``: the dataclass the keys are checked against (default :class:`Config`)."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = key.split(".")
        cls: type = root or Config
        node = data
        for i, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(cls)}
            hints = typing.get_type_hints(cls)
            if part not in fields:
                where = ".".join(parts[:i]) or "the config"
                raise L2SPError(f"unknown key {key} ({part!r} is not in {where}); valid keys: {_valid(cls)}")
            if i == len(parts) - 1:
                node[part] = value
            elif dataclasses.is_dataclass(hints[part]):
                node = node.setdefault(part, {})
                cls = hints[part]
            elif hints[part] is dict:  # free-form options: model.options.widths=[8, 16]
                node = node.setdefault(part, {})
                for sub in parts[i + 1 : -1]:
                    node = node.setdefault(sub, {})
                node[parts[-1]] = value
                break
            else:
                raise L2SPError(f"unknown key {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
    return data


def resolve(config: Any = None, overrides: list[str] | dict | None = None) -> Config:
    """A :class:`Config` from a preset name, YAML path, dict or Config, with dotted overrides applied."""
    if config is None:
        data: dict = {}
    elif isinstance(config, Config):
        data = config.to_dict()
    elif isinstance(config, dict):
        data = copy.deepcopy(config)
        if "base" in data:
            base = data.pop("base")
            data = _deep_merge(_read_yaml(base), data)
    elif isinstance(config, str | Path):
        data = _read_yaml(config)
        if "name" not in data:
            data["name"] = Path(str(config)).stem
    else:
        raise L2SPError(
            f"cannot read a config from {type(config).__name__}; pass a preset name, path or dict"
        )
    if data.get("task") == "segmentation":
        how = f"`l2sp segment {config}`" if isinstance(config, str | Path) else "finetune_segmentation"
        raise L2SPError(f"{config if isinstance(config, str | Path) else 'this config'} is a segmentation "
                        f"config (task: segmentation); run it with {how}, not with the classification commands")
    data = apply_overrides(data, parse_overrides(overrides))
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise L2SPError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")


def validate_run(cfg: Any) -> None:
    """The checks every run config shares (``optim``, ``reg``, ``train``): ranges, finite numbers, registries."""
    o, r, t = cfg.optim, cfg.reg, cfg.train
    if o.steps < 1 or o.batch_size < 1:
        raise L2SPError(f"optim.steps={o.steps} and optim.batch_size={o.batch_size} must be >= 1")
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise L2SPError(f"optim.lr={o.lr} must be a finite number > 0")
    if not all(isinstance(m, int) and m > 0 for m in o.milestones):
        raise L2SPError(f"optim.milestones={o.milestones} must be positive step numbers, e.g. [6000]")
    if not (len(o.betas) == 2 and all(isinstance(b, int | float) and 0 <= b < 1 for b in o.betas)) or o.eps <= 0:
        raise L2SPError(f"optim.betas={o.betas} must be two numbers in [0, 1) and optim.eps={o.eps} > 0")
    if not (math.isfinite(r.alpha) and math.isfinite(r.beta) and r.alpha >= 0 and r.beta >= 0):
        raise L2SPError(f"reg.alpha={r.alpha} and reg.beta={r.beta} must be finite and >= 0")
    _check_choice("reg.kind", r.kind, reg_kinds())
    _check_choice("reg.mode", r.mode, reg_modes())
    if t.log_every < 1 or t.ckpt_every < 0:
        raise L2SPError(f"train.log_every={t.log_every} must be >= 1 and train.ckpt_every={t.ckpt_every} >= 0")


def validate(cfg: Config) -> None:
    """Cross-field checks the types alone cannot express."""
    validate_run(cfg)
    if cfg.train.freeze < 0:
        raise L2SPError(f"train.freeze={cfg.train.freeze} must be >= 0 (number of blocks)")
    if cfg.train.eval_every < 0:
        raise L2SPError(f"train.eval_every={cfg.train.eval_every} must be >= 0 (0: never)")
    for s in cfg.eval.splits:
        if s not in ("val", "test"):
            raise L2SPError(f"eval.splits contains {s!r}; valid splits: val, test")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"reg": {"alpha": 0.1}} -> {"reg.alpha": 0.1} (options dicts kept whole)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(a: Config, b: Config, ignore: set[str] = NON_SEMANTIC) -> list[str]:
    """Dotted keys whose values differ between two configs, ``ignore`` left out."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return [
        f"{k}: {fa.get(k)!r} != {fb.get(k)!r}"
        for k in sorted(set(fa) | set(fb))
        if k not in ignore and fa.get(k) != fb.get(k)
    ]


def cache_dir() -> Path:
    """``$L2SP_CACHE`` or ``~/.cache/l2sp``."""
    import os

    return Path(os.environ.get("L2SP_CACHE", Path.home() / ".cache" / "l2sp"))


def expand_path(path: str | None) -> str | None:
    """``{cache}`` -> :func:`cache_dir`, then ``~`` and ``$VARS`` expanded (None stays None)."""
    import os

    if path is None:
        return None
    return os.path.expanduser(os.path.expandvars(str(path).replace("{cache}", str(cache_dir()))))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
