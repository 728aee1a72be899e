"""Session fixtures shared by the extraction and reliability tests (tests/test_extract.py, test_reliability.py).

Built once per test session and never modified by a test (copy them first):
    synth_tree   a small synthetic BAH tree (16 public + 2 private videos, seed 3): (OUT, generator result)
    tiny_specs   tiny random encoders in HF format + one spec per backend: {"zarr": path, "hdf5": path}
    ahcli_fork   a warm `ahcli` runner: each command runs in a forked child of one interpreter that imported
                 torch/transformers once (see tests/forkserver.py); SIGKILL-able like `python -m ahcli`
    ref_caches   the tree extracted once per backend by `ahcli extract`: {"zarr": cache, "hdf5": cache}

Every extraction in these tests runs with OMP_NUM_THREADS=1: CPU results of the audio encoder depend on the
intra-op thread count (one fp16 ulp), and torchrun runs its ranks with one thread each.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers_bah import cached_synth

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BACKENDS = ("zarr", "hdf5")
SYNTH_VIDEOS, SYNTH_SEED = 16, 3
CLI_ENV = {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",  # see the module docstring
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # never reach for the hub from a test
    "COLUMNS": "250",  # rich wraps at 80 columns when not on a terminal
}


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AH_FAULT_AT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(CLI_ENV)
    env.update(extra)
    return env


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


class ForkedCli:
    """Client of tests/forkserver.py: run(...) one `ahcli` command; start(...)/wait() to act while it runs."""

    def __init__(self, workdir: Path, warm_spec: Path | None = None, start_timeout: float = 180.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, str(TESTS / "forkserver.py")] + ([str(warm_spec)] if warm_spec else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=cli_env(),
                                     cwd=REPO, bufsize=0)
        self._buf = b""
        self._n = 0
        self._current: tuple[int, Path, Path] | None = None
        ready = self._reply(start_timeout)
        assert "ready" in ready, ready

    def _reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"the ahcli fork server did not answer within {timeout:.0f} s")
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"the ahcli fork server exited (rc {self.proc.poll()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, *argv: str | Path, env: dict[str, str] | None = None) -> int:
        """Start `ahcli ARGV` in a child; returns its pid (one command at a time)."""
        assert self._current is None, "wait() for the previous command first"
        self._n += 1
        out, err = self.workdir / f"{self._n}.out", self.workdir / f"{self._n}.err"
        req = {"argv": [str(a) for a in argv], "env": env or {}, "out": str(out), "err": str(err)}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        pid = self._reply(30)["pid"]
        self._current = (pid, out, err)
        return pid

    def wait(self, timeout: float = 300) -> CliResult:
        assert self._current is not None
        pid, out, err = self._current
        try:
            done = self._reply(timeout)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._reply(30)
            self._current = None
            raise
        self._current = None
        assert done["pid"] == pid, done
        return CliResult(done["rc"], out.read_text(errors="replace"), err.read_text(errors="replace"))

    def run(self, *argv: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
        self.start(*argv, env=env)
        return self.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:  # idle between commands: nothing to flush, no reason to wait for its exit
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def run_module(*argv: str | Path, timeout: float = 300, env: dict[str, str] | None = None) -> CliResult:
    """`python -m ahcli ARGV` in a fresh interpreter (the plain entry point)."""
    p = subprocess.run([sys.executable, "-m", "ahcli", *map(str, argv)], capture_output=True, text=True,
                       timeout=timeout, env=env or cli_env(), cwd=REPO)
    return CliResult(p.returncode, p.stdout, p.stderr)


def extract_args(data: Path, cache: Path, spec: Path, *more: str) -> list[str]:
    return ["extract", str(data), str(cache), "--spec", str(spec), "--workers", "1", "--no-progress", *more]


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory) -> tuple[Path, dict]:
    return cached_synth(tmp_path_factory, videos=SYNTH_VIDEOS, seed=SYNTH_SEED)


@pytest.fixture(scope="session")
def tiny_specs(tmp_path_factory) -> dict[str, Path]:
    from extract.tiny_encoders import write_tiny_encoders

    spec = write_tiny_encoders(tmp_path_factory.mktemp("tiny_encoders"), seed=0)
    hdf5 = spec.with_name("cache_spec_hdf5.yaml")  # same folder: the relative encoder paths resolve alike
    text = spec.read_text(encoding="utf-8")
    assert "\nbackend: zarr" in text
    hdf5.write_text(text.replace("\nbackend: zarr", "\nbackend: hdf5", 1), encoding="utf-8")
    return {"zarr": spec, "hdf5": hdf5}


@pytest.fixture(scope="session")
def ahcli_fork(tmp_path_factory, tiny_specs):
    cli = ForkedCli(tmp_path_factory.mktemp("ahcli_fork"), warm_spec=tiny_specs["zarr"])
    yield cli
    cli.close()


@pytest.fixture(scope="session")
def ref_caches(tmp_path_factory, synth_tree, tiny_specs, ahcli_fork) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ref_caches")
    out = {}
    for backend in BACKENDS:
        cache = root / backend
        res = ahcli_fork.run(*extract_args(synth_tree[0] / "data", cache, tiny_specs[backend]))
        assert res.rc == 0, res.err + res.out
        out[backend] = cache
    return out


@pytest.fixture(scope="session")
def report_run_case(synth_tree, tiny_specs, tmp_path_factory):
    """Finished runs on a real cache of synth_tree (tests/report_case.py): explain, predict and report read it."""
    import report_case

    return report_case.build(synth_tree[0], tiny_specs["zarr"], tmp_path_factory)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for a module of tiny models (see report_case.one_thread); a module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import report_case

    with report_case.one_thread():
        yield
