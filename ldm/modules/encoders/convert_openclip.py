"""Our OpenCLIP text tower (open_clip's key names) in transformers' CLIPTextModel(WithProjection) layout.

The layout diffusers' `text_encoder` / `text_encoder_2` folders and its single-file loader use: the packed q, k, v
projection `attn.in_proj_weight` (3W, W) is split into `q_proj` / `k_proj` / `v_proj`, `text_projection` (W, E),
used as `x @ P`, becomes the Linear weight `text_projection.weight` = P.T (E, W). Values are copied, never changed.
"""
import torch

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
EOS_ID = 49407  # the pooled state is read at the first <|endoftext|> (open_clip: argmax of the ids)


def _block_key(rest):
    """'N.ln_1.weight' -> transformers' key below text_model.encoder.layers, or None for the packed projection."""
    n, name = rest.split(".", 1)
    for ours, theirs in _BLOCK.items():
        if name.startswith(ours + "."):
            return f"encoder.layers.{n}.{theirs}{name[len(ours):]}"
    return None


def openclip_text_to_hf(state_dict, prefix=""):
    """Our tower's keys under `prefix` (e.g. 'conditioner.embedders.1.model.') -> {transformers key: tensor}.

    Keys are `text_model.*` plus `text_projection.weight` (CLIPTextModelWithProjection; CLIPTextModel of
    transformers 5.x has no `text_model.` level: see `load_hf_text_model`). `logit_scale` is dropped.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in _TOP:
            out["text_model." + _TOP[name]] = value
        elif name == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif name.startswith("transformer.resblocks."):
            rest = name[len("transformer.resblocks."):]
            hf = _block_key(rest)
            if hf is not None:
                out["text_model." + hf] = value
                continue
            n, kind = rest.split(".", 1)  # kind: attn.in_proj_weight or attn.in_proj_bias
            suffix = "weight" if kind.endswith("weight") else "bias"
            for proj, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{n}.self_attn.{proj}_proj.{suffix}"] = part.contiguous()
    return out


def hf_text_config(tower, with_projection=False):
    """A transformers CLIPTextConfig with the sizes of `tower` (an OpenCLIPTextTower): exact GELU, LayerNorm eps 1e-5.

    eos_token_id 49407 makes transformers pool at the first <|endoftext|>, where open_clip's argmax of the ids
    points. with_projection: projection_dim is the tower's embed_dim (else the width, transformers' default use).
    """
    from transformers import CLIPTextConfig

    context, width = tower.positional_embedding.shape
    block = tower.transformer.resblocks[0]
    return CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=len(tower.transformer.resblocks),
        num_attention_heads=block.attn.num_heads, max_position_embeddings=context, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=tower.text_projection.shape[1] if with_projection else width,
        bos_token_id=49406, eos_token_id=EOS_ID, pad_token_id=0)


def load_hf_text_model(tower, with_projection=False, drop_last_block=False):
    """A transformers CLIPTextModel(WithProjection) holding `tower`'s weights (strict: every key converted).
    drop_last_block: without the tower's last block, as diffusers keeps SD 2.x's text_encoder (the penultimate
    states, then the final layer norm: the last block is never run)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = hf_text_config(tower, with_projection)
    state = openclip_text_to_hf(tower.state_dict())
    if drop_last_block:
        config.num_hidden_layers -= 1
        last = f"text_model.encoder.layers.{config.num_hidden_layers}."
        state = {k: v for k, v in state.items() if not k.startswith(last)}
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    if not with_projection:
        state.pop("text_projection.weight")
        if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5
            state = {k[len("text_model."):]: v for k, v in state.items()}
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model.eval()
