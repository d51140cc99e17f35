"""Super-network mechanics and the model registry, as a user of `sors.models` sees them."""

import pytest
import torch
from torch import nn

from sors import models
from sors.errors import ConfigError
from sors.models.supernet import ChoiceLayer


def test_lenet5_has_the_papers_parameter_count_and_sors_has_four_times_it():
    lenet = models.build("lenet5")
    sors = models.build("sors_lenet5")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(lenet) == 44_426
    assert count(sors) == 4 * 44_426
    assert sors.num_paths == 4**5


def test_sors_lenet5_with_one_operator_is_lenet5_given_the_same_weights():
    lenet = models.build("lenet5")
    sors = models.build("sors_lenet5", n_ops=1)
    subnet = sors.extract_subnet([0] * 5)
    assert str(subnet) == str(lenet.body)  # same structure
    sors_keys = [k.replace(".candidates.0", "") for k in sors.body.state_dict()]
    sors.body.load_state_dict(dict(zip(sors.body.state_dict(), lenet.body.state_dict().values())))
    assert sors_keys == list(lenet.body.state_dict())
    x = torch.rand(8, 1, 28, 28)
    torch.testing.assert_close(sors(x), lenet(x))


def test_path_sampling_is_uniform_over_candidates():
    net = models.build("sors_lenet5", n_ops=4)
    gen = torch.Generator().manual_seed(0)
    draws = net.sample_path(gen, batch_size=8000)  # (8000, 5)
    for layer in range(5):
        counts = torch.bincount(draws[:, layer], minlength=4).double()
        chi2 = ((counts - 2000) ** 2 / 2000).sum().item()
        assert chi2 < 16.27, f"layer {layer}: chi-square {chi2:.1f} over 3 dof (p < 0.001)"


def test_eval_mode_forwards_are_random_unless_the_path_is_fixed():
    net = models.build("sors_lenet5").eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        outputs = [net(x) for _ in range(5)]
        assert any(not torch.allclose(outputs[0], o) for o in outputs[1:])
        path = net.sample_path(torch.Generator().manual_seed(1))
        torch.testing.assert_close(net(x, path), net(x, path))
        net.generator = torch.Generator().manual_seed(3)
        first = net(x)
        net.generator = torch.Generator().manual_seed(3)
        torch.testing.assert_close(net(x), first)


@pytest.mark.parametrize(
    "name,shape,options",
    [
        ("sors_lenet5", (6, 1, 28, 28), {}),
        ("sors_resnet18", (6, 3, 16, 16), {"width": 8}),
    ],
)
def test_per_example_paths_match_each_example_run_alone(name, shape, options):
    net = models.build(name, in_channels=shape[1], **options).eval()
    x = torch.rand(*shape)
    paths = net.sample_path(torch.Generator().manual_seed(2), batch_size=shape[0])
    with torch.no_grad():
        batched = net(x, paths)
        alone = torch.cat([net(x[i : i + 1], paths[i]) for i in range(shape[0])])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,shape,options",
    [
        ("sors_lenet5", (3, 1, 28, 28), {"n_ops": 3}),
        ("sors_resnet18", (3, 3, 16, 16), {"width": 8}),
    ],
)
def test_extracted_subnet_equals_the_supernet_on_that_path(name, shape, options):
    net = models.build(name, in_channels=shape[1], **options).eval()
    path = net.sample_path(torch.Generator().manual_seed(4))
    subnet = net.extract_subnet(path).eval()
    assert not any(isinstance(m, ChoiceLayer) for m in subnet.modules())
    x = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), net(x, path))


def test_sors_resnet18_has_the_papers_block_candidates_and_no_batchnorm():
    net = models.build("sors_resnet18", in_channels=3, width=8)
    counts = net.choice_counts
    assert counts == [4, 3] * 8  # 8 residual blocks: conv1 x4, conv2 x3
    kernels = [c[0].kernel_size[0] for c in net.choice_layers[1].candidates]
    assert kernels == [3, 5, 7]
    for name in [n for n in models.available() if n.startswith("sors_")]:
        model = models.build(name, in_channels=3 if "resnet" in name else 1)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()), name


def test_every_registered_model_classifies_a_batch():
    for name in models.available():
        channels, size = (1, 28) if "lenet" in name else (3, 32)
        options = {"members": "lenet5*2"} if name == "ensemble" else {}
        if name == "ensemble":
            channels, size = 1, 28
        model = models.build(name, num_classes=7, in_channels=channels, **options).eval()
        with torch.no_grad():
            out = model(torch.rand(2, channels, size, size))
        assert out.shape == (2, 7), name
        assert torch.isfinite(out).all(), name


def test_ensemble_and_path_average_return_log_mean_softmax():
    ens = models.build("ensemble", members="lenet5*4").eval()
    assert len(ens.members) == 4
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(-1) for m in ens.members]).mean(0)
        torch.testing.assert_close(ens(x).exp(), expected)
        net = models.build("sors_lenet5").eval()
        paths = torch.stack([net.sample_path() for _ in range(2)])
        avg = models.PathAverage(net, k=2)
        expected = (net(x, paths[0]).softmax(-1) + net(x, paths[1]).softmax(-1)) / 2
        torch.testing.assert_close(avg(x, paths).exp(), expected)


def test_rse_is_random_at_inference_and_averages_noisy_passes():
    rse = models.build("rse_lenet5", n_ensemble=4).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(rse(x), rse(x))
    assert models.is_randomized(rse) and not models.is_randomized(models.build("lenet5"))
    net = models.build("sors_lenet5")
    assert models.is_randomized(net) and not models.is_randomized(models.freeze_path(net, net.sample_path()))


def test_perturbed_copies_start_candidates_near_each_other():
    net = models.build("sors_lenet5").init_perturbed_copies_(0.1, torch.Generator().manual_seed(0))
    first, second = net.choice_layers[0].candidates[:2]
    diff = (first.weight - second.weight).std() / first.weight.std()
    assert 0.05 < diff.item() < 0.2


def test_bad_model_options_name_the_option():
    with pytest.raises(ConfigError, match="model.name"):
        models.build("lenet6")
    with pytest.raises(ConfigError, match="model.n_ops"):
        models.build("sors_lenet5", n_ops=0)
    with pytest.raises(ConfigError, match="model.members"):
        models.build("ensemble", members="lenet5*x")
