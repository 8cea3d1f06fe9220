"""TrainStep with mixed precision's loss scaling, on the CPU: a good step updates the weights, a step whose scaled
gradients overflow or whose loss is not finite updates nothing and halves the scale."""

import math

import torch
from torch import nn

from retinanet.training import StepResult, TrainStep

INITIAL_SCALE = 2.0**16  # GradScaler's default


class TwoLosses(nn.Module):
    """A model with the detector's interface: forward(images, annotations) -> (classification, regression) loss.
    Classification loss sum(w * images), regression loss `annotations` * sum(w²), so the gradient is
    images + 2 * annotations * w."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, 2.0]))

    def forward(self, images: torch.Tensor, annotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.weight * images).sum(), annotations * self.weight.square().sum()


def scaled_step() -> tuple[TwoLosses, torch.amp.GradScaler, TrainStep]:
    model = TwoLosses()
    scaler = torch.amp.GradScaler("cpu", init_scale=INITIAL_SCALE, enabled=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, scaler, TrainStep(model, optimizer, scaler, torch.device("cpu"))


def test_a_good_step_updates_the_weights_at_their_true_gradient_and_keeps_the_scale():
    model, scaler, step = scaled_step()
    result = step(torch.ones(2), torch.tensor(1.0), stop_requested=False)
    assert result == StepResult(3.0, 5.0, nonfinite=False, stop=False)  # 1 + 2, 1 + 4
    # gradient (1, 1) + 2 * (1, 2) = (3, 5), unscaled; w - 0.1 * gradient
    torch.testing.assert_close(model.weight.detach(), torch.tensor([0.7, 1.5]))
    assert scaler.get_scale() == INITIAL_SCALE


def test_overflowed_gradients_skip_the_update_and_halve_the_scale():
    model, scaler, step = scaled_step()
    hook = model.weight.register_hook(lambda gradient: gradient * math.inf)  # as an fp16 gradient past 65504
    result = step(torch.ones(2), torch.tensor(1.0), stop_requested=False)
    hook.remove()
    assert result == StepResult(3.0, 5.0, nonfinite=False, stop=False)  # the loss itself was fine
    assert model.weight.tolist() == [1.0, 2.0]
    assert scaler.get_scale() == INITIAL_SCALE / 2
    step(torch.ones(2), torch.tensor(1.0), stop_requested=True)  # the next good step updates again
    torch.testing.assert_close(model.weight.detach(), torch.tensor([0.7, 1.5]))
    assert scaler.get_scale() == INITIAL_SCALE / 2


def test_a_nonfinite_loss_is_reported_and_updates_nothing():
    model, scaler, step = scaled_step()
    result = step(torch.ones(2), torch.tensor(math.nan), stop_requested=False)
    assert result.classification_loss == 3.0 and math.isnan(result.regression_loss)
    assert result.nonfinite and not result.stop
    assert model.weight.tolist() == [1.0, 2.0]
    assert scaler.get_scale() == INITIAL_SCALE / 2  # its gradients are NaN too: the scaler backs off
