"""Tiny encoders load through the real loading code and equal direct HF calls; TopBlocks(prefix) == last."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.encoders import audio_segment_bounds, conv_output_length, load_encoders, normalize_clips
from extract.loading import EncoderError, load_backbone, resolve_spec
from heads.topblocks import TopBlocks, TopBlocksError, block_parts, segment_ids
from extract.tiny_encoders import write_tiny_encoders
from extract.spec import load_spec

N_TOP = 2  # the tiny spec's unfreeze_top


@pytest.fixture(scope="session")
def tiny_spec_path(tmp_path_factory) -> Path:
    return write_tiny_encoders(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def spec(tiny_spec_path):
    return load_spec(tiny_spec_path)


@pytest.fixture(scope="session")
def enc(spec):
    return load_encoders(spec)


def _hf(model, **inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.last_hidden_state[0], out.hidden_states[-(N_TOP + 1)][0]


def _rand_clips(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 16, 32, 32, 3), dtype=np.uint8)


def _wave(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


# ----------------------------------------------------------------------------------------- tiny writer


def test_tiny_spec_points_at_the_tiny_folders(tiny_spec_path, spec):
    root = tiny_spec_path.parent
    for m in ("video", "audio", "text"):
        assert Path(getattr(spec, m).model) == (root / m).resolve()
        assert (root / m / "config.json").is_file() and (root / m / "model.safetensors").is_file()
    assert (root / "text" / "tokenizer.json").is_file()
    assert spec.layers == ("last", "prefix") and spec.unfreeze_top == N_TOP
    assert spec.video.size is None and resolve_spec(spec).video.size == 32     # from the model's processor


def test_tiny_is_seeded(tmp_path, tiny_spec_path):
    root0 = tiny_spec_path.parent
    write_tiny_encoders(tmp_path / "a", seed=0)
    write_tiny_encoders(tmp_path / "b", seed=1)
    for m in ("video", "audio", "text"):
        same = (root0 / m / "model.safetensors").read_bytes()
        assert (tmp_path / "a" / m / "model.safetensors").read_bytes() == same
        assert (tmp_path / "b" / m / "model.safetensors").read_bytes() != same
    assert (tmp_path / "a/text/tokenizer.json").read_bytes() == (root0 / "text/tokenizer.json").read_bytes()


def test_dims_read_from_config_and_weights_id(enc, tmp_path):
    assert enc.dims == {"video": 64, "audio": 64, "text": 64}
    ids = enc.weights_id()
    assert all(v.startswith("sha256:") for v in ids.values()) and len(set(ids.values())) == 3
    other = load_encoders(load_spec(write_tiny_encoders(tmp_path / "s1", seed=1)))
    assert other.weights_id()["video"] != ids["video"]


def test_tokenizer_is_a_real_roberta_bpe(enc):
    tok = enc.tokenizer
    assert type(tok).__name__.startswith("RobertaTokenizer")
    ids = tok("I am not sure, maybe I hesitate")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids and len(ids) < 20  # corpus words are merged, not spelled out


# --------------------------------------------------------------------------------------- loading errors


def test_missing_folder_is_one_clear_line(spec, tmp_path):
    bad = dataclasses.replace(spec, video=dataclasses.replace(spec.video, model=str(tmp_path / "nope")))
    with pytest.raises(EncoderError) as err:
        load_encoders(bad)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "nope") in msg and "not found" in msg

    (tmp_path / "empty").mkdir()
    bad = dataclasses.replace(spec, audio=dataclasses.replace(spec.audio, model=str(tmp_path / "empty")))
    with pytest.raises(EncoderError, match="config.json"):
        load_backbone(bad, "audio")


def test_video_size_mismatch_is_reported(spec):
    bad = dataclasses.replace(spec, video=dataclasses.replace(spec.video, size=64))
    with pytest.raises(EncoderError, match="image_size"):
        load_backbone(bad, "video")


# -------------------------------------------------------------------------------------------- encoders


def test_normalize_equals_videomae_processor(spec):
    from transformers import VideoMAEImageProcessor

    clips = _rand_clips(2, seed=1)
    proc = VideoMAEImageProcessor.from_pretrained(spec.video.model)
    ref = proc([list(c) for c in clips], return_tensors="pt")["pixel_values"]  # no resize needed at size 32
    video = resolve_spec(spec).video
    ours = normalize_clips(clips, video.mean, video.std, "cpu")
    assert ours.shape == ref.shape == (2, 16, 3, 32, 32)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)


def test_encode_video_equals_hf(enc):
    clips = _rand_clips(3)
    out = enc.encode_video(clips)
    assert out["last"].shape == (3, 128, 64) and out["last"].dtype == torch.float32
    pixels = normalize_clips(clips, enc.spec.video.mean, enc.spec.video.std, "cpu")
    with torch.no_grad():
        ref = enc.models["video"](pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(out["last"], ref.last_hidden_state)
    torch.testing.assert_close(out["prefix"], ref.hidden_states[-(N_TOP + 1)])
    assert not torch.allclose(out["last"], out["prefix"])


def test_encode_video_rejects_wrong_shape(enc):
    with pytest.raises(EncoderError, match="video clips"):
        enc.encode_video(np.zeros((1, 8, 32, 32, 3), np.uint8))


def test_encode_audio_equals_hf(enc):
    wave = _wave(1.5)
    out = enc.encode_audio(wave)
    feats = enc.extractor(wave, sampling_rate=16000, return_tensors="pt")
    last, prefix = _hf(enc.models["audio"], input_values=feats["input_values"])
    assert out["last"].shape == (conv_output_length(enc.models["audio"].config, len(wave)), 64)
    torch.testing.assert_close(out["last"], last)
    torch.testing.assert_close(out["prefix"], prefix)


def test_long_audio_is_encoded_in_segments(spec):
    seg_spec = dataclasses.replace(spec, audio=dataclasses.replace(spec.audio, segment_seconds=0.5))
    enc = load_encoders(seg_spec)
    wave = _wave(1.3, seed=2)
    out = enc.encode_audio(wave)
    lengths = enc.audio_segment_lengths(len(wave))
    assert len(lengths) == 3 and out["last"].shape[0] == sum(lengths)
    bounds = audio_segment_bounds(len(wave), 16000, 0.5)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(wave) and all(b - a <= 8000 for a, b in bounds)
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    refs = []
    for a, b in bounds:
        feats = enc.extractor(wave[a:b], sampling_rate=16000, return_tensors="pt")
        refs.append(_hf(enc.models["audio"], input_values=feats["input_values"])[0])
    torch.testing.assert_close(out["last"], torch.cat(refs))


def test_short_audio_still_gives_tokens(enc):
    assert enc.encode_audio(_wave(0.2))["last"].shape == (9, 64)  # 3200 samples -> floor((3200-400)/320)+1
    tiny = enc.encode_audio(np.full(100, 0.05, np.float32))
    assert tiny["last"].shape == (1, 64) and torch.isfinite(tiny["last"]).all()
    assert enc.encode_audio(np.zeros(0, np.float32))["last"].shape == (1, 64)


def test_encode_text_equals_hf(enc):
    text = "Honestly I am not sure, maybe I will try it, but I worry about it."
    out = enc.encode_text(text)
    ids = enc.tokenizer(text, return_tensors="pt")
    last, prefix = _hf(enc.models["text"], **ids)
    assert out["last"].shape == (ids["input_ids"].shape[1], 64)
    torch.testing.assert_close(out["last"], last)
    torch.testing.assert_close(out["prefix"], prefix)
    empty = enc.encode_text("")
    assert empty["last"].shape == (2, 64)  # <s></s>


def test_long_text_is_encoded_in_segments(spec):
    seg_spec = dataclasses.replace(spec, text=dataclasses.replace(spec.text, max_tokens=16))
    enc = load_encoders(seg_spec)
    text = "I am happy with the treatment, but maybe I will not continue it, I don't know. " * 3
    body = enc.tokenizer(text, add_special_tokens=False)["input_ids"]
    lengths = enc.text_segment_lengths(text)
    assert len(lengths) == -(-len(body) // 14) and max(lengths) == 16
    out = enc.encode_text(text)
    assert out["last"].shape[0] == sum(lengths) == len(body) + 2 * len(lengths)
    tok = enc.tokenizer
    refs = [
        _hf(enc.models["text"], input_ids=torch.tensor([[tok.cls_token_id, *body[i : i + 14], tok.sep_token_id]]))[0]
        for i in range(0, len(body), 14)
    ]
    torch.testing.assert_close(out["last"], torch.cat(refs))


# ------------------------------------------------------------------------------------------- TopBlocks


def test_top_blocks_video(enc):
    out = enc.encode_video(_rand_clips(2, seed=5))
    top = TopBlocks(enc.models["video"], "video", N_TOP).eval()
    with torch.no_grad():
        torch.testing.assert_close(top(out["prefix"]), out["last"], atol=1e-5, rtol=1e-5)
    assert top.final is not None  # VideoMAE-base layout: LayerNorm after the blocks is part of 'last'


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), length, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s
        mask[i, : len(s)] = True
    return x, mask


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_top_blocks_padded_batch(enc, modality):
    if modality == "audio":
        outs = [enc.encode_audio(_wave(s, seed=i)) for i, s in enumerate((0.6, 1.1))]
    else:
        outs = [enc.encode_text(t) for t in ("I feel great.", "Maybe, I am not sure, I hesitate a lot about it.")]
    prefix, mask = _pad([o["prefix"] for o in outs])
    top = TopBlocks(enc.models[modality], modality, N_TOP).eval()
    with torch.no_grad():
        got = top(prefix, mask)
        alone = top(outs[0]["prefix"][None])[0]
    for i, o in enumerate(outs):
        torch.testing.assert_close(got[i, : len(o["last"])], o["last"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, outs[0]["last"], atol=1e-5, rtol=1e-5)


def test_top_blocks_segments_make_long_inputs_exact(spec):
    seg_spec = dataclasses.replace(
        spec,
        audio=dataclasses.replace(spec.audio, segment_seconds=0.5),
        text=dataclasses.replace(spec.text, max_tokens=16),
    )
    enc = load_encoders(seg_spec)
    cases = {
        "audio": (enc.encode_audio(_wave(1.3)), enc.audio_segment_lengths(int(1.3 * 16000))),
        "text": (enc.encode_text("I love it but I hate it, maybe, perhaps, I guess. " * 2),
                 enc.text_segment_lengths("I love it but I hate it, maybe, perhaps, I guess. " * 2)),
    }
    for modality, (out, lengths) in cases.items():
        assert len(lengths) > 1
        top = TopBlocks(enc.models[modality], modality, N_TOP).eval()
        with torch.no_grad():
            exact = top(out["prefix"][None], segments=segment_ids(lengths)[None])[0]
            mixed = top(out["prefix"][None])[0]
        torch.testing.assert_close(exact, out["last"], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mixed, out["last"], atol=1e-4)  # attending across segments differs


def test_top_blocks_other_layouts():
    """VideoMAE with mean pooling (no final LayerNorm) and pre-LN HuBERT (final LayerNorm after the blocks)."""
    from transformers import HubertConfig, HubertModel, VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    video = VideoMAEModel(VideoMAEConfig(
        image_size=16, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=64, use_mean_pooling=True)).eval()
    audio = HubertModel(HubertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=True, feat_extract_norm="layer")).eval()
    cases = [(video, "video", {"pixel_values": torch.randn(2, 4, 3, 16, 16)}),
             (audio, "audio", {"input_values": torch.randn(2, 800)})]
    for model, modality, inputs in cases:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
            got = TopBlocks(model, modality, 1).eval()(out.hidden_states[-2])
        torch.testing.assert_close(got, out.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert TopBlocks(video, "video", 1).final is None and TopBlocks(audio, "audio", 1).final is not None


def test_top_blocks_copy_only_the_top_blocks(spec):
    model = load_backbone(spec, "text")
    assert not any(p.requires_grad for p in model.parameters())
    blocks, _ = block_parts(model, "text")
    top = TopBlocks(model, "text", N_TOP)
    for copied, original in zip(top.blocks, blocks[-N_TOP:]):
        for (name, p), (_, q) in zip(copied.named_parameters(), original.named_parameters()):
            assert p is not q and torch.equal(p, q), name
    with pytest.raises(TopBlocksError):
        TopBlocks(model, "text", 99)
