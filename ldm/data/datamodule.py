"""DataModuleFromConfig: datasets named in the `data` section of a config, as Lightning dataloaders."""
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from ldm.util import instantiate_from_config


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(self, batch_size, train=None, validation=None, test=None, num_workers=None, wrap=False,
                 shuffle_val=False):
        super().__init__()
        self.batch_size = batch_size
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
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("validation", self.shuffle_val) if "validation" in self.datasets else []

    def test_dataloader(self):
        return self._loader("test", False) if "test" in self.datasets else []
