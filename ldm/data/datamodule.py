"""DataModuleFromConfig: datasets named in the `data` section of a config, as Lightning dataloaders."""
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.data.stream import StreamLoader
from ldm.util import instantiate_from_config


class DataModuleFromConfig(pl.LightningDataModule):
    """The training split is a resumable stream (ldm.data.stream) drawn from `seed` (default: one drawn from
    torch's generator, which the trainer seeds)."""

    def __init__(self, batch_size, train=None, validation=None, test=None, num_workers=None, wrap=False,
                 shuffle_val=False, seed=None):
        super().__init__()
        self.batch_size = batch_size
        self.seed = int(torch.randint(2 ** 62, ()).item()) if seed is None else int(seed)
        self.num_workers = batch_size * 2 if num_workers is None else num_workers
        self.configs = {"train": train, "validation": validation, "test": test}
        self.shuffle_val = shuffle_val
        self.datasets = {}
        if wrap:
            raise NotImplementedError("data.params.wrap is not supported (remove it or set it to false)")

    def setup(self, stage=None):
        for split, cfg in self.configs.items():
            if cfg is not None and split not in self.datasets:
                self.datasets[split] = instantiate_from_config(cfg)

    def _loader(self, split, shuffle):
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return StreamLoader(self.datasets["train"], self.batch_size, self.seed, self._batches_trained,
                            num_workers=self.num_workers, rank=rank, world_size=world)

    def _batches_trained(self):
        """Batches the run has trained on: its optimizer steps times the batches each accumulates."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches

    def val_dataloader(self):
        return self._loader("validation", self.shuffle_val) if "validation" in self.datasets else []

    def test_dataloader(self):
        return self._loader("test", False) if "test" in self.datasets else []
