"""Model configs: a bad config fails with a message that names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ttaserve.server.architectures import load_state_dict
from ttaserve.server.model_config import ConfigError, load_model_config


def write(tmp_path: Path, text: str, name: str = "m", filename: str = "config.yaml") -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / filename).write_text(text)
    return model_dir


GOOD = "platform: pytorch\narchitecture: cifar_resnet20\ninput: {height: 32, width: 32}\n"


def test_good_config_defaults(tmp_path: Path) -> None:
    config = load_model_config(write(tmp_path, GOOD))
    assert config.name == "m" and config.input.layout == "NHWC" and config.weights_filename == "model.pt"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("platform: tensorflow\ninput: {height: 1, width: 1}\n", ["field 'platform'", "pytorch"]),
        ("platform: pytorch\ninput: {height: 32, width: 32}\n", ["needs 'architecture'"]),
        (GOOD.replace("height: 32", "height: 0"), ["field 'input.height'", "greater than 0"]),
        (GOOD + "preprocessing: {std: [0.2, 0.0, 0.2]}\n", ["field 'preprocessing.std'", "> 0"]),
        (GOOD + "preprocessing: {mean: [0.1, 0.2]}\n", ["preprocessing.mean has 2 values", "3 channels"]),
        (GOOD + "max_batchsize: 8\n", ["field 'max_batchsize'", "Extra inputs"]),
        (GOOD + "dynamic_batching: {max_queue_delay_us: -1}\n", ["field 'dynamic_batching.max_queue_delay_us'"]),
        (GOOD + "name: other\n", ["field 'name'", "differs from the folder name"]),
        (GOOD + "instances: 0\n", ["field 'instances'", "greater than or equal to 1"]),
        ("platform: [unclosed\n", ["cannot parse"]),
        ("- just\n- a list\n", ["expected a mapping"]),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, fragments: list[str]) -> None:
    model_dir = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_model_config(model_dir)
    message = str(excinfo.value)
    assert str(model_dir / "config.yaml") in message
    for fragment in fragments:
        assert fragment in message


def test_json_config_and_missing_config(tmp_path: Path) -> None:
    model_dir = write(
        tmp_path, '{"platform": "onnx", "input": {"height": 8, "width": 8, "channels": 1}}', "j", "config.json"
    )
    assert load_model_config(model_dir).platform.value == "onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no model config"):
        load_model_config(empty)


def test_checkpoint_that_is_not_a_state_dict(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "model.pt"
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_state_dict(path)
