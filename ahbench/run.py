"""`ahcli bench`: run every benchmark on one device, save the results as JSON, render BENCHMARKS.md.

Results of each machine live in bench-results/<machine>.json, so CPU and GPU numbers sit side by side in
BENCHMARKS.md, each with its machine, versions and the command that produced it.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ahbench.encoders import bench_encoders
from ahbench.extraction import bench_extraction, host_vs_bound
from ahbench.flops import device_peak_tflops
from ahbench.heads import bench_full_run, bench_heads, bench_stream, stream_goal_rows
from ahbench.io import bench_cache, bench_decode
from ahbench.stacked import bench_stacked, stacked_goal_rows
from ahbench.top2 import bench_top2_epoch
from extract.provenance import provenance
from extract.run import PHASES

# BAH (paper Table 2 and docs/BAH_LAYOUT.md): 778 train videos with K=8 windows, 124+525+161 others with N=5.
BAH_CLIPS = 778 * 8 + (124 + 525 + 161) * 5
BAH_AUDIO_SECONDS = 10.6 * 3600
BAH_VIDEOS = 1427 + 161
# Trainings in `ahcli ablate` per seed: 7 modality subsets, no-conflict, window-aligned text, checkpoint A
# (alpha and window counts are inference-time variants of those runs).
ABLATE_TRAININGS_PER_SEED = 10


def machine(device: str) -> dict[str, Any]:
    info = {"device": device, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_key(info: dict[str, Any]) -> str:
    if "gpu" in info:
        return "cuda-" + info["gpu"].replace(" ", "-")
    return f"cpu-{info['cores']}cores"


def run_bench(device: str, quick: bool, workers: int, log: Callable[[str], None] = print,
              checkpoint: Callable[[dict[str, Any]], None] | None = None,
              full_run: bool | None = None) -> dict[str, Any]:
    """Every benchmark in turn. A section that fails is recorded with its error and the others still run;
    `checkpoint` receives the results after each section, so a run cut short keeps what it measured.
    `full_run` times one whole train-heads run at BAH scale (default: on CUDA, or without `quick`)."""
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {"machine": machine(device), "versions": provenance(), "quick": quick,
                           "date": time.strftime("%Y-%m-%d %H:%M"), "errors": {}}
    peak, peak_source = device_peak_tflops(device)
    out["peak_tflops"], out["peak_source"] = peak, peak_source

    wants_full = full_run if full_run is not None else (cuda or not quick)
    done, total = [0], 9 + int(wants_full)        # the sections below (one is skipped without encoder numbers)

    started = time.perf_counter()

    def section(name: str, title: str, fn: Callable[[], Any]) -> Any:
        # Sections are uneven, so the ETA is only the mean section time so far times the sections left.
        elapsed = time.perf_counter() - started
        pace = f"{done[0] / elapsed * 60:.1f} sections/min, ETA {elapsed / done[0] * (total - done[0]):.0f} s, " \
            if done[0] else ""
        done[0] += 1
        log(f"[{done[0]}/{total}] {title} ({pace}elapsed {elapsed:.0f} s)")
        try:
            out[name] = fn()
        except Exception as exc:  # a benchmark that breaks must not take the others' numbers with it
            out[name] = None
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} failed: {out['errors'][name]}")
        if checkpoint is not None:
            checkpoint(out)
        return out[name]

    enc = section("encoders", "encoders (full-size, random weights)",
                  lambda: {r.name: r.to_dict() | {"share_of_peak": r.tflops / peak} for r in bench_encoders(device, quick)})
    per_sample = None
    if enc:
        audio = enc["HuBERT-B"]
        audio_seconds_per_s = audio["items_per_s"] * float(audio["unit"].split()[0])
        per_sample = (1 / enc["VideoMAE-B"]["items_per_s"] + 27 / audio_seconds_per_s
                      + 1 / enc["RoBERTa-B"]["items_per_s"])
    section("decode", "decoding", lambda: bench_decode(quick))
    section("cache", "cache write/read", lambda: bench_cache(quick))
    videos = 200 if cuda else (3 if quick else 12)
    e2e = section("extraction", "extraction end to end", lambda: bench_extraction(device, videos=videos, workers=workers))
    host_videos = 200 if cuda else (40 if quick else 60)
    host = section("extraction_host", "extraction, host side alone (instant encoders)",
                   lambda: bench_extraction(device, videos=host_videos, workers=workers, instant=True))
    if host and out.get("decode") and _get(out, "cache", "zarr", "write_GBps"):
        # The key `extraction.host_vs_bound`: kept beside the end-to-end result (made here if that failed).
        out["extraction"] = (out.get("extraction") or {}) | {
            "host_vs_bound": host_vs_bound(host, out["decode"], out["cache"], "zarr")}
    if enc and e2e and out.get("decode"):
        video_s = BAH_CLIPS / enc["VideoMAE-B"]["items_per_s"]
        audio_s = BAH_AUDIO_SECONDS / audio_seconds_per_s
        out["bah_extraction_projection_s"] = {
            "from_end_to_end_clips_per_s": BAH_CLIPS / e2e["clips_per_s"] if e2e["clips_per_s"] else None,
            "video_encoder_only": video_s,
            "audio_encoder_only": audio_s,
            "face_decoding_all_workers": BAH_CLIPS * 16 / (out["decode"]["face_jpegs_per_s_per_worker"] * max(workers, 1)),
            "sum_of_encoders": video_s + audio_s,
            "host_side_alone": BAH_CLIPS / host["clips_per_s"] if host and host["clips_per_s"] else None,
        }
    if per_sample is not None:
        heads = section("heads", "head training epoch (fused vs literal vs encoders every step)",
                        lambda: bench_heads(device, quick, per_sample) | {"encoder_seconds_per_sample": per_sample})
    else:
        heads = None
    # Streamed training's keys join the heads section (heads.stream_peak_rss_gb, heads.stream_epoch_vs_memory).
    if section("heads_stream", "train-heads streamed vs in memory (peak RSS, epoch time)", lambda: bench_stream(quick)):
        out["heads"] = (out.get("heads") or {}) | out.pop("heads_stream")

    section("top2", "top-2 unfrozen: cached prefix vs end to end", lambda: bench_top2_epoch(device, quick))
    # The key `ablate.stacked_vs_sequential` (heads/stacked.py); on CUDA also the whole 3-seed ablate.
    section("ablate", "many heads in one pass: stacked vs one after another", lambda: bench_stacked(device, quick))
    run_s = None
    if wants_full:
        full = section("heads_full_run", "one full train-heads run at BAH scale", lambda: bench_full_run(device))
        run_s = full["run_s"] if full and cuda else None
    if not cuda and heads:
        run_s = heads["projected_run_s_60_epochs"]      # the bound: every run stopping at the maximum epochs
    out["ablate_projection_s"] = 3 * ABLATE_TRAININGS_PER_SEED * run_s if run_s else None
    if checkpoint is not None:
        checkpoint(out)
    return out


def save(results: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{machine_key(results['machine'])}{'-quick' if results['quick'] else ''}.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
    return path


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _get(r: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(r, dict) or r.get(key) is None:
            return None
        r = r[key]
    return r


def goals_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(goal, measured value, met?) for each goal of the performance issue, on this result's machine."""
    cuda = "gpu" in r["machine"]
    ext = _get(r, "bah_extraction_projection_s", "from_end_to_end_clips_per_s")
    share = _get(r, "encoders", "VideoMAE-B", "share_of_peak")
    e2e = _get(r, "extraction", "clips_per_s")
    rows = []
    if cuda:
        ok = ext is not None and share is not None and ext < 120 and share >= 0.4
        enc = _get(r, "bah_extraction_projection_s", "sum_of_encoders")
        host = _get(r, "bah_extraction_projection_s", "host_side_alone")
        rows.append(("extract all of BAH < 2 min on one H100; VideoMAE-B >= 40% of bf16 peak",
                     f"projected {_fmt_s(ext)} from {_num(e2e, '.0f')} end-to-end clips/s "
                     f"(the encoders alone at their measured rates: {_fmt_s(enc)}; the host side alone: "
                     f"{_fmt_s(host)}); VideoMAE-B at {_num(share and 100 * share, '.0f')}% of peak",
                     "yes" if ok else "no"))
        text, total = _full_run(r)
        rows.append(("one train-heads run, paper protocol, BAH scale < 60 s on one H100",
                     text, "yes" if total is not None and total < 60 else "no"))
        abl = r.get("ablate_projection_s")
        rows.append(("full `ahcli ablate` (3 seeds) < 15 min on one H100",
                     f"projected {_fmt_s(abl)} ({3 * ABLATE_TRAININGS_PER_SEED} runs x the measured run)",
                     "yes (projection)" if abl is not None and abl < 900 else "no (projection)"))
    else:
        proj = _get(r, "heads", "projected_run_s_60_epochs")
        text, _ = _full_run(r)
        bound = proj + (_load_s(r) or 0) if proj is not None else None
        rows.append(("one train-heads run, BAH scale, < 15 min on 2 CPU cores",
                     f"{text}; projected {_fmt_s(proj)} for all 60 epochs "
                     f"(epoch {_fmt_s(_get(r, 'heads', 'epoch_s_fused'))})",
                     "yes (projection)" if bound is not None and bound < 900 else "no (projection)"))
        host = _get(r, "bah_extraction_projection_s", "host_side_alone")
        rows.append(("extract all of BAH (a GPU goal; the CPU for reference)",
                     f"projected {_fmt_s(ext)} at {_num(e2e, '.2f')} end-to-end clips/s "
                     f"(the host side alone, instant encoders: {_fmt_s(host)})", "n/a on CPU"))
    rows += _host_rows(r)
    rows += stream_goal_rows(r)
    rows += stacked_goal_rows(r)
    speed = _get(r, "heads", "epoch_speedup_vs_encoders")
    rows.append(("head-training epoch, cached vs encoders every step >= 50x",
                 f"{_num(speed, '.0f')}x (fused {_fmt_s(_get(r, 'heads', 'epoch_s_fused'))} vs "
                 f"{_fmt_s(_get(r, 'heads', 'epoch_s_encoders_every_step'))})",
                 "yes" if speed is not None and speed >= 50 else "no"))
    return rows


def _host_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows `cache.write_vs_disk` (per backend) and `extraction.host_vs_bound`, with their measured inputs."""
    rows = []
    wvd = _get(r, "cache", "write_vs_disk")
    if wvd:
        parts = [f"{b} {x['ratio']:.2f} ({x['threads']} videos in flight; over all {x['videos']}: {x['cache_GBps']:.2f} "
                 f"vs {x['disk_GBps']:.2f} GB/s), one at a time {x['ratio_one_thread']:.2f} "
                 f"({x['cache_GBps_one_thread']:.2f} vs {x['disk_GBps_one_thread']:.2f} GB/s)"
                 for b, x in sorted(wvd.items())]
        ok = all(x["ratio"] >= 0.8 for x in wvd.values())
        rows.append(("cache writes >= 0.8 of plain writes of the same bytes (fsync per video), zarr and hdf5",
                     "median turn of interleaved writes: " + "; ".join(parts), "yes" if ok else "no"))
    hvb = _get(r, "extraction", "host_vs_bound")
    if hvb:
        rows.append(("extraction host side (instant encoders) >= 0.8 of min(face decoding, cache writes)",
                     f"{hvb['ratio']:.2f}: {hvb['host_clips_per_s']:.1f} clips/s vs decoding "
                     f"{hvb['decode_bound_clips_per_s']:.1f} ({hvb['face_jpegs_per_s_per_worker']:.0f} JPEG/s x "
                     f"{hvb['workers']} workers) and {hvb['backend']} writes {hvb['write_bound_clips_per_s']:.1f} "
                     f"clips/s ({hvb['write_GBps']:.2f} GB/s, {hvb['bytes_per_clip'] / 1e6:.1f} MB per clip)"
                     + (f"; timed on a second run into the same folder, the first ran at {first:.1f} clips/s"
                        if (first := _get(r, "extraction_host", "first_run_clips_per_s")) else ""),
                     "yes" if hvb["ratio"] >= 0.8 else "no"))
    return rows


def _load_s(r: dict[str, Any]) -> float | None:
    """Seconds to read BAH's train and val splits from a Zarr cache at this machine's measured read rate."""
    nbytes, read = _get(r, "heads_full_run", "train_val_bytes"), _get(r, "cache", "zarr", "read_GBps")
    return nbytes / (read * 1e9) if nbytes and read else None


def _full_run(r: dict[str, Any]) -> tuple[str, float | None]:
    """The measured whole run, what it included, plus the projected cache load: (text, total seconds)."""
    full = r.get("heads_full_run")
    if not full:
        return "whole run not measured", None
    writes = "run folder and checkpoints written" if full.get("writes_run_folder") else "no run folder written"
    text = f"measured {_fmt_s(full['run_s'])} ({full['epochs']} epochs, early stop at most 60; {writes})"
    load = _load_s(r)
    if load is not None:
        text += f" + loading the cache, projected {_fmt_s(load)} at the measured Zarr read rate"
    return text, full["run_s"] + (load or 0)


def _phases(x: dict[str, Any]) -> str:
    """'; main loop: video encoder 12.0 s, ...' for the phases a run measured (older results have none)."""
    phases = x.get("phases_s")
    if not phases:
        return ""
    order = [k for k in PHASES if k in phases] + sorted(set(phases) - set(PHASES))
    return f"; main loop {x['loop_s']:.1f} s: " + ", ".join(f"{k} {phases[k]:.1f} s" for k in order)


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def render_markdown(folder: Path) -> str:
    lines = ["# Benchmarks", "",
             "Measured by `make bench` (`ahcli bench`); each section is one machine. Full-size encoders are the real",
             "architectures with random weights (same FLOPs). 'projected' marks numbers computed from measured",
             "throughput rather than timed whole. Reproduce: `ahcli bench --json` (add `--quick` for the short run).", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        m, v = r["machine"], r["versions"]
        title = m.get("gpu") or f"CPU ({m['cores']} cores, {m['cpu']})"
        lines += [f"## {title}{' — quick run' if r['quick'] else ''}", "",
                  f"{r['date']}; torch {v.get('torch')}, transformers {v.get('transformers')}, "
                  f"commit {str(v.get('git_commit'))[:10]}; peak {r['peak_tflops']:.2f} TFLOP/s ({r['peak_source']})"
                  + (f"; command `{r['command']}`." if r.get("command") else "."), "",
                  "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {g} | {val} | {met} |" for g, val, met in goals_rows(r)]
        if r.get("encoders"):
            lines += ["", "| encoder | item | items/s | TFLOP/s | share of peak |", "|---|---|---|---|---|"]
            for name, e in r["encoders"].items():
                lines.append(f"| {name} | {e['unit']} | {e['items_per_s']:.2f} | {e['tflops']:.2f} | {100 * e['share_of_peak']:.0f}% |")
        lines += ["", "| what | value |", "|---|---|"]
        d, h = r.get("decode"), r.get("heads")
        if d:
            lines += [f"| face JPEG decode + resize (256 px) | {d['face_jpegs_per_s_per_worker']:.0f} /s per worker |",
                      f"| audio decode + resample | {d['audio_seconds_per_s_per_worker']:.0f} s of audio /s per worker |"]
        for key, what in (("extraction", "end-to-end extraction"),
                          ("extraction_host", "extraction, host side alone (instant encoders)")):
            x = r.get(key)
            if x and "clips_per_s" in x:
                lines.append(f"| {what} ({x['videos']} synthetic videos, {x['workers']} workers) | "
                             f"{x['clips_per_s']:.2f} clips/s{_phases(x)} |")
        for backend, io in (r.get("cache") or {}).items():
            if backend != "write_vs_disk":
                lines.append(f"| cache {backend} write / read | {io['write_GBps']:.2f} / {io['read_GBps']:.2f} GB/s |")
        if h:
            lines += [f"| head epoch, fused pooling | {_fmt_s(h['epoch_s_fused'])} |",
                      f"| head epoch, literal pooling | {_fmt_s(h['epoch_s_literal'])} ({_num(h['epoch_speedup_vs_literal'], '.2f')}x the fused time) |",
                      f"| head epoch, encoders every step (projected from encoder throughput) | {_fmt_s(h['epoch_s_encoders_every_step'])} |"]
            if h["train_videos_timed"] != h["scaled_to"]:
                lines.append(f"| (head epochs timed on {h['train_videos_timed']} train videos, scaled to {h['scaled_to']}) | |")
        t2 = r.get("top2")
        if t2:
            lines.append(f"| top-2 unfrozen epoch, cached prefix vs end to end (extrapolated from timed micro-batches) | "
                         f"{_fmt_s(t2.get('cached_top2_s_per_epoch'))} vs {_fmt_s(t2.get('end_to_end_s_per_epoch'))} "
                         f"({_num(t2.get('ratio'), '.1f')}x) |")
        for note in r.get("notes", []):
            lines.append(f"| note | {note} |")
        for name, err in (r.get("errors") or {}).items():
            lines.append(f"| {name}: FAILED | {err} |")
        lines.append("")
    for path in sorted(folder.glob("*.md")):       # measurements run by hand at scale (commands inside)
        lines += [path.read_text(encoding="utf-8").rstrip(), ""]
    return "\n".join(lines) + "\n"
