"""The 🤗 Trainer callback against a plain loop on loss + reg() (CPU, tiny models built here, no download)."""

import copy

import pytest
import torch
from torch import nn

import l2sp

transformers = pytest.importorskip("transformers")
from l2sp.integrations.transformers import L2SPCallback  # noqa: E402

ALPHA, BETA, LR = 0.5, 0.05, 0.1
N, BATCH = 32, 4


class Net(nn.Module):
    """Any nn.Module the Trainer accepts: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x, labels=None):
        logits = self.head(torch.relu(self.body(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def make_model():
    torch.manual_seed(0)
    model = Net()
    w0 = l2sp.snapshot(model)
    model.head = nn.Linear(8, 3)
    with torch.no_grad():
        model.body.weight.add_(0.2)
    return model, w0


def args(tmp_path, accumulation=1, clip=0.0, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulation,
        num_train_epochs=2, learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=clip,
        train_sampling_strategy="sequential", report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, **kw)


def train(model, tmp_path, callback, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    trainer = transformers.Trainer(model=model, args=args(tmp_path, **kw), train_dataset=Data(),
                                   callbacks=[callback], optimizers=(opt, None))
    trainer.train()
    return trainer


def plain_loop(model, w0, accumulation=1, clip=0.0, penalty=True, record=None):
    """SGD on Σ_k J_k/K + Ω(w) per optimizer step (K micro-batches); with clip, clip(∇J) + ∇Ω."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=ALPHA, beta=BETA)
    data = Data()
    for _ in range(2):
        for start in range(0, N, BATCH * accumulation):
            opt.zero_grad()
            for k in range(start, start + BATCH * accumulation, BATCH):
                (model(data.x[k:k + BATCH], data.y[k:k + BATCH])["loss"] / accumulation).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if penalty:
                reg.add_grad_() if clip else reg().backward()
            opt.step()
            if record is not None:
                record.append(reg().item())
    return model


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_equals_the_plain_loop_on_loss_plus_penalty(tmp_path, accumulation):
    model, w0 = make_model()
    expected = plain_loop(model, w0, accumulation)
    cb = L2SPCallback(w0, "l2-sp", alpha=ALPHA, beta=BETA)
    trainer = train(model, tmp_path, cb, accumulation=accumulation)
    assert trainer.state.global_step == 2 * N // (BATCH * accumulation)
    assert max_diff(model, expected) <= 1e-5
    assert cb.regularizer.novel == ["head.weight", "head.bias"]
    assert max_diff(model, plain_loop(*make_model(), accumulation, penalty=False)) > 1e-2


def test_the_penalty_gradient_is_added_after_clipping(tmp_path):
    model, w0 = make_model()
    expected = plain_loop(model, w0, clip=0.05)
    train(model, tmp_path, L2SPCallback(w0, "l2-sp", alpha=ALPHA, beta=BETA), clip=0.05)
    assert max_diff(model, expected) <= 1e-5  # clip(∇J) + ∇Ω, as the module docstring says
    assert max_diff(model, plain_loop(*make_model(), clip=0.05, penalty=False)) > 1e-2


def test_penalty_is_in_the_training_logs(tmp_path):
    model, w0 = make_model()
    omegas = []
    plain_loop(model, w0, record=omegas)
    trainer = train(model, tmp_path, L2SPCallback(w0, "l2-sp", alpha=ALPHA, beta=BETA),
                    logging_strategy="steps", logging_steps=5)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [5, 10, 15]
    for h in logs:  # Ω at the weights after that many optimizer steps
        assert h["l2sp_penalty"] == pytest.approx(omegas[h["step"] - 1], rel=1e-5)


@pytest.mark.parametrize("mode", ["decoupled", "proximal"])
def test_decoupled_and_proximal_equal_attach_in_a_plain_loop(tmp_path, mode):
    model, w0 = make_model()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    l2sp.regularizer("l2-sp", ref, w0, alpha=ALPHA, beta=BETA).attach(opt, mode)
    data = Data()
    for _ in range(2):
        for k in range(0, N, BATCH):
            opt.zero_grad()
            ref(data.x[k:k + BATCH], data.y[k:k + BATCH])["loss"].backward()
            opt.step()
    train(model, tmp_path, L2SPCallback(w0, "l2-sp", alpha=ALPHA, beta=BETA, mode=mode))
    assert max_diff(model, ref) <= 1e-5


def test_a_source_keyed_otherwise_gets_a_hint(tmp_path):
    model, _ = make_model()
    with pytest.raises(l2sp.L2SPError, match="keyed like the model the Trainer trains"):
        train(model, tmp_path, L2SPCallback({"weight": torch.zeros(8, 6)}, "l2-sp", alpha=ALPHA, beta=BETA))


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update, as PEFT's LoRA builds it (B starts at 0)."""

    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def test_parameter_efficient_fine_tuning_governs_only_trainable_parameters():
    """What docs/integrations.md says about PEFT/LoRA, checked on the partition."""
    model, w0 = make_model()
    model.body = LoRALinear(model.body)
    model.head.requires_grad_(False)
    # the base model's snapshot matches no trainable parameter (the adapters are new): a one-line error
    with pytest.raises(l2sp.L2SPError, match="no parameter of the model matches the source"):
        l2sp.regularizer("l2-sp", model, w0, alpha=ALPHA, beta=BETA)
    model.head.requires_grad_(True)
    # kind="l2" without a source: every trainable parameter (adapters, head) is S with reference 0, i.e. weight
    # decay; the frozen base weights are in none of S, S̄, free: not penalized, not even listed
    reg = l2sp.regularizer("l2", model, None, alpha=ALPHA, beta=BETA)
    assert set(reg.shared) == {"body.lora_A", "body.lora_B", "head.weight", "head.bias"}
    assert "body.base.weight" not in reg.summary()
    # a snapshot of the wrapped model, taken before training: the adapters are S, pulled toward their start
    w0_peft = l2sp.snapshot(model)
    reg = l2sp.regularizer("l2-sp", model, w0_peft, alpha=ALPHA, beta=BETA)
    assert set(reg.shared) == {"body.lora_A", "body.lora_B", "head.weight", "head.bias"}
    assert reg.novel == [] and reg.free == []
    with torch.no_grad():
        model.body.lora_B.add_(1.0)
    assert reg().item() == pytest.approx(ALPHA / 2 * model.body.lora_B.numel(), rel=1e-6)


def readme_blocks():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it where you train", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_trainer_block_runs_as_written(tmp_path, monkeypatch):
    """The README's 🤗 block, with `name` a local folder holding a tiny ViT (no download)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=5)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit-source")

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3}

    ns = {"name": str(tmp_path / "vit-source"), "num_classes": 3, "train_ds": Images()}
    exec(readme_blocks()[2], ns)
    (cb,) = [c for c in ns["trainer"].callback_handler.callbacks if isinstance(c, L2SPCallback)]
    reg = cb.regularizer
    assert reg.novel == ["classifier.weight", "classifier.bias"]  # the new 3-way head
    assert "vit.embeddings.patch_embeddings.projection.weight" in reg.shared
    assert ns["trainer"].state.global_step == 3 and ns["model"].classifier.out_features == 3


def test_docs_vision_recipe_runs_as_written(tmp_path, monkeypatch):
    """docs/integrations.md's ViT recipe; only the hub id is replaced by a local folder (no download)."""
    import re
    from pathlib import Path

    from PIL import Image

    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text(encoding="utf-8")
    recipe = text.split("### Recipe", 1)[1]
    code = re.findall(r"```python\n(.*?)```", recipe, re.S)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = tmp_path / "vit-source"
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=5)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(local)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(local)
    g = torch.Generator().manual_seed(0)
    for label in ("cat", "dog", "fox"):
        (tmp_path / "data" / "train" / label).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / "train" / label / f"{i}.png")
    assert code.count('"google/vit-base-patch16-224"') == 1
    ns = {"__name__": "recipe"}
    exec(code.replace('"google/vit-base-patch16-224"', repr(str(local))), ns)
    reg = ns["l2sp_callback"].regularizer
    assert reg.novel == ["classifier.weight", "classifier.bias"] and len(reg.shared) > 10
    assert ns["trainer"].state.global_step == 10  # 6 images, batch 32, 10 epochs


@pytest.mark.parametrize("unscaled_by_trainer", [False, True])
def test_fp16_gradients_are_unscaled_before_the_penalty_is_added(unscaled_by_trainer):
    """With a GradScaler, ∇Ω joins unscaled gradients, whether or not the Trainer unscaled them (clipping does)."""
    from types import SimpleNamespace

    model, w0 = make_model()
    data = Data()
    expected = copy.deepcopy(model)
    reg = l2sp.regularizer("l2-sp", expected, w0, alpha=ALPHA, beta=BETA)
    (expected(data.x, data.y)["loss"] + reg()).backward()

    cb = L2SPCallback(w0, "l2-sp", alpha=ALPHA, beta=BETA)
    cb.on_train_begin(None, None, None, model=model)
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(model(data.x, data.y)["loss"]).backward()
    if unscaled_by_trainer:
        scaler.unscale_(inner)
    cb.on_pre_optimizer_step(None, None, None, optimizer=SimpleNamespace(optimizer=inner, scaler=scaler))
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    scaler.step(inner)  # the scaler accepts the step it unscaled
    scaler.update()
