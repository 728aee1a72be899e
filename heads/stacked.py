"""Several head models trained together in one pass: stacked parameters and one vmapped step.

`ablate` and multi-seed runs train many small heads over the same splits. Trained one after another, each
small model leaves a GPU mostly idle (and on the CPU pays the per-step Python and kernel overhead once per
model). Here M models of one ModelConfig become ONE set of stacked parameters (torch.func.stack_module_state,
leading dimension M); every step is one vmapped forward/backward (torch.func.functional_call over the
unchanged ConflictAwareModel) and one fused AdamW step over all of them. AdamW is elementwise and the
members' parameters are disjoint, so each member receives exactly the update it would receive alone.

Each member keeps what makes it itself under heads/train.py's protocol:
- its initialisation, from its seed (build_model(cfg, seed));
- its batch order and window draws, from its own generator seeded by (seed, epoch);
- its dropout masks, drawn from its own generator seeded as a separate run seeds the global RNG, in the
  order and shapes nn.Dropout draws them on the CPU, and applied as x * mask inside the vmap;
- its loss (label smoothing, text weight, pos_weight), validation (alpha) and early stopping (patience).
  A member that stops keeps its best epoch's weights and leaves the stack (its slices of the parameters and
  of the optimizer state are dropped), so the others continue at the cost of the remaining members only.
On the CPU a member thus ends with the numbers of the same model trained alone (tests/test_stacked.py), up
to float rounding of the batched kernels. On CUDA a separate run draws dropout with the fused kernel's own
generator: a member matches it in distribution, not bit for bit (CUDA runs are not bit-exact anyway).

Members must share the model configuration and everything that shapes an epoch (`stack_problem` says
what differs). Fine-tuned top encoder blocks (unfreeze_top) and run folders stay with heads.train.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from extract.devices import resolve_device
from extract.host_memory import keep_freed_memory
from heads.config import ConfigError, ModelConfig, TrainConfig
from heads.infer import WindowLogits, autocast, per_video_modalities
from heads.metrics import bah_metrics, sweep_threshold
from heads.model import build_model
from heads.resume import SnapshotBuffers
from heads.split_data import SplitData
from heads.tokens import Tokens
from heads.train import accumulation_weights, epoch_seed, joint_loss, make_optimizer, pos_weight_for, steps_per_epoch
from heads.train_state import EpochRecord, TrainingStopped, TrainProgress, TrainResult, TrainState

# Training options in which the members of one stack may differ: they act per member (loss, selection).
MAY_DIFFER = frozenset({"seed", "label_smoothing", "text_weight", "alpha", "pos_weight", "patience",
                        "checkpoint_seconds"})


def stack_problem(model_cfgs: Sequence[ModelConfig], cfgs: Sequence[TrainConfig]) -> str | None:
    """Why these (model, training) configurations cannot train as one stack; None when they can."""
    if not cfgs or len(model_cfgs) != len(cfgs):
        return "need one model configuration per training configuration"
    if any(m != model_cfgs[0] for m in model_cfgs):
        return "the model configurations differ"
    if any(c.unfreeze_top for c in cfgs):
        return "fine-tuned top encoder blocks (unfreeze_top) train one run at a time"
    ref = cfgs[0].to_dict()
    for c in cfgs[1:]:
        d = c.to_dict()
        differ = sorted(k for k in d if k not in MAY_DIFFER and d[k] != ref[k])
        if differ:
            return f"the training options differ in {', '.join(differ)}"
    return None


@dataclass(frozen=True)
class DropoutSite:
    name: str          # module path of an nn.Dropout in the model
    p: float
    width: int         # features of its input: the in_features of the Linear after it


def dropout_sites(model: nn.Module) -> list[DropoutSite]:
    """The model's dropouts in the order its forward applies them (registration order: ffn, head, text head)."""
    sites = []
    for name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        for i, m in enumerate(parent):
            if isinstance(m, nn.Dropout):
                nxt = parent[i + 1] if i + 1 < len(parent) else None
                if not isinstance(nxt, nn.Linear):
                    raise ConfigError(f"stacked training: dropout {name}.{i} is not followed by a Linear layer")
                sites.append(DropoutSite(f"{name}.{i}", float(m.p), int(nxt.in_features)))
    if len(sites) != sum(isinstance(m, nn.Dropout) for m in model.modules()):
        raise ConfigError("stacked training: a dropout outside an nn.Sequential has no known input width")
    return sites


def draw_mask(g: torch.Generator, k: int, site: DropoutSite) -> Tensor:
    """nn.Dropout's CPU noise for a (k, width) input: bernoulli(1 - p) / (1 - p), one draw from `g`."""
    if site.p == 0:
        return torch.ones(k, site.width)          # nn.Dropout draws nothing at p = 0
    return torch.empty(k, site.width).bernoulli_(1 - site.p, generator=g).div_(1 - site.p)


class MaskDropout(nn.Module):
    """Dropout with a given (per-member, vmapped) mask: the `mask` buffer is passed to functional_call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


class MethodCall(nn.Module):
    """Calls one method of the wrapped model, so functional_call can reach window_forward too."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.m, self.method = model, method

    def forward(self, *args):
        return getattr(self.m, self.method)(*args)


def member_tokens(tokens: Tokens, members: int) -> tuple[Tensor, Tensor | None]:
    """A batch of members x k samples (member-major) as (M, k, L, D) values and (M, k, L) mask or None;
    ragged tokens are padded to the longest (padding has weight 0 in the masked softmax)."""
    t = tokens.to_padded()
    k = t.values.shape[0] // members
    mask = None if t.mask is None else t.mask.view(members, k, -1)
    return t.values.view(members, k, *t.values.shape[1:]), mask


class Stack:
    """The stacked parameters of the members still training, their optimizer and schedule."""

    def __init__(self, models: list[nn.Module], cfg: TrainConfig, total_steps: int, device: torch.device):
        params, buffers = stack_module_state(models)
        self.params = {f"m.{k}": v for k, v in params.items()}
        self.buffers = {f"m.{k}": v for k, v in buffers.items()}
        self.cfg, self.device = cfg, device
        self.opt = make_optimizer([{"params": list(self.params.values()), "lr": cfg.lr}], cfg, device)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(total_steps, 1),
                                                                eta_min=cfg.lr_min)

    def member_state(self, slot: int, into: SnapshotBuffers) -> dict[str, Tensor]:
        """A state_dict of the member in `slot`, copied into `into`'s reused host buffers (as heads.train keeps
        its best epoch: no fresh allocation, so no page faults, per improvement)."""
        return into.capture({k[2:]: v[slot] for k, v in (self.params | self.buffers).items()})

    def keep(self, slots: list[int]) -> None:
        """Keep only the members in `slots`: their parameter slices, AdamW moments and the schedule's state."""
        idx = torch.tensor(slots, device=self.device)
        old_opt, old_sched = self.opt.state_dict(), self.sched.state_dict()
        lrs = [g["lr"] for g in self.opt.param_groups]
        self.params = {k: v.detach()[idx].clone().requires_grad_(v.requires_grad) for k, v in self.params.items()}
        self.buffers = {k: v[idx].clone() for k, v in self.buffers.items()}
        self.opt = make_optimizer([{"params": list(self.params.values()), "lr": self.cfg.lr}], self.cfg, self.device)
        state = {j: {n: (s[idx] if n != "step" and s.dim() else s) for n, s in st.items()}
                 for j, st in old_opt["state"].items()}
        self.opt.load_state_dict({"state": state, "param_groups": old_opt["param_groups"]})
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=old_sched["T_max"],
                                                                eta_min=old_sched["eta_min"])
        self.sched.load_state_dict(old_sched)
        for g, lr in zip(self.opt.param_groups, lrs):     # the cosine schedule is recursive in the group's lr
            g["lr"] = lr


def train_stacked(train: SplitData, val: SplitData, model_cfg: ModelConfig, cfgs: Sequence[TrainConfig], *,
                  on_epoch: Callable[[int, EpochRecord, TrainProgress], None] | None = None,
                  videos: dict | None = None) -> list[TrainResult]:
    """Train len(cfgs) models of `model_cfg` together, one per configuration (see the module doc); the results
    are in the order of `cfgs`, each as heads.train.train_heads would return it without a run folder.
    `on_epoch(member, record, progress)` follows each member's epochs; raising TrainingStopped stops all, and
    every result then says completed=False. A member's `seconds` is the shared pass's time while it trained."""
    problem = stack_problem([model_cfg] * len(cfgs), cfgs)
    if not isinstance(train, SplitData):
        problem = "stacked training reads a train split held in memory (not a streamed one)"
    if problem is not None:
        raise ConfigError(f"cannot train these models as one stack: {problem}")
    cfg0 = cfgs[0]
    device = resolve_device(cfg0.device)
    layer = cfg0.input_layer
    if cfg0.text_source == "window" and model_cfg.has_text and layer not in train.text_window:
        raise ConfigError("text_source 'window': the cache holds no window-aligned transcripts")
    labelled = train.labelled()
    if labelled.numel() == 0:
        raise ConfigError(f"split {train.split!r} has no labelled videos to train on")
    if val.labelled().numel() == 0:
        raise ConfigError(f"split {val.split!r} has no labelled videos to select the epoch on")
    if device.type == "cpu":
        keep_freed_memory()
    return _StackedRun(train, val, model_cfg, list(cfgs), device, labelled, on_epoch, videos).run()


def _skeleton(model_cfg: ModelConfig) -> nn.Module:
    """The model's structure without storage (meta device): no initialisation cost, no RNG drawn."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_model(model_cfg)


class _StackedRun:
    def __init__(self, train, val, model_cfg, cfgs, device, labelled, on_epoch, videos):
        self.train, self.val, self.model_cfg, self.cfgs = train, val, model_cfg, cfgs
        self.device, self.labelled, self.on_epoch, self.videos = device, labelled, on_epoch, videos
        c = cfgs[0]
        self.n = labelled.numel()
        self.pw = [torch.tensor(pos_weight_for(x.pos_weight, train.labels, val.labels), device=device) for x in cfgs]
        self.w = [x.text_weight if model_cfg.has_text else 0.0 for x in cfgs]
        self.alpha = [x.alpha if model_cfg.has_text else 0.0 for x in cfgs]
        models = [build_model(model_cfg, seed=x.seed).to(device) for x in cfgs]
        self.sites = dropout_sites(models[0])
        train_tmpl = _skeleton(model_cfg)
        for s in self.sites:                             # the same module paths, dropout from given masks
            parent, _, idx = s.name.rpartition(".")
            train_tmpl.get_submodule(parent)[int(idx)] = MaskDropout()
        self.fwd = MethodCall(train_tmpl, "forward")
        self.val_fwd = MethodCall(_skeleton(model_cfg).eval(), "window_forward")
        total = c.epochs * steps_per_epoch(self.n, c.batch_size, c.accum)
        self.stack = Stack(models, c, total, device)
        self.slots = list(range(len(cfgs)))              # member in each stack slot

    # ---- one epoch --------------------------------------------------------------------------------------

    def _draw(self, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
        """A member's epoch order and windows: heads.train.train_heads' draw from the (seed, epoch) generator."""
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
        order = self.labelled.cpu()[torch.randperm(self.n, generator=g)]
        n_win = self.train.n_windows.cpu()[order]
        windows = (torch.rand(order.numel(), generator=g, dtype=torch.float64) * n_win).long().clamp(max=n_win - 1)
        return order.to(self.train.device), windows.to(self.train.device)

    def _forward(self, params, buffers, values, masks):
        def one(p, b, v, mk):
            tokens = {m: Tokens(x, x.shape[0], mk.get(m)) for m, x in v.items()}
            l_full, l_text = functional_call(self.fwd, (p, b), (tokens,))
            return (l_full, l_text) if l_text is not None else (l_full,)
        return vmap(one)(params, buffers, values, masks)

    def _train_epoch(self, epoch: int) -> list[float]:
        cfgs = [self.cfgs[i] for i in self.slots]
        c, mods = cfgs[0], self.model_cfg.present
        draws = [self._draw(x.seed, epoch) for x in cfgs]
        drop_g = [torch.Generator().manual_seed(epoch_seed(x.seed, epoch, 1)) for x in cfgs]
        st = self.stack
        totals = torch.zeros(len(cfgs), dtype=torch.float64, device=self.device)
        size = c.batch_size * c.accum
        for s in range(0, self.n, size):              # an accumulation group as ONE forward, as train_heads does
            rows = torch.cat([o[s : s + size] for o, _ in draws])     # every member's group in one gather
            wins = torch.cat([w[s : s + size] for _, w in draws])
            b = self.train.batch(rows, wins, modalities=mods, layer=c.input_layer, text_source=c.text_source,
                                 device=self.device)
            k = rows.numel() // len(cfgs)
            values, masks = {}, {}
            for m in mods:
                values[m], mask = member_tokens(b.tokens[m], len(cfgs))
                if mask is not None:
                    masks[m] = mask
            labels = b.labels.to(self.device).view(len(cfgs), k)
            drops = {f"m.{site.name}.mask": torch.stack([draw_mask(g, k, site) for g in drop_g]).to(self.device)
                     for site in self.sites}
            with autocast(self.device, c.amp):
                out = self._forward(st.params, st.buffers | drops, values, masks)
            l_full, l_text = out[0], (out[1] if len(out) > 1 else None)
            weights = accumulation_weights(k, c.batch_size, self.device)
            loss = torch.zeros((), device=self.device)
            for j, x in enumerate(cfgs):
                i = self.slots[j]
                per = joint_loss(l_full[j], None if l_text is None else l_text[j], labels[j],
                                 self.pw[i], x.label_smoothing, self.w[i], reduction="none")
                loss = loss + (per * weights).sum()
                totals[j] += per.detach().double().sum()
            loss.backward()
            st.opt.step()
            st.sched.step()
            st.opt.zero_grad(set_to_none=True)
        return [float(t) / self.n for t in totals.tolist()]

    # ---- validation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _val_logits(self) -> list[WindowLogits]:
        """Every member's heads.infer.window_logits over val, in one vmapped pass per batch."""
        c, data = self.cfgs[0], self.val
        w = data.max_windows if not c.eval_windows else min(int(c.eval_windows), data.max_windows)
        n = len(data)
        rows = torch.arange(n, device=data.device).repeat_interleave(w)
        wins = torch.arange(w, device=data.device).repeat(n)
        valid = wins < data.n_windows[rows]
        wins = torch.minimum(wins, data.n_windows[rows] - 1)
        mods = self.model_cfg.present
        per_video = per_video_modalities(mods, c.text_source)
        per_window = [m for m in mods if m not in per_video]
        step = max(1, c.eval_batch_size // max(w, 1))
        params = {k: v.detach() for k, v in self.stack.params.items()}

        def one(p, b, v, mk):
            tokens = {m: Tokens(x, x.shape[0], mk.get(m)) for m, x in v.items()}
            l_full, l_text = functional_call(self.val_fwd, (p, b), (tokens, w, per_video))
            return (l_full, l_text) if l_text is not None else (l_full,)

        outs: list[tuple[Tensor, ...]] = []
        for v in range(0, n, step):
            at = slice(v * w, min(n, v + step) * w)
            bw = data.batch(rows[at], wins[at], modalities=per_window, layer=c.input_layer,
                            text_source=c.text_source, device=self.device)
            bv = data.batch(rows[at][::w], modalities=per_video, layer=c.input_layer, text_source=c.text_source,
                            device=self.device)
            tokens = {m: t.to_padded() for m, t in (bw.tokens | bv.tokens).items()}
            values = {m: t.values for m, t in tokens.items()}
            masks = {m: t.mask for m, t in tokens.items() if t.mask is not None}
            with autocast(self.device, c.amp):
                out = vmap(one, in_dims=(0, 0, None, None))(params, self.stack.buffers, values, masks)
            outs.append(tuple(o.float().cpu() for o in out))
        full = torch.cat([o[0] for o in outs], dim=1).view(-1, n, w)
        text = torch.cat([o[1] for o in outs], dim=1).view(-1, n, w) if len(outs[0]) > 1 else None
        return [WindowLogits(full[j], None if text is None else text[j], valid.cpu().view(n, w))
                for j in range(full.shape[0])]

    def _score(self, i: int, wl: WindowLogits, epoch: int, train_loss: float, lr: float) -> tuple[EpochRecord, dict]:
        """heads.train's per-epoch validation for member i: val loss, threshold sweep, BAH metrics."""
        cfg, labels = self.cfgs[i], self.val.labels.cpu()
        keep = ~torch.isnan(labels)
        y, valid = labels[keep], wl.valid[keep]
        per = joint_loss(wl.full[keep], None if wl.text is None else wl.text[keep], y[:, None].expand_as(valid),
                         self.pw[i].cpu(), cfg.label_smoothing, self.w[i], reduction="none")
        val_loss = float(((per * valid).sum(1) / valid.sum(1).clamp(min=1)).mean())
        probs = wl.probs(self.alpha[i])[keep].numpy().astype("float64")
        t, _ = sweep_threshold(probs, y.numpy(), cfg.threshold_lo, cfg.threshold_hi, cfg.threshold_step)
        m = bah_metrics(y.numpy(), probs=probs, threshold=t)
        rec = EpochRecord(epoch, train_loss, val_loss, m["macro_f1"], m["f1_ah"], m["f1_noah"], t, float(lr))
        return rec, m

    # ---- the loop -----------------------------------------------------------------------------------------

    def run(self) -> list[TrainResult]:
        cfgs, n_members = self.cfgs, len(self.cfgs)
        states = [TrainState() for _ in cfgs]
        best: list[dict[str, Tensor] | None] = [None] * n_members
        bufs = [SnapshotBuffers() for _ in cfgs]
        stopped = [False] * n_members
        interrupted = False
        epoch = 0
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            while epoch < cfgs[0].epochs and self.slots and not interrupted:
                epoch += 1
                t0 = time.perf_counter()
                losses = self._train_epoch(epoch)
                lr = self.stack.sched.get_last_lr()[0]
                logits = self._val_logits()
                seconds = time.perf_counter() - t0
                for j, i in enumerate(self.slots):
                    rec, metrics = self._score(i, logits[j], epoch, losses[j], lr)
                    st = states[i]
                    if st.record(rec, metrics):
                        best[i] = self.stack.member_state(j, bufs[i])
                    st.seconds += seconds
                    stopped[i] = st.bad_epochs >= cfgs[i].patience
                    if self.on_epoch is not None:
                        try:
                            self.on_epoch(i, rec, TrainProgress(cfgs[i].epochs, epoch, st.best_epoch, st.best_f1))
                        except TrainingStopped:
                            interrupted = True
                alive = [j for j, i in enumerate(self.slots) if not stopped[i]]
                if len(alive) < len(self.slots) and alive:
                    self.stack.keep(alive)
                self.slots = [self.slots[j] for j in alive]
        return [self._result(i, states[i], best[i], stopped[i], not interrupted) for i in range(n_members)]

    def _result(self, i: int, st: TrainState, best: dict[str, Tensor] | None, stopped: bool,
                completed: bool) -> TrainResult:
        assert best is not None
        model = _skeleton(self.model_cfg)
        model.load_state_dict(best, assign=True)
        model.to(self.device)
        model.eval()
        history = [EpochRecord(**h) for h in st.history]
        return TrainResult(model, self.model_cfg, self.cfgs[i], st.best_epoch, st.best_threshold, st.best_metrics,
                           history, stopped, st.seconds, completed=completed, videos=self.videos)


class SeedStacks:
    """For a loop over seeds, then trainings (as `ablate` runs): the first time a training is asked for, it is
    trained together with its later seeds in one stack; the later seeds' results wait (on the host) until the
    loop reaches them. A training the stack does not take (top blocks, one seed left) is left to the caller."""

    def __init__(self, train: SplitData, val: SplitData,
                 on_epoch: Callable[[EpochRecord, TrainProgress], None] | None = None):
        self.train, self.val, self.on_epoch = train, val, on_epoch
        self.ready: dict[tuple[str, int], TrainResult] = {}

    def take(self, name: str, model_cfg: ModelConfig, cfg: TrainConfig, later_seeds: Sequence[int]) -> TrainResult | None:
        """The result of training `name` with `cfg` (trained now along with `later_seeds`, or earlier), or None
        when the caller must train it alone."""
        got = self.ready.pop((name, cfg.seed), None)
        if got is not None:
            got.model.to(resolve_device(cfg.device))
            return got
        cfgs = [cfg] + [dataclasses.replace(cfg, seed=s) for s in later_seeds]
        if len(cfgs) < 2 or not isinstance(self.train, SplitData) or stack_problem([model_cfg] * len(cfgs), cfgs):
            return None
        shown = [0]

        def on_epoch(i: int, rec: EpochRecord, progress: TrainProgress) -> None:
            if self.on_epoch is not None and rec.epoch > shown[0]:      # one line per epoch of the stack
                shown[0] = rec.epoch
                self.on_epoch(rec, progress)

        results = train_stacked(self.train, self.val, model_cfg, cfgs, on_epoch=on_epoch)
        if results[0].completed:
            for r in results[1:]:
                r.model.to("cpu")
                self.ready[(name, r.train_config.seed)] = r
        return results[0]


__all__ = ["train_stacked", "SeedStacks", "stack_problem", "dropout_sites", "draw_mask", "MAY_DIFFER"]
