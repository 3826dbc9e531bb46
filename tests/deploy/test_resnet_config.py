"""The zoo ResNets' configs as files record them (``shiftjax.deploy.resnet_config``): bad
ones are refused by name."""

import re

import pytest

from shiftjax import deploy
from shiftjax.deploy import resnet_config


@pytest.mark.parametrize("field, value, message", [
    ("pooling", "median", "pooling must be one of ('mean', 'max', 'meanmax'), got 'median'"),
    ("widths", [8], "stage_sizes and widths must be lists of 1..8 equal lengths"),
    ("stem_strides", [2], "stem_strides must be [time, frequency], got [2]"),
    ("first_stride", 0, "first_stride must be an integer in 1..8, got 0"),
    ("widths", [8, 10**6], "widths must be an integer in 1..4096, got 1000000"),
])
def test_bad_speech_resnet_config_is_refused(field, value, message):
  config = {"num_classes": 6, "in_channels": 1, "full_precision": ["stem"],
            "stage_sizes": [1, 1], "widths": [8, 16], "stem_strides": [2, 2],
            "first_stride": 2, "pooling": "max"}
  resnet_config.check_architecture("SpeechResNet", config)
  with pytest.raises(deploy.PackedModelError, match=re.escape(message)):
    resnet_config.check_architecture("SpeechResNet", dict(config, **{field: value}))
