"""Batch augmentations (`dafl.augment`): shift, flip, mixup, CutMix."""
import torch

from dafl.augment import augment_batch, cutmix, mixup, random_shift_flip


def test_augmentation_of_synthetic_batches():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    flipped = random_shift_flip(x, shift=0, flip=True)
    n_flipped = sum(torch.equal(f, x[0].flip(2)) for f in flipped)
    assert 10 < n_flipped < 54  # about half
    shifted = random_shift_flip(x, shift=1, flip=False)
    assert shifted.shape == x.shape
    assert torch.equal(random_shift_flip(x, 0, False), x)


def test_mixup_blends_pairs_of_the_batch():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()  # image i is constant i
    assert torch.equal(mixup(x, 0.0), x)
    mixed = mixup(x, 1.0)
    assert mixed.shape == x.shape and not torch.equal(mixed, x)
    # Every output is w * x_i + (1 - w) * x_j: constant per image, within the batch's range.
    assert torch.equal(mixed, mixed[:, :, :1, :1].expand_as(mixed))
    assert mixed.min() >= 0 and mixed.max() <= 7


def test_cutmix_pastes_one_box_of_a_partner_image():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 16, 16).contiguous()  # image i is constant i
    boxes = 0
    for _ in range(20):
        mixed = cutmix(x)
        changed = mixed != x
        assert mixed.shape == x.shape
        if not changed.any():
            continue  # an empty box, or every image its own partner
        boxes += 1
        # Outside the box each image is itself; inside it is one constant partner image.
        rows, cols = changed.any(0)[0].any(1).nonzero(), changed.any(0)[0].any(0).nonzero()
        box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        outside = torch.ones(16, 16, dtype=torch.bool)
        outside[box] = False
        assert torch.equal(mixed[:, 0][:, outside], x[:, 0][:, outside])
        inside = mixed[:, 0][(slice(None), *box)]
        assert torch.equal(inside, inside[:, :1, :1].expand_as(inside))
        assert sorted(inside[:, 0, 0].tolist()) == list(range(8))  # partners are a permutation
    assert boxes > 10


def test_augment_batch_chooses_cutmix_by_probability():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 16, 16).contiguous()
    assert torch.equal(augment_batch(x), x)  # no lever on: the batch is untouched
    # CutMix keeps every pixel an original value (a box, never a blend).
    assert all(torch.isin(augment_batch(x, cutmix_prob=1.0), x).all() for _ in range(5))
    assert not torch.isin(augment_batch(x, mixup_alpha=1.0), x).all()  # mixup: blends between integers
