"""ldm.config_check: every shipped config passes; each mistake is one line naming the key, where it came from and
the fix; malformed files name the file and line; untrusted_targets imports nothing."""
import builtins
import glob
import importlib
import os
import sys

import pytest
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from ldm.cli import UsageError
from ldm.config_check import COMMAND_LINE, check_config, load_config_file, overrides_config, untrusted_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_KEYS = ("actual_resume", "data_root", "init_word", "placeholder_string", "allow_existing_token")
TRUSTED = ("ldm", "improvement", "make_log_new", "torch.nn")
TINY = ("models/ldm/tiny-shapes/config.yaml", "configs/tiny-shapes/finetune.yaml")  # train_new_v1/v2's default
V1, V2 = "configs/improvement/v1.yaml", "configs/improvement/v2.yaml"
AR, AR_SCALES = "models/ar/tiny-shapes/config.yaml", "models/ar/tiny-shapes-scales/config.yaml"
PRETRAIN = ("models/ldm/tiny-shapes/config.yaml", "configs/tiny-shapes/ldm-pretrain.yaml")
ABLATIONS = "configs/ablations"


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


SHIPPED = [p for p in _rel("configs/**/*.yaml") + _rel("models/**/*.yaml") if not p.startswith(ABLATIONS)]
VARIANTS = _rel(f"{ABLATIONS}/*.yaml")  # recipes (overlays + overrides on TINY), not configs: checked as built

# The overlay stacks the scripts and the configs' own comments use.
STACKS = [
    TINY,
    TINY + (V1,),  # train_new_v1.py
    TINY + (V2,),  # train_new_v2.py
    TINY + ("configs/improvement/v2-aligner.yaml",),
    PRETRAIN,
    *[PRETRAIN + (f"configs/tiny-shapes/ldm-pretrain-{step}.yaml",)
      for step in ("balance", "colourless", "outline", "patterns", "seen")],
    (AR, "configs/ar-shapes/finetune.yaml"),
    (AR, "configs/ar-shapes/ar-pretrain.yaml"),
    (AR_SCALES, "configs/ar-shapes/finetune.yaml", "configs/ar-shapes/finetune-scales.yaml"),
    (AR_SCALES, "configs/ar-shapes/ar-pretrain.yaml", "configs/ar-shapes/next-scale-pretrain.yaml"),
    ("configs/tiny/txt2img-tiny-finetune.yaml", V1),
    ("configs/latent-diffusion/txt2img-1p4B-finetune.yaml", V1),
]


def sources_of(files, dotlist=(), extra=()):
    sources = [(f, load_config_file(os.path.join(ROOT, f))) for f in files]
    sources += list(extra)
    return sources + [(COMMAND_LINE, overrides_config(list(dotlist)))]


def check(files, dotlist=(), extra=(), **kwargs):
    sources = sources_of(files, dotlist, extra)
    config = OmegaConf.merge(*(c for _, c in sources))
    kwargs.setdefault("checkpoint_cls", ModelCheckpoint)
    kwargs.setdefault("run_keys", RUN_KEYS)
    check_config(config, sources, **kwargs)
    return config


def error_of(fn, *args, **kwargs):
    with pytest.raises(UsageError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    return message


# ---- every shipped config passes -----------------------------------------------------------------------------
def test_shipped_lists_are_not_empty():
    assert len(SHIPPED) >= 25 and len(VARIANTS) >= 10
    assert all(os.path.isfile(os.path.join(ROOT, f)) for stack in STACKS for f in stack)


@pytest.mark.parametrize("path", SHIPPED)
def test_each_shipped_config_alone(path):
    config = check([path], partial=True)
    if OmegaConf.select(config, "model.target"):  # a whole config, not an overlay
        check([path])
    assert untrusted_targets(config, TRUSTED) == []


@pytest.mark.parametrize("files", STACKS, ids=lambda s: "+".join(os.path.basename(f)[:-5] for f in s))
def test_shipped_overlay_stacks(files):
    check(files)


@pytest.mark.parametrize("variant", VARIANTS, ids=os.path.basename)
def test_ablation_variants_as_built(variant):
    """check/ablations.py: TINY, then the variant's configs, then its overrides (as key=value)."""
    spec = OmegaConf.load(os.path.join(ROOT, variant))
    config = check(TINY + tuple(spec.get("configs") or ()), list(spec.get("overrides") or ()))
    assert untrusted_targets(config, TRUSTED) == []


def test_the_flags_and_a_saved_run_folder_pass(tmp_path):
    """train_new writes run.* and the datasets' data_root from its flags; a resumed run reads the saved
    project and lightning configs back first."""
    flags = OmegaConf.create({"run": {"data_root": "dataset/x", "init_word": "circle", "placeholder_string": "*"},
                              "data": {"params": {"train": {"params": {"data_root": "dataset/x"}}}}})
    config = check(TINY, ["lightning.trainer.max_steps=10"], extra=[("the flags", flags)])
    lightning = config.pop("lightning")
    (tmp_path / "project.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))
    (tmp_path / "lightning.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"lightning": lightning})))
    check([str(tmp_path / "project.yaml"), str(tmp_path / "lightning.yaml")] + list(TINY))


def test_accepted_variants():
    """Reference options that **kwargs passes on to an option table, interpolations, ???, a compile backend,
    Lightning's Literal precision and a float UNet dropout are all accepted."""
    check(TINY, ["model.params.use_ema=false", "model.params.monitor=val/loss", "model.params.compile=aot_eager",
                 "model.params.unet_config.params.use_fp16=false", "model.params.unet_config.params.dropout=0.1",
                 "lightning.trainer.precision=bf16-mixed", "lightning.trainer.precision=16",
                 "data.params.batch_size=${lightning.trainer.max_steps}", "data.params.num_workers=???",
                 "model.params.personalization_config.params.placeholder_strings=cat",
                 "data.params.train.params.templates=ldm.data.personalized.IMAGENET_TEMPLATES_SMALL"])


# ---- each mistake: one line with the key, the source and the fix -------------------------------------------------
BAD = [  # (id, dotlist, what the line must hold)
    ("trainer-typo", ["lightning.trainer.max_stepz=5"],
     ["lightning.trainer.max_stepz:", "pytorch_lightning.Trainer", "(the command line)",
      "did you mean lightning.trainer.max_steps?"]),
    ("trainer-int", ["lightning.trainer.max_steps=abc"],
     ["lightning.trainer.max_steps: expected an integer, got 'abc' (the command line)"]),
    ("batch-size", ["data.params.batch_size=abc"],
     ["data.params.batch_size: expected an integer, got 'abc' (the command line)"]),
    ("top-level-typo", ["lightnin.trainer.max_steps=5"],
     ["lightnin: unknown key", "(the command line)", "did you mean lightning?"]),
    ("unet-param", ["model.params.unet_config.params.model_channelz=8"],
     ["model.params.unet_config.params.model_channelz:", "UNetModel", "(the command line)",
      "did you mean model.params.unet_config.params.model_channels?"]),
    ("unet-int", ["model.params.unet_config.params.model_channels=wide"],
     ["model.params.unet_config.params.model_channels: expected an integer, got 'wide'"]),
    ("bool", ["model.params.latent_cache=maybe"],
     ["model.params.latent_cache: expected true, false or null, got 'maybe' (the command line)"]),
    ("trainer-bool", ["lightning.trainer.benchmark=sometimes"],
     ["lightning.trainer.benchmark: expected true, false or null, got 'sometimes'"]),
    ("float", ["data.params.train.params.flip_p=half"],
     ["data.params.train.params.flip_p: expected a number or null, got 'half'"]),
    ("literal", ["lightning.trainer.precision=17"],
     ["lightning.trainer.precision: expected one of 64, 32, 16,", "'bf16-mixed'", "got 17"]),
    ("lightning-section-typo", ["lightning.trainr.max_steps=1"],
     ["lightning.trainr: unknown key", "did you mean lightning.trainer?"]),
    ("lightning-section-unknown", ["lightning.profiler.dirpath=x"],
     ["lightning.profiler: unknown key", "(the command line)", "known: trainer, callbacks, modelcheckpoint, logger"]),
    ("lightning-logger-not-names", ["lightning.logger.save_dir=x"],
     ["lightning.logger: expected logger names", "(the command line)"]),
    ("callback-param", ["lightning.callbacks.image_logger.params.batch_frequncy=10"],
     ["lightning.callbacks.image_logger.params.batch_frequncy:", "ldm.callbacks.ImageLogger",
      "did you mean lightning.callbacks.image_logger.params.batch_frequency?"]),
    ("callback-without-target", ["lightning.callbacks.image_loger.params.batch_frequency=10"],
     ["lightning.callbacks.image_loger: has no target (the command line)",
      "did you mean lightning.callbacks.image_logger?"]),
    ("checkpoint-param", ["lightning.modelcheckpoint.params.every_n_train_step=5"],
     ["lightning.modelcheckpoint.params.every_n_train_step:", "ModelCheckpoint",
      "did you mean lightning.modelcheckpoint.params.every_n_train_steps?"]),
    ("checkpoint-type", ["lightning.modelcheckpoint.params.every_n_train_steps=often"],
     ["lightning.modelcheckpoint.params.every_n_train_steps: expected an integer or null, got 'often'"]),
    ("checkpoint-section", ["lightning.modelcheckpoint.every_n_train_steps=5"],
     ["lightning.modelcheckpoint.every_n_train_steps: unknown key", "known: params"]),
    ("model-extra", ["model.base_learning_rat=1e-3"],
     ["model.base_learning_rat: unknown key", "did you mean model.base_learning_rate?"]),
    ("model-extra-type", ["model.base_learning_rate=fast"], ["model.base_learning_rate: expected a number"]),
    ("node-extra", ["data.batch_size=4"], ["data.batch_size: unknown key", "did you mean data.params.batch_size?"]),
    ("node-extra-unknown", ["data.sizes=4"], ["data.sizes: unknown key", "known: target, params"]),
    ("reference-option-typo", ["model.params.use_emma=false"],
     ["model.params.use_emma:", "LatentDiffusion", "did you mean model.params.use_ema?"]),
    ("manager-kwargs", ["model.params.personalization_config.params.num_vectors_per_tokn=4"],
     ["num_vectors_per_tokn:", "EmbeddingManager", "did you mean",
      "personalization_config.params.num_vectors_per_token?"]),
    ("dataset-param", ["data.params.train.params.class_text=x"],
     ["data.params.train.params.class_text:", "PersonalizedBase",
      "did you mean data.params.train.params.class_texts?"]),
    ("run-key", ["run.data_rot=x"], ["run.data_rot: unknown key", "did you mean run.data_root?"]),
    ("target-attribute", ["model.params.cond_stage_config.target=ldm.modules.encoders.modules.BERTEmbeder"],
     ["model.params.cond_stage_config.target:", "has no attribute 'BERTEmbeder'", "(the command line)",
      "did you mean ldm.modules.encoders.modules.BERTEmbedder?"]),
    ("target-module", ["model.target=nosuch_package_xyz.Model"],
     ["model.target: cannot import module 'nosuch_package_xyz'", "(the command line)"]),
    ("templates", ["data.params.train.params.templates=ldm.data.shapes.palette.TEMPLATE"],
     ["data.params.train.params.templates:", "did you mean ldm.data.shapes.palette.TEMPLATES?"]),
    ("params-not-mapping", ["model.params.first_stage_config.params=7"],
     ["model.params.first_stage_config.params: expected a mapping", "got 7 (the command line)"]),
]


@pytest.mark.parametrize("dotlist, expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_override_is_one_line(dotlist, expected):
    message = error_of(check, TINY, dotlist)
    for part in expected:
        assert part in message, (part, message)


def test_bad_key_names_the_last_file_that_sets_it(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  params:\n    latent_cach: true\n")
    message = error_of(check, TINY + (str(typo),))
    assert message.startswith("model.params.latent_cach: unknown key") and f"({typo})" in message
    assert "did you mean model.params.latent_cache?" in message
    steps = tmp_path / "steps.yaml"
    steps.write_text("lightning:\n  trainer:\n    max_steps: many\n")  # finetune.yaml sets it too; this one wins
    assert f"got 'many' ({steps})" in error_of(check, TINY + (str(steps),))
    assert "(the command line)" in error_of(check, TINY + (str(steps),), ["lightning.trainer.max_steps=more"])


def test_lone_overlay_needs_no_target_but_a_run_does():
    check(["configs/tiny-shapes/finetune.yaml"], partial=True)
    message = error_of(check, ["configs/tiny-shapes/finetune.yaml"])
    assert message.startswith("model: has no target (configs/tiny-shapes/finetune.yaml)")


def test_aliases_check_the_target_actually_built():
    dotlist = ["lightning.callbacks.image_logger.target=main.ImageLogger"]
    assert "cannot import module 'main'" in error_of(check, TINY, dotlist)
    check(TINY, dotlist, aliases={"main.ImageLogger": "make_log_new.ImageLogger"})


# ---- following **kwargs on classes of this module ------------------------------------------------------------
OPTIONS = {"legacy_flag": False}


class Base:
    def __init__(self, width=4, scale=1.0):
        pass


class Child(Base):
    def __init__(self, flag=True, **kwargs):
        super().__init__(**kwargs)


class Open:
    def __init__(self, **kwargs):
        self.options = kwargs  # kept for code the checker cannot follow


class SetsAttributes:
    def __init__(self, **kwargs):
        for key, value in kwargs.items():
            setattr(self, key, value)


class Warns:
    def __init__(self, size=1, **kwargs):
        if kwargs:
            print("ignored", sorted(kwargs))


class Table:
    def __init__(self, **others):
        bad = {k: v for k, v in others.items() if k not in OPTIONS and k != others.get("name")}
        assert not bad


KWARGS = [  # (class, params, None or what the error holds)
    ("Child", {"flag": False, "width": 8, "scale": 2}, None),
    ("Child", {"widht": 8}, "did you mean model.params.width?"),
    ("Child", {"scale": "big"}, "model.params.scale: expected a number or null, got 'big'"),
    ("Open", {"anything": 1}, None),
    ("SetsAttributes", {"anything": 1}, None),
    ("Warns", {"size": 2}, None),
    ("Warns", {"sise": 2}, "did you mean model.params.size?"),
    ("Table", {"legacy_flag": False, "name": "x"}, None),
    ("Table", {"legacy_flg": False}, "did you mean model.params.legacy_flag?"),
]


@pytest.mark.parametrize("cls, params, expected", KWARGS)
def test_kwargs_are_followed(cls, params, expected):
    config = OmegaConf.create({"model": {"target": f"{__name__}.{cls}", "params": params}})
    if expected is None:
        check_config(config, [("k.yaml", config)])
    else:
        message = error_of(check_config, config, [("k.yaml", config)])
        assert expected in message and "(k.yaml)" in message, message


# ---- loading files and overrides -----------------------------------------------------------------------------
FILES = [  # (id, file content or None for a folder, what the error holds)
    ("unclosed-list", "model:\n  params:\n    x: [1, 2\n",
     ["is not valid YAML at line 4, column 1", "(while parsing a flow sequence from line 3, column 8)"]),
    ("bad-indent", "model:\n  target: a.B\n   params: {}\n", ["is not valid YAML at line 3, column"]),
    ("tab", "model:\n\ttarget: a.B\n", ["is not valid YAML at line 2, column 1"]),
    ("duplicate", "model: {}\nmodel: {}\n", ["is not valid YAML at line 2", "duplicate key"]),
    ("list", "- model\n- data\n", ["holds a list, not a mapping"]),
    ("scalar", "just words\n", ["holds the value 'just words', not a mapping"]),
    ("binary", b"\xff\xfe\x00model", ["is not a text file"]),
    ("folder", None, ["is a folder"]),
]


@pytest.mark.parametrize("content, expected", [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_bad_config_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    message = error_of(load_config_file, str(path))
    assert str(path) in message, message
    for part in expected:
        assert part in message, (part, message)


def test_missing_and_empty_files(tmp_path):
    assert "config not found: " + str(tmp_path / "nope.yaml") in error_of(load_config_file, tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_config_file(tmp_path / "empty.yaml") == OmegaConf.create()


@pytest.mark.parametrize("item, expected", [
    ("max_steps", "'max_steps' (the command line) is not key=value"),
    ("model..params.x=1", "is not a dotted key"),
    ("=5", "is not a dotted key"),
    ("a=[1,2", "'a=[1,2' (the command line): the value is not valid YAML"),
])
def test_bad_override_item(item, expected):
    assert expected in error_of(overrides_config, ["data.params.batch_size=2", item])


def test_overrides_parse_as_yaml():
    config = overrides_config(["a.b=1e-3", "a.c=[1, 2]", "a.d=true", "a.e=abc"])
    assert OmegaConf.to_container(config) == {"a": {"b": 0.001, "c": [1, 2], "d": True, "e": "abc"}}


# ---- trust ---------------------------------------------------------------------------------------------------
def test_untrusted_targets_imports_nothing(monkeypatch):
    config = OmegaConf.create({
        "model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                  "params": {"unet_config": {"target": "subprocess.Popen", "params": {"args": ["true"]}},
                             "cond_stage_config": "__is_unconditional__",
                             "first_stage_config": {"target": "nosuch_evil_pkg.Loader"}}},
        "data": {"target": "ldm.data.datamodule.DataModuleFromConfig",
                 "params": {"train": {"target": "ldm.data.personalized.PersonalizedBase",
                                      "params": {"templates": "evil_templates_pkg.T"}}}},
        "lightning": {"callbacks": {"x": {"target": "os.system", "params": {"command": "true"}},
                                    "y": {"target": "${oc.env:EVIL}"},
                                    "z": {"target": "improvement.v1.post_BERT.PostBERTEmbedder"}}},
    })

    real_import = builtins.__import__

    def refuse(*args, **kwargs):
        raise AssertionError(f"untrusted_targets imported {args[:1]}")

    def only_loaded(name, *args, **kwargs):  # omegaconf's own local imports of its loaded modules are fine
        if name and name not in sys.modules:
            refuse(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", refuse)
    monkeypatch.setattr(builtins, "__import__", only_loaded)
    found = untrusted_targets(config, TRUSTED)
    monkeypatch.undo()
    assert found == ["subprocess.Popen", "nosuch_evil_pkg.Loader", "evil_templates_pkg.T", "os.system",
                     "${oc.env:EVIL}"]
    assert "nosuch_evil_pkg" not in sys.modules and "evil_templates_pkg" not in sys.modules
    assert untrusted_targets(config, TRUSTED + ("os", "subprocess", "nosuch_evil_pkg", "evil_templates_pkg")) == \
        ["${oc.env:EVIL}"]
    assert "ldm.models.diffusion.ddpm.LatentDiffusion" in untrusted_targets(config, ("ldmx",))
