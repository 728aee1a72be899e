"""A warm interpreter that runs `ahcli` commands in forked children (used by the extraction/reliability tests).

Starting `python -m ahcli` costs ~7 s on the test machine (torch and transformers imports, then the encoder
classes that transformers imports lazily). The crash tests run dozens of extractions and SIGKILL most of
them, so each runs in a child forked from one process that paid for the imports once. A child is a real
process running the real CLI entry point (`ahcli.app.main`): exit codes, SIGKILL, stdout and stderr behave
as with `python -m ahcli`. Tests that need the plain entry point (`python -m ahcli`, torchrun) use it as well.

    python tests/forkserver.py [SPEC]      # SPEC: an extraction spec whose encoders are loaded once to warm up

Protocol, one JSON object per line: request {"argv": [...], "env": {...}, "out": path, "err": path} on stdin;
replies {"pid": n} once the child runs and {"pid": n, "rc": code} once it ended (rc = -signal when killed).
The process's environment (OMP_NUM_THREADS ...) is fixed at start: torch reads it once, at import.
"""
from __future__ import annotations

import json
import os
import sys
import traceback


def _warm(spec: str | None) -> None:
    import ahcli.app  # noqa: F401  (typer, rich, every command module)
    import extract.run  # noqa: F401  (torch, transformers, zarr, h5py, av)

    try:  # the head trainer (sklearn metrics): optional, a child that needs it imports it anyway
        import heads.run_files  # noqa: F401
        import heads.infer  # noqa: F401
        import heads.train  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    if spec:
        from extract.encoders import load_encoders
        from extract.spec import load_spec

        load_encoders(load_spec(spec))


def _child(req: dict, reply_fd: int) -> None:
    code = 1
    try:
        os.close(reply_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, key in ((1, "out"), (2, "err")):
            f = os.open(req[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ.update(req.get("env") or {})
        if req.get("cwd"):
            os.chdir(req["cwd"])
        sys.argv = ["ahcli", *req["argv"]]
        from ahcli.app import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the child's stderr, exit 1
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    reply_fd = os.dup(1)
    reply = os.fdopen(reply_fd, "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # stray prints of the server must not corrupt the reply channel
    _warm(sys.argv[1] if len(sys.argv) > 1 else None)
    print(json.dumps({"ready": os.getpid()}), file=reply)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req, reply_fd)
        print(json.dumps({"pid": pid}), file=reply)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}), file=reply)


if __name__ == "__main__":
    serve()
