"""Precision and gradient-checkpointing options: they take effect, and they leave the results alone."""
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


def test_spatial_transformer_projections_as_matrix_products_match_the_convolutions(monkeypatch):
    from ldm.modules.attention import SpatialTransformer

    torch.manual_seed(0)
    block = SpatialTransformer(32, n_heads=2, d_head=16, context_dim=24, checkpoint=False)
    torch.nn.init.normal_(block.proj_out.weight)  # zero-initialised: give it weights to compare
    x, context = torch.randn(2, 32, 4, 5), torch.randn(2, 7, 24)
    outputs = []
    for linear in (True, False):
        monkeypatch.setattr(SpatialTransformer, "linear_projections", linear)
        outputs.append(block(x, context))
    assert outputs[0].shape == x.shape and torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert (outputs[0] - x).abs().max() > 0.1
