"""Pretraining's methods, heads, views and geography, on the CPU without Ray: each method learns on a
small synthetic set, the MAE reconstructs hidden structure, the mixture-of-vMF loss is the density it
claims to be, the day-of-year encoding has no seam at New Year, and views keep InSAR physics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from thalia_ray.config import PretrainAugmentConfig, load_config
from thalia_ray.pretrain import geo
from thalia_ray.pretrain.augment import PhasePlanes, ViewMaker, circular, from_circular, wrap
from thalia_ray.pretrain.heads import mvmf_nll
from thalia_ray.pretrain.methods import Encoder, MaskedAutoencoder, patchify, unpatchify
from thalia_ray.pretrain.model import DataFacts, PretrainModel
from thalia_ray.pretrain.objective import read_batch
from thalia_ray.pretrain.source import TRAIN, PretrainSource

HEADS = "{coherence: 1.0, dem: 1.0, era5: 0.5, day_of_year: 0.5, frame: 0.5}"


# ------------------------------------------------------------------------------ methods learn
@pytest.fixture(scope="module")
def records(synthetic_root):
    """16 training records of the synthetic set, read by the pretraining source (crop 64, phase input)."""
    cfg = _config(synthetic_root, "none", "test_resnet")
    source = PretrainSource.open(cfg)
    return source, read_batch(source, cfg, TRAIN, 16)


def _config(root, method: str, backbone: str):
    return load_config(None, [f"data.root={root}", "data.crop=64", "data.geomorphology=[insar_difference]",
                              f"model.name={backbone}", f"pretrain.method={method}", f"pretrain.heads={HEADS}",
                              "pretrain.projection_dim=32", "pretrain.decoder_dim=32", "pretrain.decoder_depth=1"])


@pytest.mark.parametrize("method, backbone", [("mae", "test_vit"), ("simclr", "test_resnet"),
                                              ("byol", "test_resnet"), ("none", "test_resnet")])
def test_each_method_learns_on_a_small_synthetic_set(records, synthetic_root, method, backbone):
    source, batch = records
    torch.manual_seed(0)
    model = PretrainModel(_config(synthetic_root, method, backbone), DataFacts(len(source.frames), 0.0015, 1.62))
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(16):
        out = model(batch)
        optimiser.zero_grad()
        out["total"].backward()
        optimiser.step()
        model.after_step(step / 16)
        losses.append(float(out["total"].detach()))
        assert set(out) >= {"total", "coherence", "dem", "era5", "day_of_year", "frame"}
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, (method, losses)


def test_byol_target_network_follows_the_online_one_slowly(records, synthetic_root):
    source, batch = records
    torch.manual_seed(0)
    model = PretrainModel(_config(synthetic_root, "byol", "test_resnet"), DataFacts(len(source.frames)))
    online, target = model.method.encoder.backbone, model.method.target["encoder"].backbone
    before = {k: v.clone() for k, v in target.state_dict().items()}
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    model(batch)["total"].backward()
    optimiser.step()
    assert not any(p.requires_grad for p in target.parameters())
    model.after_step(0.0)  # τ = momentum (0.99): 1 % of the way towards the online weights
    key = "conv1.weight" if "conv1.weight" in before else next(iter(before))
    moved = target.state_dict()[key] - before[key]
    expected = 0.01 * (online.state_dict()[key] - before[key])
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-7)
    model.after_step(1.0)  # at the end of training τ = 1: the target no longer moves
    frozen = {k: v.clone() for k, v in target.state_dict().items()}
    optimiser.step()
    model.after_step(1.0)
    torch.testing.assert_close(target.state_dict()[key], frozen[key])


# ------------------------------------------------------------------------------ the MAE
def _fields(count: int, size: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
    """Smooth unwrapped fields: a random ramp (as an orbital error gives) plus a small Gaussian bump (a
    deformation source): a hidden patch's own mean misses its ramp, which the visible patches reveal."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    a, b = (2 * torch.randn(count, 2, 1, 1, generator=generator)).unbind(1)
    cy, cx = (torch.rand(count, 2, 1, 1, generator=generator) * 1.2 - 0.6).unbind(1)
    amplitude = 0.5 * torch.randn(count, 1, 1, generator=generator)
    return (a * x + b * y + amplitude * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.15))[:, None]


def test_mae_reconstructs_masked_patches_better_than_their_own_means():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=0, embed_dim=64, depth=3, num_heads=4,
                            dynamic_img_size=True)
    mae = MaskedAutoencoder(Encoder(vit), {"mae": 1}, mask_ratio=0.5, decoder_dim=64, decoder_depth=2)
    optimiser = torch.optim.AdamW(mae.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(300):
        fields = _fields(32)
        loss = mae(fields, fields).losses["mae"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    test = _fields(64, generator=torch.Generator().manual_seed(123))
    rebuilt, mask = mae.reconstruct(test, test)
    hidden = mask.bool()
    assert torch.equal(rebuilt[:, 0][~hidden], test[:, 0][~hidden])  # visible patches are given back as they were
    own_means = unpatchify(patchify(test, 8).mean(-1, keepdim=True).expand(-1, -1, 64), 8, 1, 4, 4)
    error = ((rebuilt - test)[:, 0][hidden] ** 2).mean()
    baseline = ((own_means - test)[:, 0][hidden] ** 2).mean()  # each hidden patch filled with its true mean
    assert error < 0.6 * baseline, (float(error), float(baseline))  # measured: 0.25 (seeds 0 and 1)


def test_mae_refuses_a_cnn_and_a_crop_off_the_patch_grid(synthetic_root):
    from thalia_ray.config import ConfigError

    with pytest.raises(ConfigError, match="'mae' needs a ViT backbone"):
        PretrainModel(_config(synthetic_root, "mae", "test_resnet"), DataFacts(3))
    model = PretrainModel(_config(synthetic_root, "mae", "test_vit"), DataFacts(3))
    with pytest.raises(ConfigError, match="data.crop 40 must be a multiple of the ViT's patch size 16"):
        model.method(torch.zeros(1, 1, 40, 40), torch.zeros(1, 2, 40, 40))


# ------------------------------------------------------------------------------ heads
def test_mvmf_loss_is_the_negative_log_of_the_mixture_density():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 3))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    kappa = np.array([0.5, 2.0, 8.0, 20.0, 60.0])
    logits = rng.normal(size=(4, 5))
    y = rng.normal(size=(4, 3))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    weights = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    density = (weights * kappa / (4 * np.pi * np.sinh(kappa)) * np.exp(kappa * (y @ centres.T))).sum(axis=1)
    got = mvmf_nll(torch.tensor(logits), torch.tensor(y), torch.tensor(centres), torch.tensor(np.log(kappa)))
    np.testing.assert_allclose(got.numpy(), -np.log(density), rtol=1e-10)


def test_mvmf_loss_stays_finite_for_very_concentrated_components():
    y = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    centres = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    loss = mvmf_nll(torch.zeros(1, 2, dtype=torch.float64), y, centres, torch.log(torch.tensor([5000.0, 5000.0],
                                                                                              dtype=torch.float64)))
    assert torch.isfinite(loss).all()  # sinh(5000) overflows; the stable form does not
    assert float(loss) == pytest.approx(-(math.log(0.5) + math.log(5000 / (2 * math.pi))), rel=1e-9)


def test_day_of_year_encoding_is_continuous_across_the_end_of_the_year():
    from datetime import date, timedelta

    days = [date(2015, 12, 1) + timedelta(days=i) for i in range(800)]  # two New Years, a leap year (2016)
    points = np.array([geo.day_of_year_encoding(d) for d in days])
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    assert steps.max() < 2 * math.sin(math.pi / 365) * 1.01  # no step bigger than one day's
    new_year = days.index(date(2017, 1, 1))
    assert steps[new_year - 1] == pytest.approx(2 * math.sin(math.pi / 366), rel=1e-6)  # 31 Dec 2016 → 1 Jan 2017
    assert geo.day_of_year_encoding("20190101") == pytest.approx((0.0, 1.0))
    assert geo.day_of_year_encoding("20190702")[1] == pytest.approx(-1.0, abs=1e-3)  # mid-year: opposite side


def test_frame_positions_come_from_the_volcano_table_and_resolve_shared_names():
    etna = geo.frame_position(["Etna"])
    assert geo.latitude_longitude(etna) == pytest.approx((37.748, 14.999), abs=0.01)
    galapagos = geo.latitude_longitude(geo.frame_position(["Cerro Azul", "Sierra Negra"]))
    andes = geo.latitude_longitude(geo.frame_position(["Cerro Azul", "Descabezado Grande", "Nevados de Chillan"]))
    assert galapagos[0] == pytest.approx(-0.9, abs=0.2) and galapagos[1] == pytest.approx(-91.3, abs=0.3)
    assert andes[0] < -35 and -72 < andes[1] < -70  # the Chilean Cerro Azul, not the Galápagos one
    assert geo.frame_position(["Synthetic volcano 000"]) is None
    assert geo.frame_position(["Nyamuragira"]) is not None  # the dataset's spelling of Nyamulagira


def test_every_real_frame_has_a_position(shared_meta):
    from thalia_ray.data.annotations import load_frame_names

    names = load_frame_names(str(shared_meta))
    positions = geo.frame_positions(names)
    assert set(positions) == set(names)
    assert all(abs(np.linalg.norm(p) - 1) < 1e-9 for p in positions.values())


# ------------------------------------------------------------------------------ views
def _views(**augment) -> ViewMaker:
    cfg = PretrainAugmentConfig(**{"crop_scale": (1.0, 1.0), "flip": 0.0, "rotate90": 0.0, "phase_offset": 0.0,
                                   "jitter": 0.0, **augment})
    return ViewMaker(cfg, PhasePlanes((0, 2), mean=0.0015, std=1.62), inputs=4)


def _stack(count: int = 8, size: int = 32) -> torch.Tensor:
    """Two members of (phase, coherence), then one target plane, all made of the same pattern."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    pattern = (0.3 * x + 0.1 * y * y / size)[None].expand(count, -1, -1)
    phase = (wrap(pattern) - 0.0015) / 1.62
    return torch.stack([phase, pattern, phase, pattern, pattern], dim=1).clone()


def test_geometric_views_move_every_channel_member_and_target_alike():
    torch.manual_seed(0)
    stack = _stack()
    view = _views(crop_scale=(0.4, 0.9), flip=0.5, rotate90=0.5)(stack)
    assert not torch.allclose(view, stack)
    torch.testing.assert_close(view[:, 0], view[:, 2])  # both members' phase
    torch.testing.assert_close(view[:, 1], view[:, 3])  # both members' coherence
    torch.testing.assert_close(view[:, 1], view[:, 4])  # the target moved with the input
    # the phase plane is the wrapped version of the pattern's plane: resampled on the same grid
    torch.testing.assert_close(wrap(view[:, 0] * 1.62 + 0.0015), wrap(view[:, 1]), atol=0.05, rtol=0)


def test_phase_is_resampled_as_a_circle_not_across_its_jumps():
    torch.manual_seed(0)
    stack = _stack(count=4)
    view = _views(crop_scale=(0.3, 0.3))(stack)  # zoom in: many pixels fall between two across a 2π jump
    phase = view[:, 0] * 1.62 + 0.0015
    truth = wrap(view[:, 1])  # the unwrapped pattern, resampled, then wrapped
    gap = torch.remainder(phase - truth + math.pi, 2 * math.pi) - math.pi
    assert gap.abs().max() < 0.05  # interpolating wrapped values would be off by up to π next to each jump


def test_phase_gets_offsets_modulo_2pi_and_never_brightness_jitter():
    torch.manual_seed(0)
    stack = _stack()
    view = _views(phase_offset=1.0, jitter=0.5)(stack)
    radians = view[:, [0, 2]] * 1.62 + 0.0015
    assert radians.min() >= -math.pi - 1e-5 and radians.max() < math.pi + 1e-5  # still wrapped
    shift = torch.remainder(radians - (stack[:, [0, 2]] * 1.62 + 0.0015), 2 * math.pi)
    spread = (shift - shift.flatten(2).mean(-1)[..., None, None] + math.pi) % (2 * math.pi) - math.pi
    assert spread.abs().max() < 1e-4  # a constant offset per member: fringes keep their spacing
    assert not torch.allclose(view[:, 1], stack[:, 1])  # coherence (input) jittered
    torch.testing.assert_close(view[:, 4], stack[:, 4])  # targets never jittered


def test_circular_representation_round_trips():
    stack = _stack(count=2)
    planes = PhasePlanes((0, 2), mean=0.0015, std=1.62)
    expanded = circular(stack, planes)
    assert expanded.shape[1] == 7
    torch.testing.assert_close(from_circular(expanded, planes, 5), stack, atol=1e-5, rtol=0)
