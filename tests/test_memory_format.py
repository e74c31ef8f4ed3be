"""train.channels_last=auto: channels_last for convolutional models on the CPU, NCHW wherever it is not
known to help or the model cannot take it."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ddp_train.engine.memory_format import forward_fails, use_channels_last

CPU, SHAPE = torch.device("cpu"), (1, 28, 28)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(8 * 13 * 13, 10))


class ViewNet(nn.Module):
    """The classic tutorial forward: .view after a convolution, which an NHWC activation cannot take."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


def test_auto_is_channels_last_for_a_convolutional_model_on_the_cpu(caplog):
    with caplog.at_level(logging.INFO, logger="ddp_train"):
        assert use_channels_last("auto", cnn(), SHAPE, CPU, sharded=False) is True
    assert "memory format: channels_last (train.channels_last=auto: a convolutional model on the CPU)" in caplog.text


@pytest.mark.parametrize("model, device, sharded, reason", [
    (nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), CPU, False, "no 2-D convolution"),
    (cnn(), torch.device("cuda", 0), False, "not measured on cuda yet"),
    (cnn(), CPU, True, "FSDP"),
])
def test_auto_keeps_nchw_where_channels_last_is_not_known_to_help(caplog, model, device, sharded, reason):
    with caplog.at_level(logging.INFO, logger="ddp_train"):
        assert use_channels_last("auto", model, SHAPE, device, sharded) is False
    assert f"memory format: NCHW (train.channels_last=auto: {reason})" in caplog.text


def test_a_forward_that_cannot_take_channels_last_keeps_nchw_and_says_why(caplog):
    model = ViewNet()
    with caplog.at_level(logging.INFO, logger="ddp_train"):
        assert use_channels_last("auto", model, SHAPE, CPU, sharded=False) is False
    assert "memory format: NCHW (train.channels_last=auto: the model's forward fails on channels_last tensors " \
        "(ValueError: Cannot view a tensor with shape torch.Size([2, 4, 26, 26])" in caplog.text
    with pytest.raises(RuntimeError, match="view size"):  # what the run would have hit in its first step
        model.to(memory_format=torch.channels_last)(torch.zeros(2, *SHAPE).contiguous(memory_format=torch.channels_last))


def test_the_probe_leaves_the_model_and_the_random_streams_alone():
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert forward_fails(model, SHAPE) is None
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())
    assert model[0].weight.is_contiguous()  # still NCHW: the caller converts it


@pytest.mark.parametrize("setting", [True, False])
def test_true_and_false_are_the_users_choice(setting):
    assert use_channels_last(setting, ViewNet(), SHAPE, torch.device("cuda", 0), sharded=True) is setting
