from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from memckpt.trainer.layout import ALIGNMENT_BYTES, LeafSpec, compute_layout

specs = st.lists(
    st.builds(
        LeafSpec,
        dtype=st.just("float32"),
        shape=st.lists(st.integers(0, 50), min_size=0, max_size=3).map(tuple),
        itemsize=st.sampled_from([1, 2, 4, 8]),
    ),
    max_size=30,
).map(tuple)


@given(specs)
def test_layout_is_aligned_ordered_and_disjoint(leaves: tuple[LeafSpec, ...]) -> None:
    layout = compute_layout(leaves)
    end = 0
    for spec, place in zip(leaves, layout.placements):
        assert place.offset % ALIGNMENT_BYTES == 0
        assert place.offset >= end
        assert place.nbytes == spec.nbytes
        end = place.offset + place.nbytes
    assert layout.size_bytes >= end


def test_same_specs_give_the_same_layout() -> None:
    leaves = (LeafSpec(dtype="float32", shape=(3, 5), itemsize=4), LeafSpec(dtype="int64", shape=(7,), itemsize=8))
    assert compute_layout(leaves) == compute_layout(tuple(leaves))
    assert compute_layout(leaves).placements[1].offset == 256
