"""Stable Diffusion 1.x in every layout: one tiny model saved as .ckpt, single-file .safetensors (fp32, fp16, with EMA
copies) and a diffusers folder samples the same images through txt2img, trains through --actual_resume, and a
folder that lacks a part is one error line."""
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm import inference
from ldm.checkpoints import read_model_weights, read_state_dict
from ldm.cli import UsageError

pytest.importorskip("diffusers")
from sd1_layouts import save_layouts, tiny_config  # noqa: E402

PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    config = tiny_config("v1-inference.yaml", folder, "tiny-v1-inference.yaml")
    paths, other = save_layouts(config, folder)
    paths["other.safetensors"] = str(folder / "other.safetensors")
    save_file(other, paths["other.safetensors"])
    return {"config": config, "paths": paths, "folder": folder}


def sample(world, ckpt, outdir, **flags):
    """txt2img (ldm.inference.run) on the tiny config: its sampling block sets the size, steps and guidance ->
    the one sample as uint8 (H, W, 3)."""
    opt = inference.SampleOptions(config=[world["config"]], ckpt_path=ckpt, prompt=PROMPT, outdir=str(outdir),
                                  n_samples=1, device="cpu", **flags)
    written = inference.run(opt)
    assert len(written) == 1
    return np.asarray(Image.open(written[0]))


@pytest.fixture(scope="module")
def samples(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    return {name: sample(world, path, out / name.replace(".", "-"))
            for name, path in world["paths"].items() if name != "other.safetensors"}


def test_the_sampling_block_sets_the_image_size(samples):
    assert all(image.shape == (16, 16, 3) for image in samples.values())


@pytest.mark.parametrize("layout", ["fp32.safetensors", "ema.safetensors", "diffusers"])
def test_fp32_layouts_sample_bit_identical_images(samples, layout):
    assert np.array_equal(samples[layout], samples["model.ckpt"])


def test_the_fp16_file_samples_within_fp16_rounding(samples):
    difference = np.abs(samples["fp16.safetensors"].astype(int) - samples["model.ckpt"].astype(int))
    assert difference.max() <= 2, difference.max()


def test_the_diffusers_folder_converts_to_the_same_tensors(world):
    ours = read_state_dict(world["paths"]["fp32.safetensors"])[0]
    converted = read_model_weights(world["paths"]["diffusers"])[0]
    unet_vae_text = [k for k in ours if k.startswith(("model.", "first_stage_model.", "cond_stage_model."))]
    assert sorted(converted) == sorted(unet_vae_text)
    assert all(torch.equal(converted[k], ours[k]) for k in converted)


def test_use_ema_samples_the_ema_copies(world, samples, tmp_path):
    ema = sample(world, world["paths"]["ema.safetensors"], tmp_path / "ema", use_ema=True)
    other = sample(world, world["paths"]["other.safetensors"], tmp_path / "other")
    assert np.array_equal(ema, other) and not np.array_equal(ema, samples["model.ckpt"])


@pytest.mark.parametrize("layout, expect", [("fp32.safetensors", "has no EMA copy (model_ema.*) of model."),
                                            ("diffusers", "holds one set of UNet weights and no EMA copies")])
def test_use_ema_without_ema_copies_is_one_line(world, layout, expect):
    with pytest.raises(UsageError, match="leave out --use_ema") as info:
        read_model_weights(world["paths"][layout], use_ema=True)
    assert expect in str(info.value) and "\n" not in str(info.value)


def broken_copy(world, tmp_path, remove):
    folder = tmp_path / "pipeline"
    shutil.copytree(world["paths"]["diffusers"], folder)
    os.remove(folder / remove)
    return folder


@pytest.mark.parametrize("remove, lacks", [
    ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
    ("text_encoder/model.safetensors", "text_encoder/model.safetensors"),
    ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
    ("tokenizer/tokenizer.json", "tokenizer/vocab.json")])
def test_a_folder_that_lacks_a_part_is_one_error_line(world, tmp_path, capsys, remove, lacks):
    folder = broken_copy(world, tmp_path, remove)
    with pytest.raises(SystemExit) as info:
        inference.main(["--config", world["config"], "--ckpt_path", str(folder), "--outdir", str(tmp_path / "out"),
                        "--device", "cpu"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: diffusers folder {folder} lacks {lacks}"), errors


def test_a_diffusers_folder_needs_an_sd1_config(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        inference.main(["--config", "configs/tiny/txt2img-tiny-finetune.yaml", "--ckpt_path",
                        world["paths"]["diffusers"], "--outdir", str(tmp_path), "--device", "cpu"])
    assert "loads into Stable Diffusion 1.x configs" in capsys.readouterr().err


def test_the_folders_tokenizer_is_used(world):
    from ldm.checkpoints import load_model_from_config, read_config

    folder = world["paths"]["diffusers"]
    model = load_model_from_config(read_config(world["config"]), folder)
    tokenizer = model.cond_stage_model.tokenizer.tokenizer
    assert os.path.samefile(tokenizer.name_or_path, os.path.join(folder, "tokenizer"))


@pytest.mark.parametrize("layout, flags, weights", [("diffusers", [], "fp32.safetensors"),
                                                    ("fp16.safetensors", [], "fp16.safetensors"),
                                                    ("ema.safetensors", ["--use_ema"], "other.safetensors")])
def test_training_starts_from_the_layout_and_its_run_samples_alone(world, tiny_concept, tmp_path, layout, flags,
                                                                   weights):
    """train_new.py --actual_resume LAYOUT, then txt2img with only --embedding_path: the run's model and config."""
    import train_new

    config = tiny_config("v1-finetune.yaml", tmp_path, "tiny-v1-finetune.yaml")
    run = train_new.main(["--base", config, "-t", "--actual_resume", world["paths"][layout], "-n", "sd1",
                          "--data_root", tiny_concept, "--init_word", "dog", "--placeholder_string", "*",
                          "-l", str(tmp_path / "logs"), *flags])
    assert run.trainer.global_step == 2
    expected = read_state_dict(world["paths"][weights])[0]
    trained = run.model.state_dict()
    assert all(torch.equal(trained[k], expected[k].float()) for k in expected if k.startswith("model."))
    embedding = os.path.join(run.logdir, "checkpoints", "embeddings.pt")
    written = inference.main(["--embedding_path", embedding, "--prompt", "a photo of *", "--outdir",
                              str(tmp_path / "out"), "--n_samples", "1", "--device", "cpu"])
    assert [Image.open(p).size for p in written] == [(16, 16)]
    assert glob.glob(str(tmp_path / "out" / "a-photo-of-star-*.png"))


def test_training_from_a_folder_that_lacks_a_part_is_one_error_line(world, tiny_concept, tmp_path, capsys):
    import train_new

    folder = broken_copy(world, tmp_path, "unet/diffusion_pytorch_model.safetensors")
    config = tiny_config("v1-finetune.yaml", tmp_path, "tiny-v1-finetune.yaml")
    with pytest.raises(SystemExit) as info:
        train_new.main(["--base", config, "-t", "--actual_resume", str(folder), "--data_root", tiny_concept,
                        "--init_word", "dog", "--placeholder_string", "*", "-l", str(tmp_path / "logs")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2
    assert errors == [f"error: diffusers folder {folder} lacks unet/diffusion_pytorch_model.safetensors: save the "
                      "pipeline again with save_pretrained, or give the single-file .ckpt/.safetensors instead"]


def test_a_folder_of_another_unet_is_one_line_naming_its_keys(world, tmp_path):
    """A UNet with parts no SD 1.x UNet has (SDXL's add_embedding) is refused by the strict load, not renamed."""
    from safetensors.torch import load_file

    from ldm.checkpoints import load_model_from_config, read_config

    folder = broken_copy(world, tmp_path, "scheduler/scheduler_config.json")  # the schedule comes from --config
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(unet), "add_embedding.linear_1.weight": torch.zeros(4, 4)}, unet)
    with pytest.raises(UsageError, match=r"1 unexpected.*does not fit this config.*add_embedding") as info:
        load_model_from_config(read_config(world["config"]), str(folder))
    assert "\n" not in str(info.value)
