from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest

from memckpt.agent.erasure import Scheme, data_fragment, decode, encode_parity
from memckpt.agent.fragments import (
    Chunk,
    Completion,
    FragmentHeader,
    FragmentStore,
    StoredFragment,
    check_header,
    check_placement,
    decide_completion,
    decide_upload,
    decode_fragment_manifest,
    encode_fragment_manifest,
    fragment_prefix,
    iter_chunks,
    versions_to_keep,
)
from memckpt.agent.peer_service import header_from_proto, header_to_proto
from memckpt.agent.shm import ShmDir
from memckpt.agent.slots import MemoryBudget
from memckpt.errors import (
    BudgetExceeded,
    CorruptSnapshot,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    StaleGeneration,
    Unavailable,
)

GROUP = ("a", "b", "c", "d")  # owner "a" with k=2, m=1: fragments 0, 1, 2 go to b, c, d
PREFIX = "t-frag."


def header(data: bytes = b"x" * 10, index: int = 0, step: int = 5, generation: int = 1, **changes: object) -> FragmentHeader:
    scheme = Scheme(k=2, m=1, size_bytes=len(data))
    fragment = fragments_of(data)[index]
    base = FragmentHeader(
        job="j",
        rank=0,
        step=step,
        generation=generation,
        index=index,
        k=2,
        m=1,
        size_bytes=len(data),
        fragment_bytes=scheme.fragment_bytes,
        owner="a",
        crc32c=int(crc32c.crc32c(fragment)),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def fragments_of(data: bytes) -> list[bytes]:
    scheme = Scheme(k=2, m=1, size_bytes=len(data))
    view = memoryview(data)
    return [bytes(data_fragment(view, scheme, i)) for i in range(2)] + [bytes(p) for p in encode_parity(view, scheme)]


def chunks(data: bytes, size: int = 3) -> list[Chunk]:
    return list(iter_chunks(memoryview(data), size))


# -- pure decisions ----------------------------------------------------------------


def test_a_consistent_header_passes() -> None:
    check_header(header())


@pytest.mark.parametrize(
    "changes",
    [
        {"fragment_bytes": 4},  # != ceil(10 / 2)
        {"fragment_bytes": 1 << 40},  # an oversized claim
        {"index": 3},  # >= k + m
        {"index": -1},
        {"k": 0},
        {"size_bytes": 0, "fragment_bytes": 0},
        {"job": "../etc"},
        {"owner": ""},
        {"step": -1},
        {"crc32c": 1 << 32},
    ],
)
def test_inconsistent_headers_are_invalid(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        check_header(dataclasses.replace(header(), **changes))  # type: ignore[arg-type]


def test_placement_accepts_only_the_holder_the_coordinator_rotation_names() -> None:
    for index, node in enumerate(("b", "c", "d")):
        check_placement(header(index=index), node, GROUP)
    with pytest.raises(PermissionDenied, match="puts it on b"):
        check_placement(header(index=0), "c", GROUP)
    with pytest.raises(PermissionDenied):
        check_placement(header(index=0, owner="b"), "b", GROUP)  # never on the owner itself
    with pytest.raises(PermissionDenied):
        check_placement(header(index=0), "b", ("a", "b", "c"))  # a group of 3 cannot hold k+m = 3


def test_placement_skips_draining_members_and_keeps_everyone_elses_index() -> None:
    group = ("a", "b", "c", "d", "e")  # owner a: fragments 0, 1, 2 on b, c, d; with c drained: b, e, d
    for index, node in enumerate(("b", "e", "d")):
        check_placement(header(index=index), node, group, frozenset({"c"}))
    with pytest.raises(PermissionDenied, match="c is being drained and holds no fragments"):
        check_placement(header(index=1), "c", group, frozenset({"c"}))
    with pytest.raises(PermissionDenied, match="puts it on c, not on e"):
        check_placement(header(index=1), "e", group)  # a sender that does not know of the drain yet
    with pytest.raises(PermissionDenied, match="does not place it"):
        check_placement(header(index=0), "b", group, frozenset({"c", "d"}))  # 2 holders left for k+m = 3
    check_placement(header(index=0, owner="c"), "d", group, frozenset({"c"}))  # a draining owner's fragments are taken


def test_placement_outside_the_current_group_is_stale() -> None:
    for node, group in (("b", ("b", "c", "d", "e")), ("e", GROUP), ("b", ())):
        with pytest.raises(StaleGeneration):
            check_placement(header(index=0), node, group)


def test_upload_decisions_keep_the_newest_version_and_one_in_flight() -> None:
    assert decide_upload((1, 5), None, None).accept
    assert not decide_upload((1, 4), (1, 5), None).accept
    assert decide_upload((1, 5), (1, 5), None).accept  # another index of the set held, or a re-send
    assert decide_upload((2, 0), (1, 9), None).accept  # a newer generation wins over any older step
    newer = decide_upload((1, 7), (1, 5), (1, 6))
    assert newer.accept and newer.supersede
    assert not decide_upload((1, 6), None, (1, 7)).accept


def test_completion_makes_a_newer_set_the_newest_and_joins_the_same_version() -> None:
    assert decide_completion((1, 5), None) is Completion.NEWEST
    assert decide_completion((1, 6), (1, 5)) is Completion.NEWEST
    assert decide_completion((1, 5), (1, 5)) is Completion.ADD
    assert decide_completion((1, 4), (1, 5)) is Completion.DROP


def test_fragment_manifest_round_trips_and_rejects_a_torn_one() -> None:
    stored = (StoredFragment(header=header(index=0), segment="t-frag.j.r0.f0.s5.g1.ab"),)
    encoded = encode_fragment_manifest(stored)
    assert decode_fragment_manifest(encoded) == stored
    for bad in (encoded[:-3], b"junk", encoded.replace(b'"step": 5', b'"step": 6')):
        with pytest.raises(CorruptSnapshot):
            decode_fragment_manifest(bad)
    hinted = (StoredFragment(header=header(index=0, kept_step=4, kept_generation=1), segment="t-frag.j.r0.f0.s5.g1.ab"),)
    assert encode_fragment_manifest(hinted) == encoded, "the kept step a sender knew is not the fragment's: not stored"


def test_header_proto_round_trip() -> None:
    h = header(index=2, generation=7)
    assert header_from_proto(header_to_proto(h)) == h


def test_fragment_prefix_is_outside_the_slot_prefix() -> None:
    assert fragment_prefix("mct-abc.") == "mct-abc-frag."
    assert not fragment_prefix("mct-abc.").startswith("mct-abc.")


# -- the store over a directory standing in for /dev/shm ------------------------------


@pytest.fixture
def shm(tmp_path: Path) -> ShmDir:
    return ShmDir(tmp_path)


def make_store(shm: ShmDir, budget: MemoryBudget | None = None, node: str = "b") -> FragmentStore:
    budget = budget if budget is not None else MemoryBudget(limit_bytes=1 << 20)
    return FragmentStore(shm=shm, prefix=PREFIX, budget=budget, node=node, group=lambda: GROUP)


def read_back(store: FragmentStore, index: int = 0, step: int | None = None) -> bytes:
    _, view = store.open_fragment("j", 0, index, step)
    return bytes(view)


DATA = bytes(range(256)) * 40 + b"tail"


def test_put_then_open_gives_back_the_exact_fragment_and_any_two_decode(shm: ShmDir) -> None:
    frags = fragments_of(DATA)
    stores = {node: make_store(shm, node=node) for node in ("b", "c", "d")}
    for index, node in enumerate(("b", "c", "d")):
        assert stores[node].put(header(DATA, index=index), chunks(frags[index], 1000)) == len(frags[index])
    got = {i: read_back(stores[n], i, step=5) for i, n in enumerate(("b", "c", "d"))}
    assert got == dict(enumerate(frags))
    scheme = Scheme(k=2, m=1, size_bytes=len(DATA))
    assert bytes(decode({1: got[1], 2: got[2]}, scheme)) == DATA
    (held,) = stores["c"].held()
    assert (held.job, held.rank, held.step, held.generation, held.fragment_indices) == ("j", 0, 5, 1, (1,))
    assert (held.k, held.m, held.size_bytes) == (2, 1, len(DATA))


def test_a_corrupted_chunk_is_data_loss_and_nothing_is_kept(shm: ShmDir) -> None:
    budget = MemoryBudget(limit_bytes=1 << 20)
    store = make_store(shm, budget)
    frag = fragments_of(DATA)[0]
    bad = chunks(frag, 1000)
    bad[1] = Chunk(data=b"\xff" + bad[1].data[1:], crc32c=bad[1].crc32c)
    with pytest.raises(CorruptSnapshot):
        store.put(header(DATA), bad)
    assert shm.list_names(PREFIX) == [] and budget.used_bytes == 0
    with pytest.raises(NotFound):
        store.open_fragment("j", 0, 0, None)


def test_a_whole_fragment_crc_mismatch_is_data_loss(shm: ShmDir) -> None:
    store = make_store(shm)
    with pytest.raises(CorruptSnapshot):
        store.put(header(DATA, crc32c=123), chunks(fragments_of(DATA)[0], 1000))
    assert shm.list_names(PREFIX) == []


@pytest.mark.parametrize("cut", ["short", "long", "huge_chunk"])
def test_wrong_amounts_of_bytes_are_invalid_and_nothing_is_kept(shm: ShmDir, cut: str) -> None:
    store = make_store(shm)
    frag = fragments_of(DATA)[0]
    sent = {
        "short": chunks(frag[:-1], 1000),
        "long": chunks(frag + b"!", 1000),
        "huge_chunk": [Chunk(data=bytes(5 << 20), crc32c=int(crc32c.crc32c(bytes(5 << 20))))],
    }[cut]
    with pytest.raises(InvalidRequest):
        store.put(header(DATA), sent)
    assert shm.list_names(PREFIX) == []


def test_a_fragment_over_the_budget_is_refused(shm: ShmDir) -> None:
    budget = MemoryBudget(limit_bytes=len(DATA))
    budget.reserve("slots", len(DATA) - 100, "the slot store")
    with pytest.raises(BudgetExceeded, match="budget"):
        make_store(shm, budget).put(header(DATA), chunks(fragments_of(DATA)[0], 1000))
    assert shm.list_names(PREFIX) == [] and budget.held == {"slots": len(DATA) - 100}


def test_a_misplaced_fragment_is_refused_before_anything_is_allocated(shm: ShmDir) -> None:
    store = make_store(shm, node="c")
    with pytest.raises(PermissionDenied):
        store.put(header(DATA, index=0), chunks(fragments_of(DATA)[0], 1000))
    assert shm.list_names(PREFIX) == []


def test_versions_kept_are_the_newest_and_the_coordinators_or_else_the_one_before() -> None:
    versions = [(1, 5), (1, 7), (1, 6)]
    assert versions_to_keep(versions, None) == {(1, 7), (1, 6)}
    assert versions_to_keep(versions, (1, 5)) == {(1, 7), (1, 5)}
    assert versions_to_keep(versions, (1, 4)) == {(1, 7), (1, 6)}, "a kept version not held here: the one before"
    assert versions_to_keep([(2, 3), (1, 9)], None) == {(2, 3), (1, 9)}, "generations first, then steps"
    assert versions_to_keep([], (1, 5)) == set()


def test_a_draining_node_keeps_only_versions_newer_than_the_kept_one() -> None:
    versions = [(1, 5), (1, 7), (1, 6)]
    assert versions_to_keep(versions, None, draining=True) == set(versions), "no word yet: all may be needed"
    assert versions_to_keep(versions, (1, 6), draining=True) == {(1, 7)}
    assert versions_to_keep(versions, (1, 7), draining=True) == set(), "the kept step is held without it"
    assert versions_to_keep(versions, (2, 1), draining=True) == set(), "a newer attempt's kept step supersedes them all"


def test_newer_steps_keep_two_versions_and_an_older_one_is_refused(shm: ShmDir) -> None:
    budget = MemoryBudget(limit_bytes=1 << 20)
    store = make_store(shm, budget)
    datas = {step: bytes([step]) * len(DATA) for step in (5, 6, 7)}
    for step, data in datas.items():
        store.put(header(data, step=step), chunks(fragments_of(data)[0], 1000))
    assert read_back(store) == fragments_of(datas[7])[0], "the newest by default"
    assert read_back(store, step=6) == fragments_of(datas[6])[0], "the one before stays"
    with pytest.raises(NotFound):
        store.open_fragment("j", 0, 0, 5)
    # the two versions kept, and step 5's segment, still mapped, as the next upload's (test_fragment_reuse.py)
    assert len([n for n in shm.list_names(PREFIX) if not n.endswith(".manifest")]) == 3
    assert budget.used_bytes == 3 * len(fragments_of(datas[7])[0])
    with pytest.raises(StaleGeneration):
        store.put(header(datas[5], step=5), chunks(fragments_of(datas[5])[0], 1000))
    assert sorted(h.step for h in store.held()) == [6, 7]


def test_the_version_every_rank_is_protected_at_stays_until_the_coordinator_moves_on(shm: ShmDir) -> None:
    kept: dict[str, tuple[int, int] | None] = {"j": (1, 5)}
    store = FragmentStore(
        shm=shm, prefix=PREFIX, budget=MemoryBudget(limit_bytes=1 << 20), node="b", group=lambda: GROUP, kept_version=kept.get
    )
    datas = {step: bytes([step]) * len(DATA) for step in (5, 6, 7)}
    for step, data in datas.items():
        store.put(header(data, step=step), chunks(fragments_of(data)[0], 1000))
    assert sorted(h.step for h in store.held()) == [5, 7], "6 went: 5 is where the job is safe"
    assert store.prune() == 0
    kept["j"] = (1, 7)
    assert store.prune() == 1 and [h.step for h in store.held()] == [7]
    restarted = make_store(shm)
    assert restarted.adopt() == 1 and read_back(restarted) == fragments_of(datas[7])[0], "the manifest follows the prune"


def test_a_drained_store_takes_nothing_and_forgets_each_rank_once_its_kept_step_is_held_elsewhere(shm: ShmDir) -> None:
    kept: dict[str, tuple[int, int] | None] = {"j": (1, 5)}
    draining: set[str] = set()
    budget = MemoryBudget(limit_bytes=1 << 20)
    store = FragmentStore(
        shm=shm,
        prefix=PREFIX,
        budget=budget,
        node="b",
        group=lambda: GROUP,
        kept_version=kept.get,
        draining=lambda: frozenset(draining),
    )
    datas = {step: bytes([step]) * len(DATA) for step in (5, 6)}
    for step, data in datas.items():
        store.put(header(data, step=step), chunks(fragments_of(data)[0], 1000))
    draining.add("b")
    with pytest.raises(PermissionDenied, match="being drained"):
        store.put(header(DATA, step=7), chunks(fragments_of(DATA)[0], 1000))
    assert store.prune() == 1 and [h.step for h in store.held()] == [6], "5 is held by others: the job's kept step"
    kept["j"] = (1, 6)
    assert store.prune() == 1 and store.held() == ()
    assert shm.list_names(PREFIX) == [] and budget.used_bytes == 0, "nothing of the rank is left, not even its manifest"


def test_a_fragment_carries_the_kept_step_its_owner_heard_of_before_the_holder_did(shm: ShmDir) -> None:
    kept: dict[str, tuple[int, int] | None] = {"j": (1, 5)}  # the coordinator has moved to 6: this holder lags
    store = FragmentStore(
        shm=shm, prefix=PREFIX, budget=MemoryBudget(limit_bytes=1 << 20), node="b", group=lambda: GROUP, kept_version=kept.get
    )
    datas = {step: bytes([step]) * len(DATA) for step in (5, 6, 7)}
    for step in (5, 6):
        store.put(header(datas[step], step=step), chunks(fragments_of(datas[step])[0], 1000))
    store.put(header(datas[7], step=7, kept_step=6, kept_generation=1), chunks(fragments_of(datas[7])[0], 1000))
    assert sorted(h.step for h in store.held()) == [6, 7], "6, the job's kept step, stays; without the hint 5 would"
    assert header(step=7, kept_step=6, kept_generation=1).kept == (1, 6) and header().kept is None
    assert header_from_proto(header_to_proto(header(kept_step=6, kept_generation=1))).kept == (1, 6)
    kept["j"] = (1, 4)  # an owner's older word never overrides the coordinator's newer one here
    store.put(header(DATA, step=8, kept_step=2, kept_generation=1), chunks(fragments_of(DATA)[0], 1000))
    assert sorted(h.step for h in store.held()) == [7, 8]


def test_a_newer_upload_supersedes_the_one_in_flight(shm: ShmDir) -> None:
    store = make_store(shm)
    newer = DATA[::-1]

    def first_upload() -> Iterator[Chunk]:
        parts = chunks(fragments_of(DATA)[0], 1000)
        yield parts[0]
        store.put(header(newer, step=6), chunks(fragments_of(newer)[0], 1000))  # arrives mid-stream
        yield from parts[1:]

    with pytest.raises(StaleGeneration, match="superseded"):
        store.put(header(DATA, step=5), first_upload())
    assert read_back(store, step=6) == fragments_of(newer)[0]
    assert len(shm.list_names(PREFIX)) == 2  # the fragment and its manifest


def test_a_restarted_store_readopts_complete_fragments_and_drops_leftovers(shm: ShmDir) -> None:
    store = make_store(shm)
    store.put(header(DATA), chunks(fragments_of(DATA)[0], 1000))
    store.stop(remove=False)
    shm.create_segment(f"{PREFIX}j.r0.f0.s6.g1.dead", 100).close()  # an upload cut by a crash
    budget = MemoryBudget(limit_bytes=1 << 20)
    again = make_store(shm, budget)
    assert again.adopt() == 1
    assert read_back(again) == fragments_of(DATA)[0]
    assert budget.used_bytes == len(fragments_of(DATA)[0])
    assert not any(n.endswith(".dead") for n in shm.list_names(PREFIX))
    again.stop(remove=True)
    assert shm.list_names(PREFIX) == [] and budget.used_bytes == 0


def test_an_upload_still_arriving_when_the_store_stops_leaves_nothing_behind(shm: ShmDir) -> None:
    """A bulk connection's thread may still be receiving when the agent stops: neither that
    upload nor a new one may leave a segment or a manifest after stop(remove=True)."""
    budget = MemoryBudget(limit_bytes=1 << 20)
    store = make_store(shm, budget)
    store.put(header(DATA), chunks(fragments_of(DATA)[0], 1000))
    newer = DATA[::-1]

    def arriving() -> Iterator[Chunk]:
        parts = chunks(fragments_of(newer)[0], 1000)
        yield parts[0]
        store.stop(remove=True)  # the stop comes mid-stream
        yield from parts[1:]

    with pytest.raises((Unavailable, StaleGeneration)):
        store.put(header(newer, step=6), arriving())
    with pytest.raises(Unavailable, match="stopping"):
        store.put(header(newer, step=7), chunks(fragments_of(newer)[0], 1000))
    assert shm.list_names(PREFIX) == []
    assert budget.used_bytes == 0


def test_bytes_corrupted_in_memory_are_data_loss_when_served(shm: ShmDir) -> None:
    store = make_store(shm)
    store.put(header(DATA), chunks(fragments_of(DATA)[0], 1000))
    (name,) = [n for n in shm.list_names(PREFIX) if not n.endswith(".manifest")]
    segment = shm.open_segment(name)
    segment.buffer[7] ^= 0xFF
    segment.close()
    with pytest.raises(CorruptSnapshot):
        store.open_fragment("j", 0, 0, None)
    store.stop(remove=True)


def test_metadata_travels_with_its_checksum() -> None:
    meta = '{"format": 1, "tree": {}}'
    good = header(meta=meta, meta_crc32c=crc32c.crc32c(meta.encode()))
    check_header(good)
    assert header_from_proto(header_to_proto(good)) == good
    with pytest.raises(CorruptSnapshot, match="metadata"):
        check_header(dataclasses.replace(good, meta=meta.replace("1", "2")))


def test_a_released_job_drops_its_generation_and_older_and_an_upload_of_them_in_flight(shm: ShmDir) -> None:
    budget = MemoryBudget(limit_bytes=1 << 20)
    store = make_store(shm, budget)
    store.put(header(DATA, step=5, generation=1), chunks(fragments_of(DATA)[0], 1000))
    store.put(header(DATA, step=6, generation=1), chunks(fragments_of(DATA)[0], 1000))
    store.put(dataclasses.replace(header(DATA, step=3), job="other"), chunks(fragments_of(DATA)[0], 1000))  # stays

    def arriving() -> Iterator[Chunk]:
        parts = chunks(fragments_of(DATA)[0], 1000)
        yield parts[0]
        assert store.drop_job("j", 1) == (2, 2 * len(fragments_of(DATA)[0])), "steps 5 and 6 of generation 1"
        yield from parts[1:]

    with pytest.raises(StaleGeneration, match="superseded"):
        store.put(header(DATA, step=7, generation=1), arriving())
    assert [(h.job, h.step) for h in store.held()] == [("other", 3)]
    assert budget.used_bytes == len(fragments_of(DATA)[0]), "only the other job's fragment"
    assert all(n.startswith(f"{PREFIX}other.") for n in shm.list_names(PREFIX)), shm.list_names(PREFIX)
    assert store.drop_job("j", 1) == (0, 0), "told again with the next heartbeat: nothing left"
    store.put(header(DATA, step=1, generation=2), chunks(fragments_of(DATA)[0], 1000))
    assert store.drop_job("j", 1) == (0, 0) and sorted(h.generation for h in store.held() if h.job == "j") == [2], (
        "a newer generation (the job started again) stays"
    )
