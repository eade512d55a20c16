from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from memckpt.agent import checksum
from memckpt.agent.checksum import chunk_checksums, describe_mismatch


def test_threaded_checksums_equal_serial_and_catch_one_flipped_byte(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(checksum, "CHUNK_BYTES", 1024)
    data = bytearray(range(256)) * 20
    with ThreadPoolExecutor(2) as pool:
        threaded = chunk_checksums(memoryview(data), len(data), b"meta", mapper=pool.map)
    serial = chunk_checksums(memoryview(data), len(data), b"meta")
    assert threaded == serial and len(serial) == 5 + 1
    data[2500] ^= 1
    flipped = chunk_checksums(memoryview(data), len(data), b"meta")
    assert flipped != serial
    assert describe_mismatch(serial, flipped) == "bytes 2048..3072"
    assert describe_mismatch(serial, chunk_checksums(memoryview(data), len(data), b"other")).count("metadata") == 1


def test_checksums_stop_when_the_slot_moves_on() -> None:
    assert chunk_checksums(memoryview(b"x" * 10), 10, b"", keep_going=lambda: False) is None
