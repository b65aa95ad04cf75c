"""l2sp.fisher: estimators against brute-force loops over examples and classes (float64), files, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import l2sp.fisher as fisher
from l2sp.errors import L2SPError
from l2sp.fisher import hooks

K = 5


# ----------------------------------------------------------------------------------------------- tiny nets
class ResNetish(nn.Module):
    """Conv/BN/in-place ReLU, a residual block with +=, a strided grouped reflect-padded conv, GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding="same", bias=False), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect", dilation=1)
        self.gn = nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(out)
        out = torch.tanh(self.gn(self.down(out)))
        return self.fc(out.mean((2, 3)))


class SeqNet(nn.Module):
    """Conv1d ('same', dilated), BatchNorm1d, LayerNorm, a Linear on 3-D input used twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding="same")
        self.bn = nn.BatchNorm1d(4)
        self.c2 = nn.Conv1d(4, 4, 2, dilation=2)
        self.ln = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(torch.relu(self.bn(self.c1(x)))).transpose(1, 2)  # (n, L, 4)
        h = torch.tanh(self.mix(torch.tanh(self.mix(self.ln(h)))))
        return self.head(h.mean(1))


class RawParam(nn.Module):
    """A bare nn.Parameter (only the func backend handles it) and a frozen layer (excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.frozen(x)) * self.scale))


class VolNet(nn.Module):
    """Conv3d + BatchNorm3d (handled by the batch-as-groups convolution) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1)
        self.bn = nn.BatchNorm3d(3)
        self.fc = nn.Linear(3, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean((2, 3, 4)))


def _prepare(net: nn.Module) -> nn.Module:
    net = net.double()
    for m in net.modules():  # non-trivial BatchNorm running statistics and affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net.train()


MODELS = {
    "resnetish": (ResNetish, (3, 6, 6)),
    "seqnet": (SeqNet, (3, 9)),
    "rawparam": (RawParam, (6,)),
    "volnet": (VolNet, (2, 3, 4, 3)),
}


def _make(name: str, n: int = 7):
    cls, shape = MODELS[name]
    net = _prepare(cls())
    x = torch.randn(n, *shape, dtype=torch.float64)
    y = torch.randint(0, K, (n,))
    return net, x, y


def brute_force(net: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(1/n) Σ_i Σ_k p_k (∂ log p_k(x_i)/∂w)², one backward per (example, class); true label if y given."""
    was = net.training
    net.eval()
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros_like(p) for n, p in named}
    for i in range(len(x)):
        logp = torch.log_softmax(net(x[i : i + 1]), -1)[0]
        for k in range(logp.numel()) if y is None else [int(y[i])]:
            grads = torch.autograd.grad(logp[k], [p for _, p in named], retain_graph=True)
            w = logp[k].exp().item() if y is None else 1.0
            for (n, _), g in zip(named, grads):
                acc[n] += w * g * g
    net.train(was)
    return {n: a / len(x) for n, a in acc.items()}


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[n].double() - b[n].double()).abs().max() / b[n].double().abs().max()) for n in b)


def batches(x: torch.Tensor, y: torch.Tensor | None = None, size: int = 3) -> list:
    return [
        (x[s : s + size], y[s : s + size]) if y is not None else x[s : s + size]
        for s in range(0, len(x), size)
    ]


# --------------------------------------------------------------------------------------------- exactness
CASES = [
    ("resnetish", "hooks"),
    ("resnetish", "func"),
    ("seqnet", "hooks"),
    ("seqnet", "func"),
    ("rawparam", "func"),
    ("rawparam", "auto"),
    ("volnet", "hooks"),
]


@pytest.mark.parametrize("name,backend", CASES)
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_matches_brute_force(name, backend, method):
    net, x, y = _make(name)
    ref = brute_force(net, x, y if method == "empirical" else None)
    got = fisher.estimate(
        net, batches(x, y), method=method, backend=backend, dtype=torch.float64, chunk_size=2
    )
    assert rel_err(got, ref) < 1e-6
    assert got.metadata["examples"] == len(x) and got.metadata["method"] == method
    assert list(got) == [n for n, p in net.named_parameters() if p.requires_grad]
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in got.values())


@pytest.mark.parametrize("unfold_below,block_bytes", [(0, 1 << 20), (10**9, 1 << 20), (0, 1), (10**9, 600)])
@pytest.mark.parametrize("name", ["resnetish", "seqnet"])
def test_both_convolution_paths_match_brute_force(name, unfold_below, block_bytes, monkeypatch):
    """Per-example conv gradients by im2col + bmm or by the batch-as-groups convolution, in example blocks."""
    monkeypatch.setattr(hooks, "_UNFOLD_BELOW", unfold_below)
    monkeypatch.setattr(hooks, "_BLOCK_BYTES", block_bytes)
    net, x, _ = _make(name, 5)
    got = fisher.estimate(net, [x], backend="hooks", dtype=torch.float64)
    assert rel_err(got, brute_force(net, x)) < 1e-6


@pytest.mark.parametrize("name", ["resnetish", "seqnet", "volnet"])
def test_accelerator_code_path_matches_brute_force(name, monkeypatch):
    """The GPU branch (im2col everywhere, no cache blocking), run on CPU."""
    monkeypatch.setattr(hooks, "_accelerated", lambda t: True)
    monkeypatch.setattr(hooks, "_BLOCK_BYTES", 1)  # would split every layer if the branch ignored it
    net, x, _ = _make(name, 5)
    got = fisher.estimate(net, [x], backend="hooks", dtype=torch.float64)
    assert rel_err(got, brute_force(net, x)) < 1e-6


def test_auto_backend_and_trainable_names():
    for name, expected in [("resnetish", "hooks"), ("seqnet", "hooks"), ("rawparam", "func")]:
        net, x, _ = _make(name, 3)
        got = fisher.estimate(net, [x], method="mc", progress=False)
        assert got.metadata["backend"] == expected
        assert all(t.dtype == torch.float32 for t in got.values())
    assert "frozen.weight" not in got and "scale" in got


def test_eval_mode_used_and_mode_restored():
    net, x, _ = _make("resnetish")
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    got = fisher.estimate(net, [x], dtype=torch.float64)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(stats[k], v) for k, v in net.state_dict().items())  # running stats untouched
    assert rel_err(got, brute_force(net, x)) < 1e-6  # brute force in eval mode: BatchNorm running statistics
    net.eval()
    fisher.estimate(net, [x])
    assert not net.training


def test_last_layer_closed_form():
    """F(W_ij) = mean_n p_i (1 − p_i) h_j², F(b_i) = mean_n p_i (1 − p_i): an oracle without autograd."""
    net, x, _ = _make("resnetish", 9)
    feats = []
    net.fc.register_forward_hook(lambda m, a, out: feats.append(a[0].detach()))
    got = fisher.estimate(net, [x], dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        p = torch.softmax(net(x), -1)
    h = feats[-1]
    v = p * (1 - p)
    torch.testing.assert_close(got["fc.weight"], (v.T @ h**2) / len(x), rtol=1e-9, atol=0)
    torch.testing.assert_close(got["fc.bias"], v.mean(0), rtol=1e-9, atol=0)


def test_chunk_size_and_batching_do_not_change_the_result():
    net, x, y = _make("seqnet", 8)
    a = fisher.estimate(net, [(x, y)], dtype=torch.float64, chunk_size=64)
    b = fisher.estimate(net, batches(x, y, 3), dtype=torch.float64, chunk_size=1)
    assert rel_err(a, b) < 1e-12


def test_squared_batch_mean_gradient_is_not_the_estimate():
    """(mean_n g_n)² (the popular shortcut) differs from mean_n g_n², which is what is returned."""
    net, x, y = _make("resnetish", 8)
    net.eval()
    logp = torch.log_softmax(net(x), -1)
    params = [p for p in net.parameters() if p.requires_grad]
    mean_grad = torch.autograd.grad(logp.gather(1, y[:, None]).mean(), params)
    got = fisher.estimate(net, [(x, y)], method="empirical", dtype=torch.float64)
    ref = brute_force(net, x, y)
    shortcut = {n: g**2 for (n, _), g in zip(net.named_parameters(), mean_grad)}
    assert rel_err(got, ref) < 1e-6
    assert rel_err(shortcut, ref) > 0.5
    total = sum(float(t.sum()) for t in got.values())
    assert sum(float(t.sum()) for t in shortcut.values()) < 0.5 * total  # Jensen: (E g)² ≤ E g²


# ------------------------------------------------------------------------------------- sampled estimators
def test_mc_converges_to_exact_like_one_over_sqrt_samples():
    net, x, _ = _make("resnetish", 6)
    exact = fisher.estimate(net, [x], dtype=torch.float64)
    errs = {}
    for s in (2, 32):
        gen = torch.Generator().manual_seed(s)
        e = [
            rel_err(
                fisher.estimate(net, [x], method="mc", samples=s, dtype=torch.float64, generator=gen), exact
            )
            for _ in range(8)
        ]
        errs[s] = float(np.sqrt(np.mean(np.square(e))))
    ratio = errs[2] / errs[32]  # 1/√samples: √16 = 4
    assert 2.0 < ratio < 8.0, errs


def test_mc_is_unbiased():
    net, x, _ = _make("seqnet", 4)
    exact = fisher.estimate(net, [x], dtype=torch.float64)
    # repeating the inputs averages independent draws: the mean of an unbiased estimator converges to exact
    mc = fisher.estimate(net, [x.repeat(400, 1, 1)], method="mc", dtype=torch.float64, chunk_size=1600)
    tot = {n: float(exact[n].sum()) for n in exact}
    assert max(abs(float(mc[n].sum()) - tot[n]) / tot[n] for n in exact) < 0.05


def test_class_weights_identity():
    p = torch.softmax(torch.randn(6, 7, dtype=torch.float64) * 3, -1)
    e = torch.eye(7, dtype=torch.float64)
    direct = p * ((e[None] - p[:, None]) ** 2).sum(-1)  # p_c ‖e_c − p‖²
    torch.testing.assert_close(fisher.class_weights(p), direct)
    torch.testing.assert_close(fisher.class_weights(p).sum(-1), 1 - (p * p).sum(-1))


def _confident(name: str = "resnetish", n: int = 6):
    net, x, y = _make(name, n)
    with torch.no_grad():
        net.fc.weight.mul_(8.0)
        net.fc.bias.mul_(8.0)
    return net, x, y


def test_truncation_by_fisher_share_beats_truncation_by_probability():
    net, x, _ = _confident()
    exact = fisher.estimate(net, [x], dtype=torch.float64)
    total = sum(float(t.sum()) for t in exact.values())
    top = fisher.estimate(net, [x], classes=1, tail_samples=0, dtype=torch.float64)
    share_w = sum(float(t.sum()) for t in top.values()) / total
    # brute force: keep only the most probable class of each example
    net.eval()
    with torch.no_grad():
        p = torch.softmax(net(x), -1)
    named = [(n, q) for n, q in net.named_parameters()]
    by_p = 0.0
    for i in range(len(x)):
        k = int(p[i].argmax())
        g = torch.autograd.grad(torch.log_softmax(net(x[i : i + 1]), -1)[0, k], [q for _, q in named])
        by_p += float(p[i, k]) * sum(float((t * t).sum()) for t in g)
    share_p = by_p / len(x) / total
    assert float(p.max(-1).values.min()) > 0.5  # the model is confident
    assert share_w > 5 * share_p  # the most probable class holds little of the Fisher: its own term vanishes
    pred = top.metadata["predicted_share"]
    w = fisher.class_weights(p)
    torch.testing.assert_close(
        torch.tensor(pred, dtype=torch.float64), (w.max(-1).values / w.sum(-1)).mean(), rtol=1e-6, atol=0
    )
    assert 0 < share_w <= 1 + 1e-9


def test_truncation_share_grows_to_exact():
    net, x, _ = _make("resnetish", 6)
    exact = fisher.estimate(net, [x], dtype=torch.float64)
    total = sum(float(t.sum()) for t in exact.values())
    shares = [
        sum(
            float(t.sum())
            for t in fisher.estimate(net, [x], classes=c, tail_samples=0, dtype=torch.float64).values()
        )
        / total
        for c in range(1, K + 1)
    ]
    assert all(a < b for a, b in zip(shares, shares[1:])) and shares[-1] == pytest.approx(1.0, rel=1e-9)


def test_truncation_with_tail_sampling_is_unbiased():
    net, x, _ = _confident("resnetish", 3)
    exact = fisher.estimate(net, [x], dtype=torch.float64)
    est = fisher.estimate(
        net, [x.repeat(300, 1, 1, 1)], classes=2, tail_samples=1, dtype=torch.float64, chunk_size=900
    )
    biased = fisher.estimate(net, [x], classes=2, tail_samples=0, dtype=torch.float64)
    tot = {n: float(exact[n].sum()) for n in exact}
    err = max(abs(float(est[n].sum()) - tot[n]) / tot[n] for n in exact)
    bias = max(abs(float(biased[n].sum()) - tot[n]) / tot[n] for n in exact)
    assert err < 0.05 and err < bias
    assert est.metadata["columns_per_example"] == 3


@pytest.mark.parametrize("accelerated", [False, True])
def test_autocast_bf16_runs_and_stays_close(accelerated, monkeypatch):
    monkeypatch.setattr(hooks, "_accelerated", lambda t: accelerated)
    net, x, _ = _make("resnetish", 8)
    net = net.float()
    ref = fisher.estimate(net, [x.float()])
    got = fisher.estimate(net, [x.float()], autocast=torch.bfloat16)
    for n in ref:
        assert got[n].dtype == torch.float32
        assert abs(float(got[n].sum()) / float(ref[n].sum()) - 1) < 0.1, n


# -------------------------------------------------------------------------------------------------- data
def test_dataloaders_of_x_or_xy_and_max_examples():
    net, x, y = _make("resnetish", 10)
    full = fisher.estimate(net, [x[:6]], dtype=torch.float64)
    only_x = fisher.estimate(
        net, DataLoader(TensorDataset(x), batch_size=4), max_examples=6, dtype=torch.float64
    )
    xy = fisher.estimate(
        net, DataLoader(TensorDataset(x, y), batch_size=4), max_examples=6, dtype=torch.float64
    )
    assert only_x.metadata["examples"] == 6 == xy.metadata["examples"]
    assert rel_err(fisher.estimate(net, x[:6], dtype=torch.float64), full) < 1e-12  # a bare tensor: one batch
    assert rel_err(only_x, full) < 1e-12 and rel_err(xy, full) < 1e-12


# ------------------------------------------------------------------------------------------------ errors
def _msg(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_bad_input_errors():
    net, x, y = _make("resnetish", 4)
    with pytest.raises(L2SPError, match="no examples") as e:
        fisher.estimate(net, [])
    _msg(e)
    with pytest.raises(L2SPError, match="no examples"):
        fisher.estimate(net, DataLoader(TensorDataset(x[:0]), batch_size=2))
    with pytest.raises(L2SPError, match="no trainable"):
        fisher.estimate(nn.Sequential(nn.Linear(2, 3)).requires_grad_(False), [torch.randn(2, 2)])
    for bad in (0, -1, 1.5):
        with pytest.raises(L2SPError, match="samples"):
            fisher.estimate(net, [x], method="mc", samples=bad)
    with pytest.raises(L2SPError, match="is for method='mc'"):
        fisher.estimate(net, [x], method="exact", samples=4)
    with pytest.raises(L2SPError, match="is for method='exact'"):
        fisher.estimate(net, [x], method="mc", classes=2)
    with pytest.raises(L2SPError, match="unknown Fisher method"):
        fisher.estimate(net, [x], method="diag")
    with pytest.raises(L2SPError, match="true labels"):
        fisher.estimate(net, [x], method="empirical")
    with pytest.raises(L2SPError, match="class indices"):
        fisher.estimate(net, [(x, y + K)], method="empirical")
    with pytest.raises(L2SPError, match="backend='hooks'"):
        fisher.estimate(_make("rawparam")[0], [torch.randn(2, 6, dtype=torch.float64)], backend="hooks")


def test_nan_logits_name_the_batch():
    net, x, _ = _make("resnetish", 4)
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    net.train()
    with pytest.raises(L2SPError, match="batch 1") as e:
        fisher.estimate(net, [x[:2], bad[:2]], chunk_size=2)
    _msg(e)
    assert net.training  # mode restored on error


# ------------------------------------------------------------------------------------------- save / load
def test_save_load_roundtrip(tmp_path):
    net, x, _ = _make("resnetish", 4)
    f = fisher.estimate(net, [x], method="mc", samples=2)
    path = fisher.save(tmp_path / "f.safetensors", f, source_dataset="fmnist-source")
    back = fisher.load(path, model=net)
    assert list(back) == list(f)
    assert all(torch.equal(back[n], f[n]) for n in f)
    md = back.metadata
    assert md["method"] == "mc" and md["examples"] == 4 and md["samples"] == 2
    assert md["source_dataset"] == "fmnist-source"
    assert md["shapes"] == {n: list(t.shape) for n, t in f.items()} and md["names"] == list(f)


def test_load_rejects_other_models(tmp_path):
    net, x, _ = _make("resnetish", 3)
    path = fisher.save(tmp_path / "f.safetensors", fisher.estimate(net, [x]))
    other = ResNetish()
    other.fc = nn.Linear(6, 3)
    with pytest.raises(L2SPError, match="shapes differ") as e:
        fisher.load(path, model=other)
    _msg(e)
    with pytest.raises(L2SPError, match="match no trainable"):
        fisher.load(path, model=SeqNet())
    f = fisher.load(path)
    del f["fc.bias"]
    with pytest.raises(L2SPError, match="lacks 1"):
        fisher.check_matches(f, net)
    fisher.check_matches(
        f, {("module." + n): p.shape for n, p in net.named_parameters()}, require=["fc.weight"]
    )  # wrapper prefixes are ignored
    with pytest.raises(L2SPError, match="no such file"):
        fisher.load(tmp_path / "missing.safetensors")


def test_save_rejects_invalid_values(tmp_path):
    with pytest.raises(L2SPError, match="negative, NaN or Inf"):
        fisher.save(tmp_path / "f.safetensors", {"w": torch.tensor([1.0, -1.0])})
    with pytest.raises(L2SPError, match="empty"):
        fisher.save(tmp_path / "f.safetensors", {})


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "f.safetensors"
    fisher.save(path, {"w": torch.ones(3)}, method="exact")

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        fisher.save(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(fisher.load(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["f.safetensors"]


# ------------------------------------------------------------------------------------------- statistics
def test_summary_statistics():
    f = {"a": torch.rand(4, 5), "b": torch.rand(7)}
    rows = fisher.summary(f, quantiles=(0.1, 0.5, 0.9))
    assert [r["name"] for r in rows] == ["a", "b"]
    for r, (name, t) in zip(rows, f.items()):
        assert r["name"] == name
        v = t.double().numpy().ravel()
        assert r["shape"] == list(t.shape) and r["numel"] == v.size
        assert r["min"] == pytest.approx(v.min()) and r["max"] == pytest.approx(v.max())
        assert r["mean"] == pytest.approx(v.mean())
        for q in (0.1, 0.5, 0.9):
            assert r[f"q{q:g}"] == pytest.approx(np.quantile(v, q))


def test_regularizer_accepts_the_file(tmp_path):
    import l2sp

    net, x, _ = _make("resnetish", 4)
    net = net.float()
    f = fisher.estimate(net, [x.float()])
    path = fisher.save(tmp_path / "f.safetensors", f)
    reg = l2sp.regularizer("l2-sp-fisher", net, l2sp.snapshot(net), alpha=0.1, beta=0.01, fisher=path)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    expected = 0.1 / 2 * sum(float((f[n] * 0.01).sum()) for n in f)  # α/2 Σ_j F_j (w_j − w0_j)²
    assert float(reg().detach()) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------- package
def test_public_names_and_no_import_of_the_package_root():
    """The names of ``l2sp.fisher`` are where they were; its modules import submodules of l2sp, never the root."""
    import pathlib
    import re

    assert sorted(fisher.__all__) == sorted(
        ["METHODS", "FisherDict", "check_matches", "class_weights", "estimate", "load", "save", "summary"]
    )
    assert all(callable(getattr(fisher, n)) for n in fisher.__all__ if n != "METHODS")
    assert fisher.METHODS == ("exact", "mc", "empirical") and fisher.BACKENDS == ("auto", "hooks", "func")
    root = re.compile(r"^\s*(from l2sp import |import l2sp\s*$)", re.M)
    files = sorted(pathlib.Path(fisher.__file__).parent.glob("*.py"))
    assert len(files) >= 6 and not [f.name for f in files if root.search(f.read_text(encoding="utf-8"))]
