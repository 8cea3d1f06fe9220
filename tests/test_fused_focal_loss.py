import pytest
import torch

from retinanet import losses as fused
from retinanet.losses import focal_loss

OPTIONS = [(0.25, 2.0), (-1, 0.0), (0.5, 0.5), (0.75, 5.0)]


def logits_and_targets(shape, dtype, seed=0, scale=8.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    logits.view(-1)[:4] = torch.tensor([-60.0, 60.0, 0.0, -1e-3], dtype=torch.float64).to(dtype)  # extremes, zero
    positive = torch.rand(shape, generator=generator) > 0.8
    return logits, positive


def loss_and_gradient(function, logits, positive, alpha, gamma):
    x = logits.clone().requires_grad_()
    loss = function(x, positive, alpha, gamma)
    loss.backward(torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.dtype))
    return loss.detach(), x.grad


@pytest.mark.parametrize("alpha, gamma", OPTIONS)
def test_fused_and_plain_agree_in_float64(alpha, gamma):
    logits, positive = logits_and_targets((6, 500, 7), torch.float64)
    loss, grad = loss_and_gradient(fused.fused_focal_loss, logits, positive, alpha, gamma)
    plain_loss, plain_grad = loss_and_gradient(focal_loss, logits, positive, alpha, gamma)
    assert loss.dtype == grad.dtype == torch.float64
    assert (loss - plain_loss).abs().max() <= 1e-10 and (grad - plain_grad).abs().max() <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha, gamma", OPTIONS)
def test_fused_and_plain_agree_in_half_precision(dtype, alpha, gamma):
    logits, positive = logits_and_targets((6, 500, 7), dtype)
    loss, grad = loss_and_gradient(fused.fused_focal_loss, logits, positive, alpha, gamma)
    plain_loss, plain_grad = loss_and_gradient(focal_loss, logits, positive, alpha, gamma)
    _, exact_grad = loss_and_gradient(focal_loss, logits.double(), positive, alpha, gamma)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-7)
    # Each a float32 gradient rounded once: within one step of the dtype (or of fp16's subnormals) of the exact one
    one_step = dict(rtol=torch.finfo(dtype).eps, atol=2.0**-24 if dtype == torch.float16 else 1e-37)
    for gradient in (grad, plain_grad):
        torch.testing.assert_close(gradient.double(), exact_grad.to(dtype).double(), **one_step)


def test_fp16_gradient_of_easy_negatives_survives_the_loss_scale():
    # Late in training: 80 classes, easy negatives around σ(−6), one positive per 200 anchors; loss normalised by the
    # positives and scaled as GradScaler does. Half the negatives' own derivatives are below fp16's smallest number.
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(20000, 80, generator=generator) - 6.0).half()
    positive = torch.zeros(20000, 80, dtype=torch.bool)
    positive[torch.randperm(20000, generator=generator)[:100], 0] = True
    logits[positive] = 2.0
    scale = 65536.0

    def negatives_gradient(function, dtype):
        x = logits.to(dtype).clone().requires_grad_()
        (function(x, positive).sum() / positive.sum() * scale).backward()
        return x.grad.double()[~positive].sum() / scale

    reference = negatives_gradient(focal_loss, torch.float64)
    for function in (fused.fused_focal_loss, focal_loss):
        assert abs(negatives_gradient(function, torch.float16) / reference - 1) < 1e-4


def test_the_gradient_is_computed_only_when_one_is_needed(monkeypatch):
    gradients, terms = [], fused.focal_loss_and_gradient

    def recording(*args, **kwargs):
        loss, gradient = terms(*args, **kwargs)
        gradients.append(gradient)
        return loss, gradient

    monkeypatch.setattr(fused, "focal_loss_and_gradient", recording)
    layer = torch.nn.Linear(4, 3)  # logits out of a network, as in training and evaluation
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[True, False, False]] * 5)
    with torch.no_grad():
        without = fused.fused_focal_loss(layer(inputs), targets)
    with_grad = fused.fused_focal_loss(layer(inputs), targets)
    assert gradients[0] is None and gradients[1].shape == (5, 3)
    assert torch.equal(without, with_grad.detach()) and with_grad.requires_grad


@pytest.mark.parametrize("alpha, gamma", OPTIONS)
def test_fused_focal_loss_gradcheck(alpha, gamma):
    logits, positive = logits_and_targets((3, 4), torch.float64, scale=3.0)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fused.fused_focal_loss(x, positive, alpha, gamma), (logits,))


@pytest.mark.slow
def test_the_compiled_terms_compute_what_the_eager_ones_do():
    # torch.compile makes the GPU's one-kernel focal loss; compiled here for the CPU, it must trace to the same math.
    logits, positive = logits_and_targets((2, 300, 5), torch.float32, seed=4, scale=4.0)
    for alpha, gamma in OPTIONS:
        compiled = fused.compiled_focal_loss_and_gradient()(logits, positive, alpha, gamma)
        for value, eager in zip(compiled, fused.focal_loss_and_gradient(logits, positive, alpha, gamma)):
            torch.testing.assert_close(value, eager)
