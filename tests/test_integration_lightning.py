"""The Lightning callback against a plain loop on loss + reg() (CPU, tiny model, deterministic data order)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import l2sp

L = pytest.importorskip("lightning")
from l2sp.integrations.lightning import L2SP  # noqa: E402

ALPHA, BETA, LR = 0.5, 0.05, 0.1


class Lit(L.LightningModule):
    def __init__(self, manual_callback=None, fused=False):
        super().__init__()
        self.fused = fused
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        self.manual_callback = manual_callback
        self.automatic_optimization = manual_callback is None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        self.manual_callback.regularizer.add_grad_()  # what the warning tells the user to do
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9, fused=self.fused or None)


def make_module(**kw):
    """A 'pre-trained' module, its snapshot w0, then a new 3-class head and moved weights (so d ≠ 0)."""
    torch.manual_seed(0)
    lit = Lit(**kw)
    w0 = l2sp.snapshot(lit)
    lit.net[2] = nn.Linear(8, 3)
    with torch.no_grad():
        lit.net[0].weight.add_(0.2)
    return lit, w0


def loader():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(tmp_path, epochs=2, callbacks=(), **kw):
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=list(callbacks),
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


def plain_loop(lit, w0, epochs=2, autocast=False, kind="l2-sp", penalty=True, record=None):
    """The reference: SGD on J(w) + Ω(w) with autograd through reg(); J under CPU bf16 autocast if asked."""
    model = copy.deepcopy(lit)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    reg = l2sp.regularizer(kind, model, w0, alpha=ALPHA, beta=BETA)
    for _ in range(epochs):
        for x, y in loader():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.cross_entropy(model.net(x), y)
            omega = reg()
            if record is not None:
                record.append(omega.item())
            (loss + omega if penalty else loss).backward()
            opt.step()
    return model


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_fit_equals_the_plain_loop_on_loss_plus_penalty(tmp_path):
    lit, w0 = make_module()
    expected = plain_loop(lit, w0)
    cb = L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA)
    trainer(tmp_path, callbacks=[cb]).fit(lit, loader())
    assert max_diff(lit, expected) <= 1e-5
    assert cb.regularizer.novel == ["net.2.weight", "net.2.bias"]  # the new head is S̄, keyed like the module
    assert max_diff(lit, plain_loop(*make_module(), penalty=False)) > 1e-2  # the penalty did something


def plain_loop_accumulated(lit, w0, accumulation=1, clip=0.0):
    """SGD on Σ_k J_k/K + Ω per step (K micro-batches), gradient norm of the sum clipped to ``clip``."""
    model = copy.deepcopy(lit)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=ALPHA, beta=BETA)
    batches = list(loader())
    for _ in range(2):
        for i in range(0, len(batches), accumulation):
            opt.zero_grad()
            for x, y in batches[i:i + accumulation]:
                (nn.functional.cross_entropy(model.net(x), y) / accumulation).backward()
            reg().backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return model


def test_accumulation_adds_the_penalty_once_per_step_and_clipping_sees_it(tmp_path):
    lit, w0 = make_module()
    expected = plain_loop_accumulated(lit, w0, accumulation=2)
    trainer(tmp_path, callbacks=[L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA)], accumulate_grad_batches=2).fit(
        lit, loader())
    assert max_diff(lit, expected) <= 1e-5

    lit, w0 = make_module()
    expected = plain_loop_accumulated(lit, w0, clip=0.05)
    trainer(tmp_path, callbacks=[L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA)], gradient_clip_val=0.05).fit(
        lit, loader())
    assert max_diff(lit, expected) <= 1e-5  # clip(∇J + ∇Ω): the penalty is added before Lightning clips


def test_bf16_mixed_equals_the_plain_loop_under_the_same_autocast(tmp_path):
    lit, w0 = make_module()
    expected = plain_loop(lit, w0, autocast=True)
    trainer(tmp_path, callbacks=[L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA)], precision="bf16-mixed").fit(lit, loader())
    # Both sides run the same bf16 kernels on the same inputs; they differ only in how ∇Ω (float32) is formed:
    # add_grad_ vs autograd through reg(), last-bit differences (measured: 3e-8 after 8 steps). Such a difference
    # can flip one bf16 rounding (2^-8 relative) of an activation in a later step, moving a weight by about
    # lr·2^-8·|grad| ~ 1e-4: the bound. The penalty itself moves the weights by 0.26 (checked below).
    assert max_diff(lit, expected) <= 1e-4
    assert max_diff(lit, plain_loop(*make_module(), autocast=True, penalty=False)) > 2e-2


@pytest.mark.parametrize("fused", [False, True])
def test_16_mixed_with_a_grad_scaler_adds_the_penalty_to_unscaled_gradients(tmp_path, fused):
    """Lightning unscales before on_before_optimizer_step (a fused optimizer unscales inside its step, so ∇Ω is
    added times the loss scale there): the same as scaling loss + reg() in a plain loop."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    lit, w0 = make_module(fused=fused)
    model = copy.deepcopy(lit)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, fused=fused or None)
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=ALPHA, beta=BETA)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(2):
        for x, y in loader():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model.net(x), y)
            scaler.scale(loss + reg()).backward()
            scaler.step(opt)
            scaler.update()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer(tmp_path, callbacks=[L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA)], plugins=[plugin]).fit(lit, loader())
    assert plugin.scaler.get_scale() == 2.0 ** 16  # scaled by 65536 throughout: a scaled ∇Ω would be way off
    assert max_diff(lit, model) <= 1e-4  # same fp16 kernels on both sides (measured 3e-8); bound as for bf16


def test_resume_from_a_lightning_checkpoint_continues_identically(tmp_path):
    lit, w0 = make_module()
    straight = copy.deepcopy(lit)
    trainer(tmp_path / "a", epochs=3, callbacks=[L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA)]).fit(straight, loader())

    first = trainer(tmp_path / "b", epochs=1, callbacks=[L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA)])
    first.fit(lit, loader())
    ckpt = tmp_path / "b" / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["callbacks"]["L2SP"]["w0"]["net.0.weight"].equal(w0["net.0.weight"])

    resumed, _ = make_module()  # fresh weights: the checkpoint restores them
    with torch.no_grad():
        resumed.net[0].weight.mul_(3.0)
    cb = L2SP(None, "l2-sp", alpha=ALPHA, beta=BETA)  # no source: w0 comes from the checkpoint
    trainer(tmp_path / "c", epochs=3, callbacks=[cb]).fit(resumed, loader(), ckpt_path=ckpt)
    assert max_diff(resumed, straight) <= 1e-6
    assert cb.state_dict()["w0"]["net.0.weight"].equal(w0["net.0.weight"])  # and the next checkpoint keeps it


def test_resume_with_other_coefficients_says_so_in_one_line(tmp_path):
    lit, w0 = make_module()
    first = trainer(tmp_path, epochs=1, callbacks=[L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA)])
    first.fit(lit, loader())
    first.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.warns(UserWarning, match=r"resuming with alpha=0\.1 \(checkpoint: 0\.5\)") as rec:
        trainer(tmp_path, epochs=2, callbacks=[L2SP(w0, "l2-sp", alpha=0.1, beta=BETA)]).fit(
            lit, loader(), ckpt_path=tmp_path / "a.ckpt")
    assert all("\n" not in str(w.message) for w in rec if "L2SP" in str(w.message))


def test_manual_optimization_warns_in_one_line_and_the_advice_works(tmp_path):
    cb = L2SP(None, "l2-sp", alpha=ALPHA, beta=BETA)
    lit, w0 = make_module(manual_callback=cb)
    cb.source = w0
    expected = plain_loop(lit, w0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=[cb]).fit(lit, loader())
    msgs = [str(w.message) for w in rec if "L2SP: manual optimization" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "regularizer.add_grad_()" in msgs[0]
    assert max_diff(lit, expected) <= 1e-5  # applied once, by the user, not twice


def test_penalty_is_logged_on_lightnings_cadence(tmp_path):
    from lightning.pytorch.loggers import Logger

    class Spy(Logger):
        name, version = "spy", 0
        logged = []

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            if "l2sp/penalty" in metrics:
                self.logged.append((step, metrics["l2sp/penalty"]))

    lit, w0 = make_module()
    omegas = []
    plain_loop(lit, w0, record=omegas)
    spy = Spy()
    trainer(tmp_path, callbacks=[L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA)], logger=spy,
            log_every_n_steps=3).fit(lit, loader())
    # Ω at the weights of the batch (before its optimizer step), only on the steps Lightning writes logs
    assert [s for s, _ in spy.logged] == [2, 5]
    for step, v in spy.logged:
        assert v == pytest.approx(omegas[step], rel=1e-5)


def test_a_checkpoint_path_keyed_otherwise_gets_a_lightning_hint(tmp_path):
    lit, _ = make_module()
    torch.save(nn.Linear(6, 8).state_dict(), tmp_path / "bare.pt")  # keys "weight", "bias": not "net.0.weight"
    with pytest.raises(l2sp.L2SPError, match="keyed like the LightningModule's own parameters"):
        trainer(tmp_path, callbacks=[L2SP(str(tmp_path / "bare.pt"), "l2-sp", alpha=ALPHA, beta=BETA)]).fit(
            lit, loader())


def test_bad_kind_or_mode_fails_at_construction():
    with pytest.raises(l2sp.L2SPError, match="unknown regularizer kind"):
        L2SP(None, "l3", alpha=1, beta=1)
    with pytest.raises(l2sp.L2SPError, match="unknown mode"):
        L2SP(None, "l2", alpha=1, beta=1, mode="lazy")


@pytest.mark.parametrize("mode", ["decoupled", "proximal"])
def test_decoupled_and_proximal_equal_attach_in_a_plain_loop(tmp_path, mode):
    lit, w0 = make_module()
    model = copy.deepcopy(lit)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    l2sp.regularizer("l2-sp", model, w0, alpha=ALPHA, beta=BETA).attach(opt, mode)
    for _ in range(2):
        for x, y in loader():
            opt.zero_grad()
            nn.functional.cross_entropy(model.net(x), y).backward()
            opt.step()
    trainer(tmp_path, callbacks=[L2SP(w0, "l2-sp", alpha=ALPHA, beta=BETA, mode=mode)]).fit(lit, loader())
    assert max_diff(lit, model) <= 1e-5


# ---------------------------------------------------------------------- the README's "Use it where you train"
def readme_blocks():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it where you train", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3, "the section shows your loop, Lightning and the 🤗 Trainer"
    return blocks


class TinyNet(nn.Module):
    """A torchvision-style classifier (its head is ``fc``), pre-trained on 4 classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.features(x)))


def readme_reference(net, epochs):
    """What the README blocks must compute: SGD(lr 0.01, momentum 0.9) on CE + L2-SP(0.1, 0.01), new 3-class fc."""
    torch.manual_seed(5)
    w0 = l2sp.snapshot(net)
    net.fc = nn.Linear(8, 3)
    reg = l2sp.regularizer("l2-sp", net, w0, alpha=0.1, beta=0.01)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for _ in range(epochs):
        for x, y in loader():
            opt.zero_grad()
            (nn.functional.cross_entropy(net(x), y) + reg()).backward()
            opt.step()
    return net


def test_readme_your_loop_block_runs_as_written():
    torch.manual_seed(0)
    net = TinyNet()
    expected = readme_reference(copy.deepcopy(net), epochs=1)
    ns = {"model": net, "loader": loader(), "num_classes": 3}
    torch.manual_seed(5)
    exec(readme_blocks()[0], ns)
    assert ns["reg"].novel == ["fc.weight", "fc.bias"]
    assert max_diff(ns["model"], expected) <= 1e-6


def test_readme_lightning_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning's default logger and checkpoints go to the working directory
    torch.manual_seed(0)
    net = TinyNet()
    expected = readme_reference(copy.deepcopy(net), epochs=10)
    ns = {"model": net, "loader": loader(), "num_classes": 3, "__name__": "readme"}
    torch.manual_seed(5)
    exec(readme_blocks()[1], ns)
    assert ns["trainer"].global_step == 10 * len(loader())
    assert max_diff(ns["lit"].net, expected) <= 1e-5


def test_checkpoint_keeps_the_w0_the_penalty_was_built_with(tmp_path):
    """A source module that changes after the penalty was built must not leak into the reference saved in
    checkpoints (nor may a source file that moved away break the save)."""
    lit, w0 = make_module()
    source = copy.deepcopy(lit)
    callback = L2SP(source, "l2-sp", alpha=ALPHA, beta=BETA)
    start = {k: v.detach().clone() for k, v in source.state_dict().items()}
    trainer(tmp_path, callbacks=[callback]).fit(lit, loader())
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # the user's source module changes after fitting started
    saved = callback.state_dict()["w0"]
    assert saved and all(torch.equal(saved[k], start[k]) for k in saved)
