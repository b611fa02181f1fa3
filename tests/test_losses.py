import math

import pytest
import torch
from torch import nn

from dafl.generator import balanced_targets
from dafl.losses import (BatchNormStatistics, activation_loss, batchnorm_statistics_loss, information_entropy_loss,
                         kd_loss, l1_disagreement, mode_seeking_loss, one_hot_loss)


def test_one_hot_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # Targets are the argmax (0, 1): CE = mean(log(1 + e^-2), log(1 + e^-1)).
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert one_hot_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_activation_loss_by_hand():
    features = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    assert activation_loss(features).item() == pytest.approx(-(1 + 3 + 0.5 + 0.5) / 4)


def test_information_entropy_loss_by_hand():
    # Two samples, confident in different classes -> batch mean (0.5, 0.5).
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    assert information_entropy_loss(logits, log_base=10).item() == pytest.approx(2 * 0.5 * math.log10(0.5), rel=1e-5)
    assert information_entropy_loss(logits, log_base=math.e).item() == pytest.approx(math.log(0.5), rel=1e-5)
    # All samples in one class: p_mean = (1, 0) -> loss 0, the maximum (worst) value.
    collapsed = torch.tensor([[100.0, 0.0], [100.0, 0.0]])
    assert information_entropy_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)


def test_information_entropy_is_finite_when_a_class_probability_underflows():
    # softmax(-1000) is exactly 0 in float32: 0 * log 0 must count as 0, with a finite gradient.
    logits = torch.tensor([[1000.0, 0.0, 0.0], [1000.0, 0.0, 0.0]], requires_grad=True)
    loss = information_entropy_loss(logits)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_information_entropy_is_a_batch_statistic():
    logits = torch.randn(8, 5)
    full = information_entropy_loss(logits)
    halves = (information_entropy_loss(logits[:4]) + information_entropy_loss(logits[4:])) / 2
    assert not torch.isclose(full, halves)  # why DDP must all-gather before computing it


def test_kd_loss_by_hand():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax (0.75, 0.25)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # Temperature T: KL of the softened distributions times T^2.
    t = 2.0
    p = torch.softmax(teacher / t, 1)[0]
    expected_t = (p * torch.log(p / 0.5)).sum().item() * t * t
    assert kd_loss(student, teacher, temperature=t).item() == pytest.approx(expected_t, rel=1e-6)


def test_kd_loss_is_batchmean():
    s, t = torch.randn(1, 4), torch.randn(1, 4)
    assert kd_loss(s.repeat(5, 1), t.repeat(5, 1)).item() == pytest.approx(kd_loss(s, t).item(), rel=1e-6)


def test_l1_disagreement_by_hand():
    assert l1_disagreement(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])).item() == pytest.approx(1.5)


def test_batchnorm_statistics_loss_by_hand():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    hooks = BatchNormStatistics(nn.Sequential(bn))
    x = torch.zeros(3, 2, 2, 2)
    x[:, 0] = 1.0  # channel 0: mean 1 var 0 ; channel 1: mean 0 var 0
    hooks.recording = True
    bn(x)
    records = hooks.pop()
    assert len(records) == 1
    loss = batchnorm_statistics_loss(records)
    # ||(0, 1)|| + ||(-4, -1)||
    assert loss.item() == pytest.approx(1.0 + math.sqrt(17.0), rel=1e-6)


def test_batchnorm_statistics_of_a_batchnorm1d_by_hand():
    # a BatchNorm1d on (N, C) features, as after a fully connected layer
    bn = nn.BatchNorm1d(2).eval()
    bn.running_var.copy_(torch.tensor([1.0, 9.0]))
    hooks = BatchNormStatistics(nn.Sequential(nn.Linear(3, 2), bn))
    assert hooks.layers == [bn]
    hooks.recording = True
    bn(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))  # channel 0: mean 2 var 1; channel 1: mean 2 var 0
    (mean, var, layer), = hooks.pop()
    assert torch.equal(mean, torch.tensor([2.0, 2.0])) and torch.equal(var, torch.tensor([1.0, 0.0])) and layer is bn
    # ||(2, 2) - 0|| + ||(1, 0) - (1, 9)||
    assert batchnorm_statistics_loss([(mean, var, layer)]).item() == pytest.approx(math.sqrt(8.0) + 9.0, rel=1e-6)
    hooks.remove()


def test_batchnorm_statistics_records_only_while_recording():
    hooks = BatchNormStatistics(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    net = nn.Sequential(*[m for m in hooks.layers])
    net(torch.randn(2, 2, 3, 3))
    assert hooks.pop() == []
    hooks.remove()


def test_one_hot_loss_with_requested_classes():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([1, 1])  # the first image was asked to show class 1, the teacher says 0
    expected = (math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1))) / 2
    assert one_hot_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_targets_by_hand():
    # Already one image per class: the quota changes nothing, targets are the arg-max.
    logits = torch.tensor([[0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    assert balanced_targets(logits).tolist() == [1, 0, 2]
    # Four images, two classes, all prefer class 0: two slots per class. The two that lose
    # least by moving (log p(1) - log p(0) largest: images 1 and 3) go to class 1.
    logits = torch.tensor([[4.0, 0.0], [1.0, 0.5], [3.0, 0.0], [2.0, 1.8]])
    assert balanced_targets(logits).tolist() == [0, 1, 0, 1]
    # Uneven sizes: 5 images, 2 classes -> at most 3 per class.
    targets = balanced_targets(torch.tensor([[5.0, 0.0]] * 5))
    assert sorted(torch.bincount(targets, minlength=2).tolist()) == [2, 3]


def test_mode_seeking_loss_by_hand():
    # Pairs (z0, z2) and (z1, z3): latent gaps 2 and 1; image gaps 4 and 1 -> (2/4 + 1/1) / 2.
    latents = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [0.0, 2.0]])
    images = torch.tensor([[0.0], [1.0], [4.0], [2.0]])
    assert mode_seeking_loss(latents, images, eps=0.0).item() == pytest.approx((2 / 4 + 1 / 1) / 2)
    # Collapsed images (identical whatever the latent) give a huge loss: that is what it fights.
    assert mode_seeking_loss(latents, torch.zeros(4, 1)).item() > 1e4
