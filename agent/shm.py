"""POSIX shared memory: the only module that maps segments. Used by the agent and the client.

On Linux a POSIX shm object is a file in /dev/shm; we use that directly so segments can be
created owner-only, pre-faulted and listed. Every segment is 0600 and owned by the job's
user; `open_segment` refuses one that is not.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import stat
from pathlib import Path

from memckpt.errors import BudgetExceeded, InvalidRequest, NotFound
from memckpt.names import safe_join
from memckpt.sizes import format_size

DEFAULT_ROOT = Path("/dev/shm")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class Segment:
    """A mapped shm segment. `buffer` aliases the mapping until `close()`."""

    def __init__(self, name: str, mapping: mmap.mmap, size_bytes: int, identity: tuple[int, int]) -> None:
        self.name = name
        self.size_bytes = size_bytes
        self.identity = identity  # (device, inode): tells a recreated segment of the same name apart
        self._mapping = mapping
        self.buffer = memoryview(mapping)

    def close(self) -> None:
        """Unmaps, or leaves the unmapping to the last view of it (a reader, a tensor) to go.

        Never fails: a reader still holding a slice keeps valid memory (the mapping lives on,
        even if the file was unlinked) until it drops the slice.
        """
        try:
            self.buffer.release()
            self._mapping.close()
        except BufferError:
            pass  # views still alias it; the mapping goes when they do

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {format_size(self.size_bytes)})"


class SegmentWriter:
    """Writes into a segment through its file, not through a mapping.

    The kernel copies into the segment's pages, and allocates a page that a write covers whole
    without zeroing it first; nothing is mapped into the writer. A first write through a fresh
    mapping instead zeroes and maps every page, one fault at a time: here about twice the CPU.
    Thread-safe: each write names its offset.
    """

    def __init__(self, name: str, fd: int, size_bytes: int) -> None:
        self.name = name
        self.size_bytes = size_bytes
        self._fd = fd

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Writes `data` at `offset`; InvalidRequest if it would run past the segment's end."""
        if offset < 0 or offset + len(data) > self.size_bytes:
            raise InvalidRequest(f"a write of {len(data)} bytes at {offset} runs outside segment {self.name} ({self.size_bytes})")
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)  # releases the GIL
            view, offset = view[written:], offset + written

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ShmDir:
    """Shared-memory objects of one agent, under `root` (normally /dev/shm)."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def create_segment(self, name: str, size_bytes: int) -> Segment:
        """Creates an owner-only segment with all its memory allocated (so a full /dev/shm fails here).

        The pages are not faulted in yet: `prefault` does that, off the caller's path.
        """
        path = safe_join(self.root, name)
        if path.exists():
            path.unlink()  # a leftover that no manifest adopted
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, max(size_bytes, 1))
            except OSError as exc:
                path.unlink(missing_ok=True)
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise BudgetExceeded(
                        f"shared memory in {self.root} is full: cannot allocate {format_size(size_bytes)} for {name}"
                    ) from exc
                raise
            return self._map(fd, name, size_bytes, populate=False)
        finally:
            os.close(fd)

    def prefault(self, name: str) -> None:
        """Faults every page of a segment in, once, so that a first copy into it runs at full speed.

        A first touch of fresh shared memory is several times slower than a copy into warm
        memory (BASELINES.md); done here, in the agent's background, nobody waits for it.
        """
        try:
            segment = self.open_segment(name)
        except (NotFound, InvalidRequest):
            return  # dropped or reallocated meanwhile
        segment.close()

    def open_segment(self, name: str) -> Segment:
        """Maps an existing segment read-write; it must be ours and private to us."""
        path = safe_join(self.root, name)
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as exc:
            raise NotFound(f"shared memory segment {name} does not exist in {self.root}") from exc
        try:
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise InvalidRequest(f"segment {name} is not private to uid {os.getuid()}; refusing it")
            return self._map(fd, name, info.st_size)
        finally:
            os.close(fd)

    def open_writer(self, name: str) -> SegmentWriter:
        """A writer into an existing segment of ours, private to us (see `SegmentWriter`)."""
        path = safe_join(self.root, name)
        try:
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as exc:
            raise NotFound(f"shared memory segment {name} does not exist in {self.root}") from exc
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            os.close(fd)
            raise InvalidRequest(f"segment {name} is not private to uid {os.getuid()}; refusing it")
        return SegmentWriter(name, fd, info.st_size)

    def is_same_segment(self, segment: Segment) -> bool:
        """Whether `segment` is still the file its name points to (not unlinked and recreated)."""
        try:
            info = safe_join(self.root, segment.name).stat()
        except FileNotFoundError:
            return False
        return (info.st_dev, info.st_ino) == segment.identity

    def unlink(self, name: str) -> None:
        safe_join(self.root, name).unlink(missing_ok=True)

    def write_file_atomic(self, name: str, data: bytes) -> None:
        """Writes a small file so that readers see the old or the new bytes, never a mix."""
        path = safe_join(self.root, name)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # tmpfs: no fsync needed, rename is the commit

    def read_file(self, name: str) -> bytes:
        """A small file's bytes, if it is a regular file of ours, private to us (never a link)."""
        fd = os.open(safe_join(self.root, name), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise InvalidRequest(f"{name} in {self.root} is not a private file of uid {os.getuid()}; ignored")
            return os.read(fd, info.st_size)
        finally:
            os.close(fd)

    def list_names(self, prefix: str) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.name.startswith(prefix))

    @staticmethod
    def _map(fd: int, name: str, size_bytes: int, populate: bool = True) -> Segment:
        if size_bytes == 0:
            size_bytes = 1
            os.ftruncate(fd, 1)
        mapping = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED | (_POPULATE if populate else 0))
        info = os.fstat(fd)
        return Segment(name, mapping, size_bytes, (info.st_dev, info.st_ino))
