"""The next-scale (VAR-style) path: a multi-scale residual quantiser on taming's codebook, a block-causal
transformer over its token maps, and cached sampling that gives the teacher-forced logits."""
import pytest
import torch

from ldm.models.autoregressive.ar import check_scales
from ldm.models.autoregressive.transformer import NextScaleTransformer
from ldm.modules.multiscale_quantize import MultiScaleQuantizer

SCALES = (1, 2, 4)


def quantizer():
    torch.manual_seed(0)
    return MultiScaleQuantizer(32, 4, SCALES).eval()


def test_scales_sum_to_the_quantised_features_and_inputs_follow_them():
    q, f = quantizer(), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        f_hat, loss, codes = q.quantize_scales(f)
        assert [tuple(c.shape) for c in codes] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
        assert torch.allclose(q.decode_codes(codes), f_hat, atol=1e-6)
        flat = torch.cat([c.flatten(1) for c in codes], 1)
        assert all(torch.equal(a, b) for a, b in zip(q.split(flat), codes))
        inputs, partial = q.next_scale_inputs(codes), q.empty_features(codes[0])
        for k in (1, 2):  # the input of scale k is the sum of scales < k at scale k's size
            partial = q.add_scale(partial, codes[k - 1], k - 1)
            start = sum(s * s for s in SCALES[1:k])
            assert torch.allclose(inputs[:, start:start + SCALES[k] ** 2], q.resized(partial, k), atol=1e-6)
    assert loss > 0


def test_each_scale_reduces_the_residual():
    q, f = quantizer(), torch.randn(8, 4, 4, 4)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(32, 4) * 0.5)
        _, _, codes = q.quantize_scales(f)
        errors = [(f - q.decode_codes(codes[:k + 1])).pow(2).mean().item() for k in range(len(SCALES))]
    assert errors[-1] < errors[0] < f.pow(2).mean().item(), errors


def test_transformer_is_block_causal_over_scales():
    torch.manual_seed(0)
    net = NextScaleTransformer(n_codes=16, scales=SCALES, code_dim=4, context_dim=8, dim=16, depth=2, heads=2).eval()
    inputs, context = torch.randn(2, 4 + 16, 4), torch.randn(2, 5, 8)
    changed = inputs.clone()
    changed[:, 0] += 1.0  # an input of scale 1 (the 2x2 map)
    with torch.no_grad():
        a, b = net(inputs, context), net(changed, context)
    assert a.shape == (2, 21, 16)
    assert torch.allclose(a[:, :1], b[:, :1])  # the 1x1 scale does not see it
    assert not torch.allclose(a[:, 1:5], b[:, 1:5]) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_cached_scales_give_the_full_forward_logits():
    q = quantizer()
    net = NextScaleTransformer(n_codes=32, scales=SCALES, code_dim=4, context_dim=8, dim=16, depth=2, heads=2).eval()
    context = torch.randn(3, 5, 8)
    with torch.no_grad():
        _, _, codes = q.quantize_scales(torch.randn(3, 4, 4, 4))
        full = net(q.next_scale_inputs(codes), context)
        caches, steps, partial, inputs = net.start_cache(context), [], q.empty_features(codes[0]), None
        for k in range(len(SCALES)):
            steps.append(net.step(inputs, caches))
            partial = q.add_scale(partial, codes[k], k)
            inputs = q.resized(partial, k + 1) if k + 1 < len(SCALES) else None
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_warm_start_copies_the_tensors_that_fit(tmp_path):
    from safetensors.torch import save_file
    from torch import nn

    from load import warm_start

    source = nn.ModuleDict({"blocks": nn.Linear(4, 4), "pos": nn.Linear(4, 3), "first_stage": nn.Linear(2, 2)})
    target = nn.ModuleDict({"blocks": nn.Linear(4, 4), "pos": nn.Linear(4, 5), "first_stage": nn.Linear(2, 2),
                            "new": nn.Linear(2, 2)})
    path = str(tmp_path / "source.safetensors")
    save_file(source.state_dict(), path)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    copied = warm_start(target, path, skip=("first_stage.",))
    assert sorted(copied) == ["blocks.bias", "blocks.weight"]
    after = target.state_dict()
    assert torch.equal(after["blocks.weight"], source.blocks.weight)
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("blocks."))


def test_model_scales_must_agree():
    check_scales((1, 2, 4), (1, 2, 4), 4)
    with pytest.raises(ValueError, match="differ from the first stage"):
        check_scales((1, 2, 8), (1, 2, 4), 4)
    with pytest.raises(ValueError, match=r"image_size=8 is not the finest scale 4: set model.params.image_size"):
        check_scales((1, 2, 4), (1, 2, 4), 8)
