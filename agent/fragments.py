"""Fragments of peers' snapshots held by this agent: shared memory within the memory budget.

Per (job, rank) the store keeps the fragments of the newest complete version (generation,
then step) and at most one upload in flight. A fragment is complete only when every chunk
and the whole fragment match their crc32c; only then does it enter the (job, rank)'s
manifest, written atomically, so a restarted agent re-adopts exactly the complete fragments
and unlinks the rest. The decisions (header checks, placement, which set to keep) are the
pure functions at the top.
"""

from __future__ import annotations

import enum
import json
import logging
import secrets
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import crc32c

from memckpt.agent.erasure import Scheme
from memckpt.agent.shm import Segment, ShmDir
from memckpt.agent.slots import MemoryBudget, RankKey
from memckpt.coordinator.cluster import Held
from memckpt.coordinator.groups import choose_fragment_holders
from memckpt.errors import CorruptSnapshot, InvalidRequest, MemckptError, NotFound, PermissionDenied, StaleGeneration
from memckpt.names import check_name
from memckpt.sizes import format_size

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 4 << 20
MAX_META_BYTES = 16 << 20
SERVE_CHUNK_BYTES = 2 << 20  # with its header a message stays under gRPC's default 4 MiB receive limit
MANIFEST_MAGIC = b"memckpt-fragments-v1\n"

# -- pure decisions ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FragmentHeader:
    """Fragment `index` of the (k, m) encoding of a rank's snapshot, as its sender describes it."""

    job: str
    rank: int
    step: int
    generation: int
    index: int
    k: int
    m: int
    size_bytes: int  # of the whole snapshot
    fragment_bytes: int  # ceil(size_bytes / k)
    owner: str  # node whose rank the snapshot is
    crc32c: int  # of the whole fragment
    meta: str = ""  # the snapshot's layout and small values (JSON), so any k holders can restore it
    meta_crc32c: int = 0
    snapshot_checksums: tuple[int, ...] = ()  # the owner's, of the whole snapshot: a rebuild is verified

    @property
    def key(self) -> RankKey:
        return RankKey(job=self.job, rank=self.rank)

    @property
    def version(self) -> tuple[int, int]:
        """Newer generations win over any step of older ones (a restored job may go back in steps)."""
        return (self.generation, self.step)

    def __str__(self) -> str:
        return f"{self.key} step {self.step} generation {self.generation} fragment {self.index} of k={self.k} m={self.m}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    data: bytes
    crc32c: int


def fragment_prefix(shm_prefix: str) -> str:
    """The shm prefix of fragments: a sibling of the slots' prefix, which the slot store's orphan sweep ignores."""
    return f"{shm_prefix.removesuffix('.')}-frag."


def check_header(header: FragmentHeader) -> None:
    """Raises InvalidRequest unless the header is self-consistent (sizes, index, names)."""
    check_name(header.job, "job")
    check_name(header.owner, "owner node")
    if header.rank < 0 or header.step < 0 or header.generation < 0:
        raise InvalidRequest(f"{header}: rank, step and generation must be >= 0")
    scheme = Scheme(k=header.k, m=header.m, size_bytes=header.size_bytes)  # raises InvalidRequest
    if header.size_bytes == 0:
        raise InvalidRequest(f"{header}: an empty snapshot has no fragments")
    if not 0 <= header.index < header.k + header.m:
        raise InvalidRequest(f"{header}: fragment index must be in 0..{header.k + header.m - 1}")
    if header.fragment_bytes != scheme.fragment_bytes:
        raise InvalidRequest(f"{header}: fragment_bytes {header.fragment_bytes} != ceil(size / k) = {scheme.fragment_bytes}")
    if not 0 <= header.crc32c < 1 << 32:
        raise InvalidRequest(f"{header}: crc32c {header.crc32c} is not 32 bits")
    if len(header.meta) > MAX_META_BYTES:
        raise InvalidRequest(f"{header}: metadata of {len(header.meta)} bytes exceeds {MAX_META_BYTES}")
    if crc32c.crc32c(header.meta.encode()) != header.meta_crc32c:
        raise CorruptSnapshot(f"{header}: metadata checksum mismatch")


def check_placement(header: FragmentHeader, node: str, group: tuple[str, ...]) -> None:
    """Raises unless the coordinator's placement puts this fragment on `node`.

    StaleGeneration: the sender's view of the group and ours differ (retry after a heartbeat);
    PermissionDenied: both know the group and it places the fragment elsewhere.
    """
    if node not in group or header.owner not in group:
        raise StaleGeneration(
            f"{header} from {header.owner}: {node} and the owner are not both in this agent's group {list(group)}"
        )
    count = header.k + header.m
    if header.owner == node or count > len(group) - 1:
        raise PermissionDenied(f"{header}: group {list(group)} does not place it on {node}")
    holder = choose_fragment_holders(header.owner, group, count)[header.index]
    if holder != node:
        raise PermissionDenied(f"{header}: the placement puts it on {holder}, not on {node}")


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadDecision:
    accept: bool
    supersede: bool  # the upload in flight is abandoned for this one
    reason: str


def decide_upload(
    version: tuple[int, int], complete: tuple[int, int] | None, in_flight: tuple[int, int] | None
) -> UploadDecision:
    """Whether an upload of `version` may start, given the complete version held and the one in flight.

    Senders skip to their newest step, so an equal or newer upload replaces the one in flight
    (also a retry after a broken stream); an older one is refused.
    """
    if complete is not None and version < complete:
        return UploadDecision(accept=False, supersede=False, reason=f"version {version} is older than the complete {complete}")
    if in_flight is not None and version < in_flight:
        return UploadDecision(accept=False, supersede=False, reason=f"version {version} is older than {in_flight} in flight")
    if in_flight is not None:
        return UploadDecision(accept=True, supersede=True, reason=f"version {version} replaces {in_flight} in flight")
    return UploadDecision(accept=True, supersede=False, reason=f"version {version} accepted")


class Completion(enum.Enum):
    REPLACE = "replace"  # a newer version: its fragments replace every older one
    ADD = "add"  # the version held: the fragment joins (or replaces the same index of) the set
    DROP = "drop"  # older than what is held meanwhile


def decide_completion(version: tuple[int, int], complete: tuple[int, int] | None) -> Completion:
    if complete is None or version > complete:
        return Completion.REPLACE
    return Completion.ADD if version == complete else Completion.DROP


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredFragment:
    header: FragmentHeader
    segment: str


def encode_fragment_manifest(fragments: Iterable[StoredFragment]) -> bytes:
    body = json.dumps([{"header": asdict(f.header), "segment": f.segment} for f in fragments], sort_keys=True).encode()
    return MANIFEST_MAGIC + body + b"\n" + f"{zlib.crc32(body):08x}".encode()


def decode_fragment_manifest(data: bytes) -> tuple[StoredFragment, ...]:
    """Parses a fragment manifest; raises CorruptSnapshot if it is torn, foreign or inconsistent."""
    if not data.startswith(MANIFEST_MAGIC):
        raise CorruptSnapshot("fragment manifest has no memckpt header")
    body, _, trailer = data[len(MANIFEST_MAGIC) :].rpartition(b"\n")
    if trailer != f"{zlib.crc32(body):08x}".encode():
        raise CorruptSnapshot("fragment manifest checksum mismatch")
    try:
        fragments = tuple(
            StoredFragment(header=_header_from_json(e["header"]), segment=str(e["segment"])) for e in json.loads(body)
        )
        for f in fragments:
            check_header(f.header)
    except (KeyError, TypeError, ValueError, InvalidRequest) as exc:
        raise CorruptSnapshot(f"fragment manifest is malformed: {exc!r}") from exc
    if len({(f.header.key, f.header.version) for f in fragments}) > 1:
        raise CorruptSnapshot("fragment manifest mixes ranks or versions")
    return fragments


def _header_from_json(raw: dict[str, object]) -> FragmentHeader:
    raw = dict(raw)
    raw["snapshot_checksums"] = tuple(int(c) for c in raw.get("snapshot_checksums", ()))  # type: ignore[attr-defined]
    return FragmentHeader(**raw)  # type: ignore[arg-type]


def held_entry(fragments: tuple[StoredFragment, ...]) -> Held:
    """The inventory entry of one (job, rank)'s complete fragments (all of one version)."""
    h = fragments[0].header
    indices = tuple(sorted(f.header.index for f in fragments))
    return Held(
        job=h.job,
        rank=h.rank,
        step=h.step,
        generation=h.generation,
        fragment_indices=indices,
        k=h.k,
        m=h.m,
        size_bytes=h.size_bytes,
    )


def iter_chunks(view: memoryview, chunk_bytes: int = SERVE_CHUNK_BYTES) -> Iterator[Chunk]:
    """Copies of `view` in chunks, each with its crc32c."""
    for start in range(0, len(view), chunk_bytes):
        data = bytes(view[start : start + chunk_bytes])
        yield Chunk(data=data, crc32c=int(crc32c.crc32c(data)))


# -- the store -----------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Upload:
    """One fragment being received. Only its receiving thread writes, closes or unlinks its segment."""

    header: FragmentHeader
    name: str
    segment: Segment
    received_bytes: int = 0
    crc32c: int = 0
    cancelled: bool = False  # set under the store's lock when a newer upload supersedes this one


@dataclass(slots=True, kw_only=True)
class _RankFragments:
    complete: dict[int, StoredFragment] = field(default_factory=dict)  # by index; all of one version
    upload: _Upload | None = None

    @property
    def version(self) -> tuple[int, int] | None:
        return next((f.header.version for f in self.complete.values()), None)


class FragmentStore:
    """Fragments this agent holds for its group's peers. Thread-safe.

    Call order: `adopt()` once at start; then `put()` per received fragment (the servicer's
    thread runs it to the end) and `open_fragment()` to serve one; `stop()` last.
    """

    def __init__(
        self, *, shm: ShmDir, prefix: str, budget: MemoryBudget, node: str, group: Callable[[], tuple[str, ...]]
    ) -> None:
        self._shm = shm
        self._prefix = prefix
        self._budget = budget  # shared with the slot store
        self._node = node
        self._group = group  # node names of this agent's current protection group (from the coordinator)
        self._lock = threading.Lock()
        self._ranks: dict[RankKey, _RankFragments] = {}
        self._segments: dict[str, Segment] = {}  # complete fragments' segments, by name

    def adopt(self) -> int:
        """Re-adopts complete fragments named by manifests in shm, unlinks everything else; returns fragments adopted."""
        with self._lock:
            for name in self._shm.list_names(self._prefix):
                if name.endswith(".manifest"):
                    self._adopt_manifest(name)
            keep = {self._manifest_name(k) for k in self._ranks} | set(self._segments)
            for name in self._shm.list_names(self._prefix):
                if name not in keep:
                    log.info("removing orphan fragment segment name=%s", name)
                    self._shm.unlink(name)
            return len(self._segments)

    def put(self, header: FragmentHeader, chunks: Iterable[Chunk]) -> int:
        """Receives one fragment; it is kept only if it is whole and matches its checksums.

        Returns the bytes stored. Raises InvalidRequest, StaleGeneration, PermissionDenied,
        BudgetExceeded or CorruptSnapshot; on any error nothing of this upload is kept.
        """
        check_header(header)
        check_placement(header, self._node, self._group())
        upload = self._begin(header)
        try:
            for chunk in chunks:
                self._write(upload, chunk)
            self._finish(upload)
        except BaseException:
            self._discard(upload)
            raise
        log.info("stored %s from %s bytes=%d", header, header.owner, header.fragment_bytes)
        return header.fragment_bytes

    def open_fragment(self, job: str, rank: int, index: int, step: int | None) -> tuple[FragmentHeader, memoryview]:
        """A verified complete fragment: its header and a view of its bytes.

        The view aliases the shm mapping, which stays mapped while the view lives, even if a
        newer set replaces the fragment meanwhile. Raises NotFound or CorruptSnapshot.
        """
        key = RankKey(job=check_name(job, "job"), rank=rank)
        with self._lock:
            entry = self._ranks.get(key)
            stored = entry.complete.get(index) if entry is not None else None
            if stored is None or (step is not None and stored.header.step != step):
                held = entry.version if entry is not None else None
                raise NotFound(f"{key}: no complete fragment {index} of step {step} here (holding version {held})")
            view = self._segments[stored.segment].buffer[: stored.header.fragment_bytes]
        found = int(crc32c.crc32c(view))
        if found != stored.header.crc32c:
            raise CorruptSnapshot(f"{stored.header}: stored bytes have crc32c {found:08x}, expected {stored.header.crc32c:08x}")
        return stored.header, view

    def held(self) -> tuple[Held, ...]:
        """The complete fragments held here, one entry per (job, rank, version), for the coordinator's inventory."""
        with self._lock:
            sets = [tuple(e.complete.values()) for e in self._ranks.values() if e.complete]
        return tuple(held_entry(fragments) for fragments in sets)

    def stop(self, remove: bool) -> None:
        """Unmaps every fragment; with `remove`, unlinks them and their manifests too."""
        with self._lock:
            for key, entry in self._ranks.items():
                if entry.upload is not None:
                    entry.upload.cancelled = True  # its thread closes it; the name goes now
                    self._shm.unlink(entry.upload.name)
                for stored in entry.complete.values():
                    self._drop_segment(stored.segment, unlink=remove)
                if remove:
                    self._shm.unlink(self._manifest_name(key))
            self._ranks.clear()

    # -- internals -----------------------------------------------------------------

    def _begin(self, header: FragmentHeader) -> _Upload:
        with self._lock:
            entry = self._ranks.setdefault(header.key, _RankFragments())
            in_flight = entry.upload.header.version if entry.upload is not None else None
            decision = decide_upload(header.version, entry.version, in_flight)
            if not decision.accept:
                raise StaleGeneration(f"{header}: {decision.reason}")
            if decision.supersede and entry.upload is not None:
                log.info("%s: %s", header, decision.reason)
                entry.upload.cancelled = True
                self._budget.release(entry.upload.name)
                entry.upload = None
            name = self._new_segment_name(header)
            self._budget.reserve(name, header.fragment_bytes, f"{header} ({format_size(header.fragment_bytes)})")
            try:
                segment = self._shm.create_segment(name, header.fragment_bytes)
            except BaseException:
                self._budget.release(name)
                raise
            entry.upload = _Upload(header=header, name=name, segment=segment)
            return entry.upload

    def _write(self, upload: _Upload, chunk: Chunk) -> None:
        header, size = upload.header, len(chunk.data)
        if size > MAX_CHUNK_BYTES:
            raise InvalidRequest(f"{header}: chunk of {format_size(size)} exceeds {format_size(MAX_CHUNK_BYTES)}")
        if upload.received_bytes + size > header.fragment_bytes:
            raise InvalidRequest(f"{header}: chunks run past fragment_bytes {header.fragment_bytes}")
        found = int(crc32c.crc32c(chunk.data))
        if found != chunk.crc32c:
            raise CorruptSnapshot(
                f"{header}: chunk at byte {upload.received_bytes} has crc32c {found:08x}, sent {chunk.crc32c:08x}"
            )
        if upload.cancelled:  # read without the lock: a stale False costs one more chunk copy, never memory safety
            raise StaleGeneration(f"{header}: superseded by a newer upload")
        upload.segment.buffer[upload.received_bytes : upload.received_bytes + size] = chunk.data
        upload.crc32c = int(crc32c.crc32c(chunk.data, value=upload.crc32c))
        upload.received_bytes += size

    def _finish(self, upload: _Upload) -> None:
        header = upload.header
        if upload.received_bytes != header.fragment_bytes:
            raise InvalidRequest(f"{header}: received {upload.received_bytes} of {header.fragment_bytes} bytes")
        if upload.crc32c != header.crc32c:
            raise CorruptSnapshot(f"{header}: fragment has crc32c {upload.crc32c:08x}, header says {header.crc32c:08x}")
        with self._lock:
            entry = self._ranks.get(header.key)
            if upload.cancelled or entry is None or entry.upload is not upload:
                raise StaleGeneration(f"{header}: superseded by a newer upload")
            completion = decide_completion(header.version, entry.version)
            if completion is Completion.DROP:
                raise StaleGeneration(f"{header}: a newer version {entry.version} completed meanwhile")
            replaced = list(entry.complete.values()) if completion is Completion.REPLACE else []
            if completion is Completion.ADD and header.index in entry.complete:
                replaced = [entry.complete[header.index]]
            for old in replaced:
                del entry.complete[old.header.index]
            entry.complete[header.index] = StoredFragment(header=header, segment=upload.name)
            self._segments[upload.name] = upload.segment
            entry.upload = None
            # the manifest names the new set before the old segments go: a crash in between leaves orphans, never a hole
            self._shm.write_file_atomic(self._manifest_name(header.key), encode_fragment_manifest(entry.complete.values()))
            for old in replaced:
                self._drop_segment(old.segment, unlink=True)

    def _discard(self, upload: _Upload) -> None:
        with self._lock:
            entry = self._ranks.get(upload.header.key)
            if entry is not None and entry.upload is upload:
                entry.upload = None
            if entry is not None and entry.upload is None and not entry.complete:
                del self._ranks[upload.header.key]
            if upload.name not in self._segments:  # not completed: the upload's segment is ours to drop
                self._budget.release(upload.name)
                upload.segment.close()
                self._shm.unlink(upload.name)

    def _drop_segment(self, name: str, unlink: bool) -> None:
        segment = self._segments.pop(name, None)
        if segment is not None:
            segment.close()  # readers' views keep the mapping alive until they are done
        if unlink:
            self._shm.unlink(name)
        self._budget.release(name)

    def _new_segment_name(self, header: FragmentHeader) -> str:
        # a random suffix: a re-sent fragment never reuses (and so never unlinks) the name of one held
        h = header
        return f"{self._prefix}{h.job}.r{h.rank}.f{h.index}.s{h.step}.g{h.generation}.{secrets.token_hex(4)}"

    def _manifest_name(self, key: RankKey) -> str:
        return f"{self._prefix}{key.job}.r{key.rank}.manifest"

    def _adopt_manifest(self, name: str) -> None:
        try:
            fragments = decode_fragment_manifest(self._shm.read_file(name))
        except (MemckptError, OSError) as exc:
            log.error("ignoring fragment manifest name=%s: %s", name, exc)
            return
        entry = _RankFragments()
        for stored in fragments:
            try:
                segment = self._shm.open_segment(stored.segment)
            except (MemckptError, OSError) as exc:
                log.error("cannot adopt %s: %s; dropping it", stored.header, exc)
                continue
            if segment.size_bytes < stored.header.fragment_bytes:
                log.error("cannot adopt %s: segment of %d bytes; dropping it", stored.header, segment.size_bytes)
                segment.close()
                continue
            entry.complete[stored.header.index] = stored
            self._segments[stored.segment] = segment
            self._budget.adopt(stored.segment, stored.header.fragment_bytes)  # already in memory: counted, never refused
        if not entry.complete:
            return
        key = next(iter(entry.complete.values())).header.key
        if name != self._manifest_name(key):
            log.error("fragment manifest name=%s describes %s; ignoring it", name, key)
            for stored in entry.complete.values():
                self._drop_segment(stored.segment, unlink=False)
            return
        self._ranks[key] = entry
        self._shm.write_file_atomic(name, encode_fragment_manifest(entry.complete.values()))
        log.info("adopted fragments of %s version=%s indices=%s", key, entry.version, sorted(entry.complete))
