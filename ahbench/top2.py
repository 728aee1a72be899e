"""Benchmark: one epoch of checkpoint A's cached top-2 path vs its end-to-end path, at BAH scale.

Full-size architectures, random-initialised from transformers configs (same FLOPs as the real models):
VideoMAE-B (1568 tokens per 16-frame 224 px clip), HuBERT-B (27 s of audio -> 1349 tokens), RoBERTa-B
(512 tokens), all 768 wide, and the paper's heads. Both paths run the same code as training
(heads.topblocks.TopBlocksHeads, ahflows.raw_media.truncate_top): the cached path runs only the top 2 blocks of
each encoder (forward + backward) on prefix states; the end-to-end path first runs the frozen lower 10
blocks of each encoder (no grad) on raw inputs. An epoch = 778 train videos (one window each; micro-batches
of 4 on CUDA, of 1 on the CPU), 49 AdamW steps (batch 4 x 4 accumulation) + scoring 124 val videos on 5
windows.

Measured: a few micro-batch steps (forward + backward), one optimizer step, and one val video (5 windows)
per path; the epoch is extrapolated from them (on the CPU a full epoch would take hours). Not counted: media
decoding (the end-to-end path also decodes 16 face JPEGs and the audio of each video, in DataLoader
workers, overlapped with compute) and the cache read (the cached split is resident in memory).
"""
from __future__ import annotations

import math
import platform
import time
from typing import Any, Callable

import torch
from torch import nn

from ahbench.models import full_size_models
from ahflows.raw_media import ragged_tokens, truncate_top
from extract.devices import resolve_device
from extract.encoders import conv_output_length
from heads.config import ModelConfig, TrainConfig
from heads.infer import autocast
from heads.model import build_model
from heads.tokens import Tokens
from heads.topblocks import TopBlocks, TopBlocksHeads
from heads.train import joint_loss, make_optimizer, param_groups, steps_per_epoch

TRAIN_VIDEOS, VAL_VIDEOS, EVAL_WINDOWS, PAPER_BATCH, ACCUM = 778, 124, 5, 4, 4
AUDIO_SECONDS = 27.0
TEXT_TOKENS = 512
N_TOP = 2


class _Setup:
    """The two paths' modules and inputs on one device."""

    def __init__(self, device: torch.device, batch: int):

        self.device, self.batch = device, batch
        models = full_size_models()
        tops = nn.ModuleDict({m: TopBlocks(model, m, N_TOP).requires_grad_(True) for m, model in models.items()})
        self.lower = {m: truncate_top(model, m, N_TOP).eval().requires_grad_(False).to(device)
                      for m, model in models.items()}
        heads = build_model(ModelConfig(input_dims={m: 768 for m in models}), seed=0)
        self.core = TopBlocksHeads(tops, heads).to(device)
        self.opt = make_optimizer(param_groups(self.core, TrainConfig()), TrainConfig(), device)
        g = torch.Generator().manual_seed(0)
        self.audio_samples = int(AUDIO_SECONDS * 16000)
        self.pixels = torch.randn(1, 16, 3, 224, 224, generator=g).to(device)
        self.wave = torch.randn(1, self.audio_samples, generator=g).to(device)
        self.ids = torch.randint(3, 50000, (1, TEXT_TOKENS), generator=g).to(device)
        self.audio_len = conv_output_length(models["audio"].config, self.audio_samples)

    def autocast(self):
        return autocast(self.device, True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- inputs ----------------------------------------------------------------------------------

    def cached_tokens(self, clips: int, videos: int) -> dict:
        """Prefix states as the cache holds them (fp16): `clips` video rows, `videos` audio/text rows."""
        def ragged(length: int):
            v = torch.randn(videos * length, 768, device=self.device, dtype=torch.float16)
            seg = torch.arange(videos, device=self.device).repeat_interleave(length)
            return Tokens(v, videos, segments=seg, parts=torch.zeros_like(seg))

        video = torch.randn(clips, 1568, 768, device=self.device, dtype=torch.float16)
        return {"video": Tokens(video, clips), "audio": ragged(self.audio_len), "text": ragged(TEXT_TOKENS)}

    @torch.no_grad()
    def lower_video(self, clips: int) -> None:
        with self.autocast():
            self.lower["video"](pixel_values=self.pixels.expand(clips, -1, -1, -1, -1))

    @torch.no_grad()
    def lower_tokens(self, clips: int, videos: int) -> dict:
        """Prefix states computed by the frozen lower blocks from raw inputs (per video for audio and text,
        as ahflows.raw_media.LowerEncoders does)."""

        with self.autocast():
            v = self.lower["video"](pixel_values=self.pixels.expand(clips, -1, -1, -1, -1)).last_hidden_state
            a = [self.lower["audio"](input_values=self.wave).last_hidden_state[0] for _ in range(videos)]
            t = [self.lower["text"](input_ids=self.ids, attention_mask=torch.ones_like(self.ids)).last_hidden_state[0]
                 for _ in range(videos)]
        return {"video": Tokens(v, clips), "audio": ragged_tokens(a, [[len(x)] for x in a]),
                "text": ragged_tokens(t, [[len(x)] for x in t])}

    # ---- steps -----------------------------------------------------------------------------------

    def train_step(self, tokens_fn: Callable[[int, int], dict]) -> None:
        self.core.train()
        tokens = tokens_fn(self.batch, self.batch)
        with self.autocast():
            lf, lt = self.core(tokens)
        y = torch.arange(self.batch, device=self.device).remainder(2).float()
        joint_loss(lf, lt, y, torch.tensor(1.0, device=self.device), 0.0, 0.5).backward()

    def opt_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_videos(self, tokens_fn: Callable[[int, int], dict]) -> None:
        """`batch` val videos at once, 5 windows each (time / batch = one video)."""
        self.core.eval()
        tokens = tokens_fn(EVAL_WINDOWS * self.batch, self.batch)
        with self.autocast():
            self.core.window_forward(tokens, EVAL_WINDOWS, per_video=("audio", "text"))


def _timed(setup: _Setup, fn: Callable[[], None], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    setup.sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    setup.sync()
    return (time.perf_counter() - t0) / max(repeats, 1)


def _timed_train(setup: _Setup, tokens_fn, repeats: int, warmup: int) -> tuple[float, float]:
    """(seconds per micro-batch forward + backward, seconds per AdamW step with those gradients)."""
    for _ in range(warmup):
        setup.train_step(tokens_fn)
        setup.opt_step()
    step = opt = 0.0
    for _ in range(repeats):
        setup.sync()
        t0 = time.perf_counter()
        setup.train_step(tokens_fn)
        setup.sync()
        t1 = time.perf_counter()
        setup.opt_step()
        setup.sync()
        step, opt = step + t1 - t0, opt + time.perf_counter() - t1
    return step / repeats, opt / repeats


def bench_top2_epoch(device: str = "auto", quick: bool = True) -> dict[str, Any]:
    """Seconds per epoch of the cached top-2 path and the end-to-end path, and their ratio (see the module
    doc). On the CPU a few steps are measured and the epoch extrapolated (`extrapolated` says so)."""

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    batch = 4 if cuda else 1
    repeats, warmup = (5, 2) if cuda else ((1, 0) if quick else (2, 1))
    t_build = time.perf_counter()
    s = _Setup(dev, batch)
    build_s = time.perf_counter() - t_build
    cached_mb, opt_s = _timed_train(s, s.cached_tokens, repeats, warmup)
    e2e_mb, _ = _timed_train(s, s.lower_tokens, repeats, warmup)
    t = {
        "cached_train_microbatch_s": cached_mb,
        "e2e_train_microbatch_s": e2e_mb,
        "optimizer_step_s": opt_s,
        "cached_eval_video_s": _timed(s, lambda: s.eval_videos(s.cached_tokens), repeats, warmup) / batch,
    }
    if quick and not cuda:
        # The end-to-end val video = the cached one + the lower blocks on one video (the end-to-end minus the
        # cached micro-batch, both measured) + the lower video blocks on 4 more clips (measured once).
        lower_one_video = max(t["e2e_train_microbatch_s"] - t["cached_train_microbatch_s"], 0.0)
        clip_s = _timed(s, lambda: s.lower_video(1), 1, 0)
        t["e2e_eval_video_s"] = t["cached_eval_video_s"] + lower_one_video + (EVAL_WINDOWS - 1) * clip_s
        t["e2e_eval_video_composed"] = True
    else:
        t["e2e_eval_video_s"] = _timed(s, lambda: s.eval_videos(s.lower_tokens), repeats, warmup) / batch
    micro = math.ceil(TRAIN_VIDEOS / batch)
    steps = steps_per_epoch(TRAIN_VIDEOS, PAPER_BATCH, ACCUM)     # the protocol's optimizer steps

    def epoch(train_mb: float, eval_video: float) -> float:
        return micro * train_mb + steps * t["optimizer_step_s"] + VAL_VIDEOS * eval_video

    cached = epoch(t["cached_train_microbatch_s"], t["cached_eval_video_s"])
    e2e = epoch(t["e2e_train_microbatch_s"], t["e2e_eval_video_s"])
    return {
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "quick": quick, "amp": "bf16" if cuda else "fp32",
        "train_videos": TRAIN_VIDEOS, "val_videos": VAL_VIDEOS, "eval_windows": EVAL_WINDOWS, "micro_batch": batch,
        "tokens": {"video": 1568, "audio": s.audio_len, "text": TEXT_TOKENS, "dim": 768}, "unfrozen_blocks": N_TOP,
        "measured": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()},
        "repeats": repeats, "warmup": warmup, "build_s": round(build_s, 2),
        "extrapolated": True,
        "method": (f"{repeats} timed micro-batch(es) of {batch} per path after {warmup} warm-up(s), one optimizer "
                   f"step and one val video (5 windows); epoch = {micro} micro-batches + {steps} optimizer steps "
                   f"+ {VAL_VIDEOS} val videos. Media decoding and cache reads not counted."),
        "cached_top2_s_per_epoch": cached,
        "end_to_end_s_per_epoch": e2e,
        "ratio": e2e / cached if cached > 0 else None,
    }


__all__ = ["bench_top2_epoch"]
