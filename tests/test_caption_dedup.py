"""Repeated captions are encoded once: same context and same gradient of the vectors as row by row."""
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.util import instantiate_from_config

CONFIG = "configs/tiny/txt2img-tiny-finetune.yaml"
CAPTIONS = ["a photo of *", "a rendering of *", "a photo of *", "a photo of *", "a rendering of *"]


def test_repeated_captions_encode_once_with_the_same_context_and_gradient(fixture_dir):
    model = instantiate_from_config(OmegaConf.load(CONFIG).model)
    model.load_state_dict(load_file(str(fixture_dir / "state_dict.safetensors")), strict=False)
    model.train()
    seen = []
    model.cond_stage_model.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    weights = torch.randn(len(CAPTIONS), 77, 1)

    def context_and_grad(fn):
        (vector,) = model.embedding_manager.embedding_parameters()
        vector.grad = None
        c = fn()
        (c * weights).sum().backward()
        return c.detach(), vector.grad.clone()

    deduped, grad = context_and_grad(lambda: model.get_learned_conditioning(CAPTIONS))
    assert seen == [2]  # two distinct captions went through the encoder
    rows = [model.cond_stage_model.encode([c], embedding_manager=model.embedding_manager) for c in CAPTIONS]
    one_by_one, grad_rows = context_and_grad(lambda: torch.cat(rows))
    torch.testing.assert_close(deduped, one_by_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_rows, rtol=1e-4, atol=1e-5)  # summed in another order
    assert grad.abs().sum() > 0


def test_captions_are_not_deduplicated_while_the_encoder_trains(fixture_dir):
    config = OmegaConf.load(CONFIG).model
    config.params.pop("personalization_config")
    model = instantiate_from_config(config).train()
    model.cond_stage_model.train()
    seen = []
    model.cond_stage_model.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    model.get_learned_conditioning(CAPTIONS)
    assert seen == [len(CAPTIONS)]
