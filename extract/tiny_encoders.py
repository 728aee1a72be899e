"""Small random-initialised encoders of the real architectures (VideoMAE, HuBERT, RoBERTa) in HF format,
with a spec that points at them: what the tests and the demo extract with (no model hub here). They load
through the very same `from_pretrained` code as the real weights."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from extract.errors import AHError
from extract.loading import quiet_loading
from extract.spec import ExtractionSpec
from extract.vocab import MODALITIES

MARKER = ".tiny-encoders"          # marks a folder this module wrote (and may overwrite)
_TINY_HIDDEN = 64
_TINY_LAYERS = 4
_TINY_HEADS = 4
_TINY_IMAGE = 32
_TINY_CORPUS = """
I am happy with the treatment and I feel great about it.
I am not sure, maybe I will try it, but I don't know if it will work.
Honestly I feel anxious and worried about the side effects.
It is good, I guess, although sometimes I think it is bad for me.
I really want to quit smoking but I also enjoy it, so I hesitate.
Perhaps I could exercise more, yet I am tired and it is hard.
The doctor said it is fine and I trust her, absolutely.
I hate the pills, they make me sick, but they help a little.
Well, um, I suppose it depends, I might change my mind later.
I love my family and they support me every day.
This is terrible, I am angry and frustrated with everything.
Probably yes, or probably no, I cannot decide right now.
I would like to eat healthier, but fast food is easy and cheap.
Sure, it could be useful, however I have some doubts.
I'm totally fine with it, no problem at all.
Sometimes I feel sad, sometimes I feel hopeful, it is mixed.
Kind of, sort of, I mean, it is not really clear to me.
I am confident that the vaccine is safe and effective.
I worry that the vaccine is risky, I am hesitant to take it.
Thank you, that was a nice and pleasant conversation.
"""


def _tiny_video(path: Path) -> None:
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    cfg = VideoMAEConfig(
        image_size=_TINY_IMAGE, patch_size=8, num_channels=3, num_frames=16, tubelet_size=2,
        hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS, num_attention_heads=_TINY_HEADS,
        intermediate_size=2 * _TINY_HIDDEN, use_mean_pooling=False,  # like videomae-base: LayerNorm on top
    )
    VideoMAEModel(cfg).save_pretrained(path)
    VideoMAEImageProcessor(
        size={"shortest_edge": _TINY_IMAGE}, crop_size={"height": _TINY_IMAGE, "width": _TINY_IMAGE},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)


def _tiny_audio(path: Path) -> None:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    cfg = HubertConfig(
        hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS, num_attention_heads=_TINY_HEADS,
        intermediate_size=2 * _TINY_HIDDEN, conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="group", do_stable_layer_norm=False,  # the hubert-base layout (50 tokens/s)
    )
    HubertModel(cfg).save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False,
    ).save_pretrained(path)


def tiny_tokenizer(path: Path) -> int:
    """A real byte-level BPE (RoBERTa layout) trained on a small built-in corpus; returns the vocab size."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    lines = [line for line in _TINY_CORPUS.strip().splitlines() if line]
    bpe.train_from_iterator(
        lines * 4, vocab_size=600, min_frequency=1, show_progress=False,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    vocab = bpe.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _bpe_merges(bpe)]
    tok = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=512)
    tok.save_pretrained(path)
    return len(vocab)


def _bpe_merges(bpe) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]


def _tiny_text(path: Path) -> None:
    from transformers import RobertaConfig, RobertaModel

    vocab_size = tiny_tokenizer(path)
    cfg = RobertaConfig(
        vocab_size=vocab_size, hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS,
        num_attention_heads=_TINY_HEADS, intermediate_size=2 * _TINY_HIDDEN, max_position_embeddings=514,
        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    RobertaModel(cfg, add_pooling_layer=False).save_pretrained(path)


def _template_spec_text() -> str | None:
    template = Path(__file__).resolve().parent.parent / "cache_spec.yaml"
    return template.read_text(encoding="utf-8") if template.is_file() else None


def _set_yaml_values(text: str, updates: dict[tuple[str | None, str], str]) -> str:
    """Replace `key: value` lines (top level: section None) keeping their comments and layout."""
    out, section = [], None
    for line in text.splitlines():
        top = re.match(r"^([A-Za-z_]\w*):\s*(#.*)?$", line)
        if top:
            section = top.group(1)
        m = re.match(r"^(\s*)([A-Za-z_]\w*):(\s*)([^#]*?)(\s*#.*)?$", line)
        if m and not top:
            where = section if m.group(1) else None
            if not m.group(1):
                section = None
            if (where, m.group(2)) in updates:
                line = f"{m.group(1)}{m.group(2)}:{m.group(3) or ' '}{updates[(where, m.group(2))]}{m.group(5) or ''}"
        out.append(line)
    return "\n".join(out) + "\n"


def _tiny_spec_text() -> str:
    updates = {
        (None, "layers"): "[last, prefix]",
        # './video', not 'video': explicitly local, so a deleted folder is named, never looked up on the hub.
        ("video", "model"): "./video", ("video", "revision"): "null",
        ("audio", "model"): "./audio", ("audio", "revision"): "null",
        ("text", "model"): "./text", ("text", "revision"): "null",
    }
    expected = ExtractionSpec().to_dict()
    expected.pop("weights_id")
    expected.pop("preprocessing")
    expected["layers"] = ["last", "prefix"]
    for modality in MODALITIES:
        expected[modality].update(model=f"./{modality}", revision=None)
    template = _template_spec_text()
    if template is not None:
        text = _set_yaml_values(template, updates)
        loaded = yaml.safe_load(text)
        got = {k: loaded.get(k) for k in ("layers", "video", "audio", "text")}
        if all(got[k] == expected[k] for k in ("layers",)) and all(
            loaded[m]["model"] == f"./{m}" for m in MODALITIES
        ):
            return "# Tiny random encoders for tests and demos (written by `write_tiny_encoders`).\n" + text
    return yaml.safe_dump(expected, sort_keys=False)


def write_tiny_encoders(out_dir: Path, seed: int = 0) -> Path:
    """Small random VideoMAE / HuBERT / RoBERTa in HF format under out_dir/{video,audio,text}, plus
    out_dir/cache_spec.yaml pointing at them. The same seed writes identical weights. Returns the spec path."""
    out_dir = Path(out_dir)
    marker = out_dir / MARKER
    if out_dir.exists() and any(out_dir.iterdir()) and not marker.is_file():
        raise AHError(f"{out_dir}: exists and was not written by `ahcli encoders tiny`; choose a new or empty folder "
                      "(nothing was changed)")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by write_tiny_encoders: this folder may be rewritten\n", encoding="utf-8")
    with torch.random.fork_rng(devices=[]), quiet_loading():
        for offset, (modality, writer) in enumerate(
            (("video", _tiny_video), ("audio", _tiny_audio), ("text", _tiny_text))
        ):
            torch.manual_seed(int(seed) * 1000 + offset)
            writer(out_dir / modality)
    spec_path = out_dir / "cache_spec.yaml"
    spec_path.write_text(_tiny_spec_text(), encoding="utf-8")
    return spec_path
