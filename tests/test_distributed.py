"""Data parallel (tether.distributed): sharding and seeding by hand, then 2 gloo ranks against 1
process on SFT, RM and PPO with the same global batch, and a 2-rank PPO run killed and rerun."""

from __future__ import annotations

import pytest
import torch

from tether.distributed import Dist, micro_batches, rank_seed, shard, shard_range


@pytest.mark.parametrize("n", [0, 1, 5, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_contiguous_blocks_that_tile_the_items_in_order(n, world_size):
    blocks = [shard(list(range(n)), Dist(rank, world_size)) for rank in range(world_size)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [len(shard_range(n, Dist(r, world_size))) for r in range(world_size)] == list(map(len, blocks))


def test_every_rank_gets_a_micro_batch_and_fillers_are_marked():
    items = ["a", "b", "c"]
    # 3 items over 4 ranks: rank 0 has none and gets a filler (its loss is multiplied by 0).
    assert micro_batches(items, 2, Dist(0, 4)) == [(["a"], False)]
    others = [micro_batches(items, 2, Dist(r, 4)) for r in (1, 2, 3)]
    assert others == [[(["a"], True)], [(["b"], True)], [(["c"], True)]]
    # 5 items over 2 ranks in micro-batches of 2: ranks hold 2 and 3 items.
    assert micro_batches(list("abcde"), 2, Dist(0, 2)) == [(["a", "b"], True)]
    assert micro_batches(list("abcde"), 2, Dist(1, 2)) == [(["c", "d"], True), (["e"], True)]
    # equal (FSDP2): every rank runs as many micro-batches as the largest share needs.
    assert micro_batches(list("abcde"), 2, Dist(0, 2), equal=True) == [(["a", "b"], True), (["a"], False)]
    # One process: the batch cut into micro-batches, as without data parallel.
    assert micro_batches(list("abcde"), 2, Dist()) == [(["a", "b"], True), (["c", "d"], True), (["e"], True)]
    with pytest.raises(ValueError, match="no items"):
        micro_batches([], 2, Dist())


def test_rank_seeds_differ_by_rank_and_seed():
    seeds = {rank_seed(s, r) for s in range(3) for r in range(4)}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)
    torch.manual_seed(rank_seed(0, 1))  # a valid torch seed
