"""Training runs from configs: build the config (checked before any work), the data, the model and the Lightning
trainer, and run it in a run folder of its own, resumable at any step (docs/resume.md).

    run(TrainOptions(base=[...], train=True, actual_resume=..., data_root=..., init_word=...), ["key=value", ...])

`main` is the command line (train_new.py, the `ti-train` command); check/ calls `run` directly.
"""
import argparse
import dataclasses
import datetime
import glob
import itertools
import logging
import os
import signal
import sys
from collections import namedtuple

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.callbacks import (
    ContinuedCSVLogger,
    EmbeddingCheckpoint,
    ImageLogger,
    LossCurve,
    ResumableCheckpoint,
    RunProgress,
    SetupCallback,
    StepTimer,
    ValidationSampler,
    VectorsMustMove,
    quiet_console,
)
from ldm.checkpoints import check_model_path, load_state_dict_into, prepare_model_config
from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.config_check import (
    COMMAND_LINE,
    TRUSTED_MODULES,
    check_config,
    load_config_file,
    overrides_config,
    untrusted_targets,
)
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

USAGE = """Train a textual-inversion embedding (or pretrain a model) from YAML configs, on Lightning 2.x.

    python train_new.py --base configs/latent-diffusion/txt2img-1p4B-finetune.yaml -t \
        --actual_resume models/ldm/text2img-large/model.ckpt -n NAME --gpus 0, \
        --data_root dataset/NAME --init_word dog --placeholder_string '*'

Any `key=value` argument overrides that entry of the merged config (e.g. model.params.latent_cache=false,
lightning.trainer.max_steps=1000, data.params.batch_size=2).
"""

Run = namedtuple("Run", "logdir model trainer")


PRECISIONS = ("32", "bf16-mixed", "16-mixed")
RUN_KEYS = ("actual_resume", "data_root", "init_word", "placeholder_string", "allow_existing_token",
            "from_scratch", "use_ema")  # flags kept in the config's run section
SWITCHES = ("from_scratch", "use_ema")  # recorded only when given
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")


@dataclasses.dataclass
class TrainOptions:
    """What train_new.py's flags set (see its --help); `base`: the configs, merged left to right."""

    base: list = dataclasses.field(default_factory=list)
    train: bool = False
    name: str = ""
    resume: str = ""
    logdir: str = "logs"
    seed: int = 23
    gpus: str = None
    num_nodes: int = 1
    scale_lr: bool = True
    no_test: bool = False
    actual_resume: str = None
    data_root: str = None
    init_word: str = None
    placeholder_string: str = None
    embedding_manager_ckpt: str = None
    allow_existing_token: bool = None
    precision: str = None
    grad_checkpoint: bool = None
    validation_prompts: list = None
    validation_every: int = None
    logger: str = None
    from_scratch: bool = False
    use_ema: bool = False
    trust_configs: bool = False
    debug: bool = False


class StopSignals:
    """While entered, SIGINT and SIGTERM ask the run to stop after its current step (`received`: the signal).

    A second Ctrl-C stops at once, without saving.
    """

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            log.warning("%s: stopping after this step and saving (Ctrl-C again stops at once, without saving)",
                        signal.Signals(signum).name)
        self.received = self.received or signum


def resolve_resume(opt):
    """-r RUN_DIR or -r RUN_DIR/checkpoints/x.ckpt -> (run folder, checkpoint or None, saved configs).

    A run killed before its first checkpoint has none: it starts again from step 0 in its folder."""
    if not os.path.exists(opt.resume):
        raise UsageError(f"cannot resume: {opt.resume} does not exist (give a run folder under logs/)")
    if os.path.isfile(opt.resume):
        logdir, ckpt = os.path.dirname(os.path.dirname(opt.resume)), opt.resume
    else:
        logdir, ckpt = opt.resume.rstrip("/"), os.path.join(opt.resume, "checkpoints", "last.ckpt")
    saved = [sorted(glob.glob(os.path.join(logdir, "configs", f"*-{kind}.yaml")))[-1:]
             for kind in ("project", "lightning")]
    if not saved[0]:
        raise UsageError(f"cannot resume: {logdir} holds no configs/*-project.yaml (is it a run folder?)")
    if not opt.trust_configs:
        refuse_outside_code(saved[0] + saved[1])
    if not os.path.isfile(ckpt):
        log.warning("%s has no checkpoint yet: the run starts again from step 0 in that folder", logdir)
        ckpt = None
    return logdir, ckpt, saved[0] + saved[1]


# the image logger as the original's configs name it (its main.py, this framework's make_log_new.py)
IMAGE_LOGGER_ALIASES = {name: "ldm.callbacks.ImageLogger" for name in ("main.ImageLogger", "make_log_new.ImageLogger")}


def refuse_outside_code(paths):
    """A run folder's configs name the code a resumed run imports and calls: refuse any outside this framework's
    modules (and the torch and Lightning classes configs use) before importing anything."""
    for path in paths:
        outside = untrusted_targets(load_config_file(path), TRUSTED_MODULES)
        if outside:
            raise UsageError(f"{path} names code outside this framework ({', '.join(outside)}); configs are code: "
                             "pass --trust_configs if you trust this run folder")


def resume_step(ckpt):
    """The step a checkpoint was saved at (0 without one); a damaged checkpoint is refused in one line."""
    if ckpt is None:
        return 0
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception as e:  # any damage: the message says what to do
        raise UsageError(f"cannot resume from {ckpt}: it is damaged or not a training checkpoint "
                         f"({type(e).__name__}); "
                         "give another checkpoint of the run with -r RUN/checkpoints/FILE") from e


def claim_run_folder(parent, stamp, name):
    """Create the run folder `parent/<stamp>_<name>` exclusively (`<stamp>-2_<name>`, ... if a run started in the
    same second took it) -> its path. A data-parallel worker takes the folder its launcher claimed."""
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get("LDM_RUN_DIR"):
        return os.environ["LDM_RUN_DIR"]
    os.makedirs(parent, exist_ok=True)
    for k in itertools.count(1):
        path = os.path.join(parent, (stamp if k == 1 else f"{stamp}-{k}") + (f"_{name}" if name else ""))
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        os.environ["LDM_RUN_DIR"] = path  # for the workers a data-parallel launcher starts
        return path


def apply_speed_options(config, opt):
    """--precision -> lightning.trainer.precision; --grad_checkpoint -> the UNet's and BERT's use_checkpoint."""
    if opt.precision is not None:
        OmegaConf.update(config, "lightning.trainer.precision", opt.precision)
    if opt.grad_checkpoint is not None:
        OmegaConf.update(config, "model.params.unet_config.params.use_checkpoint", opt.grad_checkpoint)
        cond = OmegaConf.select(config, "model.params.cond_stage_config")
        if cond is not None and cond.target.endswith("BERTEmbedder"):
            OmegaConf.update(cond, "params.use_checkpoint", opt.grad_checkpoint)


def build_config(opt, dotlist):
    """Merge the base configs, the CLI overrides and the TI flags; record the CLI values under `run`."""
    if not opt.base:
        raise UsageError("no config given: pass --base configs/....yaml")
    sources = [(path, load_config_file(path)) for path in opt.base] + [(COMMAND_LINE, overrides_config(dotlist))]
    config = OmegaConf.merge(*(cfg for _, cfg in sources))
    check_config(config, sources, checkpoint_cls=ResumableCheckpoint, run_keys=RUN_KEYS,
                 aliases=IMAGE_LOGGER_ALIASES)
    run = config.get("run", OmegaConf.create())
    for key in RUN_KEYS:
        value = getattr(opt, key) if key not in SWITCHES else (getattr(opt, key) or None)
        if isinstance(value, str) and not value.strip():
            raise UsageError(f"--{key} is empty: give a value (e.g. --init_word dog --placeholder_string '*') "
                             "or leave the flag out to keep the config's")
        if value is not None:
            run[key] = value
    config.run = run
    apply_run_to_config(config)
    apply_speed_options(config, opt)
    return config


def apply_run_to_config(config):
    """Point the datasets at run.data_root and the embedding manager at run.init_word/placeholder."""
    run = config.run
    for split in ("train", "validation", "test"):
        node = OmegaConf.select(config, f"data.params.{split}.params")
        if node is None:
            continue
        if run.get("data_root"):
            node.data_root = run.data_root
        if run.get("placeholder_string"):
            node.placeholder_token = run.placeholder_string
    pers = OmegaConf.select(config, "model.params.personalization_config.params")
    if pers is not None:
        if run.get("init_word"):
            pers.initializer_words = [run.init_word]
        if run.get("placeholder_string"):
            pers.placeholder_strings = [run.placeholder_string]
        if run.get("allow_existing_token"):
            pers.allow_existing_token = True


def choose_devices(opt, trainer_cfg):
    """-> (accelerator, devices). --gpus without CUDA falls back to CPU with a one-line warning."""
    if opt.gpus is not None and str(opt.gpus).strip(", ") != "":
        ids = [int(g) for g in str(opt.gpus).split(",") if g.strip() != ""]
        if torch.cuda.is_available():
            return "gpu", ids
        log.warning("--gpus %s given but no CUDA device is available: training on the CPU", opt.gpus)
    accelerator = trainer_cfg.pop("accelerator", "cpu")
    if str(trainer_cfg.get("precision", "32")).startswith("16") and accelerator == "cpu":
        raise UsageError("precision 16-mixed needs a GPU (--gpus 0,): use bf16-mixed or 32 on the CPU")
    return accelerator, trainer_cfg.pop("devices", 1)


def make_callbacks(opt, config, lightning_config, now, logdir, signals):
    ckptdir, cfgdir = os.path.join(logdir, "checkpoints"), os.path.join(logdir, "configs")
    checkpointing = dict(OmegaConf.select(lightning_config, "modelcheckpoint.params", default=None) or {})
    checkpointing.setdefault("every_n_train_steps", 500)
    callbacks = [
        RunProgress(),
        VectorsMustMove(),
        StepTimer(),
        SetupCallback(opt.resume, now, logdir, ckptdir, cfgdir, config, lightning_config),
        ResumableCheckpoint(ckptdir, signals=signals, **checkpointing),
        EmbeddingCheckpoint(ckptdir, every_n_steps=checkpointing["every_n_train_steps"]),
        LossCurve(os.path.join(logdir, "loss.png")),
        pl.callbacks.LearningRateMonitor(logging_interval="step"),
    ]
    validation = validation_sampler(opt, lightning_config)
    if validation is not None:
        callbacks.append(validation)
    for name, cfg in (lightning_config.get("callbacks") or {}).items():
        if name == "validation" or cfg is None:  # built above, with the flags applied; or turned off (null)
            continue
        if name == "image_logger" and cfg.target in IMAGE_LOGGER_ALIASES:
            callbacks.append(ImageLogger(**cfg.get("params", {})))
        else:
            callbacks.append(instantiate_from_config(cfg))
    return callbacks


def validation_sampler(opt, lightning_config):
    """The config's lightning.callbacks.validation with --validation_prompts / --validation_every applied, or None."""
    node = OmegaConf.select(lightning_config, "callbacks.validation")
    params = dict(node.get("params", {})) if node is not None else {}
    if opt.validation_prompts:
        params["prompts"] = list(opt.validation_prompts)
    if opt.validation_every is not None:
        params["every_n_steps"] = opt.validation_every
    if not params.get("prompts"):
        if opt.validation_every is not None:
            raise UsageError("--validation_every needs prompts: add --validation_prompts \"a photo of a *\" ...")
        return None
    return ValidationSampler(**params)


def make_loggers(names, logdir, first_step):
    """metrics.csv (always; continued from `first_step` when a run resumes) and the other loggers `names`
    (comma-separated), each resuming from `first_step` where it can."""
    names = [n.strip() for n in str(names).split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise UsageError(f"unknown logger '{unknown[0]}': use a comma-separated list of {', '.join(LOGGERS)}")
    loggers, run_name = [ContinuedCSVLogger(logdir, first_step)], os.path.basename(logdir)
    try:
        if "tensorboard" in names:
            from pytorch_lightning.loggers import TensorBoardLogger
            loggers.append(TensorBoardLogger(save_dir=logdir, name="tensorboard", version="",
                                             purge_step=first_step or None))
        if "wandb" in names:
            from pytorch_lightning.loggers import WandbLogger
            loggers.append(WandbLogger(name=run_name, save_dir=logdir, project="textual-inversion", id=run_name,
                                       resume="allow"))
        if "mlflow" in names:
            from pytorch_lightning.loggers import MLFlowLogger
            uri = os.environ.get("MLFLOW_TRACKING_URI")  # a user's server, else a database in the run folder
            local = None if uri else os.path.abspath(logdir)
            loggers.append(MLFlowLogger(experiment_name="textual-inversion", run_name=run_name,
                                        tracking_uri=uri or f"sqlite:///{local}/mlflow.db",
                                        artifact_location=local and f"file:{local}/mlflow-artifacts"))
    except ModuleNotFoundError as e:
        raise UsageError(f"the logger needs the package '{e.name}': pip install {e.name} (or leave it out of "
                         "--logger)") from e
    return loggers


def logger_names(opt, lightning_config):
    """--logger, else the config's lightning.logger (a list or a comma-separated string), else tensorboard."""
    if opt.logger is not None:
        return opt.logger
    configured = lightning_config.get("logger")
    if configured is None:
        return "tensorboard"
    return ",".join(configured) if OmegaConf.is_list(configured) else str(configured)


def build_model(config, opt):
    ckpt = config.run.get("actual_resume")
    if not ckpt and not config.run.get("from_scratch") and not names_weights(config.model):
        raise UsageError("no pretrained weights: give the model with --actual_resume MODEL.ckpt (or .safetensors, or "
                         "a diffusers folder), or pass --from_scratch to train from random weights")
    if ckpt:
        check_model_path(ckpt, "--actual_resume")
        prepare_model_config(config.model, ckpt)
    model = instantiate_from_config(config.model)
    if ckpt:
        load_state_dict_into(model, ckpt, use_ema=bool(config.run.get("use_ema")))
    if opt.embedding_manager_ckpt:
        model.embedding_manager.load(opt.embedding_manager_ckpt)
        model.restart_vector_ema()
    return model


def names_weights(node):
    """Whether a config node names a checkpoint anywhere inside it (a `ckpt_path` of the model or of a part)."""
    if OmegaConf.is_dict(node):
        return bool(node.get("ckpt_path")) or any(names_weights(v) for v in node.values())
    return OmegaConf.is_list(node) and any(names_weights(v) for v in node)


def set_learning_rate(model, config, trainer_cfg, n_devices, opt):
    base_lr = config.model.base_learning_rate
    bs = config.data.params.batch_size
    accumulate = trainer_cfg.get("accumulate_grad_batches", 1) or 1
    model.learning_rate = accumulate * n_devices * bs * base_lr if opt.scale_lr else base_lr
    log.info("learning rate %.2e (%s)", model.learning_rate,
             f"{accumulate} x {n_devices} x {bs} x {base_lr:.2e}" if opt.scale_lr else "not scaled")


def run(opt, dotlist, signals=None):
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    ckpt = None
    if opt.resume:
        logdir, ckpt, saved = resolve_resume(opt)
        opt.base = saved + opt.base
    config = build_config(opt, dotlist)
    first_step = resume_step(ckpt)
    pl.seed_everything(opt.seed, verbose=False)

    data = instantiate_from_config(config.data, seed=opt.seed)
    data.setup()  # bad data fails here, before a large model is loaded
    lightning_config = config.pop("lightning", OmegaConf.create())
    trainer_cfg = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True)
    accelerator, devices = choose_devices(opt, trainer_cfg)
    n_devices = (len(devices) if isinstance(devices, list) else int(devices)) * opt.num_nodes
    if n_devices > 1:
        trainer_cfg.setdefault("strategy", "ddp")
    trainer_cfg.setdefault("log_every_n_steps", 10)
    trainer_cfg.setdefault("use_distributed_sampler", False)  # the training stream gives each rank its share
    trainer_cfg.setdefault("enable_checkpointing", False)  # ResumableCheckpoint writes last.ckpt
    trainer_cfg.setdefault("enable_progress_bar", False)  # RunProgress shows the whole run
    clashing = [k for k in ("logger", "callbacks", "default_root_dir", "num_nodes") if k in trainer_cfg]
    if clashing:
        raise UsageError(f"lightning.trainer.{clashing[0]} is set by train_new.py: use --logger / lightning.logger, "
                         "lightning.callbacks, -l and --num_nodes instead")
    model = build_model(config, opt)
    set_learning_rate(model, config, trainer_cfg, n_devices, opt)

    if not opt.resume:
        data_name = os.path.basename(os.path.normpath(config.run.data_root)) if config.run.get("data_root") else ""
        logdir = claim_run_folder(opt.logdir, f"{data_name}{now}", opt.name)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, num_nodes=opt.num_nodes, default_root_dir=logdir,
                         logger=make_loggers(logger_names(opt, lightning_config), logdir, first_step),
                         callbacks=make_callbacks(opt, config, lightning_config, now, logdir, signals), **trainer_cfg)
    if opt.train:
        trainer.fit(model, data, ckpt_path=ckpt, weights_only=True)
    if not opt.no_test and "test" in data.datasets:
        trainer.test(model, data)
    return Run(logdir, model, trainer)


def get_parser(default_base=()):
    p = ArgumentParser(prog="train_new.py", description=USAGE)
    p.add_argument("-b", "--base", nargs="*", default=list(default_base), metavar="config.yaml",
                   help="configs, merged left to right; key=value arguments override them")
    p.add_argument("-t", "--train", action="store_true", help="train (without it: only build and check)")
    p.add_argument("-n", "--name", default="", help="postfix of the run folder name")
    p.add_argument("-r", "--resume", default="", help="run folder or checkpoint to resume from")
    p.add_argument("-l", "--logdir", default="logs", help="parent folder of run folders")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for everything")
    p.add_argument("--gpus", default=None, help='GPU indices: "0," or "0,1"; without CUDA training runs on CPU')
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--scale_lr", type=_bool, default=True, help="lr = base_lr x batch x devices x accumulation")
    p.add_argument("--no-test", action="store_true", help="skip testing after training")
    p.add_argument("--actual_resume", default=None,
                   help="pretrained model: .ckpt, .safetensors (its model.* UNet weights) or a diffusers SD 1.x folder")
    p.add_argument("--data_root", default=None, help="folder of the concept's training images")
    p.add_argument("--init_word", default=None, help="word the embedding starts from")
    p.add_argument("--placeholder_string", default=None, help="pseudo-word in captions, e.g. '*'")
    p.add_argument("--embedding_manager_ckpt", default=None, help="start from a saved embedding file")
    p.add_argument("--allow_existing_token", action="store_true", default=None,
                   help="let the placeholder be a word of the text encoder's vocabulary (its meaning is retrained)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="32; bf16-mixed (autocast on CPU or GPU); 16-mixed (autocast + grad scaler, GPU only). "
                        "Weights and the learned embedding stay float32")
    p.add_argument("--grad_checkpoint", type=_bool, default=None,
                   help="gradient checkpointing of the UNet and of the LDM BERT encoder (true/false)")
    p.add_argument("--validation_prompts", nargs="+", default=None, metavar="PROMPT",
                   help='prompts sampled every --validation_every steps and at the end, from fixed seeds, into '
                        'images/validation_gs-<step>.png (e.g. "a photo of a *" "a purple *")')
    p.add_argument("--validation_every", type=int, default=None, help="steps between validation grids (default 250)")
    p.add_argument("--logger", default=None,
                   help="loggers beside metrics.csv, comma-separated: tensorboard, wandb, mlflow "
                        "(default: the config's "
                        "lightning.logger, else tensorboard); W&B offline: WANDB_MODE=offline")
    p.add_argument("--from_scratch", action="store_true",
                   help="train from random weights (pretraining); without it a run needs --actual_resume or "
                        "weights named in the config")
    p.add_argument("--use_ema", action="store_true",
                   help="start from the checkpoint's EMA UNet weights (model_ema.*) instead of model.* (the default)")
    p.add_argument("--trust_configs", action="store_true",
                   help="with -r: build what the run folder's saved configs name even outside this framework's "
                        "modules (configs are code: only for run folders you trust)")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    return p


def _bool(v):
    """true/false (also yes/no, 1/0); anything else is refused, never read as false."""
    value = str(v).lower()
    if value not in ("1", "true", "yes", "y", "t", "0", "false", "no", "n", "f"):
        raise argparse.ArgumentTypeError(f"'{v}' is not true or false")
    return value in ("1", "true", "yes", "y", "t")


def main(argv=None, default_base=(), overlays=()):
    """overlays: configs merged after --base (the improvement entry points add their conditioner's).

    Exit status: 0 for a finished run, 2 for a user's error (one `error:` line), 128 + the signal's number for a
    run stopped by SIGINT or SIGTERM (its state saved, resumable with -r)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_console()
    opt, dotlist = get_parser(default_base).parse_known_args(argv)
    opt.base = list(opt.base) + [o for o in overlays if o not in opt.base]
    bad = [a for a in dotlist if "=" not in a]
    if bad:
        print(f"error: unknown arguments {bad} (config overrides are written key=value)", file=sys.stderr)
        raise SystemExit(2)
    with StopSignals() as signals:
        try:
            result = run_command(lambda: run(TrainOptions(**vars(opt)), dotlist, signals), debug=opt.debug)
        except SystemExit as e:  # Lightning's own exits after a signal (SIGTERM, a second Ctrl-C) say 0 or 1
            if signals.received and e.code in (0, 1, None):
                raise SystemExit(128 + signals.received) from None
            raise
    if signals.received:
        raise SystemExit(128 + signals.received)
    return result
