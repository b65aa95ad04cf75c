"""Model factory: the small ResNet, head surgery, w0 before surgery, local checkpoints and their errors."""

import pytest
import torch
import torchvision
from torch import nn

import l2sp
from l2sp.errors import L2SPError
from l2sp.io import save_tensors
from l2sp.models import build_model, create, find_head, new_head, replace_head, small_resnet


def test_small_resnet_shape_and_size():
    m = small_resnet(num_classes=5, in_channels=1)
    n = sum(p.numel() for p in m.parameters())
    assert 50_000 < n < 300_000
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    assert m.block_names() == ["stem", "stage1", "stage2", "stage3"]
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    with pytest.raises(L2SPError, match="strides"):
        small_resnet(widths=[8, 8], strides=[2, 2, 2])


@pytest.mark.parametrize(
    "arch, head",
    [
        ("resnet18", "fc"),
        ("mobilenet_v2", "classifier.1"),
        ("efficientnet_b0", "classifier.1"),
        ("small_resnet", "fc"),
    ],
)
def test_find_head(arch, head):
    m = create(arch, 7, 1 if arch == "small_resnet" else 3)
    assert find_head(m) == head and m.get_submodule(head).out_features == 7


def test_find_head_last_linear_fallback():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))
    assert find_head(m) == "2.0"
    with pytest.raises(L2SPError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_new_head_initialisation():
    torch.manual_seed(0)
    h = new_head(512, 1000, std=0.01)
    assert h.weight.std().item() == pytest.approx(0.01, rel=0.02) and abs(h.weight.mean().item()) < 1e-3
    assert torch.count_nonzero(h.bias) == 0


def test_replace_head_keeps_the_old_one():
    m = create("resnet18", 1000)
    old_w = m.fc.weight.detach().clone()
    name, old = replace_head(m, 12)
    assert name == "fc" and m.fc.out_features == 12 and torch.equal(old.weight, old_w)


def test_build_model_from_a_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = small_resnet(num_classes=10, in_channels=1)
    path = tmp_path / "src.safetensors"
    save_tensors(path, src.state_dict())
    built = build_model("small_resnet", 5, weights=str(path), in_channels=1)
    assert built.head_name == "fc" and built.model.fc.out_features == 5
    assert built.source_head.out_features == 10 and torch.equal(built.source_head.weight, src.fc.weight)
    assert set(built.source_state) == set(src.state_dict())  # w0 taken before the surgery
    assert all(torch.equal(built.source_state[k], v) for k, v in src.state_dict().items())
    assert built.model.stem[0].weight.data_ptr() != built.source_state["stem.0.weight"].data_ptr()
    reg = l2sp.regularizer("l2-sp", built.model, built.source_state, alpha=0.1, beta=0.01)
    assert set(reg.novel) == {"fc.weight", "fc.bias"}  # the new head falls into S̄
    assert "stem.0.weight" in reg.shared
    # a .pt file wrapped in {"state_dict": ...} with DDP prefixes loads too (weights_only=True)
    pt = tmp_path / "src.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, pt)
    b2 = build_model("small_resnet", 5, weights=str(pt), in_channels=1)
    assert torch.equal(b2.model.stem[0].weight, src.stem[0].weight)


def test_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / "other.safetensors"
    save_tensors(path, small_resnet(5, 1, widths=(8, 16, 32)).state_dict())
    with pytest.raises(L2SPError, match=r"does not fit model.arch=small_resnet: .*mis-shaped"):
        build_model("small_resnet", 5, weights=str(path), in_channels=1)
    with pytest.raises(L2SPError, match="does not fit model.arch=resnet18: missing"):
        build_model("resnet18", 5, weights=str(path))
    with pytest.raises(L2SPError, match="no such checkpoint"):
        build_model("small_resnet", 5, weights=str(tmp_path / "none.pt"), in_channels=1)


def test_unknown_names():
    with pytest.raises(L2SPError, match="unknown model.arch 'resnet9000'.*resnet18"):
        create("resnet9000", 3)
    with pytest.raises(L2SPError, match="not a weights name of resnet18; valid: DEFAULT, IMAGENET1K_V1"):
        build_model("resnet18", 3, weights="IMAGENET9K")


def test_random_init_for_pretraining():
    b = build_model("small_resnet", 5, weights=None, in_channels=1)
    assert b.source_state is None and b.source_head is None and b.model.fc.out_features == 5


def test_shared_mobilenet_checkpoint(shared_dir):
    path = shared_dir / "weights" / "mobilenet_v2_imagenet.safetensors"
    if not path.is_file():
        pytest.skip("no shared MobileNetV2 weights")
    built = build_model("mobilenet_v2", 101, weights=str(path))
    assert built.head_name == "classifier.1" and built.source_head.out_features == 1000
    ref = torchvision.models.mobilenet_v2(num_classes=1000)
    assert set(built.source_state) == set(ref.state_dict())
    assert built.model.classifier[1].out_features == 101


def test_new_head_is_novel_even_with_the_source_class_count(tmp_path):
    """5 source classes, 5 target classes (the built-in benchmark): the new head must not be pulled toward
    the old head, whose classes are other ones."""
    path = tmp_path / "src5.safetensors"
    save_tensors(path, small_resnet(5, 1).state_dict())
    built = build_model("small_resnet", 5, weights=str(path), in_channels=1)
    assert "fc.weight" in built.source_state and "fc.weight" not in built.penalty_source
    reg = l2sp.regularizer("l2-sp", built.model, built.penalty_source, alpha=0.1, beta=0.01)
    assert (
        set(reg.novel) == {"fc.weight", "fc.bias"}
        and len(reg.shared) == len(list(built.model.parameters())) - 2
    )
    keep = build_model("small_resnet", 5, weights=str(path), in_channels=1, replace=False)
    assert keep.penalty_source is keep.source_state  # no surgery: the head stays in S


# --------------------------------------------------------------------------------------------------- timm
TIMM_ARCHS = [("resnet10t", "fc"), ("mobilenetv3_small_050", "classifier")]


def _timm_source(tmp_path, name: str, classes: int = 10):
    """A timm network with a ``classes``-way head and non-trivial BN statistics, saved as the 'pre-trained' file."""
    import timm

    torch.manual_seed(0)
    src = timm.create_model(name, pretrained=False, num_classes=classes).eval()
    for m in src.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"{name}.safetensors"
    save_tensors(path, src.state_dict())
    return src, path


def _timm_weights(route: str, path, classes: int = 10) -> tuple[str, dict]:
    """(model.weights, model.options): timm's 'pretrained' loader pointed at the local file, or the file itself."""
    if route == "pretrained":
        return "pretrained", {"pretrained_cfg_overlay": {"file": str(path), "num_classes": classes}}
    return str(path), {}


@pytest.mark.parametrize("route", ["pretrained", "checkpoint"])
@pytest.mark.parametrize("name, head", TIMM_ARCHS)
def test_timm_keeps_its_pretrained_head_in_w0_and_source_head(tmp_path, name, head, route):
    """timm:NAME: w0 and the source head are the file's (10 classes), taken before the 4-way head replaces it."""
    src, path = _timm_source(tmp_path, name)
    weights, options = _timm_weights(route, path)
    built = build_model(f"timm:{name}", 4, weights=weights, options=options)
    file_state = src.state_dict()
    assert built.head_name == head
    assert set(built.source_state) == set(file_state)
    assert all(torch.equal(built.source_state[k], v) for k, v in file_state.items())  # head included
    assert built.source_head.out_features == 10
    assert torch.equal(built.source_head.weight, src.get_submodule(head).weight)
    assert torch.equal(built.source_head.bias, src.get_submodule(head).bias)
    new = built.model.get_submodule(head)
    assert new.out_features == 4 and torch.count_nonzero(new.bias) == 0
    assert new.weight.std().item() == pytest.approx(0.01, rel=0.2)  # the paper's N(0, 0.01²) head
    body = {k: v for k, v in built.model.state_dict().items() if not k.startswith(head + ".")}
    assert all(torch.equal(v, file_state[k]) for k, v in body.items())  # the body is the pre-trained one
    reg = l2sp.regularizer("l2-sp", built.model, built.penalty_source, alpha=0.1, beta=0.01)
    names = [n for n, _ in built.model.named_parameters()]
    assert set(reg.novel) == {f"{head}.weight", f"{head}.bias"}  # S̄: the new head only
    assert set(reg.shared) == set(names) - set(reg.novel)  # S: everything else
    assert float(reg().detach()) == pytest.approx(0.01 / 2 * float(new.weight.detach().pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("name, head", TIMM_ARCHS[:1])
def test_timm_source_drop_reattaches_the_pretrained_head(tmp_path, name, head):
    """The source model rebuilt from the same weights carries the file's head; re-attached onto the untouched
    body it reproduces the source logits exactly (drop 0), and a changed body shows a drop."""
    from l2sp.analysis import reattach_head, source_task_drop
    from l2sp.models import pretrained

    src, path = _timm_source(tmp_path, name, classes=3)
    weights, options = _timm_weights("pretrained", path, classes=3)
    built = build_model(f"timm:{name}", 2, weights=weights, options=options)
    source_model = pretrained(f"timm:{name}", weights, 2, options=options).eval()
    assert source_model.get_submodule(head).out_features == 3
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = src(x)
        assert torch.equal(source_model(x), ref)
        back = reattach_head(built.model, source_model, head).eval()
        assert torch.equal(back(x), ref)
    y = ref.argmax(-1)
    res = source_task_drop(built.model, source_model, head, [(x, y)])
    assert res == {"source_acc": 100.0, "reattached_acc": 100.0, "drop": 0.0}
    with torch.no_grad():
        for p in built.model.parameters():
            p.add_(torch.randn_like(p))  # a body far from w0 forgets the source task
    assert source_task_drop(built.model, source_model, head, [(x, y)])["drop"] > 0


def test_timm_rejects_unknown_weights_and_resets_non_linear_heads():
    import timm

    with pytest.raises(L2SPError, match="not understood for timm:resnet10t; use 'pretrained'"):
        build_model("timm:resnet10t", 3, weights="DEFAULT")
    m = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    m.fc = nn.Conv2d(m.num_features, 5, 1)  # a head that is not nn.Linear: the model's reset_classifier
    name, old = replace_head(m, 7)
    assert name == "fc" and old.out_channels == 5 and m.fc.out_features == 7
