"""End-to-end extraction with full-size random-initialised encoders (the real FLOPs) on a synthetic tree."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from extract.encoders import _tiny_tokenizer
from extract.run import ExtractOptions, extract
from extract.synth import write_synthetic_bah


def write_full_size_encoders(out_dir: Path) -> Path:
    """VideoMAE-B, HuBERT-B and RoBERTa-B architectures, random weights, HF format; returns a spec path."""
    import torch
    from transformers import (HubertConfig, HubertModel, RobertaConfig, RobertaModel, VideoMAEConfig,
                              VideoMAEImageProcessor, VideoMAEModel, Wav2Vec2FeatureExtractor)

    torch.manual_seed(0)
    VideoMAEModel(VideoMAEConfig(use_mean_pooling=False)).save_pretrained(out_dir / "video")
    VideoMAEImageProcessor().save_pretrained(out_dir / "video")
    HubertModel(HubertConfig()).save_pretrained(out_dir / "audio")
    Wav2Vec2FeatureExtractor(return_attention_mask=False).save_pretrained(out_dir / "audio")
    # A small real BPE vocabulary: the embedding table shrinks, the transformer's FLOPs do not.
    vocab = _tiny_tokenizer(out_dir / "text")
    RobertaModel(RobertaConfig(vocab_size=vocab, max_position_embeddings=514, type_vocab_size=1,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2),
                 add_pooling_layer=False).save_pretrained(out_dir / "text")
    spec = Path(__file__).resolve().parent.parent / "cache_spec.yaml"
    text = spec.read_text(encoding="utf-8")
    for modality, hub in (("video", "MCG-NJU/videomae-base"), ("audio", "facebook/hubert-base-ls960"),
                          ("text", "SamLowe/roberta-base-go_emotions")):
        text = text.replace(f"model: {hub}", f"model: ./{modality}")
    (out_dir / "cache_spec.yaml").write_text(text, encoding="utf-8")
    return out_dir / "cache_spec.yaml"


def bench_extraction(device: str, videos: int, workers: int, batch_size: int = 16) -> dict:
    """Extract a synthetic tree end to end (decode in workers, encode, write) and report clips/s."""
    tmp = Path(tempfile.mkdtemp(prefix="ahbench-extract-"))
    try:
        spec = write_full_size_encoders(tmp / "encoders")
        write_synthetic_bah(tmp / "synth", videos=videos, seed=0, private=0)
        opts = ExtractOptions(device=device, workers=workers, batch_size=batch_size, progress=False)
        t = time.perf_counter()
        summary = extract(tmp / "synth" / "data", tmp / "cache", spec, opts)
        wall = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "videos": summary.extracted,
        "clips": summary.clips,
        "failed": len(summary.failed),
        "loop_s": summary.seconds,
        "wall_s_with_model_load": wall,
        "clips_per_s": summary.clips_per_s,
        "workers": workers,
    }
