"""Start and stop a local `redis-server` process: the launcher's prefix index when no Redis URL
is given (`pdserve up`), and the tests' real Redis.

- `start_redis_server(work_dir)` starts one redis-server bound to 127.0.0.1 on a free port (or
  the `port` given, e.g. to restart on the same address after a kill), with no persistence
  (`--save '' --appendonly no`) and its working dir and log under `work_dir`. It returns
  `(port, Popen)` once the server answers PING, and raises RuntimeError otherwise.
- `stop_redis_server(proc)` stops exactly that process (by its Popen, never by name).
- `running_redis_server(work_dir)` is the context-manager form of the two.
- `REDIS_SERVER` is the binary's path, or None when it is not on PATH.
- `tls=RedisTLS(cert, key, ca)` serves TLS only (`--port 0 --tls-port P`), requiring client
  certificates signed by `ca` when `client_cert`/`client_key` are given (the readiness PING
  presents them). A redis-server built without TLS fails to start (RuntimeError, log tail).

Only the standard library: no redis-py needed to import this.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
SKIP_REASON = "redis-server is not on PATH (apt-get install -y redis-server)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RedisTLS:
    """PEM files for a TLS-only redis-server. With client_cert/client_key, clients must
    present a certificate signed by `ca_file` (`--tls-auth-clients yes`)."""

    cert_file: str
    key_file: str
    ca_file: str
    client_cert: str | None = None
    client_key: str | None = None

    def server_args(self, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", self.cert_file,
                "--tls-key-file", self.key_file, "--tls-ca-cert-file", self.ca_file,
                "--tls-auth-clients", "yes" if self.client_cert else "no"]

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.client_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def ping(port: int, password: str | None = None, timeout_s: float = 0.2,
         tls: ssl.SSLContext | None = None) -> bool:
    """True when a Redis server on 127.0.0.1:port answers PING (raw RESP, no client lib;
    over TLS with `tls`)."""
    try:
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection(("127.0.0.1", port),
                                                             timeout=timeout_s))
            if tls is not None:
                s = stack.enter_context(tls.wrap_socket(s, server_hostname="127.0.0.1"))
            if password is not None:
                s.sendall(_resp("AUTH", password))
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(_resp("PING"))
            return s.recv(64).startswith(b"+PONG")
    except OSError:  # ssl.SSLError included
        return False


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def start_redis_server(
    work_dir: Path,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    password: str | None = None,
    timeout_s: float = 10.0,
    tls: RedisTLS | None = None,
) -> tuple[int, subprocess.Popen]:
    if REDIS_SERVER is None:
        raise RuntimeError(SKIP_REASON)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # A port picked by free_port() can be taken by someone else before redis binds it; try a
    # few fresh ones. A caller-chosen port (a restart) gets exactly one try.
    attempts = 1 if port is not None else 3
    last_log = ""
    for _ in range(attempts):
        p = port if port is not None else free_port()
        log = work_dir / f"redis-{p}.log"
        args = [
            REDIS_SERVER, "--port", str(p), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(work_dir), "--logfile", str(log),
            "--daemonize", "no", *extra_args,
        ]
        if password is not None:
            args += ["--requirepass", password]
        if tls is not None:
            args[args.index("--port"):args.index("--port") + 2] = tls.server_args(p)
        ctx = tls.client_context() if tls is not None else None
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if ping(p, password, tls=ctx):
                return p, proc
            time.sleep(0.02)
        stop_redis_server(proc)
        last_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"redis-server did not start; log tail:\n{last_log}")


def stop_redis_server(proc: subprocess.Popen, kill: bool = False) -> None:
    """Stop the server we started: SIGTERM (or SIGKILL for `kill=True`), then reap it."""
    if proc.poll() is not None:
        return
    if kill:
        proc.kill()
    else:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextlib.contextmanager
def running_redis_server(
    work_dir: Path, port: int | None = None, extra_args: Sequence[str] = (),
    password: str | None = None, tls: RedisTLS | None = None,
) -> Iterator[tuple[int, subprocess.Popen]]:
    port, proc = start_redis_server(work_dir, port, extra_args, password, tls=tls)
    try:
        yield port, proc
    finally:
        stop_redis_server(proc)
