"""Precision and memory options: they take effect, and they leave the results alone."""
import contextlib

import pytest
import torch
from safetensors.torch import load_file

from ldm.modules import x_transformer
from ldm.modules.encoders.modules import BERTEmbedder


def test_bf16_mixed_on_cpu_trains_a_float32_embedding(train_tiny, tiny_concept, ckpt, tmp_path):
    run = train_tiny(tiny_concept, tmp_path, "lightning.trainer.max_steps=3", "--precision", "bf16-mixed",
                     "--grad_checkpoint", "true")
    assert run.trainer.precision == "bf16-mixed"
    model = run.model
    vector = model.embedding_manager.string_to_param_dict["*"]
    assert vector.dtype == torch.float32
    reference = load_file(ckpt)
    assert not torch.allclose(vector.detach()[0], reference["cond_stage_model.transformer.token_emb.weight"][3899])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items()), "a frozen weight changed"
    assert model.model.diffusion_model.input_blocks[1][0].use_checkpoint
    assert model.cond_stage_model.transformer.attn_layers.use_checkpoint


def test_fp16_on_cpu_is_refused_in_one_line(train_tiny, tiny_concept, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_tiny(tiny_concept, tmp_path, "lightning.trainer.max_steps=3", "--precision", "16-mixed")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: precision 16-mixed needs a GPU (--gpus 0,): use bf16-mixed or 32 on the CPU"


def test_bert_checkpointing_recomputes_and_keeps_gradients(tiny_bert, monkeypatch):
    calls = [0]
    forward = x_transformer.Attention.forward
    monkeypatch.setattr(x_transformer.Attention, "forward", lambda self, x: (calls.__setitem__(0, calls[0] + 1),
                                                                              forward(self, x))[1])
    grads, counts = [], []
    for use_checkpoint in (False, True):
        encoder = BERTEmbedder(n_embed=32, n_layer=2, use_checkpoint=use_checkpoint)
        encoder.load_state_dict(tiny_bert.state_dict())
        encoder.requires_grad_(False)
        calls[0] = 0
        x = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
        encoder.transformer.encode_embeddings(x).square().sum().backward()
        grads.append(x.grad)
        counts.append(calls[0])
    assert counts == [2, 4]  # with checkpointing both attention layers ran again in backward
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_frozen_conv_keeps_only_its_weight_and_gives_the_same_input_gradient(monkeypatch):
    from ldm.modules.diffusionmodules.util import Conv2d

    monkeypatch.setattr(Conv2d, "lean_min_numel", 1)
    conv = Conv2d(8, 16, 3, stride=2, padding=1)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    g = torch.randn(2, 16, 5, 5)

    def saved_shapes_and_grad():
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (shapes.append(tuple(t.shape)), t)[1], lambda t: t):
            y = conv(x)
        (grad,) = torch.autograd.grad(y, x, g)
        return shapes, grad

    trained_shapes, trained_grad = saved_shapes_and_grad()
    assert (2, 8, 9, 9) in trained_shapes  # a trainable weight needs the input for its own gradient
    conv.requires_grad_(False)
    frozen_shapes, frozen_grad = saved_shapes_and_grad()
    assert frozen_shapes == [(16, 8, 3, 3)]
    assert torch.equal(frozen_grad, trained_grad)
    monkeypatch.setattr(Conv2d, "lean_min_numel", x.numel() + 1)  # small inputs stay with autograd
    assert (2, 8, 9, 9) in saved_shapes_and_grad()[0]


def test_spatial_transformer_projections_as_matrix_products_match_the_convolutions():
    from ldm.implementation import Implementation, using
    from ldm.modules.attention import SpatialTransformer

    torch.manual_seed(0)
    block = SpatialTransformer(32, n_heads=2, d_head=16, context_dim=24, checkpoint=False)
    torch.nn.init.normal_(block.proj_out.weight)  # zero-initialised: give it weights to compare
    x, context = torch.randn(2, 32, 4, 5), torch.randn(2, 7, 24)
    outputs = []
    for linear in (True, False):
        with using(Implementation(linear_projections=linear)):
            outputs.append(block(x, context))
    assert outputs[0].shape == x.shape and torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert (outputs[0] - x).abs().max() > 0.1


@pytest.fixture
def unpacked(monkeypatch):
    """What recompute_saved's hooks packed, as backward unpacks it: kept tensors, and recipe tuples."""
    from ldm.modules.diffusionmodules import util

    seen, unpack = [], util._unpack_recipe
    monkeypatch.setattr(util, "_unpack_recipe", lambda packed: (seen.append(packed), unpack(packed))[1])
    return seen


def _recipes(packed):
    return [p for p in packed if not torch.is_tensor(p)]


def _kept_for_backward(fn, inputs, modules, unpacked):
    """What autograd keeps for backward while running fn(*inputs): the tensors it saves, and the inputs of the
    recipes it keeps instead (the modules' weights aside), as (bytes, shapes); and the inputs' gradients."""
    unpacked.clear()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (kept.append(t), t)[1], lambda t: t):
        out = fn(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    for packed in unpacked:
        kept.extend([packed] if torch.is_tensor(packed) else [a for a in packed[0].args if torch.is_tensor(a)])
    weights = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    kept = [t for t in kept if t.untyped_storage().data_ptr() not in weights]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(storages.values()), {tuple(t.shape) for t in kept}, grads


@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_projections_keep_less_and_give_the_same_gradients_bit_for_bit(tiny_bert, unpacked, autocast):
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.util import keeping_saved

    torch.manual_seed(0)
    block = SpatialTransformer(32, n_heads=2, d_head=16, context_dim=32, checkpoint=False)
    torch.nn.init.normal_(block.proj_out.weight)
    block.requires_grad_(False)
    encoder = BERTEmbedder(n_embed=32, n_layer=2).requires_grad_(False)
    encoder.load_state_dict(tiny_bert.state_dict())
    tokens = torch.randn(2, 77, 32, requires_grad=True)
    image = torch.randn(2, 32, 4, 4)

    def step(tokens, recompute):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                contextlib.nullcontext() if recompute else keeping_saved():
            return block(image, encoder.transformer.encode_embeddings(tokens)).float()

    results = {recompute: _kept_for_backward(lambda x: step(x, recompute), (tokens,), (block, encoder), unpacked)
               for recompute in (False, True)}
    (bytes_kept, shapes_kept, grads), (bytes_recomputing, shapes_recomputing, grads_recomputing) = results.values()
    assert torch.equal(grads_recomputing[0], grads[0])
    # the BERT's GELU inputs, the UNet block's GEGLU input and its keys and values of the context (per head)
    recomputed = {(2, 77, 4 * 32), (2, 16, 2 * 4 * 32), (2, 2, 77, 16)}
    assert recomputed <= shapes_kept and not recomputed & shapes_recomputing
    # and the BERT's queries, keys and values (2 layers x 3 x (2, 8 heads, 77, 64)), whose shape its attention's
    # output shares; kept instead: the inputs of the projections (32 wide)
    queries_keys_values = 2 * 3 * 2 * 77 * 512 * (2 if autocast else 4)
    assert bytes_kept - bytes_recomputing > queries_keys_values


def test_recomputation_stands_aside_in_checkpointed_regions_and_refuses_inputs_changed_in_place(tiny_bert, unpacked):
    from ldm.modules.diffusionmodules import util

    for use_checkpoint in (False, True):
        encoder = BERTEmbedder(n_embed=32, n_layer=2, use_checkpoint=use_checkpoint).requires_grad_(False)
        encoder.load_state_dict(tiny_bert.state_dict())
        unpacked.clear()
        x = torch.randn(2, 77, 32, requires_grad=True)
        encoder.transformer.encode_embeddings(x).sum().backward()
        assert bool(_recipes(unpacked)) != use_checkpoint

    layer = torch.nn.Linear(4, 8, bias=False).requires_grad_(False)
    x = torch.randn(3, 4, requires_grad=True)
    source = x * 2
    h = layer(source)
    with util.recompute_saved({h: util.linear_recipe(layer, source)}):
        y = torch.sin(h)  # keeps h: as a recipe
    source.add_(1)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        y.sum().backward()


def _tiny_ti_model(fixture_dir, **params):
    """The tests' tiny TI model (configs/tiny) with `params` set, its weights loaded, in training mode."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    from load import load_state_dict_into

    config = OmegaConf.load("configs/tiny/txt2img-tiny-finetune.yaml")
    config.model.params.update(params)
    model = instantiate_from_config(config.model)
    load_state_dict_into(model, str(fixture_dir / "state_dict.safetensors"), strict=False)  # vectors from "dog"
    return model.train()


def _tiny_images():
    """(4, 16, 16, 3) in [-1, 1], as the dataset gives."""
    return torch.rand(4, 16, 16, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_recomputed_projections_train_the_same_embedding_bit_for_bit(fixture_dir, unpacked):
    images = _tiny_images()
    runs = {}
    for recompute in (False, True):
        model = _tiny_ti_model(fixture_dir, recompute_projections=recompute)
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=5e-3)
        torch.manual_seed(0)
        unpacked.clear()
        losses = []
        for step in range(5):
            loss, _ = model.shared_step({"image": images[step % 2::2], "caption": ["a photo of *"] * 2})
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[recompute] = losses, [p.detach().clone() for p in model.trainable_parameters()], bool(_recipes(unpacked))
    (losses, vectors, recomputed), (losses_r, vectors_r, recomputed_r) = runs[False], runs[True]
    assert recomputed_r and not recomputed
    assert losses_r == losses and all(torch.equal(a, b) for a, b in zip(vectors_r, vectors))


def test_recomputed_projections_keep_second_order_gradients():
    from ldm.modules.diffusionmodules.util import keeping_saved
    from ldm.modules.x_transformer import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(8, mult=4).requires_grad_(False)
    x = torch.randn(2, 5, 8, requires_grad=True)
    results = []
    for context in (keeping_saved, contextlib.nullcontext):
        with context():
            y = ff(x)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), x)[0])
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("backend", ["aot_eager", True])  # True: inductor, as `compile: true` runs it
def test_compile_runs_the_training_step_compiled_and_sampling_eagerly_with_the_same_gradients(fixture_dir, backend):
    from torch._dynamo.utils import counters

    images = _tiny_images()
    runs = {}
    try:
        for compile in (False, backend):
            model = _tiny_ti_model(fixture_dir, compile=compile)
            graphs = []
            for step in range(2):
                torch.manual_seed(step)
                loss, _ = model.shared_step({"image": images, "caption": ["a photo of *"] * 4})
                loss.backward()
                graphs.append(counters["stats"]["unique_graphs"])
                with torch.no_grad():  # as the samplers call it: a guidance pair of another batch size
                    model.apply_model(torch.randn(6, 4, 8, 8), torch.full((6,), 500), torch.randn(6, 77, 32))
                graphs.append(counters["stats"]["unique_graphs"])
            runs[compile] = (loss.item(), [p.grad for p in model.trainable_parameters()], graphs,
                             list(model.state_dict()))
    finally:
        torch._dynamo.reset()
    (loss, grads, graphs, keys), (loss_c, grads_c, graphs_c, keys_c) = runs[False], runs[backend]
    assert len(set(graphs)) == 1 and graphs_c[0] == graphs[0] + 1 and len(set(graphs_c)) == 1  # one graph, once
    assert keys_c == keys
    if backend == "aot_eager":  # the same operations, traced: bit for bit
        assert loss_c == loss and all(torch.equal(a, b) for a, b in zip(grads_c, grads))
    else:  # inductor's fused kernels round differently
        assert loss_c == pytest.approx(loss, rel=1e-5)
        for a, b in zip(grads_c, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
