"""A training data stream that a resumed run can pick up exactly where it stopped.

Sample number s (counted over the whole run) is item perm_p[s % n] of a dataset of n items, where p = s // n
is the pass over the data and perm_p a permutation drawn from (seed, p); the item is made under random
generators seeded from (seed, s), so its random flips and captions depend on nothing else. Batch b holds
samples b * B ... (b + 1) * B - 1 (under data parallelism, rank r of w takes batch b * w + r), so the whole
stream is a function of (seed, b): a run restarted at batch b
sees the batches the uninterrupted run saw, whatever the number of loader workers. Lightning's epochs are
slices of `len(sampler)` batches of the stream.
"""
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.rng import derived_seed, seeded_generators


class SeededItems(Dataset):
    """dataset[i] made under generators seeded for one sample: items[(i, seed)] -> dataset[i]."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with seeded_generators(seed):
            return self.dataset[index]


class StreamBatches(Sampler):
    """Batches of (index, seed) keys for SeededItems: the stream from batch `cursor` to the end of its epoch, the
    share of rank `rank` of `world_size`."""

    def __init__(self, n, batch_size, seed, shuffle=True, rank=0, world_size=1):
        super().__init__()
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.cursor = 0  # the next batch of the stream
        self._pass = (None, None)  # (pass number, its permutation)

    def __len__(self):
        return max(1, self.n // (self.batch_size * self.world_size))

    def key(self, s):
        """Sample number s -> (item index, item seed)."""
        p, position = divmod(s, self.n)
        if self._pass[0] != p:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "pass", p))
            order = torch.randperm(self.n, generator=generator) if self.shuffle else torch.arange(self.n)
            self._pass = (p, order.tolist())
        return self._pass[1][position], derived_seed(self.seed, "sample", s)

    def __iter__(self):
        end = (self.cursor // len(self) + 1) * len(self)
        while self.cursor < end:
            b = self.cursor * self.world_size + self.rank
            self.cursor += 1
            yield [self.key(s) for s in range(b * self.batch_size, (b + 1) * self.batch_size)]


class StreamLoader(DataLoader):
    """A DataLoader over the stream whose state (seed, next batch) goes into Lightning's checkpoints.

    `position()` -> the number of batches the run has trained on (not those a worker prefetched): the caller
    knows it, e.g. from the trainer's step count.
    """

    def __init__(self, dataset, batch_size, seed, position, num_workers=0, shuffle=True, rank=0, world_size=1):
        sampler = StreamBatches(len(dataset), batch_size, seed, shuffle, rank, world_size)
        super().__init__(SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers,
                         persistent_workers=num_workers > 0)
        self.position = position

    def state_dict(self):
        return {"seed": self.batch_sampler.seed, "next_batch": int(self.position())}

    def load_state_dict(self, state):
        self.batch_sampler.seed = int(state["seed"])
        self.batch_sampler.cursor = int(state["next_batch"])
