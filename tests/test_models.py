"""Every stage's shapes (DESIGN.md's layer sizes) and that each one learns on a learnable toy."""

import pytest
import torch
from torch import nn

from respiscan.errors import RespiscanError
from respiscan.models.backbone import EmbeddingNet, create_backbone
from respiscan.models.mlp import AdversarialSharedMLP, Discriminator, Head, SharedMLP, TaskSpecificMLP
from respiscan.models.network import MMTLNet, ModelSpec
from respiscan.training.loop import ClassifierFit, train_classifier
from respiscan.training.stages import finetune_adversarial, random_affine, train_adversarial, train_embedder


def _linears(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def test_layer_sizes_match_the_reference():
    assert _linears(TaskSpecificMLP("xray")) == [(1280, 1120), (1120, 960), (960, 800), (800, 640), (640, 1)]
    ct = TaskSpecificMLP("ct")
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.45 for m in ct.modules()) == 4
    assert all(m.negative_slope == 0.5 for m in ct.modules() if isinstance(m, nn.LeakyReLU))
    assert _linears(SharedMLP()) == [(1280, 960), (960, 800), (800, 640), (640, 1)]
    adv = AdversarialSharedMLP()
    assert _linears(adv.generator) == [(1280, 960), (960, 640), (640, 960), (960, 1280)]
    assert _linears(Discriminator()) == [(1280, 640), (640, 320), (320, 160), (160, 1)]
    assert _linears(adv.body) == [(1280, 640)]
    assert _linears(Head()) == [(1280, 320), (320, 80), (80, 20), (20, 1)]


def test_feature_and_logit_shapes():
    x = torch.randn(5, 1280)
    for m in (TaskSpecificMLP("ct"), SharedMLP(), AdversarialSharedMLP()):
        m.eval()
        assert m.features(x).shape == (5, 640) and m(x).shape == (5,)
    net = EmbeddingNet("test_resnet")
    images = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    assert net.embed(images).shape == (3, 1280) and net(images).shape == (3,)


def test_whole_network_forward_per_modality_and_without_shared():
    for shared, backbones in (("plain", None), ("adversarial", {"xray": "test_resnet", "ct": "test_efficientnet"}),
                              ("none", None)):
        spec = ModelSpec(task_backbones={"xray": "test_resnet", "ct": "test_resnet"}, shared_backbones=backbones,
                         shared=shared)
        net = MMTLNet(spec).eval()
        assert len(net.embedders) == (4 if backbones else 2)
        images = torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8)
        for m in ("xray", "ct"):
            assert net(images, m).shape == (2,)


def test_unknown_backbone_and_shared_kind_are_clear_errors(tmp_path):
    with pytest.raises(RespiscanError, match="unknown backbone 'resnet_nope'"):
        create_backbone("resnet_nope")
    with pytest.raises(RespiscanError, match="unknown shared kind"):
        ModelSpec(shared="both")
    with pytest.raises(RespiscanError, match="weights file not found"):
        create_backbone("test_resnet", tmp_path / "missing.safetensors")


def test_local_weights_file_is_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = create_backbone("test_resnet", tmp_path / "w.safetensors")
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def _toy(n=160, dim=1280, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) > 0.5).float()
    x = torch.randn(n, dim, generator=g) + y[:, None] * 0.6
    return x, y


@pytest.mark.parametrize("make", [lambda: TaskSpecificMLP("xray"), lambda: TaskSpecificMLP("ct"), SharedMLP,
                                  lambda: Head(1280)])
def test_mlp_stages_learn(make):
    x, y = _toy()
    xv, yv = _toy(seed=1)
    result = train_classifier(make(), x, y, xv, yv, ClassifierFit(epochs=8, patience=8, batch_size=32, lr=1e-3))
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0] * 0.7
    assert result.best["val_auc"] > 0.9


def _bright_square_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) > 0.5).float()
    images = (torch.rand(n, 48, 48, generator=g) * 60 + 60).to(torch.uint8)
    images[y.bool(), 16:32, 16:32] = 220
    return images, y


def test_embedding_model_learns_from_scratch_and_frozen():
    tr, va = _bright_square_images(96, 0), _bright_square_images(48, 1)
    net = EmbeddingNet("test_resnet")
    scratch = train_embedder(net, tr, va, ClassifierFit(epochs=6, patience=6, batch_size=16, lr=3e-3), frozen=False,
                             augment="affine", bf16=False, seed=0, log_path=None, desc="t")
    assert scratch.best["val_auc"] > 0.9
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    frozen = train_embedder(net, tr, va, ClassifierFit(epochs=3, patience=3, batch_size=16), frozen=True,
                            augment="none", bf16=False, seed=0, log_path=None, desc="t")
    assert all(torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())
    assert frozen.best["val_auc"] > 0.9


def test_random_affine_keeps_shape_range_and_is_seeded():
    images = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8)
    a = random_affine(images, torch.Generator().manual_seed(0))
    b = random_affine(images, torch.Generator().manual_seed(0))
    assert a.shape == (4, 1, 32, 32) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 255
    assert not torch.allclose(a, images[:, None].float())
    same = random_affine(images[:1].expand(8, -1, -1), torch.Generator().manual_seed(0))
    assert len({tuple(x.flatten().tolist()) for x in same}) == 8  # parameters are drawn per image


def test_adversarial_stage_logs_losses_and_finetunes_on_covid(tmp_path):
    g = torch.Generator().manual_seed(0)
    modality = (torch.arange(200) % 2).float()
    covid = (torch.rand(200, generator=g) > 0.5).float()
    emb = torch.randn(200, 1280, generator=g) + modality[:, None] * 1.0 + covid[:, None] * 1.2
    shared = AdversarialSharedMLP()
    log = tmp_path / "adv.csv"
    result = train_adversarial(shared, emb[:150], modality[:150], emb[150:], modality[150:], 3,
                               ClassifierFit(batch_size=32, lr=1e-4), seed=0, log_path=log)
    assert {"gen_loss", "disc_loss", "val_disc_acc"} <= set(result.history[0])
    assert log.read_text().splitlines()[0].startswith("epoch,gen_loss,disc_loss")
    gen_before = {k: v.clone() for k, v in shared.generator.state_dict().items()}
    fine = finetune_adversarial(shared, (emb[:150], covid[:150]), (emb[150:], covid[150:]),
                                ClassifierFit(epochs=10, patience=10, batch_size=32, lr=1e-3), seed=0, log_path=None)
    assert all(torch.equal(gen_before[k], v) for k, v in shared.generator.state_dict().items())
    assert fine.best["val_auc"] > 0.8


def test_shared_kinds_agree_across_layers():
    """A shared kind needs its module, its training, its name and its line in the report; none may be missing."""
    from respiscan.evaluation.report import SHARED_TEXT
    from respiscan.models.mlp import SHARED_MODULES
    from respiscan.models.spec import SHARED_KINDS
    from respiscan.training.shared import SHARED_FITS

    assert set(SHARED_MODULES) == set(SHARED_KINDS) == set(SHARED_TEXT)
    assert set(SHARED_FITS) == {k for k, module in SHARED_MODULES.items() if module is not None}


def test_adversarial_bundle_ships_no_discriminator():
    from respiscan.models.network import MMTLNet
    from respiscan.models.spec import ModelSpec

    net = MMTLNet(ModelSpec(task_backbones={"xray": "test_resnet", "ct": "test_resnet"}, shared="adversarial"))
    assert not [k for k in net.state_dict() if "discriminator" in k]


def test_mlp_twin_keeps_the_backbones_and_starts_every_mlp_afresh():
    """Cross-fitting's twin must not start from the MLP weights that validation chose (that would leak the choice
    into the scores it gives validation), and must embed exactly as the model does."""
    net = MMTLNet(ModelSpec(task_backbones={"xray": "test_resnet", "ct": "test_resnet"}, shared="plain"))
    for p in [*net.task.parameters(), *net.shared.parameters(), *net.heads.parameters()]:
        nn.init.constant_(p, 0.5)  # stands in for trained weights
    twin, again = net.mlp_twin(seed=3), net.mlp_twin(seed=3)
    mine, theirs = net.state_dict(), twin.state_dict()
    for name, value in mine.items():
        if name.startswith("embedders."):
            assert torch.equal(value, theirs[name]) and value.data_ptr() != theirs[name].data_ptr()
        elif value.is_floating_point() and "running_" not in name:
            assert not torch.equal(value, theirs[name]), name
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in theirs.items())  # seeded: the same twin
