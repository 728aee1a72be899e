"""The real encoders' architectures, not only the tiny ones: each public model's own configuration files
(tests/real_configs/, no weights) build a full-size model with random weights, saved in HF format as the
public checkpoint is (its class, its pre-training or classification head), loaded through the very same
code as the real weights, and one short synthetic video is extracted with them on the CPU."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ahbench.models import full_size_configs
from extract.bah import read_bah
from extract.encoders import load_encoders
from extract.run import decode_video, encode_video_record
from extract.spec import ExtractionSpec, load_spec
from extract.synth import write_synthetic_bah
from extract.tiny_encoders import tiny_tokenizer

REAL = Path(__file__).resolve().parent / "real_configs"
FOLDERS = {"video": "videomae-base", "audio": "hubert-base-ls960", "text": "roberta-base-go_emotions"}
SPEC = Path(__file__).resolve().parent.parent / "cache_spec.yaml"


def _real(modality: str, name: str) -> dict:
    return json.loads((REAL / FOLDERS[modality] / name).read_text())


def _write_model(modality: str, out: Path) -> None:
    """The public checkpoint's class from its config.json, random weights, plus its processor files."""
    import transformers

    shutil.copytree(REAL / FOLDERS[modality], out)
    if modality == "text":              # a small real BPE vocabulary; the real tokenizer settings on top
        tiny_tokenizer(out)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(REAL / FOLDERS[modality] / name, out / name)
    config = transformers.AutoConfig.from_pretrained(out)
    cls = getattr(transformers, config.architectures[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cls(config).save_pretrained(out)


@pytest.fixture(scope="module")
def real_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_configs")
    for modality in FOLDERS:
        _write_model(modality, root / modality)
    text = SPEC.read_text(encoding="utf-8")
    for modality, hub in (("video", "MCG-NJU/videomae-base"), ("audio", "facebook/hubert-base-ls960"),
                          ("text", "SamLowe/roberta-base-go_emotions")):
        text = text.replace(f"model: {hub}", f"model: ./{modality}")
    (root / "cache_spec.yaml").write_text(text.replace("train: 8", "train: 1").replace("eval: 5", "eval: 1"))
    write_synthetic_bah(root / "synth", videos=12, seed=3, private=0)
    return root


@pytest.mark.slow
def test_full_size_architectures_extract_a_video_with_the_real_shapes(real_world):
    spec = load_spec(real_world / "cache_spec.yaml")
    enc = load_encoders(spec, device="cpu")
    resolved = enc.spec
    # what the models' own processors say, and the spec's defaults agree with them
    assert (resolved.video.size, resolved.video.mean, resolved.video.std) == (224, (0.485, 0.456, 0.406),
                                                                           (0.229, 0.224, 0.225))
    assert resolved.windows.frames == _real("video", "config.json")["num_frames"] == 16
    assert resolved.audio.sample_rate == _real("audio", "preprocessor_config.json")["sampling_rate"]
    assert resolved.text.max_tokens == _real("text", "tokenizer_config.json")["model_max_length"] == 512
    assert resolved.preprocessing["audio"]["do_normalize"] is True
    # the public checkpoints' heads were skipped by name and recorded, nothing else
    unused = enc.loading_report()
    assert any(k.startswith("decoder.") for k in unused["video"]) and unused["audio"] == []
    assert any(k.startswith("classifier.") for k in unused["text"])

    video = sorted(read_bah(real_world / "synth" / "data").videos, key=lambda v: v.video_id)[0]
    decoded = decode_video(video, resolved)
    assert decoded.error is None, decoded.error
    with torch.inference_mode():
        rec = encode_video_record(decoded, enc, resolved, batch_size=1)
    assert rec.arrays["video/last"].shape == (1, 1568, 768)                    # 8 x 14 x 14 tubelets per clip
    audio = rec.arrays["audio/last"]
    assert audio.shape[1] == 768 and abs(audio.shape[0] - 50 * len(decoded.wave) / 16000) <= 2   # ~50 per s
    assert rec.arrays["text/last"].shape[1] == 768 and 2 <= rec.arrays["text/last"].shape[0] <= 512
    assert all(np.isfinite(a).all() for a in rec.arrays.values() if a.dtype.kind == "f")


KEYS = {"video": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                  "patch_size", "num_frames", "tubelet_size", "use_mean_pooling"),
        "audio": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                  "conv_kernel", "conv_stride", "feat_extract_norm", "do_stable_layer_norm",
                  "num_conv_pos_embeddings", "num_conv_pos_embedding_groups"),
        "text": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings", "type_vocab_size", "pad_token_id")}


@pytest.mark.parametrize("modality", list(FOLDERS))
def test_the_benchmark_models_are_the_real_architectures(modality):
    ours = full_size_configs()[modality].to_dict()
    real = _real(modality, "config.json")
    differ = {k: (ours.get(k), real[k]) for k in KEYS[modality] if k in real and
              (list(ours.get(k)) if isinstance(ours.get(k), (list, tuple)) else ours.get(k)) != real[k]}
    assert not differ


def test_spec_defaults_leave_video_preprocessing_to_the_model():
    video = ExtractionSpec().video
    assert (video.size, video.mean, video.std, video.override_processor) == (None, None, None, False)
    assert dataclasses.asdict(load_spec(SPEC).video)["model"] == "MCG-NJU/videomae-base"
