"""Fragments of peers' snapshots held by this agent: shared memory within the memory budget.

Per (job, rank) the store keeps the fragments of at most two complete versions (generation,
then step) and one upload in flight: the newest, and the one the coordinator says every
rank of the job is protected at (without word from it, the one before the newest), so that
after a node loss some step can still be restored for every rank. A fragment is complete
only when every chunk and the whole fragment match their crc32c; only then does it enter
the (job, rank)'s manifest, written atomically, so a restarted agent re-adopts exactly the complete fragments
and unlinks the rest. The decisions (header checks, placement, which set to keep) are the
pure functions at the top. A dropped version's segment stays mapped (and budgeted) as the
rank's spare, which the next upload is received into in place: the memory a rank holds
peaks where it did (two versions and an upload), and no put pays for fresh shared memory.
While its node is drained the store takes no fragments, and drops each version the job's
kept step has caught up with (the coordinator counts that step without this node).
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import secrets
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import crc32c
import numpy as np

from memckpt.agent.checksum import gf2_times
from memckpt.agent.erasure import Scheme, populate
from memckpt.agent.shm import Segment, ShmDir
from memckpt.agent.slots import MemoryBudget, RankKey
from memckpt.coordinator.cluster import Held
from memckpt.coordinator.groups import can_hold, choose_fragment_holders
from memckpt.errors import (
    CorruptSnapshot,
    InvalidRequest,
    MemckptError,
    NotFound,
    PermissionDenied,
    StaleGeneration,
    Unavailable,
)
from memckpt.names import check_name, safe_join
from memckpt.sizes import format_size

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 4 << 20
MAX_META_BYTES = 16 << 20
SERVE_CHUNK_BYTES = (4 << 20) - (64 << 10)  # with its framing a message stays under gRPC's default 4 MiB receive limit
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
    kept_step: int = -1  # the job's kept step as the owner heard it from the coordinator (-1: none)
    kept_generation: int = 0

    @property
    def kept(self) -> tuple[int, int] | None:
        """(generation, step) the owner knew every rank of the job to be protected at, if any."""
        return None if self.kept_step < 0 else (self.kept_generation, self.kept_step)

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
    data: bytes | memoryview  # a view into a received message: copied once, into the fragment's segment
    crc32c: int | None  # None: a piece of a bulk stream (agent/bulk.py), covered by the fragment's crc32c alone


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


def check_placement(header: FragmentHeader, node: str, group: tuple[str, ...], draining: frozenset[str] = frozenset()) -> None:
    """Raises unless the coordinator's placement puts this fragment on `node`.

    StaleGeneration: the sender's view of the group and ours differ (retry after a heartbeat);
    PermissionDenied: both know the group and it places the fragment elsewhere (a `draining`
    member holds none).
    """
    if node not in group or header.owner not in group:
        raise StaleGeneration(
            f"{header} from {header.owner}: {node} and the owner are not both in this agent's group {list(group)}"
        )
    if node in draining:
        raise PermissionDenied(f"{header}: {node} is being drained and holds no fragments")
    count = header.k + header.m
    if header.owner == node or not can_hold(header.owner, group, count, draining):
        raise PermissionDenied(f"{header}: group {list(group)} does not place it on {node}")
    holder = choose_fragment_holders(header.owner, group, count, draining)[header.index]
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
    NEWEST = "newest"  # a newer version: it becomes the newest set; older ones are then pruned
    ADD = "add"  # the newest version: the fragment joins (or replaces the same index of) the set
    DROP = "drop"  # older than what is held meanwhile


def decide_completion(version: tuple[int, int], complete: tuple[int, int] | None) -> Completion:
    if complete is None or version > complete:
        return Completion.NEWEST
    return Completion.ADD if version == complete else Completion.DROP


def versions_to_keep(
    versions: Iterable[tuple[int, int]], kept: tuple[int, int] | None, draining: bool = False
) -> set[tuple[int, int]]:
    """Which complete versions of a rank stay: the newest, and the version every rank of the
    job is protected at (`kept`, from the coordinator), else the one before the newest.

    On a `draining` node only those newer than `kept`: the coordinator's kept step counts no
    fragment of a draining node, so what it kept is held by others; a newer version may still
    be the newest its rank has anywhere, until the job's kept step reaches it.
    """
    if draining:
        return set(versions) if kept is None else {v for v in versions if v > kept}
    ordered = sorted(set(versions), reverse=True)
    keep = set(ordered[:1])
    if kept is not None and kept in ordered:
        keep.add(kept)
    elif len(ordered) > 1:
        keep.add(ordered[1])
    return keep


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredFragment:
    header: FragmentHeader
    segment: str


# what a header says about the moment it was sent, not about the fragment: never in a manifest,
# whose format stays what agents before it read
_IN_TRANSIT_ONLY = ("kept_step", "kept_generation")


def encode_fragment_manifest(fragments: Iterable[StoredFragment]) -> bytes:
    entries = [{"header": _header_to_json(f.header), "segment": f.segment} for f in fragments]
    body = json.dumps(entries, sort_keys=True).encode()
    return MANIFEST_MAGIC + body + b"\n" + f"{zlib.crc32(body):08x}".encode()


def _header_to_json(header: FragmentHeader) -> dict[str, object]:
    raw = asdict(header)
    for name in _IN_TRANSIT_ONLY:
        del raw[name]
    return raw


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
    if len({f.header.key for f in fragments}) > 1:
        raise CorruptSnapshot("fragment manifest mixes ranks")
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


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """crc32c of A + B from crc32c(A), crc32c(B) and len(B), without reading the bytes again.

    crc32c(B, value=c) is affine in c: L(c) ^ crc32c(B), with L linear and depending on len(B)
    only; L's 32 columns are computed once per length (from zeros) and cached.
    """
    return gf2_times(_crc_shift_columns(length_b), crc_a) ^ crc_b


@functools.lru_cache(maxsize=16)
def _crc_shift_columns(length: int) -> tuple[int, ...]:
    zeros = bytes(length)
    base = int(crc32c.crc32c(zeros))
    return tuple(int(crc32c.crc32c(zeros, value=1 << bit)) ^ base for bit in range(32))


def copy_into(target: memoryview, data: bytes | memoryview) -> None:
    """`target[:] = data`, with the GIL released (numpy), so receiving threads copy (and fault
    fresh pages in) in parallel."""
    if len(data) < 1 << 16:
        target[:] = data
    else:
        np.copyto(np.frombuffer(target, dtype=np.uint8), np.frombuffer(data, dtype=np.uint8))


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
    sets: dict[tuple[int, int], dict[int, StoredFragment]] = field(default_factory=dict)  # version -> index ->
    upload: _Upload | None = None
    spare: Segment | None = None  # a dropped fragment's segment, still mapped and budgeted: the next upload's

    @property
    def version(self) -> tuple[int, int] | None:
        """The newest complete version."""
        return max(self.sets, default=None)

    def fragments(self) -> list[StoredFragment]:
        return [f for fragments in self.sets.values() for f in fragments.values()]

    def find(self, index: int, step: int | None) -> StoredFragment | None:
        """Fragment `index` of `step` (None: the newest version); the newest generation of that step."""
        versions = [v for v in self.sets if (step is None or v[1] == step) and index in self.sets[v]]
        return self.sets[max(versions)][index] if versions else None


class FragmentStore:
    """Fragments this agent holds for its group's peers. Thread-safe.

    Call order: `adopt()` once at start; then `put()` per received fragment (the servicer's
    thread runs it to the end) and `open_fragment()` to serve one; `stop()` last.
    """

    def __init__(
        self,
        *,
        shm: ShmDir,
        prefix: str,
        budget: MemoryBudget,
        node: str,
        group: Callable[[], tuple[str, ...]],
        kept_version: Callable[[str], tuple[int, int] | None] = lambda job: None,
        draining: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self._shm = shm
        self._prefix = prefix
        self._budget = budget  # shared with the slot store
        self._node = node
        self._group = group  # node names of this agent's current protection group (from the coordinator)
        self._kept_version = kept_version  # job -> (generation, step) every rank is protected at, if known
        self._draining = draining  # members of the group being drained (from the coordinator): they hold nothing
        self._lock = threading.Lock()
        self._ranks: dict[RankKey, _RankFragments] = {}
        self._segments: dict[str, Segment] = {}  # complete fragments' segments, by name
        # Segments are reused: one dropped (pruned, replaced) becomes its rank's spare, renamed to
        # the next upload's name and received into in place, through a mapping whose pages are
        # all mapped in (`_warm`), at memcpy speed, instead of a new segment faulted in per put.
        # One handed to a reader (`_lent`) is never reused: its bytes must stay what was read.
        self._warm: weakref.WeakSet[Segment] = weakref.WeakSet()
        self._lent: set[str] = set()
        self._stopped = False  # after stop(): an upload still arriving (a bulk connection's thread) is refused
        self._prefaulter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fragment-prefault")

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
        self.admit(header)
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

    def admit(self, header: FragmentHeader) -> None:
        """Raises what `put` would refuse `header` for before reading any byte: a malformed
        header (InvalidRequest) or one the coordinator did not place here (PermissionDenied)."""
        check_header(header)
        check_placement(header, self._node, self._group(), self._draining())

    def open_fragment(
        self, job: str, rank: int, index: int, step: int | None, verify: bool = True
    ) -> tuple[FragmentHeader, memoryview]:
        """A complete fragment, verified against its crc32c unless `verify` is False (a sender
        that checks it as it streams, from the chunks' crcs): its header and a view of its bytes.

        The view aliases the shm mapping, which stays mapped while the view lives, even if a
        newer set replaces the fragment meanwhile. Raises NotFound or CorruptSnapshot.
        """
        key = RankKey(job=check_name(job, "job"), rank=rank)
        with self._lock:
            entry = self._ranks.get(key)
            stored = entry.find(index, step) if entry is not None else None
            if stored is None:
                held = sorted(entry.sets) if entry is not None else []
                raise NotFound(f"{key}: no complete fragment {index} of step {step} here (holding versions {held})")
            view = self._segments[stored.segment].buffer[: stored.header.fragment_bytes]
            self._lent.add(stored.segment)
        if not verify:
            return stored.header, view
        found = int(crc32c.crc32c(view))
        if found != stored.header.crc32c:
            raise CorruptSnapshot(f"{stored.header}: stored bytes have crc32c {found:08x}, expected {stored.header.crc32c:08x}")
        return stored.header, view

    def held(self) -> tuple[Held, ...]:
        """The complete fragments held here, one entry per (job, rank, version), for the coordinator's inventory."""
        with self._lock:
            sets = [tuple(fragments.values()) for e in self._ranks.values() for fragments in e.sets.values() if fragments]
        return tuple(held_entry(fragments) for fragments in sets)

    def prune(self) -> int:
        """Drops the sets no longer kept (the coordinator's kept step moved on, or this node is
        drained); returns how many. A rank left with none is forgotten, with its manifest."""
        dropped = 0
        with self._lock:
            for key, entry in list(self._ranks.items()):
                dropped += len(self._prune(entry))
                if not entry.sets and entry.upload is None:
                    self._drop_spare(entry)
                    self._shm.unlink(self._manifest_name(key))
                    del self._ranks[key]
        return dropped

    def drop_job(self, job: str, generation: int) -> tuple[int, int]:
        """Drops the job's fragments of `generation` and older (the job was released) and cancels
        an upload of them in flight (its thread drops its segment); returns (sets, bytes) dropped."""
        sets = freed = 0
        with self._lock:
            for key, entry in list(self._ranks.items()):
                if key.job != job:
                    continue
                if entry.upload is not None and entry.upload.header.generation <= generation:
                    entry.upload.cancelled = True
                    entry.upload = None
                gone = [f for v in [v for v in entry.sets if v[0] <= generation] for f in entry.sets.pop(v).values()]
                sets += len({f.header.version for f in gone})
                freed += sum(f.header.fragment_bytes for f in gone)
                if entry.sets or entry.upload is not None:  # a newer generation's: the manifest names what stays first
                    if gone:
                        self._shm.write_file_atomic(self._manifest_name(key), encode_fragment_manifest(entry.fragments()))
                else:
                    self._drop_spare(entry)
                    self._shm.unlink(self._manifest_name(key))
                    del self._ranks[key]
                for stored in gone:
                    self._drop_segment(stored.segment, unlink=True)
        if sets:
            log.info("released job %r: dropped %d fragment set(s) of generation <= %d, %d bytes", job, sets, generation, freed)
        return sets, freed

    def settle(self) -> None:
        """Waits until the segments received so far are mapped in (for tests and benchmarks)."""
        self._prefaulter.submit(lambda: None).result()

    def stop(self, remove: bool) -> None:
        """Unmaps every fragment; with `remove`, unlinks them and their manifests too."""
        with self._lock:
            self._stopped = True
            for key, entry in self._ranks.items():
                if entry.upload is not None:
                    entry.upload.cancelled = True  # its thread closes it; the name goes now
                    self._shm.unlink(entry.upload.name)
                self._drop_spare(entry)
                for stored in entry.fragments():
                    self._drop_segment(stored.segment, unlink=remove)
                if remove:
                    self._shm.unlink(self._manifest_name(key))
            self._ranks.clear()
        self._prefaulter.shutdown(wait=True, cancel_futures=True)

    # -- internals -----------------------------------------------------------------

    def _begin(self, header: FragmentHeader) -> _Upload:
        with self._lock:
            if self._stopped:
                raise Unavailable(f"{header}: this agent is stopping")
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
            spare = entry.spare if entry.spare is not None and entry.spare.size_bytes == header.fragment_bytes else None
            if spare is None:
                self._drop_spare(entry)  # of another size: its memory goes to the new segment
            else:
                entry.spare = None
                self._budget.release(spare.name)  # its bytes are reserved again, under the new name, below
            try:
                self._budget.reserve(name, header.fragment_bytes, f"{header} ({format_size(header.fragment_bytes)})")
                segment = self._reuse(spare, name) if spare is not None else self._shm.create_segment(name, header.fragment_bytes)
            except BaseException:
                self._budget.release(name)
                if spare is not None:
                    self._close_and_unlink(spare)
                raise
            entry.upload = _Upload(header=header, name=name, segment=segment)
            return entry.upload

    def _reuse(self, spare: Segment, name: str) -> Segment:
        """The spare, renamed `name`: a crash from now on leaves it an orphan that no manifest names."""
        os.rename(safe_join(self._shm.root, spare.name), safe_join(self._shm.root, name))
        spare.name = name
        return spare

    def _write(self, upload: _Upload, chunk: Chunk) -> None:
        header, size = upload.header, len(chunk.data)
        if size > MAX_CHUNK_BYTES:
            raise InvalidRequest(f"{header}: chunk of {format_size(size)} exceeds {format_size(MAX_CHUNK_BYTES)}")
        if upload.received_bytes + size > header.fragment_bytes:
            raise InvalidRequest(f"{header}: chunks run past fragment_bytes {header.fragment_bytes}")
        found = int(crc32c.crc32c(chunk.data))
        if chunk.crc32c is not None and found != chunk.crc32c:
            raise CorruptSnapshot(
                f"{header}: chunk at byte {upload.received_bytes} has crc32c {found:08x}, sent {chunk.crc32c:08x}"
            )
        if upload.cancelled:  # read without the lock: a stale False costs one more chunk copy, never memory safety
            raise StaleGeneration(f"{header}: superseded by a newer upload")
        if upload.segment in self._warm:  # its pages are mapped in: a plain copy, the GIL released
            copy_into(upload.segment.buffer[upload.received_bytes : upload.received_bytes + size], chunk.data)
        else:
            self._write_at(upload, chunk.data)
        upload.crc32c = crc32c_combine(upload.crc32c, found, size)
        upload.received_bytes += size

    def _write_at(self, upload: _Upload, data: bytes | memoryview) -> None:
        """Writes a chunk into the upload's segment at its place, through the file, not the
        mapping: the kernel copies into the pages, with none of the page faults a first write
        through a new mapping takes (which cost more than the copy here, BASELINES.md)."""
        try:
            fd = os.open(safe_join(self._shm.root, upload.name), os.O_WRONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise StaleGeneration(f"{upload.header}: its segment is gone (superseded or stopping)") from None
        try:
            view, at = memoryview(data), upload.received_bytes
            while view:
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
        finally:
            os.close(fd)

    def _finish(self, upload: _Upload) -> None:
        header = upload.header
        if upload.received_bytes != header.fragment_bytes:
            raise InvalidRequest(f"{header}: received {upload.received_bytes} of {header.fragment_bytes} bytes")
        if upload.crc32c != header.crc32c:
            raise CorruptSnapshot(f"{header}: fragment has crc32c {upload.crc32c:08x}, header says {header.crc32c:08x}")
        with self._lock:
            entry = self._ranks.get(header.key)
            if self._stopped:
                raise Unavailable(f"{header}: this agent is stopping")
            if upload.cancelled or entry is None or entry.upload is not upload:
                raise StaleGeneration(f"{header}: superseded by a newer upload")
            completion = decide_completion(header.version, entry.version)
            if completion is Completion.DROP:
                raise StaleGeneration(f"{header}: a newer version {entry.version} completed meanwhile")
            fragments = entry.sets.setdefault(header.version, {})
            replaced = [fragments[header.index]] if header.index in fragments else []  # the same fragment sent again
            fragments[header.index] = StoredFragment(header=header, segment=upload.name)
            self._segments[upload.name] = upload.segment
            entry.upload = None
            for old in replaced:
                self._retire(entry, old.segment)
            self._prune(entry, always_write=True, hint=header.kept)
        if upload.segment not in self._warm:  # a new segment: mapped in off the put's path, for readers and reuse
            try:
                self._prefaulter.submit(self._prefault, upload.segment)
            except RuntimeError:  # stopping: nobody reads or reuses it any more
                pass

    def _discard(self, upload: _Upload) -> None:
        with self._lock:
            entry = self._ranks.get(upload.header.key)
            if entry is not None and entry.upload is upload:
                entry.upload = None
            if entry is not None and entry.upload is None and not entry.sets:
                self._drop_spare(entry)
                del self._ranks[upload.header.key]
            if upload.name not in self._segments:  # not completed: the upload's segment is ours to drop
                self._budget.release(upload.name)
                upload.segment.close()
                self._shm.unlink(upload.name)

    def _prune(
        self, entry: _RankFragments, always_write: bool = False, hint: tuple[int, int] | None = None
    ) -> list[tuple[int, int]]:
        """Drops the entry's sets that are no longer kept (under the lock); returns their versions.

        `hint`: the kept version an arriving fragment's owner knew, used when newer than the
        coordinator's word here (which may lag it by a heartbeat). The manifest names what
        stays before the dropped segments go: a crash in between leaves orphans (removed at
        adoption), never a hole."""
        if not entry.sets:
            return []
        key = next(iter(entry.fragments())).header.key
        kept = self._kept_version(key.job)
        if hint is not None and (kept is None or hint > kept):
            kept = hint
        keep = versions_to_keep(entry.sets, kept, self._node in self._draining())
        dropped = [v for v in entry.sets if v not in keep]
        if not dropped and not always_write:
            return []
        gone = [f for v in dropped for f in entry.sets.pop(v).values()]
        self._shm.write_file_atomic(self._manifest_name(key), encode_fragment_manifest(entry.fragments()))
        for old in gone:
            self._retire(entry, old.segment)
        if dropped:
            log.info("%s: dropped fragment versions %s, keeping %s", key, sorted(dropped), sorted(entry.sets))
        return dropped

    def _drop_segment(self, name: str, unlink: bool) -> None:
        segment = self._segments.pop(name, None)
        if segment is not None:
            segment.close()  # readers' views keep the mapping alive until they are done
        if unlink:
            self._shm.unlink(name)
        self._budget.release(name)
        self._lent.discard(name)

    def _retire(self, entry: _RankFragments, name: str) -> None:
        """A complete fragment's segment that no manifest names any more: the rank's spare (still
        mapped, its bytes still budgeted) unless a reader was given it; under the lock."""
        segment = self._segments.get(name)
        if segment is None or name in self._lent:
            self._drop_segment(name, unlink=True)
            return
        del self._segments[name]
        self._drop_spare(entry)
        entry.spare = segment

    def _drop_spare(self, entry: _RankFragments) -> None:
        if entry.spare is not None:
            self._budget.release(entry.spare.name)
            self._close_and_unlink(entry.spare)
            entry.spare = None

    def _close_and_unlink(self, segment: Segment) -> None:
        segment.close()
        self._shm.unlink(segment.name)

    def _prefault(self, segment: Segment) -> None:
        """Maps every page of a received segment in (on the prefault thread), then marks it warm."""
        try:
            populate(segment.buffer)
        except (ValueError, BufferError):  # dropped meanwhile: its buffer was released
            return
        self._warm.add(segment)

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
            entry.sets.setdefault(stored.header.version, {})[stored.header.index] = stored
            self._segments[stored.segment] = segment
            self._budget.adopt(stored.segment, stored.header.fragment_bytes)  # already in memory: counted, never refused
        if not entry.sets:
            return
        key = entry.fragments()[0].header.key
        if name != self._manifest_name(key):
            log.error("fragment manifest name=%s describes %s; ignoring it", name, key)
            for stored in entry.fragments():
                self._drop_segment(stored.segment, unlink=False)
            return
        self._ranks[key] = entry
        self._shm.write_file_atomic(name, encode_fragment_manifest(entry.fragments()))
        log.info(
            "adopted fragments of %s versions=%s", key, {v: sorted(fragments) for v, fragments in sorted(entry.sets.items())}
        )
