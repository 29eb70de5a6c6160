"""txt2img's defaults come from the model: image size, steps and guidance from the config's `sampling` block (flags
win), the model from the run an embedding was trained in; without a model, one error line."""
import pytest
from omegaconf import OmegaConf

from ldm.cli import UsageError
from ldm.inference import get_parser
from ldm.inference_model import FALLBACK_SAMPLING, NO_MODEL, resolve_model

SHIPPED = {  # config -> the side of the images its model was trained at
    "configs/stable-diffusion/v1-inference.yaml": 512, "configs/stable-diffusion/v1-finetune.yaml": 512,
    "configs/stable-diffusion/v2-inference.yaml": 512, "configs/stable-diffusion/v2-inference-v.yaml": 768,
    "configs/stable-diffusion/v2-finetune.yaml": 768, "configs/latent-diffusion/txt2img-1p4B-eval.yaml": 256,
    "models/ldm/tiny-shapes/config.yaml": 32, "configs/tiny/txt2img-tiny-finetune.yaml": 16,
}


def options(*argv):
    return get_parser().parse_args(list(argv))


@pytest.mark.parametrize("config, side", SHIPPED.items())
def test_the_image_size_is_the_models(config, side):
    opt = options("--config", config, "--ckpt_path", "model.ckpt")
    resolve_model(opt)
    assert (opt.H, opt.W) == (side, side)
    assert opt.ddim_steps == OmegaConf.load(config).sampling.ddim_steps


def test_flags_on_the_command_line_win():
    opt = options("--config", "configs/stable-diffusion/v1-inference.yaml", "--ckpt_path", "m.ckpt", "--H", "256",
                  "--scale", "3.5")
    resolve_model(opt)
    assert (opt.H, opt.W, opt.scale, opt.ddim_steps) == (256, 512, 3.5, 50)


def test_a_config_without_a_sampling_block_keeps_the_original_defaults(tmp_path):
    config = OmegaConf.load("configs/tiny/txt2img-tiny-finetune.yaml")
    del config["sampling"]
    OmegaConf.save(config, tmp_path / "plain.yaml")
    opt = options("--config", str(tmp_path / "plain.yaml"), "--ckpt_path", "m.ckpt")
    resolve_model(opt)
    assert {k: getattr(opt, k) for k in FALLBACK_SAMPLING} == FALLBACK_SAMPLING


@pytest.mark.parametrize("block, expect", [
    ("{H: 16, ddim_step: 3}", "sampling.ddim_step: unknown key, not a txt2img setting"),
    ("{H: 16, scale: high}", "sampling.scale: expected a number, got 'high'"),
    ("{H: 16.5}", "sampling.H: expected an integer, got 16.5"),
    ("[16, 16]", "sampling: expected a mapping of keys"),
])
def test_a_mistake_in_the_sampling_block_is_one_line(tmp_path, block, expect):
    path = tmp_path / "typo.yaml"
    path.write_text(open("configs/tiny/txt2img-tiny-finetune.yaml").read().replace(
        "sampling: {H: 16, W: 16, ddim_steps: 50, scale: 3.0}", f"sampling: {block}"))
    with pytest.raises(UsageError, match=expect) as info:
        resolve_model(options("--config", str(path), "--ckpt_path", "m.ckpt"))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def fake_run(tmp_path, config="configs/tiny/txt2img-tiny-finetune.yaml", actual_resume="models/x.safetensors"):
    """A run folder as training leaves it: configs/<time>-project.yaml (the merged config, run.actual_resume) and
    checkpoints/embeddings.pt -> the embedding's path."""
    run = tmp_path / "logs" / "2026-01-01T00-00-00_toy"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    saved = OmegaConf.merge(OmegaConf.load(config), {"run": {"actual_resume": actual_resume}})
    OmegaConf.save(saved, run / "configs" / "2026-01-01T00-00-00-project.yaml")
    (run / "checkpoints" / "embeddings.pt").write_bytes(b"")
    return str(run / "checkpoints" / "embeddings.pt")


def test_an_embedding_of_a_run_samples_with_the_runs_model(tmp_path):
    embedding = fake_run(tmp_path)
    opt = options("--embedding_path", embedding)
    config = resolve_model(opt)
    assert opt.config[0].endswith("-project.yaml") and opt.ckpt_path == "models/x.safetensors"
    assert (opt.H, config.model.params.cond_stage_config.target) == (16, "ldm.modules.encoders.modules.BERTEmbedder")
    opt = options("--embedding_path", embedding, "--ckpt_path", "other.ckpt")
    resolve_model(opt)
    assert opt.ckpt_path == "other.ckpt" and opt.config[0].endswith("-project.yaml")


def test_a_run_config_naming_outside_code_in_its_model_is_refused(tmp_path):
    embedding = fake_run(tmp_path)
    saved = next((tmp_path / "logs").glob("*/configs/*-project.yaml"))
    saved.write_text(saved.read_text().replace("ldm.data.datamodule.DataModuleFromConfig", "main.DataModuleFromConfig"))
    assert resolve_model(options("--embedding_path", embedding)).model  # the original's data module: never built here
    saved.write_text(saved.read_text().replace("ldm.modules.encoders.modules.BERTEmbedder", "evil.Encoder"))
    with pytest.raises(UsageError, match=r"names code outside this framework \(evil.Encoder\)"):
        resolve_model(options("--embedding_path", embedding))


@pytest.mark.parametrize("argv", [[], ["--embedding_path", "elsewhere/embeddings.pt"],
                                  ["--config", "configs/tiny/txt2img-tiny-finetune.yaml"]])
def test_no_model_is_one_line_naming_the_flags(argv, tmp_path, capsys):
    from ldm.inference import main

    with pytest.raises(SystemExit) as info:
        main([*argv, "--outdir", str(tmp_path)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and errors == [f"error: {errors[0][7:]}"] and NO_MODEL in errors[0]
    assert "--ckpt_path" in errors[0] and "--config" in errors[0]
