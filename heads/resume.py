"""Crash-safe run folders for training: checkpoints written in the background, exact resume, finishing.

A resume checkpoint is `state.safetensors` (model + optimizer tensors; scheduler, early-stopping counters and
history as JSON in its metadata) plus `best-eNNN.safetensors` (the best weights so far). Every file is
written atomically (extract/files.py), so a run killed at any moment resumes from the last checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from extract.files import atomic_write_json, refuse_foreign_folder, remove_stale_tmp
from heads import run_files as rf
from heads.config import TrainConfig
from heads.runs import load_run
from heads.topblocks import TOPS_FILE, head_model_of, save_tops, tops_of
from heads.train_state import EpochRecord, TrainResult, TrainState

RUN_OWN_FILES = (".lock", "train.log")      # what the CLI may have put in a new run folder first

def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimizer's tensors by flat name (device tensors, not copied) and the rest as JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    groups = json.loads(json.dumps(sd["param_groups"], default=list))
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---- snapshots and the checkpoint writer -----------------------------------------------------------


class SnapshotBuffers:
    """CPU copies of device tensors, allocated once (pinned for CUDA sources) and refilled in place."""

    def __init__(self) -> None:
        self.bufs: dict[str, Tensor] = {}

    def capture(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out, cuda = {}, False
        for k, v in tensors.items():
            v = v.detach()
            buf = self.bufs.get(k)
            if buf is None or buf.shape != v.shape or buf.dtype != v.dtype:
                buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda)
                self.bufs[k] = buf
            buf.copy_(v, non_blocking=v.is_cuda)
            cuda |= v.is_cuda
            out[k] = buf
        if cuda:
            torch.cuda.synchronize()
        return out


class Checkpointer:
    """Writes epoch checkpoints from a background thread, in order, one epoch in flight at a time.
    Before the next snapshot refills the buffers, the previous write is waited for."""

    def __init__(self, out: Path):
        self.out = out
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt")
        self.pending: Future | None = None
        self.state_bufs = SnapshotBuffers()

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()        # re-raises a write error here
            self.pending = None

    def save(self, model, opt, sched, st: TrainState, best: dict[str, Tensor] | None) -> None:
        """Snapshot now (training goes on mutating the tensors); write in the thread. `best`, when
        the epoch improved, must stay untouched until the next call (it is the trainer's best copy)."""
        self.wait()
        optim_t, optim_meta = optimizer_tensors(opt)
        tensors = self.state_bufs.capture({f"model/{k}": v for k, v in model.state_dict().items()} | optim_t)
        meta = {"state": asdict(st), "optimizer": optim_meta, "scheduler": sched.state_dict()}
        self.pending = self.pool.submit(_write_epoch, self.out, tensors, meta, best, st.best_epoch)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def _best_name(epoch: int) -> str:
    return f"best-e{epoch:03d}.safetensors"


def _write_epoch(out: Path, tensors: dict, meta: dict, best: dict | None, best_epoch: int) -> None:
    if best is not None:
        rf.save_tensors(out / _best_name(best_epoch), best, {"epoch": str(best_epoch)})
    rf.save_tensors(out / rf.STATE_FILE, tensors, {"state": json.dumps(meta)})
    for stale in out.glob("best-e*.safetensors"):         # only after the state that names the new one
        if stale.name != _best_name(best_epoch):
            stale.unlink(missing_ok=True)


def check_out_folder(out: str | Path, resume: bool) -> None:
    """Refuse (one line) to train into a folder that already holds a run unless resuming it."""
    out = Path(out)
    refuse_foreign_folder(out, rf.is_run_folder, "a run folder", ours=RUN_OWN_FILES)
    if not resume and ((out / rf.STATE_FILE).exists() or (out / rf.METRICS_FILE).exists()):
        raise rf.RunError(f"{out}: already holds a run; pass --resume to continue it or choose another folder")


def prepare_out(out: Path, resume: bool, config_json: dict) -> TrainResult | None:
    """Create `out`; refuse to overwrite a run; with resume, check it is the same run (options and cache).
    Returns the result of a run that is already finished, else None (train or continue)."""
    check_out_folder(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)                                 # half-written files of a killed run
    has_state = (out / rf.STATE_FILE).exists()
    finished = (out / rf.METRICS_FILE).exists()
    if (has_state or finished) and resume:
        old = rf.read_config(out)
        for section in ("model", "train"):
            a, b = dict(old[section]), dict(config_json[section])
            if section == "train":
                a = {**_train_defaults(), **a}           # a run written before an option existed
                for k in TrainConfig.RUNTIME:
                    a.pop(k, None), b.pop(k, None)
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise rf.RunError(f"{out}: --resume with different {section} options ({', '.join(diff)})")
        fp_old, fp_new = (old.get("cache") or {}).get("fingerprint"), config_json["cache"].get("fingerprint")
        if fp_old != fp_new:
            raise rf.RunError(f"{out}: --resume on another cache (fingerprint {fp_old} vs {fp_new})")
    if finished and resume:
        return _load_finished(out)
    return None


def _train_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _load_finished(out: Path) -> TrainResult:
    run = load_run(out)
    hist = [EpochRecord(**h) for h in rf.read_history(out / rf.HISTORY_FILE)]
    m = run.metrics
    for stale in [out / rf.STATE_FILE, *out.glob("best-e*.safetensors")]:   # leftovers of a kill after finish
        stale.unlink(missing_ok=True)
    return TrainResult(run.model, run.model_config, run.train_config, int(m["best_epoch"]), float(m["threshold"]),
                       m["val"], hist, bool(m["stopped_early"]), float(m.get("seconds", 0.0)), videos=m.get("videos"))


def restore(out: Path, model, opt, sched) -> tuple[TrainState, dict[str, Tensor]]:
    tensors, meta = rf.load_tensors(out / rf.STATE_FILE)
    try:
        blob = json.loads(meta["state"])
        st = TrainState(**blob["state"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise rf.RunError(f"{out / rf.STATE_FILE}: not a training state ({exc})") from exc
    model_t = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    rf.load_weights(model, model_t, str(out / rf.STATE_FILE))
    optimizer_from_flat(opt, tensors, blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    best_path = out / _best_name(st.best_epoch)
    if not best_path.exists():
        raise rf.RunError(f"{out}: {best_path.name} is missing; the training state cannot be resumed")
    best, _ = rf.load_tensors(best_path)
    return st, best


def finalize(out: Path, result: TrainResult) -> None:
    rf.save_model(out / rf.MODEL_FILE, head_model_of(result.model), {"epoch": str(result.best_epoch)})
    if tops_of(result.model) is not None:                # fine-tuned encoder blocks beside the heads
        save_tops(out / TOPS_FILE, tops_of(result.model))
    rf.write_history(out / rf.HISTORY_FILE, [asdict(h) for h in result.history])
    atomic_write_json(out / rf.METRICS_FILE, result.metrics_record())    # last: marks the run complete
    for stale in [out / rf.STATE_FILE, *out.glob("best-e*.safetensors")]:
        stale.unlink(missing_ok=True)
