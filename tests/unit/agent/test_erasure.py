from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memckpt.agent.erasure import Scheme, data_fragment, decode, encode_parity
from memckpt.errors import InvalidRequest


def all_fragments(data: bytes, scheme: Scheme, stripe: int) -> dict[int, bytes]:
    view = memoryview(data)
    frags = {i: bytes(data_fragment(view, scheme, i)) for i in range(scheme.k)}
    for j, parity in enumerate(encode_parity(view, scheme, stripe_bytes=stripe)):
        frags[scheme.k + j] = bytes(parity)
    return frags


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.integers(1, 4), st.integers(0, 3), st.sampled_from([7, 64, 1 << 20]))
def test_any_k_of_k_plus_m_fragments_give_back_the_exact_bytes(data: bytes, k: int, m: int, stripe: int) -> None:
    scheme = Scheme(k=k, m=m, size_bytes=len(data))
    frags = all_fragments(data, scheme, stripe)
    for chosen in itertools.combinations(range(k + m), k):
        got = decode({i: frags[i] for i in chosen}, scheme, stripe_bytes=stripe)
        assert bytes(got) == data, f"fragments {chosen} decoded wrong"


def test_threaded_encoding_equals_serial() -> None:
    data = bytes(range(256)) * 997
    scheme = Scheme(k=3, m=2, size_bytes=len(data))
    with ThreadPoolExecutor(2) as pool:
        threaded = encode_parity(memoryview(data), scheme, mapper=pool.map, stripe_bytes=4096)
    assert threaded == encode_parity(memoryview(data), scheme, stripe_bytes=4096)


def test_too_few_or_wrong_sized_fragments_are_refused() -> None:
    data = b"x" * 100
    scheme = Scheme(k=2, m=1, size_bytes=100)
    frags = all_fragments(data, scheme, 64)
    with pytest.raises(InvalidRequest, match="1 of the 2"):
        decode({0: frags[0]}, scheme)
    with pytest.raises(InvalidRequest, match="fragment 1"):
        decode({0: frags[0], 1: frags[1][:-1]}, scheme)
    with pytest.raises(InvalidRequest):
        Scheme(k=0, m=1, size_bytes=1)
