"""The autoregressive path: code sampling filters, a causal transformer, and textual inversion through the same
train_new.py / txt2img.py on an ARTextToImage with a tiny T5 whose tokenizer splits words into pieces."""
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import txt2img
from ldm.data.shapes.t5 import world_captions, write_tiny_t5
from ldm.models.autoregressive.sampling import filter_logits
from ldm.models.autoregressive.transformer import ImageTokenTransformer

AR_CONFIG = "models/ar/tiny-shapes/config.yaml"
AR_CONFIGS = {"raster": AR_CONFIG, "next-scale": "models/ar/tiny-shapes-scales/config.yaml"}
TINY = {"transformer_config": {"params": {"n_codes": 64, "dim": 32, "depth": 1, "heads": 2, "context_dim": 32}},
        "context_dim": 32, "first_stage_config": {"params": {"n_embed": 64}}}


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.01)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits)).any()


def test_transformer_is_causal():
    torch.manual_seed(0)
    net = ImageTokenTransformer(n_codes=16, n_positions=8, context_dim=8, dim=16, depth=2, heads=2).eval()
    codes, context = torch.randint(0, 16, (2, 7)), torch.randn(2, 5, 8)
    changed = codes.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 16
    a, b = net(codes, context), net(changed, context)
    assert a.shape == (2, 8, 16)
    assert torch.allclose(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.fixture(scope="module", params=sorted(AR_CONFIGS))
def ar_setup(tmp_path_factory, request):
    """(config file, checkpoint) of a random-init tiny ARTextToImage (raster order or next-scale) with its own
    tiny T5 folder."""
    from ldm.util import instantiate_from_config

    root = tmp_path_factory.mktemp("ar")
    tokenizer = write_tiny_t5(str(root / "t5"), list(world_captions()), d_model=32, d_kv=8, d_ff=64, num_layers=1)
    assert len(tokenizer.tokenize("triangle")) > 1  # the init word is several pieces
    config = OmegaConf.merge(OmegaConf.load(AR_CONFIGS[request.param]), {"model": {"params": {
        **TINY, "cond_stage_config": {"params": {"version": str(root / "t5")}}}}})
    OmegaConf.save(config, str(root / "config.yaml"))
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    ckpt = str(root / "model.safetensors")
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, ckpt)  # T5 ties two keys
    return str(root / "config.yaml"), ckpt


@pytest.mark.parametrize("injection", ["input", "output"])
def test_ti_on_the_ar_model_trains_only_the_vectors(ar_setup, tmp_path, injection):
    import train_new
    from load import read_state_dict

    config, ckpt = ar_setup
    run = train_new.main(["--base", config, "configs/ar-shapes/finetune.yaml", "-t", "--actual_resume", ckpt,
                          "-n", "ar", "--data_root", "dataset/striped_triangle", "--init_word", "triangle",
                          "--placeholder_string", "*", "-l", str(tmp_path), "lightning.trainer.max_steps=3",
                          "data.params.batch_size=2",
                          f"model.params.personalization_config.params.injection={injection}"])
    model, reference = run.model, read_state_dict(ckpt)[0]
    manager = model.embedding_manager
    assert not torch.equal(manager.string_to_param_dict["*"], manager.initial_embeddings["*"])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items()), "a frozen weight changed"
    (group,) = run.trainer.optimizers[0].param_groups
    assert [p.data_ptr() for p in group["params"]] == [manager.string_to_param_dict["*"].data_ptr()]
    assert not model.transformer.training and not model.cond_stage_model.training
    embedding = os.path.join(run.logdir, "checkpoints", "embeddings.pt")
    assert os.path.isfile(embedding)

    out, sampling = tmp_path / "samples", tmp_path / "injection.yaml"
    OmegaConf.save({"model": {"params": {"personalization_config": {"params": {"injection": injection}}}}},
                   str(sampling))
    written = txt2img.main(["--config", config, "configs/ar-shapes/finetune.yaml", str(sampling), "--ckpt_path", ckpt,
                            "--embedding_path", embedding, "--prompt", "a photo of a *", "--n_samples", "2",
                            "--outdir", str(out), "--device", "cpu", "--top_k", "8", "--scale", "2"])
    assert len(written) == 2 and all(os.path.isfile(p) for p in written)


def test_placeholder_positions_come_from_token_ids(ar_setup):
    """'*' is found wherever the tokenizer puts it (no 'A photo of a' position arithmetic)."""
    from ldm.util import instantiate_from_config

    config = OmegaConf.merge(OmegaConf.load(ar_setup[0]), OmegaConf.load("configs/ar-shapes/finetune.yaml"))
    model = instantiate_from_config(config.model)
    encoder, manager = model.cond_stage_model, model.embedding_manager
    with torch.no_grad():
        manager.string_to_param_dict["*"].fill_(3.0)
        for prompt in ("a photo of a *", "a good photo of the weird *", "* in the kitchen"):
            tokens = encoder.tokenize([prompt])
            embeds = manager.input_seam(tokens.clone(), encoder.token_embedding)
            rows = (embeds[0] == 3.0).all(-1).nonzero().flatten().tolist()
            start = (tokens[0] == manager.placeholder_ids["*"][0]).nonzero().flatten().tolist()
            assert rows[0] == start[0] and len(rows) == len(manager.placeholder_ids["*"])


def test_cached_steps_give_the_full_forward_logits():
    torch.manual_seed(1)
    net = ImageTokenTransformer(n_codes=16, n_positions=6, context_dim=8, dim=16, depth=2, heads=2).eval()
    codes, context = torch.randint(0, 16, (3, 6)), torch.randn(3, 5, 8)
    with torch.no_grad():
        full = net(codes[:, :-1], context)
        caches, steps = net.start_cache(context), []
        for i in range(6):
            steps.append(net.step(None if i == 0 else codes[:, i - 1], caches))
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)
