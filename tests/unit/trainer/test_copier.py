from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from memckpt.trainer.copier import ParallelCopy, split_spans


@given(st.lists(st.integers(0, 10_000), max_size=20), st.integers(1, 5), st.integers(1, 4096))
def test_split_spans_covers_every_byte_once(sizes: list[int], parts: int, min_split: int) -> None:
    spans, dst, src = [], 0, 1_000_000
    for n in sizes:
        spans.append((dst, src, n))
        dst, src = dst + n + 7, src + n + 3
    pieces = split_spans(spans, parts, min_split)
    assert len(pieces) <= max(parts, 1) + 1
    flat = [p for part in pieces for p in part]
    for d, s, n in spans:
        covered = sorted((pd, ps, pn) for pd, ps, pn in flat if d <= pd < d + max(n, 1))
        assert sum(pn for *_, pn in covered) == n
        assert all(ps - s == pd - d for pd, ps, _ in covered), "a piece's source and destination drifted apart"


def test_parallel_copy_matches_copy_for_mixed_tensors() -> None:
    torch.manual_seed(0)
    sources = [torch.randn(1 << 20), torch.arange(10), torch.randn(3, 4).t(), torch.randn(0), torch.randn(5).to(torch.bfloat16)]
    targets = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in sources]
    copier = ParallelCopy(threads=3)
    try:
        copier.copy(list(zip(targets, sources)))
    finally:
        copier.close()
    for t, s in zip(targets, sources):
        assert torch.equal(t, s)
