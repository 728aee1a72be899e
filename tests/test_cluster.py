"""The cluster path of docs/CLUSTER.md on one machine: two torchrun launchers (`--nnodes 2 --nproc-per-node 1`)
meeting at a c10d rendezvous on 127.0.0.1, as two nodes of a batch job would, extract the shared tree into
one cache with the digest of a single process (same thread count: OMP_NUM_THREADS=1 everywhere)."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import REPO, cli_env, extract_args
from extract.store import CacheReader


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_launchers_with_c10d_rendezvous_give_the_single_process_digest(tmp_path, synth_tree, tiny_specs,
                                                                                  ref_caches):
    cache = tmp_path / "cache"
    port = _free_port()
    procs = []
    for node, is_host in enumerate((1, 0)):           # node 0 hosts the rendezvous store, as the first node would
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ah-two-nodes",
               "--rdzv-conf", f"is_host={is_host}", "--local-addr", "127.0.0.1", "--max-restarts", "0",
               "-m", "ahcli", *extract_args(synth_tree[0] / "data", cache, tiny_specs["zarr"])]
        out, err = open(tmp_path / f"node{node}.out", "w"), open(tmp_path / f"node{node}.err", "w")
        procs.append((subprocess.Popen(cmd, stdout=out, stderr=err, env=cli_env(), cwd=REPO), out, err))
    codes = []
    for p, out, err in procs:
        try:
            codes.append(p.wait(timeout=300))
        finally:
            if p.poll() is None:
                p.kill()
            out.close(), err.close()
    logs = "\n".join(f"node {n}: {(tmp_path / f'node{n}.{k}').read_text()[-2000:]}" for n in (0, 1) for k in ("out", "err"))
    assert codes == [0, 0], logs
    outs = [(tmp_path / f"node{n}.out").read_text() for n in (0, 1)]
    assert sum(o.count("extracted 18 videos") for o in outs) == 1, logs   # global rank 0 reports the sum
    r = CacheReader(cache)
    assert r.sealed and r.verify() == [] and len(r.video_ids()) == 18, logs
    assert r.digest() == CacheReader(ref_caches["zarr"]).digest(), logs
    assert r.manifest["provenance"]["torch_threads"] == 1
    assert sorted(p.name.rsplit("-", 1)[1] for p in (cache / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    assert not (cache / ".lock").exists()
