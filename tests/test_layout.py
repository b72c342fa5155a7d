import pytest

from fastusp_xdit import layout


@pytest.mark.parametrize("total", [0, 1, 7, 16, 4609])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_split_sizes_balanced_and_complete(total, parts):
    sizes = layout.split_sizes(total, parts)
    assert sum(sizes) == total and len(sizes) == parts
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_blocks_are_ulysses_groups_of_shards():
    shards = layout.shard_sizes(23, 2, 3)
    assert layout.block_sizes(23, 2, 3) == [shards[0] + shards[1], shards[2] + shards[3], shards[4] + shards[5]]


def test_head_split_keeps_gqa_groups_together():
    q, kv = layout.head_split(12, 3, 2)
    assert kv == [2, 1] and q == [8, 4]
    with pytest.raises(ValueError):
        layout.split_sizes(4, 0)
