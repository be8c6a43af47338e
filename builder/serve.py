"""Start a real tritonserver on a model repository: for tests, demos and `serve-repo`.

Uses `tritonserver` from PATH (NVIDIA's container) or else the one bundled in nvidia-pytriton,
prepared by server_setup.py.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .server_setup import (
    bundle_backends,
    bundled_stub_problem,
    find_tritonserver,
    free_ports,
    parent_death_signal,
    server_environment,
    stub_python_env,
)

# `failed to load 'NAME' version V: MESSAGE"` lines name the model that broke the start.
_FAILED_LOAD = re.compile(r"failed to load '([^']+)' version (\S+): (.*?)\"?$")


class ServerStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message carries its log's relevant lines."""


def failure_causes(log: str) -> list[str]:
    """The lines of a tritonserver log that say why it did not start, most specific first."""
    causes = []
    for line in log.splitlines():
        found = _FAILED_LOAD.search(line)
        if found:
            name, version, message = found.groups()
            # Triton escapes the traceback's newlines; keep the first line and where it was raised.
            message = re.sub(r"\s+", " ", message.replace("\\n\\nAt:\\n", " at ").replace("\\n", " ")).strip()
            causes.append(f"model '{name}' (version {version}) failed to load: {message}")
        elif line.startswith("error: ") or "address already in use" in line.lower():
            causes.append(line.strip())
    return list(dict.fromkeys(causes))


class TritonServer:
    """A tritonserver process on a model repository; a context manager that starts and stops it.

    Ports left as None are picked free. `http_url` and `grpc_url` are "host:port" as tritonclient
    takes them; `metrics_url` is the full Prometheus URL.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_verbose: int = 0,
        python_shm_mb: int = 64,
        exit_timeout_s: int = 3,
        ready_timeout_s: float = 300.0,
        log_path: str | os.PathLike | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} is not a directory")
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.log_verbose = log_verbose
        self.python_shm_mb = python_shm_mb
        self.exit_timeout_s = exit_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = tuple(extra_args)
        self._given_log_path = Path(log_path).resolve() if log_path else None
        self.binary, self.bundle = find_tritonserver()
        self.ports: tuple[int, int, int] | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._workdir: Path | None = None
        # The Python backend's shared-memory regions (/dev/shm, 64 MiB per model instance) are
        # named from this prefix, so that stop() can remove what a server left behind: one that
        # hits its exit timeout (a model still unloading) exits without unlinking them. 2 of a
        # tiny repository's 5 were left at every stop here, and 312 had piled up (20 GiB of RAM).
        self.shm_prefix = f"qwen3vl_{os.getpid()}_{uuid.uuid4().hex[:8]}_"

    # --- addresses -----------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self._require_ports()[0]}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self._require_ports()[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._require_ports()[2]}/metrics"

    def _require_ports(self) -> tuple[int, int, int]:
        if self.ports is None:
            raise RuntimeError("the server has not been started")
        return self.ports

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        """Start the server and wait until it is ready; raise ServerStartError with its log if not.

        Picked ports can be taken by another process between picking and binding: then it retries
        with new ones (given ports are not retried). After a failure the log is kept on disk.
        """
        problem = bundled_stub_problem(self.bundle)
        if problem:
            raise ServerStartError(problem)
        self._workdir = Path(tempfile.mkdtemp(prefix="serve-repo-"))
        try:
            backends = bundle_backends(self.bundle, self._workdir) if self.bundle else None
            stub_bin = stub_python_env(self._workdir) if self.bundle else None
            self.log_path = self._given_log_path or self._workdir / "tritonserver.log"
            attempts = 1 if all(self._fixed_ports) else 3
            for attempt in range(attempts):
                picked = iter(free_ports(3))
                self.ports = tuple(p if p else next(picked) for p in self._fixed_ports)
                log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
                self._launch(backends, stub_bin)
                try:
                    self._wait_ready()
                    return self
                except ServerStartError as err:
                    self._terminate()
                    log = self._read_log(log_start)
                    if attempt + 1 < attempts and "address already in use" in log.lower():
                        continue
                    self._keep_log()
                    raise ServerStartError(self._failure_message(str(err), log)) from None
        except BaseException:
            self._keep_log()
            self.stop()
            raise

    def _command(self, backends: Path | None) -> list[str]:
        http, grpc, metrics = self._require_ports()
        shm = self.python_shm_mb * 1024 * 1024
        cmd = [
            str(self.binary),
            f"--model-repository={self.repository}",
            f"--http-port={http}",
            f"--grpc-port={grpc}",
            f"--metrics-port={metrics}",
            # A stopping server holds its ports this long; the default (30 s) stalls restarts.
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            # Images and embeddings cross the Python stub's shared memory; the 1 MB default is small.
            f"--backend-config=python,shm-default-byte-size={shm}",
            f"--backend-config=python,shm-growth-byte-size={shm}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if backends:
            cmd.append(f"--backend-directory={backends}")
        return cmd + list(self.extra_args)

    def _launch(self, backends: Path | None, stub_bin: Path | None) -> None:
        with open(self.log_path, "ab") as log:
            # Own session: Ctrl-C in a terminal reaches only us, and stop() can end the whole
            # group, stub processes included.
            self._proc = subprocess.Popen(
                self._command(backends),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_environment(self.bundle, stub_bin),
                # The stubs put "" (the working folder) first on sys.path: a private folder keeps
                # model imports independent of where the server was started from.
                cwd=self._workdir,
                start_new_session=True,
                preexec_fn=parent_death_signal(),
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerStartError(f"tritonserver exited with code {code} while starting")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or listening but some model is still loading
            if time.monotonic() > deadline:
                raise ServerStartError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s")
            time.sleep(0.2)

    def _read_log(self, start: int = 0) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(start)
            return f.read().decode("utf-8", errors="replace")

    def _keep_log(self) -> None:
        """Move a temporary log out of the folder that stop() removes, so a failure can be read."""
        if self.log_path and self.log_path.parent == self._workdir and self.log_path.exists():
            fd, kept = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            shutil.move(self.log_path, kept)
            self.log_path = Path(kept)

    def _failure_message(self, headline: str, log: str) -> str:
        causes = failure_causes(log)
        lines = [f"{headline} (repository {self.repository})"]
        lines += [f"  {c}" for c in causes] or ["  log tail:"] + [f"    {ln}" for ln in log.splitlines()[-20:]]
        lines.append(f"full log: {self.log_path}")
        return "\n".join(lines)

    def log_tail(self, max_lines: int = 50) -> str:
        """The last lines of the server's log ("" before it starts)."""
        return "\n".join(self._read_log().splitlines()[-max_lines:])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        """Block until the server exits on its own; return its exit code."""
        return self._proc.wait()

    def _terminate(self) -> None:
        """SIGTERM, wait for the server's own shutdown, then kill the whole process group."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stubs the server left behind, if any
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the server and remove its temporary files (a log at a given log_path is kept)."""
        self._terminate()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve-repo", description="Serve a Triton model repository.")
    p.add_argument("repository", help="model repository folder (e.g. the output of build-repo)")
    # Triton's own defaults, which clients and perf_analyzer assume; 0 picks a free port.
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (0: a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument("--python-shm-mb", type=int, default=64, help="Python backend shared memory per model instance")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every model to load")
    p.add_argument("--log-file", help="keep the server's log here (default: a temporary file)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`serve-repo`: start tritonserver, print its addresses, serve until Ctrl-C or SIGTERM."""
    args = _parse_args(argv)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server = TritonServer(
            args.repository,
            http_port=args.http_port or None,
            grpc_port=args.grpc_port or None,
            metrics_port=args.metrics_port or None,
            log_verbose=args.log_verbose,
            python_shm_mb=args.python_shm_mb,
            ready_timeout_s=args.ready_timeout,
            log_path=args.log_file,
        )
    except FileNotFoundError as err:
        print(f"serve-repo: {err}", file=sys.stderr)
        return 2
    origin = "PATH" if server.bundle is None else "nvidia-pytriton"
    print(f"serve-repo: starting {server.binary} (from {origin}) on {server.repository} ...", file=sys.stderr, flush=True)
    try:
        server.start()
    except ServerStartError as err:
        print(f"serve-repo: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"HTTP     {server.http_url}", flush=True)
    print(f"gRPC     {server.grpc_url}", flush=True)
    print(f"metrics  {server.metrics_url}", flush=True)
    print(f"serve-repo: ready; log at {server.log_path}; Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        code = server.wait()
        print(f"serve-repo: tritonserver exited with code {code}\n{server.log_tail(30)}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        print("serve-repo: stopping ...", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
