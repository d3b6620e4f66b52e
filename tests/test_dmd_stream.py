"""dmd.stream: a loader's batches through a teacher, with an image budget split over ranks."""

import torch

from dmd.stream import rank_share, stream_trajectories


def _loader(valid_rows, batch_size=4, seed=0):
    """Batches of numbered images (image n is filled with n) with the given valid flags."""
    n = len(valid_rows)
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 2, 2)
    labels = torch.arange(n) % 3
    valid = torch.tensor(valid_rows)
    return [
        {"image": images[k : k + batch_size], "label": labels[k : k + batch_size],
         "valid": valid[k : k + batch_size]}
        for k in range(0, n, batch_size)
    ]  # fmt: skip


def _teacher(images):
    """A deterministic 'trajectory' (B, 3, 1, 1): the image's number times 1, 2, 3."""
    x = images[:, 0, 0, 0]
    return torch.stack([x, 2 * x, 3 * x], dim=1)[:, :, None, None]


class _Counting(list):
    """A loader that counts the batches taken from it."""

    taken = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.taken += 1
            yield batch


def test_budget_split_over_ranks_takes_the_first_valid_images_in_order():
    flags = [True, False, True, True, False, False, False, False, True, True, True, True, True]
    loader = _Counting(_loader(flags))
    # 7 images over 2 ranks: this rank takes ceil(7 / 2) = 4, the first 4 valid ones
    out = list(stream_trajectories(loader, _teacher, "cpu", images=7, ranks=2))
    used = torch.cat([b.trajectory[b.valid, 1, 0, 0] / 2 for b in out]).tolist()
    valid_numbers = [n for n, ok in enumerate(flags) if ok]
    assert used == valid_numbers[:4] == [0, 2, 3, 8]
    # the all-invalid second batch is skipped; the batch reaching the budget is the last read
    assert len(out) == 2 and loader.taken == 3
    assert out[1].valid.tolist() == [True, False, False, False]
    for b, first in zip(out, (0, 8)):  # whole batches run, rows in loader order
        assert b.trajectory[:, 2, 0, 0].tolist() == [3.0 * (first + k) for k in range(4)]
        assert b.labels.tolist() == [(first + k) % 3 for k in range(4)]
    assert rank_share(7, 2) == 4 and rank_share(7, 1) == 7 and rank_share(7, 0) == 7


def test_only_valid_runs_just_the_images_used():
    flags = [True, False, True, True, False, True, True, True]
    out = list(stream_trajectories(_loader(flags), _teacher, "cpu", images=5, only_valid=True))
    assert [b.trajectory.shape[0] for b in out] == [3, 2]
    assert torch.cat([b.trajectory[:, 0, 0, 0] for b in out]).tolist() == [0, 2, 3, 5, 6]
    assert torch.cat([b.labels for b in out]).tolist() == [0, 2, 0, 2, 0]
    assert all(b.valid.all() for b in out)


def test_no_budget_reads_every_batch_and_missing_valid_means_all():
    batches = [{"image": b["image"]} for b in _loader([True] * 10)]
    out = list(stream_trajectories(batches, _teacher, "cpu"))
    assert [len(b.valid) for b in out] == [4, 4, 2] and all(b.valid.all() for b in out)
    assert out[0].labels is None
