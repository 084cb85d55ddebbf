"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): a tiny real data set."""
from __future__ import annotations

import torch

from .base import EVAL, TRAIN, DataInfo, check_common_options, shard_bounds, step_generator


class Digits:
    batches = "features"  # what a batch holds, for the models' ``needs_batches``
    N_SAMPLES = 1797

    @staticmethod
    def check_options(o) -> None:
        check_common_options(o, int(Digits.N_SAMPLES * (1 - o.val_fraction)))

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, eval_batches: int = 4, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        # the split is fixed (not the trainer seed) so val numbers compare across seeds
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        n_val = int(len(x) * val_fraction)
        self.val_x, self.val_y = x[perm[:n_val]], y[perm[:n_val]]
        self.train_x, self.train_y = x[perm[n_val:]], y[perm[n_val:]]
        self.batch_size, self.eval_batches = batch_size, eval_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.lo, self.hi = shard_bounds(len(self.train_x), rank, world_size)
        self.info = DataInfo(unit="samples", items_per_batch=batch_size, n_features=x.shape[1],
                             num_classes=10)

    def train_batch(self, step: int) -> dict[str, torch.Tensor]:
        gen = step_generator(self.seed, TRAIN, self.rank, step)
        idx = self.lo + torch.randint(0, self.hi - self.lo, (self.batch_size,), generator=gen)
        return {"x": self.train_x[idx], "y": self.train_y[idx]}

    def eval_batches_for_rank(self):
        for i in range(self.rank, self.eval_batches, self.world_size):
            gen = step_generator(self.seed, EVAL, i)
            idx = torch.randint(0, len(self.val_x), (self.batch_size,), generator=gen)
            yield {"x": self.val_x[idx], "y": self.val_y[idx]}
