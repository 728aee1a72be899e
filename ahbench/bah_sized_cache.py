"""A BAH-sized cache without a GPU: a synthetic tree with BAH's number of videos, extracted with
InstantEncoders (zero tokens of the full-size models' shapes). For measuring memory, cache I/O and whole
`ahcli train-heads` runs at scale on any machine; its tokens carry no signal, so no accuracy means anything.

    python -m ahbench.bah_sized_cache OUT [--videos 1427] [--private 161] [--workers 2] [--compress]

writes OUT/data (the tree) and OUT/cache. The synthetic split sizes follow the generator's participant
split (1,427 videos: train 856, val 216, test 355), not BAH's 778 / 124 / 525; the synthetic recordings are
1-3 s long, so audio and transcript tokens are fewer than BAH's (the video tokens, most of the bytes, are
full size). Uncompressed the cache takes ~26 GB (BAH's size); --compress stores the zero tokens in a few
hundred MB (a spec copy with `compress: true`, OUT/spec.yaml), e.g. for a cache 3x BAH's size that trains with
`ahcli train-heads --stream` on a machine whose disk would not hold it uncompressed.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from ahbench.extraction import SPEC, InstantEncoders
from extract.run import ExtractOptions, extract, phase_report
from extract.spec import load_spec
from extract.synth import write_synthetic_bah


def main(
    out: Path = typer.Argument(..., help="Folder for OUT/data (synthetic tree) and OUT/cache."),
    videos: int = typer.Option(1427, help="Labelled videos (BAH: 1,427)."),
    private: int = typer.Option(161, help="Unlabelled private-split videos (BAH: 161)."),
    workers: int = typer.Option(2, help="Decoding worker processes."),
    compress: bool = typer.Option(False, help="Compress the cached arrays (the zero tokens then take almost no disk)."),
) -> None:
    """Write a synthetic tree of BAH's size and a cache of it with instant (zero-output) encoders."""
    t = time.perf_counter()
    write_synthetic_bah(out, videos=videos, seed=0, private=private)
    print(f"tree written in {time.perf_counter() - t:.0f} s")
    spec = SPEC
    if compress:
        spec = out / "spec.yaml"
        text = SPEC.read_text(encoding="utf-8")
        if "\ncompress: false" not in text:
            raise SystemExit(f"{SPEC}: no 'compress: false' line to switch on")
        spec.write_text(text.replace("\ncompress: false", "\ncompress: true", 1), encoding="utf-8")
    summary = extract(out / "data", out / "cache", spec, ExtractOptions(workers=workers, progress=True),
                      encoders=InstantEncoders(load_spec(spec)))
    print(f"cache: {summary.extracted} videos, {summary.clips} clips, {len(summary.failed)} failed; "
          f"{phase_report(summary)}")


if __name__ == "__main__":
    typer.run(main)
