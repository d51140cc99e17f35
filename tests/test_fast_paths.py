"""The fast paths of the SORS step and of EOT compute the same values as the straightforward code.

Equivalence in float64 on tiny inputs (relative 1e-6 on the loss and on every weight gradient),
plus the `sors bench` command's contract (table / JSON, exit codes) on a quick run.
"""

import json
import resource
import sys

import pytest
import torch
import torch.nn.functional as F

from bench import cli as bench_cli
from sors import kernels, losses, losses_ablation, models
from sors.models.supernet import per_example_sampling, repeat_forward

RTOL = 1e-6


def lenet(n_ops=3, seed=0):
    torch.manual_seed(seed)
    return models.build("sors_lenet5", n_ops=n_ops).double()


def small_resnet(seed=0):
    """SORS-ResNet-18 structure (choice layers nested in residual blocks), 4 channels wide. Inputs of
    16x16 keep a 2x2 map in the last stage (at 1x1 its per-channel GroupNorm would erase the input)."""
    torch.manual_seed(seed)
    return models.build("sors_resnet18", in_channels=3, width=4).double()


def batch(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def assert_grads_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        assert a is not None
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)


def param_grads(model, backward):
    """Run ``backward()`` from zeroed gradients; the gradient of every parameter (None: unused)."""
    model.zero_grad(set_to_none=True)
    backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------------------
# orthogonality loss


@pytest.mark.parametrize("k", [2, 3, 4])
def test_orthogonality_loss_equals_the_einsum_formula_with_its_gradient(k):
    g = torch.randn(k, 5, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    g[1, 2] = 0.0  # a zero gradient: counts as orthogonal to everything in both
    a = g.clone().requires_grad_()
    b = g.clone().requires_grad_()
    fast, ref = losses.orthogonality_loss(a), losses_ablation.einsum_orthogonality(b)
    torch.testing.assert_close(fast, ref, rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.autograd.grad(fast, a)[0], torch.autograd.grad(ref, b)[0], rtol=RTOL, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# the SORS step


def _resnet_paths(net):
    return [[i % m for m in net.choice_counts] for i in (0, 1)]  # every layer differs


@pytest.mark.parametrize(
    "make,shape,n,paths,distill",
    [
        (lenet, (1, 28, 28), 4, [[0, 1, 2, 0, 1], [1, 2, 0, 1, 2]], True),  # every layer differs
        (lenet, (1, 28, 28), 4, [[0, 1, 2, 0, 1], [0, 1, 0, 2, 1], [2, 1, 2, 0, 0]], True),  # K=3, some shared
        (lenet, (1, 28, 28), 4, [[2, 2, 2, 2, 2], [2, 2, 2, 2, 2]], True),  # the same path twice
        (small_resnet, (3, 16, 16), 3, _resnet_paths, False),  # choice layers nested in residual blocks
    ],
    ids=["lenet-differ", "lenet-k3", "lenet-same", "resnet-nested"],
)
def test_sors_step_equals_the_sequential_reference(make, shape, n, paths, distill):
    net = make()
    x, y = batch(shape, n=n)
    teacher = torch.softmax(torch.randn(n, 10, dtype=torch.float64), -1) if distill else None
    paths = torch.tensor(paths(net) if callable(paths) else paths)
    params = [p for p in net.parameters() if p.requires_grad]
    parts = {}

    def run(which):
        if which == "fast":
            parts[which] = losses.sors_loss(net, x, y, lam=10.0, paths=paths, teacher_probs=teacher)
            losses.backward_into(parts[which], params)
        else:
            parts[which] = losses.sors_loss_reference(net, x, y, paths, lam=10.0, teacher_probs=teacher)
            parts[which].total.backward()

    g_fast, g_ref = param_grads(net, lambda: run("fast")), param_grads(net, lambda: run("ref"))
    fast, ref = parts["fast"], parts["ref"]
    assert ref.ortho > 1e-6  # input gradients that carry signal, not rounding noise
    torch.testing.assert_close(fast.ortho, ref.ortho, rtol=RTOL, atol=0)
    torch.testing.assert_close(fast.total, ref.total, rtol=RTOL, atol=0)
    torch.testing.assert_close(fast.logits, ref.logits, rtol=RTOL, atol=1e-12)
    assert_grads_close(g_fast, g_ref)


def lenet_step():
    """A float64 SORS-LeNet-5, a batch, two paths sharing one layer, and the parameter list."""
    net = lenet()
    x, y = batch((1, 28, 28))
    return net, x, y, torch.tensor([[0, 1, 2, 0, 1], [1, 1, 0, 2, 2]]), list(net.parameters())


def test_weight_grads_from_the_input_gradient_backward_add_up_to_the_same_step():
    net, x, y, paths, params = lenet_step()
    reuse = param_grads(
        net, lambda: losses.backward_into(losses.sors_loss(net, x, y, lam=10.0, paths=paths, weight_grads=True), params)
    )
    plain = param_grads(net, lambda: losses.sors_loss_reference(net, x, y, paths, lam=10.0).total.backward())
    assert_grads_close(reuse, plain)


def test_every_fast_path_switched_off_gives_the_same_gradients():
    """The bench's ablation variants differ in cost only."""
    net, x, y, paths, params = lenet_step()
    opt = torch.optim.SGD(params, lr=0.0)
    grads = {
        label: param_grads(net, lambda o=options: losses_ablation.sors_step_variant(net, x, y, paths, params, opt, **o))
        for label, options in losses_ablation.FAST_PATH_VARIANTS.items()
    }
    first = grads.pop("all fast paths")
    for other in grads.values():
        assert_grads_close(other, first)


CONV_SHAPES = [  # (c_in, c_out, kernel, padding, bias): LeNet-5's conv1, a ResNet stem, a padded RGBA layer
    (1, 6, 5, 0, True),
    (3, 4, 3, 1, False),
    (4, 2, 3, 2, True),
]


def _conv_second_order(x, weight, bias, padding):
    """y = conv(x); g = dsum(y^2)/dx with a graph; the gradients of (y.sum() + sum(g^3)) w.r.t. x,
    weight, bias: the first and second derivatives the SORS step takes of a first convolution."""
    y = kernels.conv2d(x, weight, bias, padding=padding)
    g = torch.autograd.grad((y * y).sum(), x, create_graph=True)[0]
    wanted = [t for t in (x, weight, bias) if t is not None]
    return [y, g, *torch.autograd.grad(y.sum() + (g**3).sum(), wanted)]


@pytest.mark.parametrize("c_in,c_out,k,padding,bias", CONV_SHAPES)
def test_fast_first_conv_equals_the_builtin_convolution_to_second_order(c_in, c_out, k, padding, bias):
    g = torch.Generator().manual_seed(c_in)
    x = torch.rand(3, c_in, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    fast = _conv_second_order(x, weight, b, padding)  # an int, as F.conv2d takes it
    assert fast[0].grad_fn is not None and "Narrow" in type(fast[0].grad_fn).__name__  # the fast path ran
    with kernels.fast_input_gradients(False):
        builtin = _conv_second_order(x, weight, b, padding)
    assert "Narrow" not in type(builtin[0].grad_fn).__name__
    for got, want in zip(fast, builtin):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-12)
    assert torch.autograd.gradgradcheck(
        lambda xx, ww: kernels.conv2d(xx, ww, padding=(padding, padding)),
        (x[:1].detach().requires_grad_(), weight.detach().requires_grad_()),
    )


@pytest.mark.parametrize("case", ["wide", "stride 2", "no input gradient", "dilated"])
def test_fast_first_conv_steps_aside_where_it_does_not_apply(case):
    c_in, stride, dilation, needs_grad = {
        "wide": (8, 1, 1, True),
        "stride 2": (1, 2, 1, True),
        "no input gradient": (1, 1, 1, False),
        "dilated": (1, 1, 2, True),
    }[case]
    conv = models.layers.Conv2d(c_in, 4, 3, stride=stride, dilation=dilation, padding=1).double()
    x = torch.rand(2, c_in, 10, 10, dtype=torch.float64, requires_grad=needs_grad)
    out = conv(x)
    assert "Narrow" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, stride, 1, dilation))


def test_input_gradient_pass_skips_the_weight_gradient_and_the_param_pass_skips_the_input_gradient():
    """Like built-in ops, the fast conv computes only what the backward call asks for."""
    conv = models.layers.Conv2d(1, 6, 5)
    x = torch.rand(4, 1, 12, 12, requires_grad=True)

    def ops_during(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return {e.name for e in prof.events()}

    out = conv(x).pow(2).sum()
    input_pass = ops_during(lambda: torch.autograd.grad(out, x, retain_graph=True))
    assert "aten::convolution_backward" not in input_pass and "_InputGradient" in input_pass
    param_pass = ops_during(lambda: torch.autograd.backward(out, inputs=[conv.weight, conv.bias]))
    assert "aten::convolution_backward" in param_pass and "_InputGradient" not in param_pass
    assert x.grad is None and conv.weight.grad is not None


def test_training_backprops_parameters_only():
    """The train step's backward leaves no gradient on the input copy (no third input-gradient pass)."""
    net = lenet()
    x, y = batch((1, 28, 28))
    parts = losses.sors_loss(net, x, y, lam=10.0, paths=torch.tensor([[0] * 5, [1] * 5]))
    losses.backward_into(parts, list(net.parameters()))
    leaves = [t for t in _graph_leaves(parts.total) if t.dim() == 4 and t.shape[0] == 8]
    assert leaves and all(t.grad is None for t in leaves)


def _graph_leaves(tensor):
    seen, stack, found = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            found.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return found


# ---------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize(
    "paths", [[[0, 1, 2, 0, 1], [1, 2, 0, 1, 2]], [[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1]]]
)
def test_block_routing_equals_per_example_routing(paths):
    net = lenet()
    x, _ = batch((1, 28, 28), n=3)
    paths = torch.tensor(paths)
    stacked = x.repeat(len(paths), 1, 1, 1)
    torch.testing.assert_close(
        net.forward_blocks(stacked, paths), net(stacked, paths.repeat_interleave(3, 0)), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("make,shape", [(lenet, (1, 28, 28)), (small_resnet, (3, 16, 16))])
def test_forward_copies_equals_the_repeated_batch_with_input_gradients(make, shape):
    net = make().eval()
    x, y = batch(shape, n=3)
    path = net.sample_path(torch.Generator().manual_seed(3), batch_size=5 * 3)
    a_in, b_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = net.forward_copies(a_in, 5, path), net(b_in.repeat(5, 1, 1, 1), path)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(F.cross_entropy(a, y.repeat(5), reduction="sum"), a_in)[0]
    gb = torch.autograd.grad(F.cross_entropy(b, y.repeat(5), reduction="sum"), b_in)[0]
    torch.testing.assert_close(ga, gb, rtol=RTOL, atol=RTOL * gb.abs().max().item())


def test_repeat_forward_draws_the_same_paths_as_the_repeated_forward():
    net = lenet().eval()
    x, _ = batch((1, 28, 28), n=4)
    with per_example_sampling(net):
        torch.manual_seed(7)
        a = repeat_forward(net, x, 6)
        torch.manual_seed(7)
        b = net(x.repeat(6, 1, 1, 1))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_forward_copies_runs_the_first_layer_once_per_image_and_candidate():
    net = lenet(n_ops=4).eval()
    rows = []
    for candidate in net.choice_layers[0].candidates:
        candidate.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    x, _ = batch((1, 28, 28), n=8)
    with per_example_sampling(net):
        net.forward_copies(x, 20)
    assert sum(rows) <= 4 * 8  # not 20 * 8
    rows.clear()
    with per_example_sampling(net):
        net(x.repeat(20, 1, 1, 1))
    assert sum(rows) == 20 * 8


# ---------------------------------------------------------------------------------------------
# the bench command


def test_bench_quick_json_describes_the_machine_and_every_figure(capsys):
    code = bench_cli.main(["--quick", "--cases", "train_step,fastpaths", "--repeats", "1", "--json", "--no-targets"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"cpu", "torch_threads", "torch", "device", "load_average"} <= set(out["machine"])
    names = {r["name"] for r in out["results"]}
    assert {
        "train_step.sors_lenet5.ratio",
        "train_step.sors_lenet5.speedup_vs_reference",
        "train_step.sors_resnet18.ratio",
        "fastpaths.all fast paths",
    } <= names
    ratio = next(r for r in out["results"] if r["name"] == "train_step.sors_lenet5.ratio")
    assert ratio["value"] > 1 and ratio["detail"]["sors_ms"] > 0 and ratio["detail"]["vanilla_ms"] > 0


def test_bench_exits_1_on_a_missed_target_and_2_on_bad_input(capsys):
    code = bench_cli.main(
        [
            "--quick",
            "--cases",
            "train_step",
            "--models",
            "sors_lenet5",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--target",
            "train_step.sors_lenet5.ratio=0.5",
        ]
    )
    table = capsys.readouterr().out
    assert code == 1 and "targets missed: train_step.sors_lenet5.ratio" in table
    assert any(line.startswith("train_step.sors_lenet5.ratio") and " NO " in line for line in table.splitlines())
    assert bench_cli.main(["--cases", "nope"]) == 2
    assert bench_cli.main(["--target", "no.such=1"]) == 2
    assert bench_cli.main(["--models", "vgg16"]) == 2
    assert "sors bench:" in capsys.readouterr().err


def test_bench_attack_and_memory_cases_report_their_figures(capsys):
    code = bench_cli.main(
        ["--quick", "--cases", "eot,pgd,memory", "--repeats", "1", "--warmup", "0", "--json", "--no-targets"]
    )
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["results"]}
    assert code == 0
    assert rows["eot.speedup_vs_sequential"]["value"] > 0
    assert rows["eot.speedup_vs_sequential"]["detail"]["eot_samples"] == 4
    assert rows["pgd.ratio_vs_torchattacks"]["detail"]["ours_images_per_s"] > 0
    memory = rows["memory.sors_lenet5.sors_step"]
    assert memory["unit"] == "MiB peak RSS" and memory["value"] > memory["detail"]["sors_rss_before_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
def test_steps_reuse_freed_memory_instead_of_page_faulting_it_in_again():
    assert kernels.retain_freed_memory()
    torch.manual_seed(0)
    net = models.build("sors_lenet5")
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    paths, params = torch.tensor([[0, 1, 2, 3, 0], [1, 2, 3, 0, 1]]), list(net.parameters())

    def step():
        net.zero_grad(set_to_none=True)
        losses.backward_into(losses.sors_loss(net, x, y, lam=10.0, paths=paths), params)

    step(), step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert faults < 400, f"{faults:.0f} page faults per step (1,000-7,000 when freed buffers go back to the OS)"
