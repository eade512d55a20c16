"""The on-shm manifest of one rank: its slots and their states, as bytes. Pure logic.

The agent rewrites it atomically (temp + rename) at every state change, so a restarted
agent re-adopts exactly the committed snapshots. A manifest that fails its own checksum
is rejected, never half-read.
"""

from __future__ import annotations

import base64
import json
import zlib

from memckpt.agent.slots import Attempt, RankKey, RankSlots, Slot, SlotState
from memckpt.errors import CorruptSnapshot

MAGIC = b"memckpt-manifest-v1\n"


def encode_manifest(slots: RankSlots) -> bytes:
    body = json.dumps(
        {
            "job": slots.key.job,
            "rank": slots.key.rank,
            "world_size": slots.world_size,
            "latest": slots.latest,
            "commits": slots.commits,
            "run_id": slots.attempt.run_id,
            "generation": slots.attempt.generation,
            "slots": [_slot_to_json(s) for s in slots.slots],
        },
        sort_keys=True,
    ).encode()
    return MAGIC + body + b"\n" + f"{zlib.crc32(body):08x}".encode()


def decode_manifest(data: bytes) -> RankSlots:
    """Parses a manifest; raises CorruptSnapshot if it is torn, foreign or inconsistent."""
    if not data.startswith(MAGIC):
        raise CorruptSnapshot("manifest has no memckpt header")
    body, _, trailer = data[len(MAGIC) :].rpartition(b"\n")
    if trailer != f"{zlib.crc32(body):08x}".encode():
        raise CorruptSnapshot("manifest checksum mismatch")
    try:
        raw = json.loads(body)
        slots = [_slot_from_json(s) for s in raw["slots"]]
        result = RankSlots(
            key=RankKey(job=raw["job"], rank=int(raw["rank"])),
            world_size=int(raw["world_size"]),
            slots=slots,
            latest=raw["latest"],
            commits=int(raw["commits"]),
            attempt=Attempt(run_id=str(raw.get("run_id", "")), generation=int(raw.get("generation", 0))),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptSnapshot(f"manifest is malformed: {exc!r}") from exc
    latest = result.latest_committed()
    if result.latest is not None and (latest is None or latest.state is not SlotState.COMMITTED):
        raise CorruptSnapshot("manifest names a latest slot that is not committed")
    return result


def _slot_to_json(slot: Slot) -> dict[str, object]:
    return {
        "index": slot.index,
        "version": slot.version,
        "size_bytes": slot.size_bytes,
        "state": slot.state.value,
        "step": slot.step,
        "data_size_bytes": slot.data_size_bytes,
        "checksums": None if slot.checksums is None else list(slot.checksums),
        "meta": base64.b64encode(slot.meta).decode(),
        "commit_id": slot.commit_id,
        "protected": slot.protected,
        "protected_by": list(slot.protected_by),
    }


def _slot_from_json(raw: dict[str, object]) -> Slot:
    checksums = raw["checksums"]
    return Slot(
        index=int(raw["index"]),  # type: ignore[call-overload]
        version=int(raw["version"]),  # type: ignore[call-overload]
        size_bytes=int(raw["size_bytes"]),  # type: ignore[call-overload]
        state=SlotState(raw["state"]),
        step=int(raw["step"]),  # type: ignore[call-overload]
        data_size_bytes=int(raw["data_size_bytes"]),  # type: ignore[call-overload]
        checksums=None if checksums is None else tuple(int(c) for c in checksums),  # type: ignore[attr-defined]
        meta=base64.b64decode(str(raw["meta"])),
        commit_id=int(raw["commit_id"]),  # type: ignore[call-overload]
        protected=bool(raw.get("protected", False)),
        protected_by=tuple(str(n) for n in raw.get("protected_by", ())),  # type: ignore[attr-defined]
    )
