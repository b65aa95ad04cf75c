"""Caltech-101-30 from an ImageNet MobileNetV2 on one GPU: the paper's full protocol, several runs at once.

Two steps. ``pack`` (on the CPU machine) writes a compact copy of just the images a run needs, small enough to
travel with the working tree (≤ 64 MiB in all): the 30 training + ≤ 50 test images of each Caltech-101 class
(re-encoded as JPEG, shorter side kept), Tiny ImageNet validation images (the source test set) and training
images (the Fisher's source inputs), byte for byte, and the MobileNetV2 weights. ``run`` (on the GPU machine)
decodes the images once, keeps them on the GPU as uint8 (resized 256×256, as the paper), augments there
(random 224 crop, mirror, blur), trains in bf16 with channels_last, and runs ``--workers`` runs at once
(one process each, sharing the GPU), then prints a table last.

    python benchmarks/caltech101_gpu.py pack [--caltech ../shared/data/caltech101] \\
        [--tiny ../shared/data/tiny-imagenet] \\
        [--weights ../shared/weights/mobilenet_v2_imagenet.safetensors] \\
        [--out runs/caltech101-pack]
    PYTHONPATH=src python3 benchmarks/caltech101_gpu.py run --pack runs/caltech101-pack \\
        [--kinds l2,l2-sp,l2-sp-fisher] [--seeds 0,1] [--workers 3] [--steps 9000] [--budget-s 480]

Each run's settings come from the presets ``caltech101-mobilenetv2-<kind>`` (``--set key=value`` overrides
them all). The pure parts (pack / unpack, decoding, the batched augmentation) also serve the CPU benchmark
``benchmarks/caltech101_mobilenetv2.py`` and are tested on CPU tensors in
``tests/test_caltech101_protocol.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

try:
    import l2sp  # noqa: F401
except ImportError:  # run from a checkout without installing: PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from l2sp.data.transforms import BLUR_P, BLUR_SIGMA, blur_kernel_size
from l2sp.errors import L2SPError

SHARED = Path(__file__).resolve().parents[2] / "shared"
PACK_FILE = "images.safetensors"
WEIGHTS_FILE = "mobilenet_v2_imagenet.safetensors"
PARTS = {"train": 0, "test": 2}
#: run kinds: preset, extra overrides
KINDS = {
    "l2": ("caltech101-mobilenetv2-l2", {}),
    "l2-sp": ("caltech101-mobilenetv2-l2-sp", {}),
    "l2-sp-fisher": ("caltech101-mobilenetv2-l2-sp-fisher", {}),
    "l2-freeze": ("caltech101-mobilenetv2-l2-freeze", {}),
    "l2-sp-bnfrozen": ("caltech101-mobilenetv2-l2-sp", {"train.bn": "frozen"}),
    "l2-bnfrozen": ("caltech101-mobilenetv2-l2", {"train.bn": "frozen"}),
}


# ------------------------------------------------------------------------------------------ packing (CPU)
def encode_jpeg(img: torch.Tensor, *, quality: int, short_side: int | None = None) -> bytes:
    """A uint8 RGB image (3, H, W) as JPEG bytes (4:2:0); shorter side reduced to ``short_side`` first
    (Lanczos, aspect kept, never enlarged)."""
    from PIL import Image

    im = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB")
    if short_side is not None and min(im.size) > short_side:
        s = short_side / min(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def pack_group(
    files: list[str], labels: list[int], *, quality: int | None = None, short_side: int | None = None
) -> dict[str, torch.Tensor]:
    """``{"bytes": uint8 (total,), "offsets": int64 (n + 1,), "labels": int64 (n,)}``: the files byte for byte
    (``quality=None``) or decoded and re-encoded at ``quality``."""
    from l2sp.data.folders import load_image

    chunks = []
    for f in files:
        if quality is None:
            chunks.append(Path(f).read_bytes())
        else:
            chunks.append(encode_jpeg(load_image(f), quality=quality, short_side=short_side))
    sizes = torch.tensor([len(c) for c in chunks], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    data = (
        torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        if chunks
        else torch.zeros(0, dtype=torch.uint8)
    )
    return {"bytes": data, "offsets": offsets, "labels": torch.tensor(labels, dtype=torch.long)}


def write_pack(path: str | Path, groups: dict[str, dict[str, torch.Tensor]], metadata: dict) -> Path:
    """One safetensors file: tensors ``<group>.<field>``, metadata JSON-encoded (``l2sp.io.save_tensors``)."""
    from l2sp.io import save_tensors

    flat = {f"{g}.{k}": v for g, fields in groups.items() for k, v in fields.items()}
    return save_tensors(path, flat, {"pack": metadata})


def read_pack(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Inverse of :func:`write_pack`."""
    from l2sp.io import load_tensors

    path = Path(path)
    if path.is_dir():
        path = path / PACK_FILE
    tensors, meta = load_tensors(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        g, _, k = key.rpartition(".")
        groups.setdefault(g, {})[k] = t
    return groups, json.loads(meta.get("pack", "{}"))


def group_item(group: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    """The i-th encoded file of a group (uint8 view)."""
    o = group["offsets"]
    return group["bytes"][int(o[i]) : int(o[i + 1])]


def _decode_pil(data: torch.Tensor) -> torch.Tensor:
    """JPEG bytes → uint8 RGB (3, H, W) with PIL (the library's decoder: ``l2sp.data.folders.load_image``)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def decode_group(
    group: dict[str, torch.Tensor], size: int | None, *, device: str | torch.device = "cpu", chunk: int = 512
) -> torch.Tensor:
    """Decode every image of a group (RGB; grey images repeated to 3 channels) and resize it to size×size
    (antialiased bilinear, as ``v2.Resize``), on ``device`` (CUDA: nvJPEG batches; CPU: PIL): uint8
    (N, 3, size, size). ``size=None`` keeps the images as they are (they must share one size)."""
    from torchvision.transforms.v2 import functional as TF

    device = torch.device(device)
    n = len(group["labels"])
    out = []
    for s in range(0, n, chunk):
        datas = [group_item(group, i) for i in range(s, min(n, s + chunk))]
        if device.type == "cuda":
            from torchvision.io import ImageReadMode, decode_jpeg

            try:
                imgs = decode_jpeg(datas, mode=ImageReadMode.UNCHANGED, device=device)
            except RuntimeError:  # a file nvJPEG cannot read: decode this chunk on the host
                imgs = [_decode_pil(d).to(device) for d in datas]
        else:
            imgs = [_decode_pil(d) for d in datas]
        for img in imgs:
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
            if size is not None and tuple(img.shape[-2:]) != (size, size):
                img = TF.resize(img, [size, size], antialias=True)
            out.append(img)
    if not out:
        return torch.zeros(0, 3, size or 0, size or 0, dtype=torch.uint8, device=device)
    return torch.stack(out)


def carve_val(labels: torch.Tensor, val_per_class: int) -> torch.Tensor:
    """Boolean mask of the validation images: the last ``val_per_class`` of each class in pack order
    (the order of the seeded draw, as ``build_task(..., val_per_class=v)``)."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if val_per_class <= 0:
        return mask
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) <= val_per_class:
            raise L2SPError(
                f"class {c} has {len(idx)} training images, not more than val_per_class="
                f"{val_per_class}; lower it"
            )
        mask[idx[-val_per_class:]] = True
    return mask


def make_pack(
    caltech: str,
    tiny: str,
    weights: str,
    out: str | Path,
    *,
    split_seed: int = 0,
    n_per_class: int = 30,
    test_per_class: int = 50,
    quality: int = 70,
    short_side: int | None = 144,
    tiny_test_per_class: int = 20,
    tiny_fisher_per_class: int = 5,
    max_mib: float = 56.0,
    progress: bool = True,
) -> Path:
    """Write ``out/images.safetensors`` and copy the weights beside it; returns the folder."""
    from l2sp.data import build_task

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = build_task(
        "caltech101",
        root=caltech,
        n_per_class=n_per_class,
        val_per_class=0,
        seed=split_seed,
        normalization="half",
        check="none",
        test_per_class=test_per_class,
    )
    rec = task.split
    root = Path(rec["root"])
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for part in ("train", "test"):
        items = rec[part]
        groups[f"caltech_{part}"] = pack_group(
            [str(root / p) for p, _ in items], [c for _, c in items], quality=quality, short_side=short_side
        )
        if progress:
            print(
                f"  caltech {part}: {len(items)} images, "
                f"{groups[f'caltech_{part}']['bytes'].numel() / 2**20:.1f} MiB",
                flush=True,
            )
    src = build_task(
        "imagenet-subset",
        root=tiny,
        n_per_class=tiny_fisher_per_class,
        test_per_class=tiny_test_per_class,
        seed=split_seed,
        normalization="half",
        check="none",
    )
    sroot = Path(src.split["root"])
    for part, name in (("test", "tiny_test"), ("train", "tiny_fisher")):
        items = src.split[part]
        groups[name] = pack_group([str(sroot / p) for p, _ in items], [c for _, c in items])
        if progress:
            print(
                f"  tiny {part}: {len(items)} images, {groups[name]['bytes'].numel() / 2**20:.1f} MiB",
                flush=True,
            )
    meta = {
        "classes": rec["classes"],
        "split_seed": split_seed,
        "n_per_class": n_per_class,
        "test_per_class": test_per_class,
        "protocol": rec["protocol"],
        "quality": quality,
        "short_side": short_side,
        "caltech_files": {p: [x for x, _ in rec[p]] for p in ("train", "test")},
        "tiny_class_indices": src.split["class_indices"],
        "tiny_test_per_class": tiny_test_per_class,
        "tiny_fisher_per_class": tiny_fisher_per_class,
        "weights": WEIGHTS_FILE,
    }
    path = write_pack(out / PACK_FILE, groups, meta)
    shutil.copyfile(weights, out / WEIGHTS_FILE)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2**20
    if progress:
        print(f"pack {out}: {total:.1f} MiB in {time.perf_counter() - t0:.0f} s", flush=True)
    if total > max_mib:
        raise L2SPError(
            f"the pack in {out} is {total:.1f} MiB, over --max-mib {max_mib}; lower --quality or "
            "--short-side, or --tiny-test-per-class"
        )
    del path
    return out


# ------------------------------------------------------------------------ batched augmentation (any device)
def sample_params(
    b: int,
    h: int,
    w: int,
    crop: int,
    *,
    blur: bool = True,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Per-image random parameters: crop offsets, mirror and blur flags, blur σ ~ U(BLUR_SIGMA)."""
    kw = {"generator": generator, "device": device}
    lo, hi = BLUR_SIGMA
    return {
        "top": torch.randint(0, h - crop + 1, (b,), **kw),
        "left": torch.randint(0, w - crop + 1, (b,), **kw),
        "flip": torch.rand(b, **kw) < 0.5,
        "blur": (torch.rand(b, **kw) < BLUR_P) & blur,
        "sigma": lo + (hi - lo) * torch.rand(b, **kw),
    }


def crop_flip(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, crop: int
) -> torch.Tensor:
    """``out[b] = x[b, :, top:top+crop, left:left+crop]``, mirrored where ``flip[b]``; one gather."""
    windows = x.unfold(2, crop, 1).unfold(3, crop, 1)  # (B, C, H-crop+1, W-crop+1, crop, crop), no copy
    out = windows[torch.arange(x.shape[0], device=x.device), :, top, left]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def blur_batch(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur of each float image ``x[b]`` with its own σ_b, reflect padding (torchvision's
    ``gaussian_blur`` batched): kernels k_b(t) ∝ exp(−t²/2σ_b²), two depthwise convolutions, no host sync."""
    b, c, h, w = x.shape
    t = torch.arange(size, device=x.device, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-0.5 * (t[None, :] / sigma.float()[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)  # (B·C, size)
    p = size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (p, p, p, p), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(
    x: torch.Tensor, params: dict[str, torch.Tensor], crop: int, *, mean: float = 0.5, std: float = 0.5
) -> torch.Tensor:
    """The paper's training transform of a uint8 batch: crop, mirror, blur where drawn, ``(x/255 − μ)/σ``.
    The whole batch is blurred and the drawn images kept (no data-dependent shapes, so no host sync)."""
    out = crop_flip(x, params["top"], params["left"], params["flip"], crop).float().div_(255)
    if bool(params.get("any_blur", True)):
        blurred = blur_batch(out, params["sigma"], blur_kernel_size(BLUR_SIGMA[1]))
        out = torch.where(params["blur"][:, None, None, None], blurred, out)
    return out.sub_(mean).div_(std)


def center(x: torch.Tensor, crop: int, *, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Evaluation transform: the central crop (torchvision's CenterCrop offsets), normalized."""
    h, w = x.shape[-2:]
    t, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return x[..., t : t + crop, left : left + crop].float().div_(255).sub_(mean).div_(std)


# -------------------------------------------------------------------------------------------- training (GPU)
def resolve_run(
    kind: str, seed: int, args: argparse.Namespace, pack: Path, fisher: Path | None, extra: dict | None = None
) -> Any:
    """The run's Config: preset ``KINDS[kind]``, the pack's weights file, the script's settings, ``--set``."""
    from l2sp.engine.config import parse_overrides, resolve

    if kind not in KINDS:
        raise L2SPError(f"unknown run kind {kind!r}; choose from {', '.join(KINDS)}")
    preset, kind_overrides = KINDS[kind]
    over = {
        "model.weights": str(pack / WEIGHTS_FILE),
        "train.seed": seed,
        "optim.steps": args.steps,
        "optim.milestones": [round(args.steps * 2 / 3)],
        "train.amp": "bf16",
        "train.channels_last": True,
        "data.val_per_class": args.val_per_class,
        "train.device": getattr(args, "device", "cuda"),
        "name": f"{kind}-seed{seed}",
        **kind_overrides,
    }
    if fisher is not None and KINDS[kind][0].endswith("fisher"):
        over["reg.fisher"] = str(fisher)
    over.update(parse_overrides(args.set))
    over.update(extra or {})
    return resolve(preset, over)


@torch.no_grad()
def predict_all(
    model: torch.nn.Module,
    images: torch.Tensor,
    crop: int,
    *,
    batch: int = 500,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Arg-max predictions of ``model`` on centre crops (bf16 autocast on CUDA); logits restricted to
    ``indices`` when given (returned as positions in ``indices``)."""
    was = model.training
    model.eval()
    preds = []
    for s in range(0, len(images), batch):
        x = center(images[s : s + batch], crop).contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
            z = model(x).float()
        preds.append((z if indices is None else z.index_select(1, indices)).argmax(1))
    model.train(was)
    return torch.cat(preds)


def accuracies(pred: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(top-1 %, mean per-class %)."""
    correct = (pred == y).float()
    classes = y.unique()
    per = torch.stack([correct[y == c].mean() for c in classes])
    return 100 * float(correct.mean()), 100 * float(per.mean())


def source_scores(model: torch.nn.Module, data: dict, crop: int) -> dict[str, float]:
    """1000-way and present-class (200-way) top-1 on the source test images."""
    y, idx = data["tiny_y"], data["tiny_idx"]
    p1000 = predict_all(model, data["tiny_x"], crop)
    p200 = idx[predict_all(model, data["tiny_x"], crop, indices=idx)]
    return {
        "src1000": 100 * float((p1000 == y).float().mean()),
        "src200": 100 * float((p200 == y).float().mean()),
    }


def load_data(pack: Path, device: torch.device, resize: int, source_size: int) -> dict:
    groups, meta = read_pack(pack)
    data = {"meta": meta}
    for part in ("train", "test"):
        g = groups[f"caltech_{part}"]
        data[f"{part}_x"] = decode_group(g, resize, device=device)
        data[f"{part}_y"] = g["labels"].to(device)
    data["tiny_x"] = decode_group(groups["tiny_test"], source_size, device=device)
    data["tiny_y"] = groups["tiny_test"]["labels"].to(device)
    data["tiny_idx"] = torch.tensor(meta["tiny_class_indices"], device=device)
    data["fisher_x"] = decode_group(groups["tiny_fisher"], source_size, device=device)
    return data


def train_run(cfg: Any, data: dict, device: torch.device, *, compile: bool = False) -> dict:
    """One run: the engine's setup (model from the local file, w0, head, freezing, BN mode, regularizer),
    SGD with the regularizer attached, GPU-resident batches; returns accuracies and source scores."""
    from l2sp.analysis import reattach_head
    from l2sp.engine.run import build_optimizer, setup
    from l2sp.engine.schedule import Schedule, make_scheduler

    val_mask = carve_val(data["train_y"].cpu(), cfg.data.val_per_class).to(device)
    xtr, ytr = data["train_x"][~val_mask], data["train_y"][~val_mask]
    s = setup(cfg, SimpleNamespace(num_classes=len(data["meta"]["classes"]), in_channels=3), device)
    model = s.model
    opt = build_optimizer(model, cfg, s.regularizer.penalized_names() if s.regularizer else set())
    handle = s.regularizer.attach(opt, mode=cfg.reg.mode) if s.regularizer is not None else None
    o = cfg.optim
    sched = make_scheduler(opt, Schedule(o.schedule, o.steps, list(o.milestones), o.gamma, o.power))
    fwd = torch.compile(model) if compile else model
    crop, bsz, n = cfg.data.image_size, o.batch_size, len(ytr)
    g = torch.Generator(device=device).manual_seed(cfg.train.seed)
    per_epoch = n // bsz
    losses = torch.zeros(o.steps, device=device)
    model.train()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    perm = None
    for step in range(o.steps):
        pos = step % per_epoch
        if pos == 0:
            perm = torch.randperm(n, generator=g, device=device)
        idx = perm[pos * bsz : (pos + 1) * bsz]
        xb = xtr[idx]
        params = sample_params(
            bsz, xb.shape[-2], xb.shape[-1], crop, blur=cfg.data.blur, generator=g, device=device
        )
        params["any_blur"] = cfg.data.blur
        x = augment(xb, params, crop).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp == "bf16"):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float(), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses[step] = loss.detach()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    train_s = time.perf_counter() - t0
    if handle is not None:
        handle.remove()
    crop_eval = cfg.data.image_size
    res = {
        "name": cfg.name,
        "kind": cfg.reg.kind,
        "seed": cfg.train.seed,
        "steps": o.steps,
        "train_s": train_s,
        "images_per_s": o.steps * bsz / train_s,
        "final_loss": float(losses[-50:].mean()),
        "alpha": cfg.reg.alpha,
        "beta": cfg.reg.beta,
        "lr": o.lr,
        "bn": cfg.train.bn,
        "freeze": cfg.train.freeze,
    }
    if not math.isfinite(res["final_loss"]):
        res["diverged"] = True
    res["test_top1"], res["test_mean_per_class"] = accuracies(
        predict_all(model, data["test_x"], crop_eval), data["test_y"]
    )
    if bool(val_mask.any()):
        res["val_top1"], _ = accuracies(
            predict_all(model, data["train_x"][val_mask], crop_eval), data["train_y"][val_mask]
        )
    if s.source_head is not None:
        src = _source_model(cfg, device)
        back = reattach_head(model, src, s.head_name)
        res.update(source_scores(back, data, data["source_size"]))
        # diagnostic: the same network with the source BatchNorm statistics (parameter drift alone)
        stats = {k: v for k, v in src.state_dict().items() if "running_" in k}
        back.load_state_dict({**back.state_dict(), **stats})
        res.update({f"{k}_srcbn": v for k, v in source_scores(back, data, data["source_size"]).items()})
    return res


def _source_model(cfg: Any, device: torch.device) -> torch.nn.Module:
    from l2sp.models import pretrained

    m = pretrained(cfg.model.arch, cfg.model.weights, 1000, 3, cfg.model.options).to(device)
    return m.to(memory_format=torch.channels_last).eval()


def _worker(rank: int, jobs: Any, results: Any, args: argparse.Namespace, fisher: str | None) -> None:
    """One process on the shared GPU: decode the pack once, then train the jobs it takes from the queue."""
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    data = load_data(Path(args.pack), device, args.resize, args.source_size)
    data["source_size"] = args.source_size
    while True:
        job = jobs.get()
        if job is None:
            return
        kind, seed, extra, deadline = job
        if time.time() > deadline:
            results.put({"run": kind, "seed": seed, "skipped": "time budget", **extra})
            continue
        try:
            cfg = resolve_run(kind, seed, args, Path(args.pack), Path(fisher) if fisher else None, extra)
            r = train_run(cfg, data, device, compile=args.compile)
        except Exception as exc:  # report, keep the other runs going
            r = {"kind": kind, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
        r.update(run=kind, worker=rank, **{f"set:{k}": v for k, v in extra.items()})
        from l2sp.io import atomic_write_json

        tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in extra.items() if k != "optim.lr") or "run"
        atomic_write_json(Path(args.out) / "runs" / f"{kind}-seed{seed}-lr{r.get('lr', 'x')}-{tag}.json", r)
        results.put(r)
        print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}), flush=True)


def run_jobs(
    jobs: list[tuple[str, int, dict]], args: argparse.Namespace, fisher: Path, deadline: float
) -> list[dict]:
    """Train ``jobs`` (kind, seed, overrides) on ``--workers`` processes sharing the GPU; results in job order
    of completion."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    for kind, seed, extra in jobs:
        queue.put((kind, seed, extra, deadline))
    workers = max(1, min(args.workers, len(jobs)))
    for _ in range(workers):
        queue.put(None)
    procs = [ctx.Process(target=_worker, args=(r, queue, results, args, str(fisher))) for r in range(workers)]
    for p in procs:
        p.start()
    rows = [results.get() for _ in jobs]
    for p in procs:
        p.join()
    return rows


def estimate_fisher(
    pack: Path, out: Path, args: argparse.Namespace, device: torch.device
) -> tuple[Path, dict]:
    """Diagonal Fisher of the source network on the packed Tiny ImageNet training images (upsampled to
    ``--source-size``), and the source network's own scores on the source test images."""
    import l2sp
    from l2sp.models import pretrained

    data = load_data(pack, device, args.resize, args.source_size)
    model = pretrained("mobilenet_v2", str(pack / WEIGHTS_FILE), 1000, 3).to(device)
    model = model.to(memory_format=torch.channels_last).eval()
    scores = source_scores(model, data, args.source_size)
    x = center(data["fisher_x"], args.source_size).contiguous(memory_format=torch.channels_last)
    loader = [(x[s : s + 64], None) for s in range(0, len(x), 64)]
    t0 = time.perf_counter()
    fisher = l2sp.fisher.estimate(
        model,
        [b[0] for b in loader],
        method="exact",
        classes=args.fisher_classes,
        tail_samples=4,
        device="cpu",
        progress=False,
    )
    path = out / "fisher-mobilenet_v2-tiny.safetensors"
    l2sp.fisher.save(path, fisher, source="tiny-imagenet train", size=args.source_size, **fisher.metadata)
    scores["fisher_s"] = time.perf_counter() - t0
    return path, scores


def summarize(rows: list[dict], source: dict) -> str:
    """Markdown table: target top-1 mean ± std over seeds, source drop (1000-way and 200-way, and 200-way
    with the source BatchNorm statistics restored)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if "test_top1" in r:
            by.setdefault(r["run"], []).append(r)
    with_val = any("val_top1" in r for rs in by.values() for r in rs)
    lines = [
        "| run | seeds | " + ("val top-1 % | " if with_val else "") + "target top-1 % | mean per-class % | "
        "source drop, 1000-way | source drop, 200-way | 200-way drop, source BN stats | train s/run |",
        "|---|---:|" + ("---:|" if with_val else "") + "---:|---:|---:|---:|---:|---:|",
    ]

    def ms(v: list[float]) -> str:
        if not v:
            return "-"
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    for kind, rs in by.items():
        cells = [ms([r["val_top1"] for r in rs if "val_top1" in r])] if with_val else []
        cells += [
            ms([r["test_top1"] for r in rs]),
            ms([r["test_mean_per_class"] for r in rs]),
            ms([source["src1000"] - r["src1000"] for r in rs if "src1000" in r]),
            ms([source["src200"] - r["src200"] for r in rs if "src200" in r]),
            ms([source["src200"] - r["src200_srcbn"] for r in rs if "src200_srcbn" in r]),
            f"{statistics.mean(r['train_s'] for r in rs):.0f}",
        ]
        lines.append(f"| {kind} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_main(args: argparse.Namespace) -> None:
    """Fisher and source scores, the learning-rate probe (``--lr auto``), the runs, the table."""
    from l2sp.io import atomic_write_json

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise L2SPError("the run step needs a CUDA GPU; use benchmarks/caltech101_mobilenetv2.py on a CPU")
    t_start = time.time()
    pack, out = Path(args.pack), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in args.kinds.split(",") if k]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    fisher, source = estimate_fisher(pack, out, args, torch.device(args.device))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(json.dumps({"source": source, "setup_s": round(time.time() - t_start, 1)}), flush=True)
    deadline = t_start + args.budget_s
    probe: list[dict] = []
    if args.lr == "auto":  # one rate for every penalty: the best L2-SP validation accuracy of a short run
        grid = [float(v) for v in args.lr_grid.split(",")]
        extra = {
            "data.val_per_class": args.probe_val,
            "optim.steps": args.probe_steps,
            "optim.milestones": [round(args.probe_steps * 2 / 3)],
        }
        probe = run_jobs(
            [(args.probe_kind, 0, {**extra, "optim.lr": lr}) for lr in grid], args, fisher, deadline
        )
        ok = [r for r in probe if "val_top1" in r and math.isfinite(r["val_top1"])]
        if not ok:
            raise L2SPError(
                f"every learning rate of --lr-grid failed ({probe[0].get('error')}); give lower ones"
            )
        lr = max(ok, key=lambda r: r["val_top1"])["lr"]
        for r in probe:
            print(
                f"lr probe {r.get('set:optim.lr')}: val top-1 {r.get('val_top1', float('nan')):.1f} %",
                flush=True,
            )
    else:
        lr = float(args.lr)
    print(f"learning rate {lr:g} ({time.time() - t_start:.0f} s)", flush=True)
    runs = [
        (k, s, {"optim.lr": lr}) for s in seeds for k in kinds
    ]  # seed-major: each kind's first seed first
    rows = run_jobs(runs, args, fisher, deadline)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    atomic_write_json(
        out / "results.json",
        {
            "source": source,
            "lr_probe": probe,
            "runs": rows,
            "args": vars(args),
            "device": device,
            "wall_s": time.time() - t_start,
        },
    )
    print(
        f"\nCaltech-101-30, MobileNetV2 (ImageNet), {args.steps} steps, batch 64, 224², bf16, lr {lr:g}, "
        f"{args.workers} concurrent runs on {device}; source (Tiny ImageNet val subset at "
        f"{args.source_size}²): "
        f"{source['src1000']:.1f} % (1000-way), {source['src200']:.1f} % (200-way); "
        f"wall {time.time() - t_start:.0f} s"
    )
    for r in rows:
        if "test_top1" not in r:
            print(f"not finished: {r.get('run')} seed {r.get('seed')}: {r.get('error') or r.get('skipped')}")
    print(summarize(rows, source))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="write the compact image pack (CPU machine)")
    pk.add_argument("--caltech", default=str(SHARED / "data" / "caltech101"))
    pk.add_argument("--tiny", default=str(SHARED / "data" / "tiny-imagenet"))
    pk.add_argument("--weights", default=str(SHARED / "weights" / WEIGHTS_FILE))
    pk.add_argument("--out", default="runs/caltech101-pack")
    pk.add_argument("--split-seed", type=int, default=0)
    pk.add_argument("--quality", type=int, default=70, help="JPEG quality of the re-encoded Caltech images")
    pk.add_argument("--short-side", type=int, default=144, help="shrink Caltech images to this shorter side")
    pk.add_argument("--tiny-test-per-class", type=int, default=20)
    pk.add_argument("--tiny-fisher-per-class", type=int, default=5)
    pk.add_argument("--max-mib", type=float, default=56.0)
    rn = sub.add_parser("run", help="train and evaluate on the GPU")
    rn.add_argument("--pack", default="runs/caltech101-pack")
    rn.add_argument("--out", default=os.environ.get("OUT", "runs/caltech101-gpu"))
    rn.add_argument("--kinds", default="l2,l2-sp,l2-sp-fisher", help=f"comma list of {', '.join(KINDS)}")
    rn.add_argument("--seeds", default="0,1")
    rn.add_argument("--workers", type=int, default=3, help="runs trained at once (one process each)")
    rn.add_argument("--steps", type=int, default=9000)
    rn.add_argument(
        "--lr", default="auto", help="learning rate, or 'auto': the best of --lr-grid on validation"
    )
    rn.add_argument("--lr-grid", default="0.01,0.003,0.001")
    rn.add_argument("--probe-steps", type=int, default=1500, help="steps of each learning-rate probe")
    rn.add_argument("--probe-val", type=int, default=5, help="validation images per class (of the 30)")
    rn.add_argument("--probe-kind", default="l2-sp")
    rn.add_argument("--val-per-class", type=int, default=0)
    rn.add_argument("--resize", type=int, default=256)
    rn.add_argument("--source-size", type=int, default=224, help="Tiny ImageNet images upsampled to this")
    rn.add_argument("--fisher-classes", type=int, default=20, help="exact Fisher: classes kept per example")
    rn.add_argument("--budget-s", type=float, default=540, help="start no run after this many seconds")
    rn.add_argument("--compile", action="store_true", help="torch.compile the model")
    rn.add_argument("--device", default="cuda", help="cuda (cpu: smoke tests only)")
    rn.add_argument("--set", action="append", default=[], help="override for every run, e.g. reg.alpha=0.01")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        make_pack(
            args.caltech,
            args.tiny,
            args.weights,
            args.out,
            split_seed=args.split_seed,
            quality=args.quality,
            short_side=args.short_side,
            tiny_test_per_class=args.tiny_test_per_class,
            tiny_fisher_per_class=args.tiny_fisher_per_class,
            max_mib=args.max_mib,
        )
    else:
        run_main(args)


if __name__ == "__main__":
    main()
