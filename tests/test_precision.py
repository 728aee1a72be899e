"""`--precision auto|bf16|fp16|fp32` (extract/precision.py) for extraction and training: what each name runs
as on each device, half precision refused on the CPU in one line, the default unchanged (bf16 on CUDA, fp32
on the CPU), and the choice recorded in a run's config.json. The CUDA paths (fp16 with a gradient scaler)
are checked on a GPU machine; here their CPU-side decisions are."""
from __future__ import annotations

import json

import pytest
import torch

from extract.precision import PrecisionError, autocast_context, grad_scaler, resolve_precision
from heads_fixtures import splits, tiny_model, tiny_train

pytestmark = pytest.mark.usefixtures("one_thread")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_each_name_resolves_per_device_and_the_default_is_unchanged():
    assert resolve_precision("auto", CUDA) == "bf16" and resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision(True, CUDA) == "bf16" and resolve_precision(False, CUDA) == "fp32"
    assert resolve_precision("fp16", CUDA) == "fp16" and resolve_precision("fp32", CPU) == "fp32"
    for half in ("bf16", "fp16"):
        with pytest.raises(PrecisionError, match=f"--precision {half}: .*CUDA only") as err:
            resolve_precision(half, CPU)
        assert "\n" not in str(err.value)
    with pytest.raises(PrecisionError, match="one of auto, bf16, fp16, fp32"):
        resolve_precision("fp8", CUDA)
    assert not grad_scaler("auto", CPU).is_enabled() and not grad_scaler("bf16", CUDA).is_enabled()
    with autocast_context("auto", CPU):                    # a no-op on the CPU: fp32 stays fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_train_config_precision_overrides_amp_and_is_recorded(tmp_path):
    from heads.config import ConfigError, TrainConfig
    from heads.train import train_heads

    assert TrainConfig().amp_mode is True and TrainConfig(amp=False).amp_mode is False
    assert TrainConfig(amp=False, precision="fp16").amp_mode == "fp16"
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="half")
    train, val = splits(24, 12)
    with pytest.raises(PrecisionError, match="--precision fp16"):
        train_heads(train, val, tiny_model(train), tiny_train(epochs=1, precision="fp16"))
    res = train_heads(train, val, tiny_model(train), tiny_train(epochs=1, precision="fp32"), tmp_path / "run")
    assert res.completed
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "fp32"


def test_extraction_options_check_the_name():
    from extract.run import ExtractOptions

    assert ExtractOptions().precision == "auto"
    with pytest.raises(PrecisionError, match="fp8"):
        ExtractOptions(precision="fp8")


def test_cli_refuses_half_precision_on_the_cpu(tmp_path):
    from typer.testing import CliRunner

    from ahcli.app import app
    from heads_fixtures import write_cache

    cache = write_cache(tmp_path / "cache", {"train": 8, "val": 4})
    res = CliRunner().invoke(app, ["train-heads", str(cache), str(tmp_path / "run"), "--precision", "bf16",
                                   "--device", "cpu", "--epochs", "1", "--dim", "8", "--head-hidden", "8"])
    assert res.exit_code != 0
    assert isinstance(res.exception, PrecisionError) or "--precision bf16" in res.output, res.output
