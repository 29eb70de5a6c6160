"""Prompt editing ([from:to:when]): the parser, and samplers that condition each step on its segment's prompt."""
import pytest
import torch

from ldm.models.diffusion.prompt_edits import has_edits, parse, schedule
from ldm.models.diffusion.sampling import ddim_schedule, guided_eps, sample_ddim, sample_latents


@pytest.mark.parametrize("prompt, edges, texts", [
    ("a photo of a [yellow :0.4]*", [600], ["a photo of a yellow *", "a photo of a *"]),
    ("[cat:dog:0.25] on [snow::10]", [500, 750], ["dog on", "dog on snow", "cat on snow"]),
    ("a [b] c", [], ["a [b] c"]),  # no colon: text
    ("note [x: y] at 3:30", [], ["note [x: y] at 3:30"]),  # last field not a number: text
])
def test_schedule_splits_t_at_each_edit(prompt, edges, texts):
    got_edges, got_texts = schedule([prompt], 1000, 20)
    assert got_edges == edges and [seg[0] for seg in got_texts] == texts


def test_prompts_of_a_batch_share_the_segments():
    edges, texts = schedule(["[a:b:0.5]", "plain", "[c:d:0.8]"], 1000, 50)
    assert edges == [200, 500]
    assert texts == [["b", "plain", "d"], ["b", "plain", "c"], ["a", "plain", "c"]]


@pytest.mark.parametrize("prompt, message", [
    ("[red :1.5]", "when = 1.5 is neither"), ("[red :0]", "when = 0 is neither"), ("[red :20]", "1..19"),
    ("[red :0.4", "nested or not closed"), ("[a [red:0.4] b]", "nested or not closed"),
])
def test_bad_edits_are_refused(prompt, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse(prompt, 1000, 20)


def test_has_edits_tells_edit_groups_from_text():
    assert has_edits("a [red :0.4]*") and has_edits("[a:b:7]") and has_edits("[red :1.5]")
    assert not has_edits("a [b] c") and not has_edits("note [x: y]") and not has_edits("a photo of *")


class _Recorder(torch.nn.Module):
    """apply_model of a model without bands that records which context each timestep was given."""
    num_timesteps = 1000

    def __init__(self):
        super().__init__()
        self.seen = []
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000)

    def timestep_band(self, t):
        return torch.zeros_like(t)

    def banded_conditioning(self, captions):
        return [torch.stack([torch.full((2, 3), float(len(c))) for c in captions])]

    def get_learned_conditioning(self, captions):
        return self.banded_conditioning(captions)[0]

    def apply_model(self, x, t, c):
        self.seen.append((int(t[0]), c[-1, 0, 0].item()))
        return 0.1 * x + c.mean() * 0.01


def test_each_step_is_conditioned_on_its_segments_prompt():
    model = _Recorder()
    x_T = torch.randn(1, 1, 2, 2)
    sample_latents(model, ["ab [cdefg:0.4]"], x_T.shape, steps=10, scale=3.0, x_T=x_T)
    lengths = dict(model.seen)
    assert lengths and all(n == (len("ab cdefg") if t < 600 else len("ab")) for t, n in lengths.items())
    assert {n for n in lengths.values()} == {2, 8}


def test_an_edit_samples_what_switching_the_context_by_hand_gives():
    model = _Recorder()
    x_T = torch.randn(2, 1, 2, 2)
    got = sample_latents(model, ["a [b:cc:0.5]", "d"], x_T.shape, steps=8, scale=2.0, x_T=x_T)
    before, after = model.banded_conditioning(["a b", "d"])[0], model.banded_conditioning(["a cc", "d"])[0]
    uc = model.get_learned_conditioning(["", ""])
    high, low = guided_eps(model, before, uc, 2.0), guided_eps(model, after, uc, 2.0)
    expected = sample_ddim(lambda x, t: low(x, t) if t[0] < 500 else high(x, t), x_T,
                           ddim_schedule(model.alphas_cumprod, 8))
    assert torch.equal(got, expected)


def test_txt2img_refuses_prompt_edits_for_an_autoregressive_model(tmp_path, capsys, monkeypatch):
    import os

    import txt2img

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(SystemExit) as info:
        txt2img.main(["--config", "models/ar/tiny-shapes/config.yaml", "--ckpt_path",
                      "models/ar/tiny-shapes/model.safetensors", "--outdir", str(tmp_path / "out"),
                      "--prompt", "a photo of a [red :0.3]*", "--n_samples", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and "needs a diffusion model's timesteps" in errors[0]
    assert not list((tmp_path / "out").glob("**/*.png"))
