"""The SORS objective (Eq. 4-7): values, limits and double backprop."""

import torch
from torch import nn

from sors import losses, models


class TinySuper(models.SuperNet):
    """One choice layer of two linear maps on 4 features; examples never interact."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), models.ChoiceLayer([nn.Linear(4, 3), nn.Linear(4, 3)]))
        self._register_choices()


def test_orthogonality_loss_is_zero_for_orthogonal_and_one_for_parallel_gradients():
    e1 = torch.tensor([[1.0, 0.0, 0.0]])
    e2 = torch.tensor([[0.0, 2.0, 0.0]])
    assert losses.orthogonality_loss(torch.stack([e1, e2])).item() == 0.0
    assert abs(losses.orthogonality_loss(torch.stack([e1, 3 * e1])).item() - 1.0) < 1e-6
    # three mutually parallel paths: 3 pairs
    assert abs(losses.orthogonality_loss(torch.stack([e1, e1, -e1])).item() - 3.0) < 1e-6


def test_orthogonality_loss_matches_a_hand_computation_on_a_tiny_model():
    torch.manual_seed(0)
    net = TinySuper().double()
    x = torch.rand(5, 1, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    paths = torch.tensor([[0], [1]])
    parts = losses.sors_loss(net, x, y, lam=1.0, paths=paths)
    # by hand: softmax-CE gradient wrt x for a linear map W is W^T (p - onehot)
    grads = []
    for k in range(2):
        lin = net.body[1].candidates[k]
        p = torch.softmax(x.flatten(1) @ lin.weight.T + lin.bias, -1)
        grads.append((p - nn.functional.one_hot(y, 3)) @ lin.weight)
    cos = nn.functional.cosine_similarity(grads[0], grads[1], dim=1)
    torch.testing.assert_close(parts.ortho, cos.pow(2).mean())


def test_double_backprop_reaches_the_weights():
    torch.manual_seed(0)
    net = models.build("sors_lenet5", n_ops=2)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    paths = torch.tensor([[0] * 5, [1] * 5])
    parts = losses.sors_loss(net, x, y, lam=1.0, paths=paths)
    ce_only = losses.sors_loss(net, x, y, lam=0.0, paths=paths)
    grad_total = torch.autograd.grad(parts.total, net.choice_layers[0].candidates[0].weight)[0]
    grad_ce = torch.autograd.grad(ce_only.total, net.choice_layers[0].candidates[0].weight)[0]
    assert parts.ortho.item() > 0
    assert not torch.allclose(grad_total, grad_ce), "the orthogonality term must change the weight gradient"


def test_batched_loss_equals_the_sequential_reference_in_float64():
    torch.manual_seed(1)
    net = models.build("sors_lenet5", n_ops=3).double()
    x, y = torch.rand(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,))
    teacher = torch.softmax(torch.randn(6, 10, dtype=torch.float64), -1)
    paths = losses.sample_paths(net, 3, torch.Generator().manual_seed(0))
    fast = losses.sors_loss(net, x, y, lam=10.0, paths=paths, teacher_probs=teacher)
    ref = losses.sors_loss_reference(net, x, y, paths, lam=10.0, teacher_probs=teacher)
    torch.testing.assert_close(fast.total, ref.total, rtol=1e-10, atol=0)
    params = list(net.parameters())
    g_fast = torch.autograd.grad(fast.total, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.total, params, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_distillation_is_cross_entropy_against_the_teacher_softmax():
    logits = torch.tensor([[2.0, 0.0]])
    probs = torch.tensor([[0.25, 0.75]])
    expected = -(0.25 * torch.log_softmax(logits, -1)[0, 0] + 0.75 * torch.log_softmax(logits, -1)[0, 1])
    torch.testing.assert_close(losses.soft_cross_entropy(logits, probs), expected)
