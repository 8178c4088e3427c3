"""The disk tier's block files: where G3 keeps whole KV blocks, and how it checks them.

Under ``--kvbm-disk-dir`` each worker claims a subdirectory ``w<k>`` (the lowest one no
running process holds, by ``flock`` on its ``lock`` file), so a worker restarted with
the same directory finds its blocks again and several workers may share one directory.
Blocks live in files ``kv-<fingerprint>-<n>.blocks`` of up to 1 GiB, each created and
allocated in full when first needed (a full disk shows then, not halfway through a
write). A slot is a 4 KiB header, then the block's bytes padded to 4 KiB, so every
transfer is aligned for ``O_DIRECT`` (used where the filesystem allows it). The header
holds a magic, the format version, the fingerprint (model, block size, hash scheme, KV
layout), the block's hash, a write sequence number, the checksum (xxh3-64) of the
block's bytes, and the checksum of the header itself.

Transfers go through NIXL's POSIX backend (:mod:`dynamo_bus.kvbm.nixl`) between the
files and two staging buffers registered once (one for writes, one for reads). What is
trusted: ``open`` reads every slot's header and keeps the blocks whose header is whole
and names this fingerprint (files of another fingerprint are another model's: left
alone); ``read`` checks each block's checksum before handing its bytes on, so a
corrupt, truncated or foreign block is reported, never used.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from dynamo_bus.kvbm.nixl import (
    NixlError,
    make_agent,
    post_transfer,
    run_transfer,
    wait_transfer,
)

MAGIC = b"DYNBUSKV"
VERSION = 1
ALIGN = 4096                 # O_DIRECT: offsets, lengths and buffers on 4 KiB
HEADER_BYTES = ALIGN         # a slot's header, padded
FILE_BYTES = 1 << 30         # the most one block file holds
WRITE_STAGING_BYTES = 256 << 20  # blocks on their way out: a burst of evictions
READ_STAGING_BYTES = 64 << 20    # blocks on their way in, read in runs of this size
MAX_WORKER_DIRS = 1024
_HEADER = struct.Struct("<8sII16sQQQ")  # magic, version, data bytes, fingerprint, hash,
_CHECK = struct.Struct("<Q")            # sequence, data checksum; then the header's own


def fingerprint_digest(*parts: object) -> bytes:
    """16 bytes naming what a block's bytes mean: blocks are only ever read back by an
    engine whose digest is the same."""
    return xxhash.xxh3_128_digest("|".join(map(str, parts)).encode())


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def slot_bytes(block_bytes: int) -> int:
    """What one block takes on disk: its header, then its bytes padded to 4 KiB."""
    return HEADER_BYTES + _round_up(block_bytes, ALIGN)


def blocks_in(gib: float, block_bytes: int) -> int:
    """How many blocks of ``block_bytes`` a disk tier of ``gib`` GiB holds."""
    return int(gib * 2**30) // slot_bytes(block_bytes) if gib > 0 else 0


def _pack_header(fingerprint: bytes, block_hash: int, seq: int, data_bytes: int,
                 checksum: int) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, data_bytes, fingerprint, block_hash, seq, checksum)
    return head + _CHECK.pack(xxhash.xxh3_64_intdigest(head))


def _unpack_header(raw: bytes) -> tuple[bytes, int, int, int, int] | None:
    """(fingerprint, block hash, sequence, data bytes, data checksum) of a whole header
    of this format, else None."""
    n = _HEADER.size
    if len(raw) < n + _CHECK.size:
        return None
    head = raw[:n]
    if _CHECK.unpack_from(raw, n)[0] != xxhash.xxh3_64_intdigest(head):
        return None
    magic, version, data_bytes, fp, block_hash, seq, checksum = _HEADER.unpack(head)
    if magic != MAGIC or version != VERSION:
        return None
    return fp, block_hash, seq, data_bytes, checksum


class BlockFiles:
    """The disk tier's files; see the module docstring. Every method but ``stage`` runs
    in the tier's I/O thread; ``stage`` fills only the staging rows it is given."""

    def __init__(self, root: str | Path, capacity: int, *, block_shape: tuple[int, ...],
                 dtype: Any, fingerprint: bytes, staging_blocks: int = 0,
                 file_bytes: int = FILE_BYTES) -> None:
        import torch

        self.root = Path(root)
        self.capacity = capacity
        self.block_shape = block_shape
        self.dtype = dtype
        self.block_bytes = int(torch.empty((), dtype=dtype).element_size())
        for d in block_shape:
            self.block_bytes *= d
        self.slot_bytes = slot_bytes(self.block_bytes)
        self.slots_per_file = max(1, file_bytes // self.slot_bytes)
        self.fingerprint = fingerprint
        # Rows for blocks on their way out: what one burst of evictions may write
        # before the writes count as behind; and twice a run of blocks on the way in.
        self.write_rows = max(1, min(staging_blocks or WRITE_STAGING_BYTES // self.slot_bytes,
                                     capacity))
        self.read_rows = max(1, min(staging_blocks or READ_STAGING_BYTES // self.slot_bytes,
                                    capacity))
        self.directory: Path | None = None
        self.direct = False          # O_DIRECT on this filesystem
        self.seq = 0                 # the last write's sequence number
        self._lock_fd: int | None = None
        self._fds: dict[int, int] = {}           # file index -> fd
        self._file_regs: dict[int, Any] = {}
        self._agent: Any = None
        self._staging: dict[str, Any] = {}       # "write" / "read" -> [rows, slot_bytes]
        self._staging_regs: list[Any] = []

    # -- set-up -----------------------------------------------------------------------

    def open(self) -> tuple[list[tuple[int, int]], int]:
        """Claim a worker directory, set up NIXL and read back what is there: (the
        (slot, block hash) of every block found, oldest first; slots dropped)."""
        import torch

        self.root.mkdir(parents=True, exist_ok=True)
        self._claim()
        self.direct = self._probe_direct()
        self._agent = make_agent(f"kvbm-disk-{os.getpid()}-{id(self):x}", {"POSIX": {}})
        for name, n in (("write", self.write_rows), ("read", 2 * self.read_rows)):
            raw = torch.empty(n * self.slot_bytes + ALIGN, dtype=torch.uint8)
            start = (-raw.data_ptr()) % ALIGN
            rows = raw[start:start + n * self.slot_bytes].view(n, self.slot_bytes)
            self._staging[name] = rows
            self._staging_regs.append(self._agent.register_memory(
                [(rows.data_ptr(), rows.numel(), 0, "")], "DRAM"))
        return self._scan()

    def _claim(self) -> None:
        for k in range(MAX_WORKER_DIRS):
            d = self.root / f"w{k}"
            d.mkdir(exist_ok=True)
            fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd, self.directory = fd, d
            return
        raise OSError(errno.EBUSY, f"every worker directory under {self.root} is in use")

    def _probe_direct(self) -> bool:
        """Whether this filesystem takes ``O_DIRECT`` (tmpfs, for one, does not)."""
        assert self.directory is not None
        probe = self.directory / "direct.probe"
        try:
            os.close(os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False
        finally:
            probe.unlink(missing_ok=True)
        return True

    def _path(self, index: int) -> Path:
        assert self.directory is not None
        return self.directory / f"kv-{self.fingerprint.hex()[:16]}-{index:04d}.blocks"

    def _file_size(self, index: int) -> int:
        slots = min(self.slots_per_file, self.capacity - index * self.slots_per_file)
        return slots * self.slot_bytes

    def _scan(self) -> tuple[list[tuple[int, int]], int]:
        found: dict[int, tuple[int, int]] = {}  # hash -> (seq, slot)
        dropped = 0
        for index in range(-(-self.capacity // self.slots_per_file)):
            path = self._path(index)
            if not path.exists():
                continue
            size = path.stat().st_size
            with open(path, "rb", buffering=0) as f:
                for i in range(self._file_size(index) // self.slot_bytes):
                    offset = i * self.slot_bytes
                    if offset + self.slot_bytes > size:  # cut short: the rest is gone
                        dropped += offset < size
                        break
                    raw = os.pread(f.fileno(), 64, offset)
                    header = _unpack_header(raw)
                    if header is None:
                        dropped += any(raw)  # all zeros: a slot never written
                        continue
                    fp, block_hash, seq, data_bytes, _ = header
                    if fp != self.fingerprint or data_bytes != self.block_bytes:
                        dropped += 1
                        continue
                    slot = index * self.slots_per_file + i
                    self.seq = max(self.seq, seq)
                    old = found.get(block_hash)
                    if old is None or old[0] < seq:
                        found[block_hash] = (seq, slot)
            self._fd(index)  # reopen for transfers; a truncated file is allocated again
        order = sorted((seq, slot, h) for h, (seq, slot) in found.items())
        return [(slot, h) for _, slot, h in order], dropped

    def _fd(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is not None:
            return fd
        fd = os.open(self._path(index),
                     os.O_RDWR | os.O_CREAT | (os.O_DIRECT if self.direct else 0), 0o600)
        try:
            size = self._file_size(index)
            if os.fstat(fd).st_size < size:
                os.posix_fallocate(fd, 0, size)  # ENOSPC now, not halfway through a write
            self._file_regs[index] = self._agent.register_memory([(0, size, fd, "")], "FILE")
        except BaseException:
            os.close(fd)
            raise
        self._fds[index] = fd
        return fd

    def _where(self, slot: int) -> tuple[int, int]:
        index, i = divmod(slot, self.slots_per_file)
        return self._fd(index), i * self.slot_bytes

    def close(self) -> None:
        agent = self._agent
        if agent is not None:
            for reg in [*self._file_regs.values(), *self._staging_regs]:
                agent.deregister_memory(reg)
        self._file_regs.clear()
        self._staging_regs.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._agent = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the claim
            self._lock_fd = None

    # -- blocks out and in ------------------------------------------------------------

    def stage(self, row: int, block: Any) -> None:
        """Copy one block (a tensor of the block shape) into staging ``row`` for a
        following ``write``."""
        import torch

        dst = self._staging["write"][row, HEADER_BYTES:HEADER_BYTES + self.block_bytes]
        dst.copy_(block.reshape(-1).view(torch.uint8))

    def write(self, items: Sequence[tuple[int, int, int]]) -> None:
        """Write staged blocks: ``(slot, staging row, block hash)`` each."""
        staging = self._staging["write"]
        local, remote = [], []
        for slot, row, block_hash in items:
            data = staging[row, HEADER_BYTES:HEADER_BYTES + self.block_bytes].numpy()
            self.seq += 1
            header = _pack_header(self.fingerprint, block_hash, self.seq, self.block_bytes,
                                  xxhash.xxh3_64_intdigest(data))
            staging[row, :len(header)].numpy()[:] = np.frombuffer(header, dtype=np.uint8)
            fd, offset = self._where(slot)
            local.append((staging[row].data_ptr(), self.slot_bytes, 0))
            remote.append((offset, self.slot_bytes, fd))
        self._transfer("WRITE", local, remote)

    def read(self, slots: Sequence[int], hashes: Sequence[int],
             sink: Callable[[int, Any], None]) -> tuple[int, list[int]]:
        """Read the blocks ``hashes`` from ``slots`` in order, and hand each run of
        verified blocks to ``sink(first index, rows)``; stops at the first block that
        fails its checks. Runs are read ahead: the next one's transfer is under way
        while this one is checked and handed over. Returns (how many were handed over,
        the hashes found bad)."""
        n = self.read_rows
        runs = [(lo, min(lo + n, len(slots))) for lo in range(0, len(slots), n)]
        ahead = self._post_read(0, slots[:runs[0][1]]) if runs else None
        for k, (lo, hi) in enumerate(runs):
            buf = self._staging["read"][(k % 2) * n:(k % 2) * n + hi - lo]
            try:
                handle, ahead = ahead, None
                wait_transfer(self._agent, handle)
                ok = True
            except NixlError:
                ok = False
            if k + 1 < len(runs):
                ahead = self._post_read(((k + 1) % 2) * n, slots[hi:runs[k + 1][1]])
            try:
                if ok:
                    good = self._check(buf, hashes[lo:hi], lo, sink)
                else:  # read again, run by run, to tell a cut file from a failing disk
                    good = self._read_chunk(buf, slots[lo:hi], hashes[lo:hi], lo, sink)
            except BaseException:
                self._settle(ahead)
                raise
            if good < hi - lo:
                self._settle(ahead)
                return lo + good, [hashes[lo + good]]
        return len(slots), []

    def _post_read(self, row: int, slots: Sequence[int]) -> Any:
        staging = self._staging["read"]
        where = [self._where(s) for s in slots]
        agent = self._agent
        return post_transfer(
            agent, "READ",
            agent.get_xfer_descs([(staging[row + i].data_ptr(), self.slot_bytes, 0)
                                  for i in range(len(slots))], "DRAM"),
            agent.get_xfer_descs([(off, self.slot_bytes, fd) for fd, off in where], "FILE"),
            agent.name)

    def _settle(self, handle: Any) -> None:
        """Wait out a read ahead whose blocks are no longer wanted."""
        if handle is not None:
            try:
                wait_transfer(self._agent, handle)
            except NixlError:
                pass

    def _read_chunk(self, buf: Any, slots: Sequence[int], hashes: Sequence[int],
                    first: int, sink: Callable[[int, Any], None]) -> int:
        """Read and check one run without reading ahead; how many blocks are good."""
        where = [self._where(s) for s in slots]
        try:
            self._transfer("READ", [(buf[i].data_ptr(), self.slot_bytes, 0)
                                    for i in range(len(slots))],
                           [(off, self.slot_bytes, fd) for fd, off in where])
        except NixlError:
            # A file cut short reads short: the blocks from there on are bad, not the disk.
            cut = next((i for i, (fd, off) in enumerate(where)
                        if os.fstat(fd).st_size < off + self.slot_bytes), None)
            if cut is None:
                raise
            return self._read_chunk(buf, slots[:cut], hashes[:cut], first, sink) if cut else 0
        return self._check(buf, hashes, first, sink)

    def _check(self, buf: Any, hashes: Sequence[int], first: int,
               sink: Callable[[int, Any], None]) -> int:
        """Hand the leading blocks of ``buf`` that pass their checks to ``sink``; how
        many did."""
        good = 0
        while good < len(hashes) and self._verify(buf[good], hashes[good]):
            good += 1
        if good:
            rows = buf[:good, HEADER_BYTES:HEADER_BYTES + self.block_bytes]
            sink(first, rows.view(self.dtype).unflatten(1, self.block_shape))
        return good

    def _verify(self, slot: Any, block_hash: int) -> bool:
        header = _unpack_header(slot[:64].numpy().tobytes())
        if header is None:
            return False
        fp, h, _, data_bytes, checksum = header
        if fp != self.fingerprint or h != block_hash or data_bytes != self.block_bytes:
            return False
        data = slot[HEADER_BYTES:HEADER_BYTES + self.block_bytes].numpy()
        return bool(xxhash.xxh3_64_intdigest(data) == checksum)

    def _transfer(self, op: str, local: list[tuple[int, int, int]],
                  remote: list[tuple[int, int, int]]) -> None:
        agent = self._agent
        run_transfer(agent, op, agent.get_xfer_descs(local, "DRAM"),
                     agent.get_xfer_descs(remote, "FILE"), agent.name)
