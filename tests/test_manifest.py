"""The 1.4B config builds exactly the state-dict layout of the released LDM text2img-large checkpoint."""
import json

import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config


def test_txt2img_1p4b_keys_and_shapes(manifest_dir):
    manifest = json.loads((manifest_dir / "manifest_txt2img-1p4B.json").read_text())
    config = OmegaConf.load("configs/latent-diffusion/txt2img-1p4B-eval.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    sd = model.state_dict()
    assert list(sd) == list(manifest["state_dict"])  # same keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == manifest["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def test_finetune_config_adds_only_the_embedding(manifest_dir):
    manifest = json.loads((manifest_dir / "manifest_txt2img-1p4B.json").read_text())
    config = OmegaConf.load("configs/latent-diffusion/txt2img-1p4B-finetune.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    extra = set(model.state_dict()) - set(manifest["state_dict"])
    assert extra and all(k.startswith("embedding_manager.") for k in extra)
    assert set(manifest["state_dict"]) <= set(model.state_dict())
