"""The three full-size encoder architectures with random weights (VideoMAE-B, HuBERT-B, RoBERTa-B): the
real models' FLOPs and token shapes without their weights. The one builder every benchmark uses; their
configurations are the public models' (tests/test_real_configs.py checks them against the real files)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from extract.tiny_encoders import tiny_tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROBERTA_VOCAB = 50265


def full_size_configs(vocab_size: int = ROBERTA_VOCAB) -> dict:
    from transformers import HubertConfig, RobertaConfig, VideoMAEConfig

    return {
        "video": VideoMAEConfig(use_mean_pooling=False),          # videomae-base: LayerNorm after the blocks
        "audio": HubertConfig(),                                  # hubert-base-ls960's layout
        "text": RobertaConfig(vocab_size=vocab_size, max_position_embeddings=514, type_vocab_size=1,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2),
    }


def full_size_models(device: str | torch.device = "cpu", seed: int = 0) -> dict[str, nn.Module]:
    """The three architectures with SDPA attention, eval mode, seeded without touching the caller's RNG."""
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {m: AutoModel.from_config(cfg, attn_implementation="sdpa", **({"add_pooling_layer": False}
                                                                                if m == "text" else {}))
                  for m, cfg in full_size_configs().items()}
    return {m: model.to(device).eval() for m, model in models.items()}


def write_full_size_encoders(out_dir: Path, template: Path) -> Path:
    """The three architectures in HF format under out_dir/{video,audio,text} with processors like the real
    models' (ImageNet statistics, 16 kHz normalised audio) and a small real BPE tokenizer (the embedding
    table shrinks, the transformer's FLOPs do not), plus a spec made from `template` pointing at them."""
    from transformers import AutoModel, VideoMAEImageProcessor, Wav2Vec2FeatureExtractor

    out_dir = Path(out_dir)
    vocab = tiny_tokenizer(out_dir / "text")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for m, cfg in full_size_configs(vocab).items():
            AutoModel.from_config(cfg, **({"add_pooling_layer": False} if m == "text" else {})).save_pretrained(
                out_dir / m)
    VideoMAEImageProcessor(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(out_dir / "video")
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(out_dir / "audio")
    text = Path(template).read_text(encoding="utf-8")
    for modality, hub in (("video", "MCG-NJU/videomae-base"), ("audio", "facebook/hubert-base-ls960"),
                          ("text", "SamLowe/roberta-base-go_emotions")):
        text = text.replace(f"model: {hub}", f"model: ./{modality}")
    (out_dir / "cache_spec.yaml").write_text(text, encoding="utf-8")
    return out_dir / "cache_spec.yaml"
