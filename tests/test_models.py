"""Model construction: classes and input channels adapted for torchvision models, and pretrained weights
only from a local file (never a download), with the classifier re-initialised for other class counts."""
from __future__ import annotations

import pytest
import torch

from ddp_train.config import ModelConfig
from ddp_train.data import DataInfo
from ddp_train.errors import ConfigError
from ddp_train.models import build_model, load_pretrained


def info(classes: int, channels: int, size: int = 32) -> DataInfo:
    return DataInfo(classes, channels, (size, size), (0.5,) * channels, (0.25,) * channels)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "cnn_dropout", "mlp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_models_take_the_datasets_channels_and_classes(name, channels):
    size = 28 if name in ("cnn_dropout", "mlp") else 32
    model = build_model(ModelConfig(name=name), info(7, channels, size)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_pretrained_weights_load_from_a_local_file_and_skip_a_classifier_of_another_size(tmp_path):
    source = build_model(ModelConfig(name="resnet18"), info(10, 3))
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    target = build_model(ModelConfig(name="resnet18"), info(4, 3))
    load_pretrained(target, str(tmp_path / "resnet18.pth"))
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert target.fc.weight.shape == (4, 512)  # re-initialised for 4 classes, not copied


def test_a_missing_or_wrong_pretrained_file_is_a_clear_error(tmp_path):
    model = build_model(ModelConfig(name="resnet18"), info(4, 3))
    with pytest.raises(ConfigError, match="no file at .*never downloaded at run time"):
        load_pretrained(model, str(tmp_path / "missing.pth"))
    torch.save(build_model(ModelConfig(name="efficientnet_b0"), info(4, 3)).state_dict(), tmp_path / "effnet.pth")
    with pytest.raises(ConfigError, match="does not fit ResNet"):
        load_pretrained(model, str(tmp_path / "effnet.pth"))
