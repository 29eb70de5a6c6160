"""A diffusers Stable Diffusion 1.x folder as an LDM state dict: UNet, VAE and CLIP text model renamed in memory.

    state = read_diffusers_folder("stable-diffusion-v1-5")  # {"model.diffusion_model.input_blocks.0.0.weight": ...}

The folder is what `StableDiffusionPipeline.save_pretrained` writes: unet/, vae/ and text_encoder/, each with its
weights (`diffusion_pytorch_model.safetensors` / `model.safetensors`, an `.fp16` variant or the `.bin` of older
saves, or shards listed in an `.index.json`), and tokenizer/ (vocab.json and merges.txt, or tokenizer.json),
which the CLIP embedder reads instead of its bundled BPE file. A part that is missing is one line naming it
(DiffusersFolderError). Weights keep the dtype they were saved in; loading copies them into the model's parameters.
"""
import json
import os
import re

from omegaconf import OmegaConf

from ldm.checkpoints import CheckpointError, read_state_dict

CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
CLIP_EMBEDDERS = (CLIP_EMBEDDER, "ldm.modules.encoders.clip.FrozenCLIPEmbedder")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# (subfolder, weight file stems in order of preference, our key prefix)
PARTS = (("unet", "diffusion_pytorch_model", "model.diffusion_model."),
         ("vae", "diffusion_pytorch_model", "first_stage_model."),
         ("text_encoder", "model", "cond_stage_model.transformer.text_model."))


class DiffusersFolderError(CheckpointError):
    """A folder that is not a complete diffusers Stable Diffusion 1.x pipeline, in one line."""


def is_diffusers_folder(path):
    """Whether `path` is a folder meant as a diffusers pipeline (it has model_index.json or a unet/ folder)."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, p)) for p in ("model_index.json", "unet"))


def _lacks(folder, what, fix):
    return DiffusersFolderError(f"diffusers folder {folder} lacks {what}: {fix}")


def weights_file(folder, part, stem):
    """The weights of `folder/part`: safetensors before .bin, full precision before the .fp16 variant, a shard
    index before nothing -> a path (a file or an .index.json)."""
    names = [f"{stem}{variant}{suffix}" for suffix in (".safetensors", ".bin") for variant in ("", ".fp16")]
    for name in names + [n + ".index.json" for n in names]:
        path = os.path.join(folder, part, name)
        if os.path.isfile(path):
            return path
    raise _lacks(folder, f"{part}/{stem}.safetensors", "save the pipeline again with save_pretrained, or give the "
                                                       "single-file .ckpt/.safetensors instead")


def read_part(path):
    """A weights file, or a shard index (its weight_map's files) -> {name: tensor}, never unpickling code."""
    if not path.endswith(".index.json"):
        return read_state_dict(path)[0]
    try:
        with open(path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DiffusersFolderError(f"{path} is not a shard index (a JSON weight_map): save the pipeline again") from e
    state = {}
    for shard in shards:
        shard_path = os.path.join(os.path.dirname(path), shard)
        if not os.path.isfile(shard_path):
            raise DiffusersFolderError(f"{path} lists the shard {shard}, which is not beside it: copy the whole folder")
        state.update(read_state_dict(shard_path)[0])
    return state


def read_diffusers_folder(folder):
    """A diffusers SD 1.x pipeline folder -> {our LDM key: tensor} of its UNet, VAE and text encoder."""
    folder = os.fspath(folder)
    state = {}
    for part, stem, prefix in PARTS:
        weights = read_part(weights_file(folder, part, stem))
        rename = {"unet": unet_key, "vae": vae_key, "text_encoder": text_key}[part]
        shape = layout(weights)
        for key, value in weights.items():
            ours = rename(key, shape)
            if ours is not None:
                state[prefix + ours] = vae_attention_weight(ours, value) if part == "vae" else value
    return state


def tokenizer_folder(folder):
    """folder/tokenizer, checked to hold CLIP's vocab.json and merges.txt (or the tokenizer.json that transformers
    5.x saves instead)."""
    path = os.path.join(os.fspath(folder), "tokenizer")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    for name in TOKENIZER_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise _lacks(folder, f"tokenizer/{name}", "copy the pipeline's tokenizer folder (vocab.json, merges.txt) "
                                                      "into it")
    return path


def prepare_config(model_config, folder):
    """Point the CLIP embedder of `model_config` (an LDM model node, edited in place) at the folder's tokenizer;
    a config whose text encoder is not SD 1.x's CLIP -> one line (a diffusers folder holds a CLIPTextModel)."""
    cond = OmegaConf.select(model_config, "params.cond_stage_config")
    target = cond.get("target") if cond is not None else None
    if target not in CLIP_EMBEDDERS:
        raise DiffusersFolderError(f"{folder} is a diffusers folder, which loads into Stable Diffusion 1.x configs "
                                   f"(cond_stage_config {CLIP_EMBEDDER}), not {target}: give --config "
                                   "configs/stable-diffusion/v1-inference.yaml or the model's single-file checkpoint")
    path = tokenizer_folder(folder)
    if cond.get("params") is None:
        cond.params = {}
    if cond.params.get("tokenizer_path") is None:
        cond.params.tokenizer_path = path


# ---- key names ----------------------------------------------------------------------------------------

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)")


def _count(weights, pattern):
    """How many distinct indices `pattern` (one group) matches among the keys of `weights`."""
    return len({m.group(1) for k in weights for m in [re.match(pattern, k)] if m})


def layout(weights):
    """What the renaming needs to know of a part: resnets per UNet down level, UNet up levels with attention, VAE
    decoder levels."""
    return {"res_blocks": _count(weights, r"down_blocks\.0\.resnets\.(\d+)\."),
            "up_attention": {int(m.group(1)) for k in weights for m in [re.match(r"up_blocks\.(\d+)\.attentions", k)]
                             if m},
            "decoder_levels": _count(weights, r"decoder\.up_blocks\.(\d+)\.")}


def unet_key(key, shape):
    """A diffusers UNet2DConditionModel key -> our UNetModel key (below model.diffusion_model.); a key of no SD 1.x
    UNet stays as it is, so that the strict load names it as unexpected."""
    module, _, leaf = key.rpartition(".")
    if module in UNET_FIXED:
        return f"{UNET_FIXED[module]}.{leaf}"
    mid = re.match(r"mid_block\.(\w+\.\d+)\.(.*)", key)
    if mid and mid.group(1) in MID:
        part, rest = mid.groups()
        return f"{MID[part]}.{_renamed(rest, RESNET) if part.startswith('resnets') else rest}"
    found = BLOCK.match(key)
    if not found:
        return key
    side, level, kind, index, rest = found.groups()
    level, index = int(level), int(index)
    per_level = shape["res_blocks"]
    if side == "down":
        block = 1 + level * (per_level + 1) + index
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * (per_level + 1)}.0.op.{rest.split('.', 1)[1]}"
        return f"input_blocks.{block}.{_layer(kind, rest)}"
    block = level * (per_level + 1) + index
    if kind == "upsamplers":
        last = level * (per_level + 1) + per_level
        return f"output_blocks.{last}.{2 if level in shape['up_attention'] else 1}.{rest}"
    return f"output_blocks.{block}.{_layer(kind, rest)}"


def _layer(kind, rest):
    """'resnets', 'norm1.weight' -> '0.in_layers.0.weight'; 'attentions', x -> '1.x' (same names inside)."""
    return f"0.{_renamed(rest, RESNET)}" if kind == "resnets" else f"1.{rest}"


def _renamed(name, modules):
    """'norm1.weight', {'norm1': 'in_layers.0'} -> 'in_layers.0.weight': the module part renamed where listed."""
    module, _, leaf = name.rpartition(".")
    return f"{modules.get(module, module)}.{leaf}"


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # the second four: older saves
VAE_FIXED = {"conv_norm_out": "norm_out"}


def vae_key(key, shape):
    """A diffusers AutoencoderKL key -> our AutoencoderKL key (below first_stage_model.)."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    module, _, leaf = rest.rpartition(".")
    if module in VAE_FIXED:
        return f"{side}.{VAE_FIXED[module]}.{leaf}"
    found = re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", rest)
    if found:
        kind, index, inner = found.groups()
        if kind == "attentions":
            return f"{side}.mid.attn_1.{_renamed(inner, VAE_ATTENTION)}"
        return f"{side}.mid.block_{int(index) + 1}.{_renamed(inner, VAE_RESNET)}"
    found = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
    if not found:
        return key
    way, level, kind, index, inner = found.groups()
    level = int(level)
    if way == "up":  # diffusers counts decoder levels from the lowest resolution, LDM from the highest
        level = shape["decoder_levels"] - 1 - level
    stage = "down" if way == "down" else "up"
    if kind == "resnets":
        return f"{side}.{stage}.{level}.block.{index}.{_renamed(inner, VAE_RESNET)}"
    return f"{side}.{stage}.{level}.{'downsample' if way == 'down' else 'upsample'}.{inner}"


def vae_attention_weight(key, value):
    """diffusers keeps the VAE attention's q, k, v and output projections as Linear (out, in); LDM as 1x1 convs
    (out, in, 1, 1)."""
    if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.dim() == 2:
        return value[:, :, None, None]
    return value


def text_key(key, shape):
    """A transformers CLIPTextModel key (with or without its text_model. level) -> ours below text_model.;
    None for the position_ids buffer older saves carry."""
    key = key.removeprefix("text_model.")
    return None if key == "embeddings.position_ids" else key
