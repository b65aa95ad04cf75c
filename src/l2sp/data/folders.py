"""Image folders and the paper's split protocols (Caltech-256-30/60, Caltech-101, MIT Indoor-67,
Stanford Dogs 120 with ImageNet validation images as test, Food-101), plus a generic ImageFolder task.

Every builder checks its on-disk layout and per-class counts before anything is loaded, and raises
:class:`L2SPError` naming what is missing. Unreadable image files are found while building the split (PIL
header check, or a full decode with ``check="full"``), skipped, and named in one warning.

"n per class" protocol (Caltech): each class's sorted file list is permuted with
``numpy.random.default_rng([seed, class_index])``; the first n are training images, test images are the next
``test_per_class`` (all the rest when None). Validation images are carved from the training images: the last
``val_per_class`` of the n, so training keeps n − v. Official-list protocols use the lists as they are; with
``n_per_class`` a seeded subset of the official training list is kept.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from l2sp.errors import L2SPError

Sample = tuple[str, int]


# ---- reading images ----

def load_image(path: str) -> torch.Tensor:
    """Decode an image file with PIL to a uint8 RGB tensor 3×H×W (grayscale duplicated to 3 channels).

    A file that cannot be decoded raises L2SPError naming it.
    """
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise L2SPError(f"cannot decode image {path} ({exc}); delete or replace the file") from exc
    return torch.from_numpy(arr).permute(2, 0, 1)


def is_readable(path: str, check: str = "header") -> bool:
    """``check="header"``: PIL recognises the format and size (fast); ``"full"``: the image decodes."""
    if check == "full":
        try:
            load_image(path)
            return True
        except L2SPError:
            return False
    try:
        with Image.open(path) as im:
            return im.size[0] > 0 and im.size[1] > 0
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def filter_readable(samples: Sequence[Sample], check: str = "header") -> list[Sample]:
    """Drop unreadable files, naming them in one warning."""
    if check not in ("header", "full", "none"):
        raise L2SPError(f"check={check!r} is not one of 'header', 'full', 'none'")
    if check == "none":
        return list(samples)
    good, bad = [], []
    for s in samples:
        (good if is_readable(s[0], check) else bad).append(s)
    if bad:
        names = ", ".join(p for p, _ in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.warn(f"skipping {len(bad)} unreadable image file(s): {names}", stacklevel=3)
    return good


class FileDataset(torch.utils.data.Dataset):
    """``(transform(load_image(path)), label)`` for each (path, label) sample."""

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = load_image(path)
        return (self.transform(img) if self.transform is not None else img), label


# ---- layouts ----

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_images(folder: Path, recursive: bool = False) -> list[str]:
    """Sorted image files of a folder (by extension, as torchvision's ImageFolder)."""
    if recursive:
        walk = os.walk(folder, followlinks=True)
        out = [os.path.join(d, f) for d, _, fs in walk for f in fs if _is_image(f)]
    else:
        out = [str(p) for p in folder.iterdir() if p.is_file() and _is_image(p.name)]
    return sorted(out)


def class_folders(root: Path, what: str, exclude: Sequence[str] = ()) -> list[str]:
    """Sorted class sub-folder names of ``root`` (ImageFolder's case-sensitive order)."""
    if not root.is_dir():
        raise L2SPError(f"{what}: folder {root} does not exist; pass root= to the dataset's folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name not in exclude
                     and not e.name.startswith("."))
    if not classes:
        raise L2SPError(f"{what}: {root} has no class sub-folders; expected <root>/<class>/<image>")
    return classes


def check_class_count(what: str, found: int, expected: int | None, strict: bool) -> None:
    if expected is None or found == expected:
        return
    msg = f"{what}: found {found} classes, the protocol has {expected}"
    if strict:
        raise L2SPError(f"{msg}; complete the dataset, or pass strict=False to use the classes found")
    warnings.warn(msg, stacklevel=3)


def scan_classes(root: Path, classes: Sequence[str], check: str, recursive: bool = False
                 ) -> list[list[str]]:
    """Readable image files of each class folder."""
    samples = [(f, c) for c, name in enumerate(classes) for f in list_images(root / name, recursive)]
    per_class: list[list[str]] = [[] for _ in classes]
    for f, c in filter_readable(samples, check):
        per_class[c].append(f)
    return per_class


@dataclass
class Split:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    root: str
    protocol: str


def n_per_class_split(what: str, classes: Sequence[str], files: Sequence[Sequence[str]], *, n: int,
                      test_per_class: int | None, test_min: int, val_per_class: int, seed: int
                      ) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Seeded "n per class" split; every class must hold at least n + test_min readable images."""
    if n < 1 or val_per_class < 0 or val_per_class >= n:
        raise L2SPError(f"{what}: need n_per_class >= 1 and 0 <= val_per_class < n_per_class, "
                        f"got {n} and {val_per_class}")
    short = [(c, len(f)) for c, f in zip(classes, files) if len(f) < n + test_min]
    if short:
        lst = ", ".join(f"{c} ({k})" for c, k in short[:10]) + (" ..." if len(short) > 10 else "")
        raise L2SPError(f"{what}: {len(short)} class(es) have fewer than {n} training + {test_min} test "
                        f"readable images: {lst}; lower n_per_class or complete those classes")
    train, val, test = [], [], []
    for c, f in enumerate(files):
        perm = np.random.default_rng([seed, c]).permutation(len(f))
        picked = [f[i] for i in perm[:n]]
        rest = [f[i] for i in perm[n:]]
        train += [(p, c) for p in picked[:n - val_per_class]]
        val += [(p, c) for p in picked[n - val_per_class:]]
        test += [(p, c) for p in (rest if test_per_class is None else rest[:test_per_class])]
    return train, val, test


def subset_official(what: str, classes: Sequence[str], train: Sequence[Sample], *, n: int | None,
                    val_per_class: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split an official training list into (train, val): per class a seeded permutation; the first
    n (all when None) are kept and the last ``val_per_class`` of those become validation images."""
    by_class: list[list[Sample]] = [[] for _ in classes]
    for s in train:
        by_class[s[1]].append(s)
    out_train, out_val = [], []
    for c, items in enumerate(by_class):
        k = len(items) if n is None else n
        if len(items) < max(k, 1) or val_per_class >= k:
            raise L2SPError(f"{what}: class {classes[c]!r} has {len(items)} training images, the protocol "
                            f"needs n_per_class={k} with val_per_class={val_per_class} < n_per_class; "
                            "lower them or complete the class")
        items = sorted(items)
        perm = np.random.default_rng([seed, c]).permutation(len(items))[:k]
        picked = [items[i] for i in perm]
        out_train += picked[:k - val_per_class]
        out_val += picked[k - val_per_class:]
    return out_train, out_val


def _read_list(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise L2SPError(f"{what}: list file {path} is missing; download the dataset's official split files")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _check_listed(what: str, samples: Sequence[Sample], check: str) -> list[Sample]:
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if missing:
        lst = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise L2SPError(f"{what}: {len(missing)} file(s) of the official lists are missing: {lst}; "
                        "re-extract the image archive")
    return filter_readable(samples, check)


def _pick_root(root: str | None, what: str, marker: str, parents: Sequence[str] = ()) -> Path:
    """The dataset folder: ``root`` itself or one of its sub-folders ``parents`` holding ``marker``."""
    if root is None:
        raise L2SPError(f"{what} needs root=, the folder of the downloaded dataset")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise L2SPError(f"{what}: folder {base} does not exist; pass root= to the downloaded dataset")
    for cand in [base, *(base / p for p in parents)]:
        if (cand / marker).exists():
            return cand
    raise L2SPError(f"{what}: {base} does not hold {marker!r}" +
                    (f" (also looked in {', '.join(parents)})" if parents else "") +
                    "; pass root= to the extracted dataset folder")


# ---- the protocols ----

def imagefolder(root: str | None, *, n_per_class: int | None, val_per_class: int, seed: int,
                test_per_class: int | None = None, check: str = "header", recursive: bool = True) -> Split:
    """Generic ImageFolder: ``root/train/<class>/…`` + ``root/test/<class>/…`` (+ optional ``root/val``),
    or a single ``root/<class>/…`` split with the "n per class" protocol (n_per_class required)."""
    what = "imagefolder"
    if root is None:
        raise L2SPError("imagefolder needs root=, a folder of <class>/<image> (or train/ and test/ of them)")
    base = Path(root).expanduser()
    if (base / "train").is_dir():
        classes = class_folders(base / "train", what)
        if not (base / "test").is_dir():
            raise L2SPError(f"{what}: {base} has train/ but no test/ folder; add it (same class folders)")
        test_classes = class_folders(base / "test", what)
        if test_classes != classes:
            extra = sorted(set(test_classes) ^ set(classes))[:5]
            raise L2SPError(f"{what}: train/ and test/ class folders differ ({', '.join(extra)} ...); "
                            "use the same class folders in both")
        files = scan_classes(base / "train", classes, check, recursive)
        train = [(f, c) for c, fs in enumerate(files) for f in fs]
        test_files = scan_classes(base / "test", classes, check, recursive)
        test = [(f, c) for c, fs in enumerate(test_files) for f in fs]
        if (base / "val").is_dir() and val_per_class == 0:
            val = [(f, c) for c, fs in enumerate(scan_classes(base / "val", classes, check, recursive))
                   for f in fs]
            if n_per_class is not None:
                train, _ = subset_official(what, classes, train, n=n_per_class, val_per_class=0, seed=seed)
        else:
            train, val = subset_official(what, classes, train, n=n_per_class, val_per_class=val_per_class,
                                         seed=seed)
        return Split(list(classes), train, val, test, str(base), "train/ and test/ folders")
    classes = class_folders(base, what)
    if n_per_class is None:
        raise L2SPError(f"{what}: {base} has no train/ folder, so the split is drawn per class; "
                        "pass n_per_class= (and test_per_class=)")
    files = scan_classes(base, classes, check, recursive)
    train, val, test = n_per_class_split(what, classes, files, n=n_per_class, test_per_class=test_per_class,
                                         test_min=1, val_per_class=val_per_class, seed=seed)
    return Split(list(classes), train, val, test, str(base), f"{n_per_class} per class, seeded")


def caltech(which: str, root: str | None, *, n_per_class: int | None, val_per_class: int, seed: int,
            test_per_class: int | None = None, check: str = "header", strict: bool = True) -> Split:
    """Caltech-256 (257 classes incl. clutter; n = 30 or 60 train, 20 test) or Caltech-101 (101 classes,
    BACKGROUND_Google left out; n = 30 train, the rest up to 50 test)."""
    if which == "caltech256":
        what, marker, expected, test_n, test_min = "caltech256", "256_ObjectCategories", 257, 20, None
        exclude: tuple[str, ...] = ()
    else:
        what, marker, expected, test_n, test_min = "caltech101", "101_ObjectCategories", 101, 50, 1
        exclude = ("BACKGROUND_Google",)
    base = Path(root).expanduser() if root is not None else None
    if base is not None and (base / marker).is_dir():
        base = base / marker
    if base is None:
        raise L2SPError(f"{what} needs root=, the {marker} folder")
    classes = class_folders(base, what, exclude)
    check_class_count(what, len(classes), expected, strict)
    n = 30 if n_per_class is None else n_per_class
    t = test_n if test_per_class is None else test_per_class
    files = scan_classes(base, classes, check)
    train, val, test = n_per_class_split(what, classes, files, n=n, test_per_class=t,
                                         test_min=t if test_min is None else test_min,
                                         val_per_class=val_per_class, seed=seed)
    return Split(classes, train, val, test, str(base), f"{n} train / {t} test per class, seeded")


def indoor67(root: str | None, *, n_per_class: int | None, val_per_class: int, seed: int,
             check: str = "header", strict: bool = True) -> Split:
    """MIT Indoor-67: ``Images/<class>/<file>`` and the official ``TrainImages.txt`` / ``TestImages.txt``
    (lines ``<class>/<file>``; 80 / 20 per class)."""
    what = "indoor67"
    base = _pick_root(root, what, "TrainImages.txt", ("indoorCVPR_09",))
    images = base / "Images"
    if not images.is_dir():
        raise L2SPError(f"{what}: {images} is missing; extract indoorCVPR_09.tar into {base}")
    tr, te = _read_list(base / "TrainImages.txt", what), _read_list(base / "TestImages.txt", what)
    classes = sorted({e.split("/")[0] for e in tr + te})
    check_class_count(what, len(classes), 67, strict)
    index = {c: i for i, c in enumerate(classes)}
    train = _check_listed(what, [(str(images / e), index[e.split("/")[0]]) for e in tr], check)
    test = _check_listed(what, [(str(images / e), index[e.split("/")[0]]) for e in te], check)
    train, val = subset_official(what, classes, train, n=n_per_class, val_per_class=val_per_class, seed=seed)
    return Split(classes, train, val, test, str(base), "official TrainImages.txt / TestImages.txt")


def food101(root: str | None, *, n_per_class: int | None, val_per_class: int, seed: int,
            check: str = "header", strict: bool = True) -> Split:
    """Food-101: ``images/<class>/<id>.jpg`` with ``meta/train.txt`` / ``meta/test.txt`` (lines
    ``<class>/<id>``; 750 / 250 per class)."""
    what = "food101"
    base = _pick_root(root, what, "meta", ("food-101",))
    images = base / "images"
    if not images.is_dir():
        raise L2SPError(f"{what}: {images} is missing; extract food-101.tar.gz into {base.parent}")
    tr, te = _read_list(base / "meta" / "train.txt", what), _read_list(base / "meta" / "test.txt", what)
    classes_file = base / "meta" / "classes.txt"
    classes = (_read_list(classes_file, what) if classes_file.is_file()
               else sorted({e.split("/")[0] for e in tr + te}))
    check_class_count(what, len(classes), 101, strict)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({e.split("/")[0] for e in tr + te} - set(index))
    if unknown:
        raise L2SPError(f"{what}: the lists name classes not in meta/classes.txt: {', '.join(unknown[:5])}; "
                        "re-extract meta/")

    def sample(e: str) -> Sample:
        return str(images / (e if _is_image(e) else e + ".jpg")), index[e.split("/")[0]]

    train = _check_listed(what, [sample(e) for e in tr], check)
    test = _check_listed(what, [sample(e) for e in te], check)
    train, val = subset_official(what, classes, train, n=n_per_class, val_per_class=val_per_class, seed=seed)
    return Split(classes, train, val, test, str(base), "official meta/train.txt / meta/test.txt")


_WNID = re.compile(r"n\d{8}")


def _dogs_train_list(base: Path, what: str) -> list[str]:
    for cand in (base / "train_list.txt", base / "lists" / "train_list.txt"):
        if cand.is_file():
            return _read_list(cand, what)
    for cand in (base / "train_list.mat", base / "lists" / "train_list.mat"):
        if cand.is_file():
            try:
                from scipy.io import loadmat
            except ImportError as exc:
                raise L2SPError(f"{what}: reading {cand} needs scipy; pip install scipy, or write the list "
                                "as train_list.txt (one <synset-breed>/<file>.jpg per line)") from exc
            mat = loadmat(str(cand))
            if "file_list" not in mat:
                raise L2SPError(f"{what}: {cand} has no 'file_list'; use the official lists.tar")
            return [str(np.asarray(e).ravel()[0]) for e in np.asarray(mat["file_list"]).ravel()]
    raise L2SPError(f"{what}: no train_list.mat or train_list.txt in {base} or {base / 'lists'}; "
                    "extract the official lists.tar there")


def _given_path(value: str | None, folder: bool, if_none: str, if_missing: str) -> Path:
    """``value`` as an existing folder (or file); L2SPError ``if_none`` when it is None, ``if_missing`` (with
    ``{}`` standing for the path) when it does not exist."""
    if value is None:
        raise L2SPError(if_none)
    path = Path(value).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        raise L2SPError(if_missing.format(path))
    return path


def _imagenet_val(folder: str | None, labels: str | None, wnids: set[str], what: str
                  ) -> dict[str, list[str]]:
    """ImageNet validation images of the given synsets: ``folder/<wnid>/*`` or a flat folder + a labels
    file (Kaggle's LOC_val_solution.csv, or lines ``<file> <wnid>``)."""
    base = _given_path(folder, True, f"{what} tests on the ImageNet validation images of its 120 breeds; pass "
                       "imagenet_val= (a folder of <wnid>/ sub-folders, or flat plus imagenet_val_labels=)",
                       f"{what}: ImageNet validation folder {{}} does not exist; fix imagenet_val=")
    out: dict[str, list[str]] = {w: [] for w in wnids}
    if any((base / w).is_dir() for w in wnids):
        for w in wnids:
            if (base / w).is_dir():
                out[w] = list_images(base / w)
        return out
    lab = _given_path(labels, False, f"{what}: {base} has no <wnid>/ sub-folders; pass imagenet_val_labels= "
                      "(Kaggle's LOC_val_solution.csv, or a text file of '<file> <wnid>' lines)",
                      f"{what}: labels file {{}} does not exist; fix imagenet_val_labels=")
    files = {Path(f).stem: f for f in list_images(base)}
    text = lab.read_text()
    rows: list[tuple[str, str]] = []
    if text.startswith("ImageId"):
        rows = [(r["ImageId"], r["PredictionString"].split()[0]) for r in csv.DictReader(text.splitlines())]
    else:
        for ln in text.splitlines():
            parts = ln.replace(",", " ").split()
            if len(parts) >= 2 and _WNID.fullmatch(parts[1]):
                rows.append((Path(parts[0]).stem, parts[1]))
    if not rows:
        raise L2SPError(f"{what}: no '<file> <wnid>' rows in {lab}; use LOC_val_solution.csv or that format")
    for stem, w in rows:
        if w in out and stem in files:
            out[w].append(files[stem])
    return {w: sorted(v) for w, v in out.items()}


def dogs120(root: str | None, *, n_per_class: int | None, val_per_class: int, seed: int,
            imagenet_val: str | None = None, imagenet_val_labels: str | None = None,
            test_per_class: int | None = None, check: str = "header", strict: bool = True) -> Split:
    """Stanford Dogs 120: official ``train_list`` (100 per class) over ``Images/<wnid>-<breed>/``; the test
    set is the ImageNet validation images of those 120 synsets (50 each), since the official Dogs test set
    overlaps ImageNet's training set."""
    what = "dogs120"
    base = _pick_root(root, what, "Images", ("StanfordDogs", "stanford_dogs"))
    classes = class_folders(base / "Images", what)
    check_class_count(what, len(classes), 120, strict)
    wnid = {}
    for c in classes:
        m = _WNID.match(c)
        if m is None:
            raise L2SPError(f"{what}: class folder {c!r} does not start with a synset id "
                            "(n02085620-Chihuahua); use the official Images/ folder")
        wnid[c] = m.group(0)
    index = {c: i for i, c in enumerate(classes)}
    entries = _dogs_train_list(base, what)
    bad = sorted({e.split("/")[0] for e in entries} - set(index))
    if bad:
        raise L2SPError(f"{what}: the train list names breeds without a folder in Images/: "
                        f"{', '.join(bad[:5])}; re-extract images.tar")
    train = _check_listed(what, [(str(base / "Images" / e), index[e.split("/")[0]]) for e in entries], check)
    train, val = subset_official(what, classes, train, n=n_per_class, val_per_class=val_per_class, seed=seed)
    found = _imagenet_val(imagenet_val, imagenet_val_labels, set(wnid.values()), what)
    need = 50 if test_per_class is None else test_per_class
    test: list[Sample] = []
    short = []
    for c in classes:
        files = [f for f, _ in filter_readable([(f, 0) for f in found[wnid[c]]], check)]
        if len(files) < need:
            short.append(f"{wnid[c]} ({len(files)})")
        test += [(f, index[c]) for f in files[:need]]
    if short:
        raise L2SPError(f"{what}: {len(short)} synset(s) have fewer than {need} ImageNet validation images: "
                        f"{', '.join(short[:5])}; check imagenet_val= (and its labels)")
    return Split(classes, train, val, test, str(base),
                 "official train_list; test = ImageNet val of the synsets")
