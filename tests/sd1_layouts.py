"""A tiny Stable Diffusion 1.x (configs/stable-diffusion/v1-*.yaml with small sizes) saved in every layout: our
checkpoint (.ckpt), single-file .safetensors (fp32, fp16, with EMA copies) and a diffusers folder written by
diffusers' own StableDiffusionPipeline.save_pretrained (its single-file loader reading our file)."""
import os

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.modules.encoders.tokenizers import write_clip_tokenizer_files
from ldm.util import instantiate_from_config

TINY_SD1 = {"params": {
    "image_size": 8,
    "unet_config": {"params": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1, 2],
                               "num_heads": 2, "context_dim": 32, "num_res_blocks": 2, "use_checkpoint": False}},
    "first_stage_config": {"params": {"ddconfig": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                                   "resolution": 32}}},
    "cond_stage_config": {"params": {"text_config": {"hidden_size": 32, "intermediate_size": 64,
                                                     "num_hidden_layers": 2, "num_attention_heads": 4}}}}}
TINY_DATA = {"params": {"num_workers": 0, "train": {"params": {"size": 16}}, "validation": {"params": {"size": 16}}}}
SD1_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1}  # the v1 configs' linear_start and linear_end
TINY_SAMPLING = {"H": 16, "W": 16, "ddim_steps": 3, "scale": 3.0}


def tiny_config(base, folder, name):
    """configs/stable-diffusion/<base> shrunk to the tiny sizes, written to folder/<name> -> its path."""
    config = OmegaConf.merge(OmegaConf.load(f"configs/stable-diffusion/{base}"), {"model": TINY_SD1},
                             {"sampling": TINY_SAMPLING})
    if "data" in config:
        config = OmegaConf.merge(config, {"data": TINY_DATA, "lightning": {
            "trainer": {"max_steps": 2, "benchmark": False}, "callbacks": {"image_logger": None}}})
    path = folder / name
    OmegaConf.save(config, path)
    return str(path)


def tiny_state(config_path, seed):
    """The state dict of the tiny model built with `seed`, with the buffers a real checkpoint carries; the layers
    the UNet starts at zero (its output convolutions) are random too, so that every weight changes the samples."""
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(config_path).model)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def ema_copies(state):
    """LitEma's copies of the UNet weights: model.a.b.c -> model_ema.abc, plus its two counters."""
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v for k, v in state.items() if k.startswith("model.")}
    return {**ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}


def save_layouts(config_path, folder):
    """Every layout of one tiny model (seed 0), the EMA file's EMA copies from the UNet of seed 1 ->
    ({layout: path}, the state the EMA copies make: seed 0 with the UNet of seed 1)."""
    state, other = tiny_state(config_path, 0), tiny_state(config_path, 1)
    paths = {name: str(folder / name) for name in ("model.ckpt", "fp32.safetensors", "fp16.safetensors",
                                                   "ema.safetensors", "diffusers")}
    torch.save({"state_dict": state, "global_step": 0}, paths["model.ckpt"])
    save_file(state, paths["fp32.safetensors"])
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, paths["fp16.safetensors"])
    save_file({**state, **ema_copies(other)}, paths["ema.safetensors"])
    save_pipeline(config_path, paths["fp32.safetensors"], state, paths["diffusers"])
    return paths, {**state, **{k: v for k, v in other.items() if k.startswith("model.")}}


def save_pipeline(config_path, single_file, state, folder):
    """What a user's diffusers folder is: diffusers reads our single file's UNet and VAE itself, the text encoder is
    a transformers CLIPTextModel, the tokenizer SD 1.x's; StableDiffusionPipeline.save_pretrained writes them."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm.modules.encoders.clip import VIT_L14_TEXT

    unet = UNet2DConditionModel.from_single_file(single_file, original_config=config_path, local_files_only=True)
    vae = AutoencoderKL.from_single_file(single_file, original_config=config_path, local_files_only=True)
    text = OmegaConf.load(config_path).model.params.cond_stage_config.params.text_config
    encoder = CLIPTextModel(CLIPTextConfig(**{**VIT_L14_TEXT, **text}))
    prefix = "cond_stage_model.transformer.text_model."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    tokenizer_files = f"{folder}-tokenizer"
    os.makedirs(tokenizer_files)
    write_clip_tokenizer_files(tokenizer_files)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_files)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD1_SCHEDULE), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
