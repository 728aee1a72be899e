"""What `ahcli ablate` trains: its options, the list of trainings and which of them is checkpoint A.

Two ways to run the tables (`unfreeze_top`):
- 0 (default): every variant trains the heads over frozen encoders; checkpoint A of Table 6 is an extra
  top-2 training when the cache holds the prefix states (else the frozen eps model, and the table says so).
- n > 0 (the paper's section 4.4 reading): every variant of Tables 4-6 trains with the top n encoder
  blocks unfrozen, from a cache with the 'prefix' layer (refused in one line otherwise); checkpoint A is
  then the full model itself. Checkpoint B stays the paper's B (frozen, eps 0.1) in both ways.
`label_smoothing` is the eps of every training except checkpoint B (the protocol: 0).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ahflows.ablation_table import B_SMOOTHING
from extract.errors import AHError
from heads.config import TrainConfig
from heads.topblocks import cache_prefix_problem

SUBSETS = ("v", "a", "t", "va", "vt", "at", "vat")
QUICK_SUBSETS = ("v", "a", "t", "vat")
CONTROLLED = ("seed", "modalities", "conflict", "text_source", "label_smoothing", "unfreeze_top")
MODEL_KEYS = ("dim", "head_hidden", "head_dropout", "ffn_dropout", "ffn_mult", "ffn_hidden", "pooling")
A_TOP = 2                             # blocks of the separate checkpoint-A training (frozen tables)


class AblationError(AHError):
    """Options the ablation cannot run with (a controlled option overridden, an unusable cache)."""


@dataclass(frozen=True)
class Training:
    name: str
    modalities: str = "vat"
    conflict: bool = True
    text_source: str = "full"
    label_smoothing: float = 0.0
    unfreeze_top: int = 0


@dataclass
class Plan:
    trainings: list[Training]
    checkpoint_a: str                 # name of the training used as checkpoint A
    a_note: str                       # which A was used, and why
    window_text: bool


@dataclass
class AblationOptions:
    seeds: int = 3                    # seeds seed_offset .. seed_offset + seeds - 1
    base: dict[str, Any] = field(default_factory=dict)   # TrainConfig/ModelConfig options for every training
    quick: bool = False
    windows: int = 1                  # inference windows of Tables 4 and 5
    device: str = "auto"
    resume: bool = False
    frozen_a: bool = False
    only_seed: int | None = None      # run this seed alone (one job per seed; merged with `merge`)
    merge: list[Path] = field(default_factory=list)    # ablation folders whose finished trainings to reuse
    allow_partial: bool = False       # score val/test even when the cache lacks some listed videos
    seed_offset: int = 0              # first seed (a demo run with --seed K uses seed K)
    unfreeze_top: int = 0             # every variant with the top n encoder blocks unfrozen (0: frozen)
    label_smoothing: float = 0.0      # eps of every training but checkpoint B

    @property
    def seed_list(self) -> list[int]:
        if self.only_seed is not None:
            return [self.only_seed]
        return list(range(self.seed_offset, self.seed_offset + self.seeds))

    def check(self) -> None:
        if self.seeds < 1 or self.windows < 1:
            raise AblationError("seeds and windows must be >= 1")
        if self.seed_offset < 0 or self.unfreeze_top < 0:
            raise AblationError("--seed-offset and --unfreeze-top must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise AblationError(f"--label-smoothing {self.label_smoothing}: must lie in [0, 1)")
        if self.unfreeze_top and self.frozen_a:
            raise AblationError("--frozen-a contradicts --unfreeze-top (every variant trains its top blocks)")
        lo, hi = self.seed_offset, self.seed_offset + self.seeds - 1
        if self.only_seed is not None and not lo <= self.only_seed <= hi:
            raise AblationError(f"--only-seed {self.only_seed}: must lie in {lo}..{hi} "
                                f"(--seeds {self.seeds}, --seed-offset {self.seed_offset})")

    def key_extra(self) -> dict[str, Any]:
        """What identifies this ablation's trainings beyond cache and base options (defaults left out, so
        logs written before these options existed stay reusable)."""
        extra: dict[str, Any] = {}
        if self.unfreeze_top:
            extra["unfreeze_top"] = self.unfreeze_top
        if self.label_smoothing:
            extra["label_smoothing"] = self.label_smoothing
        return extra


def unfreeze_supported(spec: dict | None, n: int = A_TOP) -> tuple[bool, str]:
    """True when the cache holds the prefix states the top n blocks read (else why not)."""
    problem = cache_prefix_problem(spec, n)
    if problem is not None:
        return False, problem
    return True, f"top-{n} encoder blocks unfrozen, trained from the cached prefix states (encoder lr = lr/10)"


def require_prefix(spec: dict | None, n: int, cache: str) -> None:
    """--unfreeze-top n on a cache whose prefix states cannot feed n blocks: one line, before any loading."""
    problem = cache_prefix_problem(spec, n)
    if problem is not None:
        raise AblationError(f"{cache}: --unfreeze-top {n}: {problem}")


def choose_a(spec: dict | None, opts: AblationOptions) -> tuple[bool, str]:
    """(is checkpoint A trained with unfrozen top blocks, why / how)."""
    if opts.unfreeze_top:
        return unfreeze_supported(spec, opts.unfreeze_top)
    if opts.quick or opts.frozen_a:
        return False, "--quick" if opts.quick else "asked for (--frozen-a)"
    return unfreeze_supported(spec)


def make_plan(spec: dict | None, quick: bool, a_unfrozen: bool, a_reason: str, *, unfreeze_top: int = 0,
              label_smoothing: float = 0.0) -> Plan:
    spec = spec or {}
    window_text = bool((spec.get("text") or {}).get("window_aligned")) and not quick
    n, eps = unfreeze_top, label_smoothing

    def training(name: str, **kw: Any) -> Training:
        return Training(name, **{"label_smoothing": eps, "unfreeze_top": n, **kw})

    t = [training(s, modalities=s) for s in (QUICK_SUBSETS if quick else SUBSETS)]
    a_name = "vat"
    if n:
        a_note = f"Every variant trained with the {a_reason}; checkpoint A = vat, eps {eps:g}"
    else:
        a_note = f"checkpoint A = vat, eps {eps:g}, all encoder layers frozen ({a_reason})"
    if not quick:
        t.append(training("vat-noconflict", conflict=False))
        if window_text:
            t.append(training("vat-window", text_source="window"))
        t.append(Training("vat-eps0.1", label_smoothing=B_SMOOTHING))      # checkpoint B: frozen, as in the paper
        if a_unfrozen and not n:
            t.append(training("vat-top2", unfreeze_top=A_TOP))
            a_name, a_note = "vat-top2", f"checkpoint A = vat, eps {eps:g}, {a_reason}"
    return Plan(t, a_name, a_note, window_text)


def split_overrides(base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model overrides, train overrides); the options the ablation varies itself are refused."""
    bad = sorted(k for k in base if k in CONTROLLED)
    if bad:
        raise AblationError(f"ablate varies {', '.join(bad)} itself; leave them out of the base options "
                            "(--label-smoothing, --unfreeze-top and --seed-offset set them for every variant)")
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in base if k not in train_keys and k not in MODEL_KEYS)
    if unknown:
        raise AblationError(f"unknown training option(s) {', '.join(unknown)}")
    model = {k: v for k, v in base.items() if k in MODEL_KEYS}
    train = {k: v for k, v in base.items() if k in train_keys}
    if "lr" in train and "lr_min" not in train:
        train["lr_min"] = min(3e-7, float(train["lr"]))
    return model, train


__all__ = ["AblationError", "AblationOptions", "Training", "Plan", "make_plan", "split_overrides", "choose_a",
           "unfreeze_supported", "require_prefix", "SUBSETS", "QUICK_SUBSETS", "CONTROLLED", "MODEL_KEYS"]
