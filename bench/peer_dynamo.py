"""NVIDIA Dynamo 1.6.1 (frontend + mocker) as a benchmark peer, on loopback only.

Follows /work/shared/peers/dynamo.md: file discovery, TCP request plane, NATS event
plane (the default ZMQ event plane binds 0.0.0.0 and is never used), every host
variable pinned to 127.0.0.1.  The venv comes from ``bench/setup_dynamo_peer.sh``.

    async with DynamoPeer(model_dir, run_dir) as peer:
        print(peer.base_url, peer.model)

Also holds the small process helpers the benchmark scripts share: each child is
started in a session (process group) of its own, remembered by PID, and torn down
by signalling that group only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PEER_PY = ROOT / ".peers" / "dynamo" / "bin" / "python"
NATS_SERVER = ROOT / ".venv" / "bin" / "nats-server"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """One child process, leader of its own process group (start_new_session)."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def spawn(
    name: str,
    argv: list[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")
    try:
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        log.close()
    with open(log_dir / "pids.txt", "a") as f:
        f.write(f"{popen.pid} {name} {' '.join(argv)}\n")
    return Proc(name, popen, log_path)


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, starttime) for every live process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rfind(")") + 2 :].split()
        out[int(d)] = (int(f[1]), int(f[2]), int(f[19]))
    return out


def group_pids(pgids: list[int]) -> list[int]:
    """Live PIDs in our process groups plus all their descendants, including children
    that moved to a session of their own (e.g. an embedded nats-server)."""
    table = _proc_table()
    want = set(pgids)
    fam = {pid for pid, (_, pg, _) in table.items() if pg in want}
    kids: dict[int, list[int]] = {}
    for pid, (pp, _, _) in table.items():
        kids.setdefault(pp, []).append(pid)
    todo = list(fam)
    while todo:
        for c in kids.get(todo.pop(), ()):
            if c not in fam:
                fam.add(c)
                todo.append(c)
    return sorted(fam)


def stop(procs: list[Proc], grace_s: float = 10.0) -> list[str]:
    """SIGTERM each process group we created (servers, then nats), wait ``grace_s``,
    then SIGKILL the groups and any descendant that left them (snapshotted first, by
    PID and start time, so a reused PID is never hit).  Returns notes on anything that
    needed force, for the report."""
    notes: list[str] = []
    table = _proc_table()
    family = {pid: table[pid][2] for pid in group_pids([p.pid for p in procs]) if pid in table}
    # servers first, the message bus they talk over last (so they can drain)
    for phase in (
        [p for p in procs if "nats" not in p.name],
        [p for p in procs if "nats" in p.name],
    ):
        for p in reversed(phase):
            if p.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in reversed(phase):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                notes.append(f"{p.name} (pid {p.pid}) still running {grace_s:.0f}s after SIGTERM")
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=5)
    leaders = {p.pid for p in procs}
    left = [pid for pid, st in family.items() if pid not in leaders]
    if left:
        time.sleep(0.2)
        now = _proc_table()
        for pid in left:
            if pid in now and now[pid][2] == family[pid]:
                name = _comm(pid)
                if _state(pid) == "Z":
                    continue  # zombie: already dead, waiting for its reaper
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    notes.append(f"orphaned descendant {name} (pid {pid}) killed")
    return notes


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2]
    except (OSError, IndexError):
        return "?"


_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgids: list[int]) -> float:
    """Cumulative user+system CPU seconds of every live process in our groups
    (children already reaped are not counted; our servers keep theirs alive)."""
    total = 0
    for pid in group_pids(pgids):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            f = stat[stat.rfind(")") + 2 :].split()
            total += int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    return total / _TICK


def non_loopback_listeners(pgids: list[int]) -> list[str]:
    """TCP/UDP sockets in LISTEN (or bound UDP) state, owned by our process groups,
    whose local address is not loopback. Empty list = everything stays on 127.0.0.1."""
    inodes: dict[str, int] = {}
    for pid in group_pids(pgids):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    tgt = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if tgt.startswith("socket:["):
                        inodes[tgt[8:-1]] = pid
    bad = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if inode not in inodes or (proto.startswith("tcp") and state != "0A"):
                    continue
                addr = local.split(":")[0]
                if addr[-8:] == "0100007F" or addr == "0" * 24 + "01000000":
                    continue  # 127.0.0.1 / ::1
                bad.append(f"{proto} {local} pid={inodes[inode]}")
    return bad


async def wait_tcp(host: str, port: int, timeout_s: float, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        _raise_if_dead(procs)
        try:
            _, w = await asyncio.open_connection(host, port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not listening after {timeout_s}s") from None
            await asyncio.sleep(0.1)


async def wait_http(
    url: str,
    timeout_s: float,
    procs: list[Proc],
    want_model: bool = False,
) -> list[str]:
    """Poll ``url`` until 200 (and, if want_model, until /v1/models lists a model)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
        while True:
            _raise_if_dead(procs)
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with s.get(url) as r:
                    if r.status == 200:
                        if not want_model:
                            return []
                        ids = [m["id"] for m in (await r.json()).get("data", [])]
                        if ids:
                            return ids
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout_s}s")
            await asyncio.sleep(0.25)


def _raise_if_dead(procs: list[Proc]) -> None:
    for p in procs:
        if not p.alive():
            raise RuntimeError(
                f"{p.name} (pid {p.pid}) exited with {p.popen.returncode}; "
                f"log {p.log_path}:\n{p.tail()}"
            )


def start_nats(run_dir: Path, name: str = "nats") -> tuple[Proc, int]:
    port = free_port()
    store = run_dir / f"{name}-store"
    store.mkdir(parents=True, exist_ok=True)
    # The same nats-server binary and Go scheduler setting dynamo-bus's embedded server
    # uses (see dynamo_bus/natsserver.py), so both systems get the same broker.
    from dynamo_bus.bus.natsserver import server_env

    p = spawn(
        name, [str(NATS_SERVER), "-a", LOOPBACK, "-p", str(port), "-js", "-sd", str(store)],
        run_dir, env=server_env(),
    )
    return p, port


@dataclass
class DynamoPeer:
    """Dynamo frontend + mocker (+ our own nats-server), started and stopped by PID."""

    model_dir: Path
    run_dir: Path
    num_workers: int = 4
    speedup: float = 1000.0
    block_size: int = 16
    router_mode: str = "kv"
    model_name: str | None = None
    log_level: str = "warn"
    ready_timeout_s: float = 180.0
    procs: list[Proc] = field(default_factory=list)
    base_url: str = ""
    model: str = ""
    startup_s: float = 0.0
    teardown_notes: list[str] = field(default_factory=list)
    stop_s: float = 0.0

    def env(self, nats_port: int) -> dict[str, str]:
        run = self.run_dir
        for d in ("home", "tmp", "kvstore"):
            (run / d).mkdir(parents=True, exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DYN_", "NATS_", "ETCD_", "VIRTUAL_ENV"))
        }
        env.update(
            {
                "DYN_FILE_KV": str(run / "kvstore"),
                "DYN_DISCOVERY_BACKEND": "file",
                "DYN_REQUEST_PLANE": "tcp",
                "DYN_EVENT_PLANE": "nats",
                "NATS_SERVER": f"nats://{LOOPBACK}:{nats_port}",
                "DYN_TCP_RPC_HOST": LOOPBACK,
                "DYN_TCP_RESPONSE_STREAM_HOST": LOOPBACK,
                "DYN_EVENT_PLANE_HOST": LOOPBACK,
                "DYN_SYSTEM_HOST": LOOPBACK,
                "DYN_HTTP_HOST": LOOPBACK,
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "HOME": str(run / "home"),
                "TMPDIR": str(run / "tmp"),
                "DYN_LOG": self.log_level,
                "PATH": f"{PEER_PY.parent}:{env.get('PATH', '/usr/bin:/bin')}",
            }
        )
        return env

    async def __aenter__(self) -> DynamoPeer:
        if not PEER_PY.exists():
            raise FileNotFoundError(f"{PEER_PY} missing: run bench/setup_dynamo_peer.sh")
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = self.model_name or Path(self.model_dir).name
        try:
            nats, nport = start_nats(self.run_dir)
            self.procs.append(nats)
            await wait_tcp(LOOPBACK, nport, 20, self.procs)
            env = self.env(nport)
            self.procs.append(
                spawn(
                    "dynamo-mocker",
                    [
                        str(PEER_PY),
                        "-m",
                        "dynamo.mocker",
                        "--model-path",
                        str(self.model_dir),
                        "--model-name",
                        name,
                        "--discovery-backend",
                        "file",
                        "--num-workers",
                        str(self.num_workers),
                        "--speedup-ratio",
                        f"{self.speedup:g}",
                        "--block-size",
                        str(self.block_size),
                    ],
                    self.run_dir,
                    env,
                    cwd=self.run_dir,
                )
            )
            http_port = free_port()
            self.procs.append(
                spawn(
                    "dynamo-frontend",
                    [
                        str(PEER_PY),
                        "-m",
                        "dynamo.frontend",
                        "--http-host",
                        LOOPBACK,
                        "--http-port",
                        str(http_port),
                        "--router-mode",
                        self.router_mode,
                        "--discovery-backend",
                        "file",
                        "--kv-cache-block-size",
                        str(self.block_size),
                    ],
                    self.run_dir,
                    env,
                    cwd=self.run_dir,
                )
            )
            self.base_url = f"http://{LOOPBACK}:{http_port}"
            ids = await wait_http(
                f"{self.base_url}/v1/models", self.ready_timeout_s, self.procs, want_model=True
            )
            self.model = name if name in ids else ids[0]
            self.startup_s = time.monotonic() - t0
            bad = non_loopback_listeners([p.pid for p in self.procs])
            if bad:
                raise RuntimeError(f"Dynamo peer listens beyond loopback: {bad}")
        except BaseException:
            stop(self.procs)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        t0 = time.monotonic()
        self.teardown_notes = await asyncio.to_thread(stop, self.procs)
        self.stop_s = time.monotonic() - t0


def peer_version() -> str:
    if not PEER_PY.exists():
        return "not installed"
    out = subprocess.run(
        [
            str(PEER_PY),
            "-c",
            "import importlib.metadata as m; print(m.version('ai-dynamo'), "
            "m.version('ai-dynamo-runtime'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return (
        f"ai-dynamo {out.stdout.strip().replace(' ', ', runtime ')}"
        if out.returncode == 0
        else "unknown"
    )


async def _main() -> None:  # smoke test: python bench/peer_dynamo.py MODEL_DIR
    model_dir = Path(sys.argv[1])
    run = ROOT / "bench" / ".runs" / f"dynamo-smoke-{int(time.time())}"
    async with DynamoPeer(model_dir, run) as peer:
        print(
            "ready",
            peer.base_url,
            peer.model,
            f"startup {peer.startup_s:.1f}s",
            "pids",
            [p.pid for p in peer.procs],
        )
    shutil.rmtree(run / "home", ignore_errors=True)
    print("stopped; logs in", run)


if __name__ == "__main__":
    asyncio.run(_main())
