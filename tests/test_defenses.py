"""Input-transform defenses (Table 7): faithful transforms, composition, BPDA, gray-box vs white-box."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from sors import defenses
from sors.config import AttackConfig, EvalConfig
from sors.defenses import transforms
from sors.errors import ConfigError
from sors.evaluation import evaluate_cell
from sors.metrics import input_gradient

pytestmark = pytest.mark.usefixtures("one_thread")


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def _pil_jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray((image[0].numpy() * 255).round().astype("uint8"), "L").save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255)
    return torch.from_numpy(np.stack(out))[:, None]


@pytest.mark.parametrize("quality", [50, 75, 90])
def test_jpeg_matches_libjpeg_on_fashion_mnist(fmnist_test, quality):
    x = fmnist_test[0][:200]
    ours, reference = transforms.jpeg_compress(x, quality), _pil_jpeg(x, quality)
    artefacts = (reference - x).abs().mean()
    difference = (ours - reference).abs().mean()
    # libjpeg's integer DCT rounds a few coefficients differently; everything else is the same codec
    assert difference < 0.5 / 255 and difference < 0.2 * artefacts
    assert torch.equal(ours * 255, (ours * 255).round())  # 8-bit output


@pytest.mark.parametrize("kernel", [2, 3])
def test_median_smoothing_matches_scipy(fmnist_test, kernel):
    x = fmnist_test[0][:50]
    expected = ndimage.median_filter(x.numpy(), size=(1, 1, kernel, kernel), mode="nearest")
    assert torch.equal(transforms.median_smooth(x, kernel), torch.from_numpy(expected))


def test_bit_depth_keeps_only_its_levels(fmnist_test):
    x = fmnist_test[0][:50]
    assert len(torch.unique(transforms.bit_depth(x, 3))) <= 8
    assert torch.allclose(transforms.bit_depth(x, 8), x)  # the data already are 8-bit


def test_dnn_oriented_jpeg_removes_small_high_frequency_noise_and_keeps_smooth_content():
    u = torch.arange(8)
    table = transforms.quality_scaled(transforms.dnn_oriented_table(), 50)
    low = (u[:, None] + u[None, :]) < 5
    assert (table[low] == 1).all() and (table[~low] == 41).all()
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(16, 1, 4, 4) * 0.6 + 0.2, size=32, mode="bilinear", align_corners=True
    )
    grid = torch.arange(32)
    checker = ((grid[:, None] + grid[None, :]) % 2 * 2 - 1).float() * 3 / 255
    assert (transforms.dnn_jpeg(smooth + checker) - smooth).abs().mean() < 1 / 255  # noise was 3/255
    assert (transforms.dnn_jpeg(smooth) - smooth).abs().mean() < (
        transforms.jpeg_compress(smooth, 75) - smooth
    ).abs().mean()


def test_colour_jpeg_runs_on_cifar_shaped_batches():
    x = torch.rand(4, 3, 32, 32)
    for out in (transforms.jpeg_compress(x, 75), transforms.dnn_jpeg(x)):
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", defenses.available())
def test_defenses_compose_in_front_of_a_model_and_keep_clean_accuracy(lenet, fmnist_test, name):
    x, y = fmnist_test[0][:300], fmnist_test[1][:300]
    defended = defenses.build(name, lenet)
    assert isinstance(defended, torch.nn.Module) and defended.model is lenet
    assert defended(x).shape == (300, 10)
    assert accuracy(defended, x, y) >= accuracy(lenet, x, y) - 0.1


@pytest.mark.parametrize("name", ["bit_depth", "jpeg", "dnn_jpeg"])
def test_bpda_gradient_is_the_models_gradient_at_the_transformed_input(lenet, fmnist_test, name):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    defended = defenses.build(name, lenet, bits=3) if name == "bit_depth" else defenses.build(name, lenet)
    transformed = defended.transform(x)
    assert not torch.equal(transformed, x)
    assert torch.allclose(input_gradient(defended, x, y), input_gradient(lenet, transformed, y), atol=1e-6)
    masked = defenses.build(name, lenet, bpda=False, **({"bits": 3} if name == "bit_depth" else {}))
    assert input_gradient(masked, x, y).abs().max() == 0  # the true gradient of rounding


def test_median_smoothing_passes_gradients_through_the_selected_pixels(lenet, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    grad = input_gradient(defenses.build("median", lenet), x, y)
    assert grad.abs().flatten(1).amax(1).min() > 0


def test_bpda_white_box_is_at_least_as_strong_as_gray_box(lenet, fmnist_test):
    x, y = fmnist_test
    defended = defenses.build("jpeg", lenet, quality=75)
    cfg = EvalConfig(n_examples=300)
    clean = evaluate_cell(defended, x, y, AttackConfig("none", 0.0), cfg)
    gray = evaluate_cell(defended, x, y, AttackConfig("transfer_pgd", 25 / 255), cfg, source_model=defended.model)
    white = evaluate_cell(defended, x, y, AttackConfig("pgd", 25 / 255), cfg)
    assert gray.accuracy < clean.accuracy - 0.1
    assert white.accuracy <= gray.accuracy + 0.01
    assert not white.sanity_flags  # BPDA gives the attack a real gradient


def test_unknown_defense_or_option_names_it(lenet):
    with pytest.raises(ConfigError) as err:
        defenses.build("jpg", lenet)
    assert err.value.option == "defense.name"
    with pytest.raises(ConfigError) as err:
        defenses.build("jpeg", lenet, qualty=50)
    assert err.value.option == "defense.qualty"
