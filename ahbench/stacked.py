"""Many heads in one pass: one stacked training of several seeds (heads/stacked.py) vs the same trainings one
after another (heads.train.train_heads), side by side; on a GPU also the whole 3-seed `ablate` at BAH scale.

Both sides train the same models on the same splits for the same epochs (patience = epochs, so early stopping
cannot make one side do less work), and the bench checks that they end with the same validation Macro F1.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ahbench.heads import BAH_TRAIN, BAH_VAL, DIM, bah_scale_split
from ahflows.ablate import AblationData, ablate
from ahflows.ablation_plan import AblationOptions
from heads.config import ModelConfig, TrainConfig
from heads.split_data import SplitData
from heads.stacked import train_stacked
from heads.train import train_heads

SEEDS = 3
BAH_TEST = 525


def _timed(fn, device: str) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def stacked_vs_sequential(train: SplitData, val: SplitData, model_cfg: ModelConfig, cfgs: list[TrainConfig],
                          device: str, repeats: int = 1) -> dict:
    """Seconds of the trainings one after another and of one stacked pass (the least of `repeats` each,
    interleaved, after a one-epoch warm-up of both paths), their ratio, and the largest difference in best
    val Macro F1 between a model trained alone and the same model in the stack (0 up to float rounding)."""
    warm = [TrainConfig(**{**c.to_dict(), "epochs": 1, "patience": 1}) for c in cfgs[:2]]
    train_heads(train, val, model_cfg, warm[0])
    train_stacked(train, val, model_cfg, warm)
    seq_s, stk_s, seq_f1, stk_f1 = [], [], [], []
    for _ in range(repeats):                 # results are dropped at once: only one side's models in memory
        t, seq_f1 = _timed(lambda: [train_heads(train, val, model_cfg, c).val_metrics["macro_f1"] for c in cfgs],
                           device)
        seq_s.append(t)
        t, stk_f1 = _timed(lambda: [r.val_metrics["macro_f1"] for r in train_stacked(train, val, model_cfg, cfgs)],
                           device)
        stk_s.append(t)
    return {"stacked_vs_sequential": min(stk_s) / min(seq_s), "stacked_s": min(stk_s),
            "sequential_s": min(seq_s), "models": len(cfgs), "epochs": cfgs[0].epochs,
            "train_videos": len(train), "val_videos": len(val),
            "max_val_macro_f1_diff": max(abs(a - b) for a, b in zip(seq_f1, stk_f1))}


def bench_stacked(device: str, quick: bool) -> dict:
    """`ablate.stacked_vs_sequential`: SEEDS seeds of one configuration, stacked vs one after another.

    The headline is the demo's small heads (64-wide tokens, dim 64, batch 4, no accumulation; BAH's split
    sizes, cut to 192 + 32 videos by `quick` on the CPU): the heads one trains on a CPU, where per-step
    overhead is what stacking saves. On CUDA also the paper's heads at BAH scale (`paper_heads`) and the
    whole 3-seed ablate (`bench_ablate`). Not on the CPU: there the paper's heads are compute-bound (measured
    1.17x the sequential time for a 2-epoch run of 32 videos, mostly set-up) and three of them stacked, with
    their AdamW state and best-epoch copies, took 8.2 GB."""
    cuda = device.startswith("cuda")
    epochs = 2 if quick else 4
    n_train, n_val = (192, 32) if quick and not cuda else (BAH_TRAIN, BAH_VAL)
    dims = (64, 64, 64)
    train = SplitData.synthetic(n_train, dims=dims, seed=0, split="train").to(device)
    val = SplitData.synthetic(n_val, dims=dims, seed=1, split="val").to(device)
    small = ModelConfig(input_dims=train.dims(), dim=64, head_hidden=64)
    cfgs = [TrainConfig(seed=s, epochs=epochs, patience=epochs, lr=1e-3, lr_min=1e-5, accum=1, text_weight=0.1,
                        device=device) for s in range(SEEDS)]
    out = stacked_vs_sequential(train, val, small, cfgs, device, repeats=1 if quick else 2)
    out["heads"] = "demo-sized heads (dim 64) over 64-wide tokens"
    out["paper_heads"] = None
    if cuda:
        big = ModelConfig(input_dims={"video": DIM, "audio": DIM, "text": DIM})
        big_cfgs = [TrainConfig(seed=s, epochs=3, patience=3, device=device) for s in range(SEEDS)]
        out["paper_heads"] = stacked_vs_sequential(bah_scale_split(BAH_TRAIN, 8, device, "train", seed=0),
                                                   bah_scale_split(BAH_VAL, 5, device, "val", seed=1),
                                                   big, big_cfgs, device)
    out["ablate_3_seeds_s"] = bench_ablate(device) if cuda else None
    out["ablate_note"] = ("the whole 3-seed ablate at BAH scale (every training and table row), stacked over seeds"
                          if cuda else "the whole 3-seed ablate: not measured (needs a GPU)")
    return out


def bench_ablate(device: str, splits: tuple[SplitData, SplitData, SplitData] | None = None,
                 base: dict | None = None, quick: bool = False) -> float:
    """Seconds of `ahflows.ablate.ablate` with 3 seeds over splits already in memory (default: BAH-shaped,
    778 / 124 / 525 videos with 8 / 5 / 5 windows; the paper's protocol; every training and table row, no
    cache read). `base` and `quick` are ablate's (for a small smoke run)."""
    if splits is None:
        splits = (bah_scale_split(BAH_TRAIN, 8, device, "train", seed=0),
                  bah_scale_split(BAH_VAL, 5, device, "val", seed=1),
                  bah_scale_split(BAH_TEST, 5, device, "test", seed=2))
    data = AblationData(*splits, spec={}, fingerprint="bench", cache={"fingerprint": "bench", "path": "bench"},
                        name="bench")
    opts = AblationOptions(seeds=3, base=dict(base or {}), quick=quick, device=device)
    with tempfile.TemporaryDirectory(prefix="ahbench-ablate-") as tmp:
        seconds, _ = _timed(lambda: ablate(data, Path(tmp) / "ablation", opts), device)
    return seconds


def stacked_goal_rows(r: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, met?) of `ablate.stacked_vs_sequential` for BENCHMARKS.md."""
    a = r.get("ablate") or {}
    if a.get("stacked_vs_sequential") is None:
        return []

    def side(x: dict) -> str:
        return (f"{x['stacked_vs_sequential']:.2f}: one stacked pass {x['stacked_s']:.1f} s vs one after another "
                f"{x['sequential_s']:.1f} s ({x['models']} seeds x {x['epochs']} epochs, {x['train_videos']} + "
                f"{x['val_videos']} videos; best val Macro F1 differs by at most {x['max_val_macro_f1_diff']:.1e})")

    text = f"{a.get('heads', 'heads')}: {side(a)}"
    if a.get("paper_heads"):
        text += f"; the paper's heads over BAH-shaped tokens: {side(a['paper_heads'])}"
    total = a.get("ablate_3_seeds_s")
    if total is None:
        return [("many heads in one pass: 3-seed `ahcli ablate` <= 2 min on one H100 (CPU: stacked / sequential)",
                 f"{text}; whole 3-seed ablate: not measured (needs a GPU)", "n/a on CPU")]
    return [("many heads in one pass: 3-seed `ahcli ablate` <= 2 min on one H100",
             f"measured {total:.1f} s for the whole ablate at BAH scale; {text}", "yes" if total <= 120 else "no")]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
