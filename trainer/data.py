"""Training text the trainer generates itself (nothing is downloaded), and its batches.

The corpus is a seeded stream of sentences from a small made-up grammar, so it has
structure a GPT can learn. The batch of a step is a pure function of (seed, step, rank):
the data position to restore is just the step.
"""

from __future__ import annotations

import random

import torch

_WORDS = (
    "the a one every some memory node rank step shard snapshot agent peer group job "
    "keeps holds sends restores writes reads copies protects loses finds commits "
    "quickly safely again later always never bright quiet small large old new"
).split()


def make_corpus(seed: int, size_bytes: int = 1 << 20) -> torch.Tensor:
    """`size_bytes` of generated text as uint8 tokens."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size_bytes:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ". "
        parts.append(sentence)
        total += len(sentence)
    return torch.frombuffer(bytearray("".join(parts)[:size_bytes].encode()), dtype=torch.uint8)


def batch_for_step(
    corpus: torch.Tensor, *, seed: int, step: int, rank: int, batch_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of (step, rank), the same in every run with that seed."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + rank)
    starts = torch.randint(0, corpus.numel() - seq_len - 1, (batch_size,), generator=generator)
    rows = torch.stack([corpus[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]
