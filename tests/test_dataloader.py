import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from retinanet.dataloader import MEAN_COLOUR, TrainingSampler, collate, item_seed, orientation_batches


def item(height, width, boxes, index, scale=1.0):
    annotations = torch.tensor(boxes, dtype=torch.float32).view(-1, 5)
    return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8), "annotations": annotations,
            "difficult": annotations[:, 4] == 1, "scale": scale, "index": index, "original_size": (height * 2, width * 2)}


def test_collate_pads_images_to_multiples_of_32_and_annotations_with_minus_one():
    first = item(50, 70, [[1, 2, 3, 4, 0], [5, 6, 7, 8, 1]], index=7, scale=0.5)
    second = item(64, 33, [], index=3, scale=2.0)
    batch = collate([first, second])
    assert batch["images"].shape == (2, 3, 64, 96)  # max 64 x 70, 70 rounded up to 96
    torch.testing.assert_close(batch["images"][0, :, :50, :70], first["image"])
    torch.testing.assert_close(batch["images"][1, :, :, :33], second["image"])
    mean_colour = torch.tensor(MEAN_COLOUR, dtype=torch.uint8).view(3, 1, 1)  # normalised, about 0
    assert (batch["images"][0, :, 50:] == mean_colour).all() and (batch["images"][1, :, :, 33:] == mean_colour).all()
    assert batch["images"].dtype == torch.uint8 and batch["image_sizes"].tolist() == [[50, 70], [64, 33]]
    assert batch["annotations"].shape == (2, 2, 5)
    torch.testing.assert_close(batch["annotations"][0], first["annotations"])
    torch.testing.assert_close(batch["annotations"][1], torch.full((2, 5), -1.0))
    assert batch["difficult"].tolist() == [[False, True], [False, False]]  # class 1 marked difficult here
    torch.testing.assert_close(batch["scales"], torch.tensor([0.5, 2.0]))
    assert batch["indices"] == [7, 3] and batch["original_sizes"] == [(100, 140), (128, 66)]


def test_collate_of_images_without_boxes_and_another_divisor():
    batch = collate([item(10, 12, [], 0), item(7, 20, [], 1)], size_divisible=8)
    assert batch["images"].shape == (2, 3, 16, 24)
    assert batch["annotations"].shape == (2, 0, 5) and batch["annotations"].dtype == torch.float32
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


RATIOS = [1.5, 0.5, 1.0, 0.75, 2.0, 0.6, 1.33, 1.33, 0.9, 1.2, 0.8, 1.1, 0.5, 1.7, 0.4, 1.0, 3.0, 0.7, 1.25]
SIZES = [(100, round(100 * ratio)) for ratio in RATIOS]  # (height, width): width / height is the ratio


def indices(sampler) -> list[list[int]]:
    """The batches of a TrainingSampler as lists of indices (it yields (index, seed) pairs)."""
    return [[index for index, _ in batch] for batch in sampler]


def test_sampler_groups_orientations_and_yields_each_index_once_per_epoch():
    sampler = TrainingSampler(SIZES, batch_size=4, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = indices(sampler)
        assert len(batches) == len(sampler) == 5  # 11 landscape -> 4 + 4 + 3, 8 portrait -> 4 + 4
        assert sorted(index for batch in batches for index in batch) == list(range(len(RATIOS)))
        for batch in batches:
            assert len({RATIOS[index] >= 1 for index in batch}) == 1
            assert 1 <= len(batch) <= 4


def test_sampler_order_changes_with_the_epoch_and_set_epoch_is_deterministic():
    sampler = TrainingSampler(SIZES, batch_size=4, seed=1)
    epoch_0 = list(sampler)
    sampler.set_epoch(1)
    epoch_1 = list(sampler)
    assert epoch_0 != epoch_1
    assert list(sampler) == epoch_1
    sampler.set_epoch(0)
    assert list(sampler) == epoch_0
    assert list(TrainingSampler(SIZES, batch_size=4, seed=2)) != epoch_0
    # each item carries the seed of its random transforms, a function of the run's seed, the epoch and the index
    assert all(seed == item_seed(1, 0, index) for batch in epoch_0 for index, seed in batch)


def test_sampler_starts_an_epoch_where_a_resumed_run_stopped():
    sampler = TrainingSampler(SIZES, batch_size=4, seed=1)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start=3)
    assert list(sampler) == whole[3:]


def test_orientation_batches_in_order():
    # landscape 0, 2, 4; portrait 1, 3, 5: buckets are emitted as they fill, then the leftovers (portrait first)
    assert orientation_batches(SIZES[:6], range(6), 2) == [[0, 2], [1, 3], [5], [4]]
    with pytest.raises(ValueError, match="batch_size"):
        orientation_batches(SIZES, range(3), 0)


def test_sampler_shards_are_disjoint_and_cover_every_index():
    ranks = [TrainingSampler(SIZES, batch_size=3, rank=rank, world_size=2, seed=5) for rank in (0, 1)]
    # 11 landscape -> 4 batches, 8 portrait -> 3 batches: 7 batches, one repeated so each rank gets 4
    assert len(ranks[0]) == len(ranks[1]) == 4
    shards = [indices(sampler) for sampler in ranks]
    assert [len(shard) for shard in shards] == [4, 4]
    seen = [[index for batch in shard for index in batch] for shard in shards]
    assert sorted(seen[0] + seen[1][:-len(shards[1][-1])]) == list(range(len(RATIOS)))  # minus the repeat
    assert shards[1][-1] == shards[0][0]  # the padding repeats the first batch
    assert not set(seen[0]) & set(index for batch in shards[1][:-1] for index in batch)


@settings(max_examples=60, deadline=None)
@given(
    num_images=st.integers(1, 40),
    batch_size=st.integers(1, 6),
    world_size=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_sampler_length_is_exact_on_every_rank(num_images, batch_size, world_size, seed):
    sizes = [(100, round(100 * ratio)) for ratio in np.random.default_rng(seed).uniform(0.3, 3.0, num_images)]
    samplers = [TrainingSampler(sizes, batch_size, rank=rank, world_size=world_size) for rank in range(world_size)]
    shards = [indices(sampler) for sampler in samplers]
    lengths = [len(sampler) for sampler in samplers]
    assert [len(shard) for shard in shards] == lengths == [lengths[0]] * world_size
    assert {index for shard in shards for batch in shard for index in batch} == set(range(num_images))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        TrainingSampler(SIZES, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one"):
        TrainingSampler([], batch_size=2)
