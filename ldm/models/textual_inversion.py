"""What every text-conditioned generator of the framework shares: its text encoder, the optional
EmbeddingManager, and the rules of textual inversion.

A subclass (LatentDiffusion, the autoregressive ARTextToImage) names its generator modules in
`generator_parts`, calls `setup_conditioning` in its constructor and defines `shared_step(batch) ->
(loss, logs)`. In TI mode (a `personalization_config`) the generator, first stage and text encoder are
frozen and stay in eval mode; only the manager's vectors and any `trainable_modules` reach the optimizer.
"""
import contextlib
import functools
import math
import random

import pytorch_lightning as pl
import torch

from ldm.modules.embedding_ema import VectorEMA, check_decay
from ldm.util import instantiate_from_config

LR_DECAYS = ("none", "cosine")


def check_lr_decay(value):
    """The learning-rate schedule of a TI run: "none" (constant, the reference's) or "cosine" (to 0 at max_steps)."""
    if value not in LR_DECAYS:
        raise ValueError(f"lr_decay={value!r} is not a schedule: use one of {', '.join(LR_DECAYS)}")
    return value


def _cosine_factor(step, total):
    """The share of the base rate at `step` of `total`: 1 at 0, 0 from `total` on."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def freeze(module):
    """Eval mode and requires_grad=False for every parameter of `module` -> module."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class TextConditionedModel(pl.LightningModule):
    generator_parts = ()  # attribute names of the modules TI freezes besides first stage and text encoder
    timestep_bands_ok = False  # whether the generator has timesteps to give each band of vectors
    lr_decay = "none"  # a subclass's constructor may take it (check_lr_decay)

    def setup_conditioning(self, cond_stage_config, personalization_config=None, cond_stage_trainable=False,
                           train_embedding=True, trainable_modules=None, embedding_ema=0.0):
        """Build the text encoder and the manager, then freeze what the mode asks (after the generator exists).

        embedding_ema: 0, or the decay of a moving average of the vectors (ldm.modules.embedding_ema) that the run
        saves, logs images with and early-stops on in place of the last step's vectors.
        """
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.personalization_config = personalization_config
        self.embedding_ema = check_decay(embedding_ema)
        if self.embedding_ema and personalization_config is None:
            raise ValueError("embedding_ema averages textual-inversion vectors: add a personalization_config or "
                             "leave embedding_ema at 0")
        self.embedding_manager = self.build_embedding_manager()
        self.restart_vector_ema()
        if personalization_config is not None:
            for name in self.generator_parts:
                freeze(getattr(self, name))
            freeze(self.cond_stage_model)
        elif not cond_stage_trainable:
            freeze(self.cond_stage_model)
        self.train_embedding = train_embedding
        self.trainable_modules = dict(trainable_modules or {})  # submodule path -> learning rate (None: base)
        self.unfreeze_trainable_modules()

    def build_embedding_manager(self):
        """The EmbeddingManager of the config, its vectors initialised from the current text encoder."""
        if self.personalization_config is None:
            return None
        return instantiate_from_config(self.personalization_config, embedder=self.cond_stage_model)

    def on_weights_loaded(self, loaded_keys):
        """Called by `load.load_state_dict_into`. Initial vectors come from the text encoder's weights, so after
        loading a base checkpoint (one without learned vectors) the manager is built again from them. Weights
        without an average of the vectors start it again from the vectors they leave."""
        if self.embedding_manager is not None and not any(k.startswith("embedding_manager.") for k in loaded_keys):
            device = next(self.cond_stage_model.parameters()).device
            self.embedding_manager = self.build_embedding_manager().to(device)
            self.unfreeze_trainable_modules()
        if not any(k.startswith("vector_ema.") for k in loaded_keys):
            self.restart_vector_ema()

    # ---- the moving average of the vectors -----------------------------------------------------
    def restart_vector_ema(self):
        """Start the average (when embedding_ema is set) from the manager's current vectors: call it whenever
        the manager's vectors are replaced other than by training (a new manager, an embedding file loaded)."""
        use = self.embedding_manager is not None and self.embedding_ema > 0
        self.vector_ema = VectorEMA(self.embedding_manager, self.embedding_ema) if use else None

    def averaged_vectors(self):
        """A context within which the manager holds the averaged vectors (no-op without embedding_ema)."""
        if self.vector_ema is None:
            return contextlib.nullcontext()
        return self.vector_ema.applied(self.embedding_manager)

    def optimizer_step(self, *args, **kwargs):
        """The optimizer's step, then the average's (before any callback sees the step: checkpoints agree)."""
        super().optimizer_step(*args, **kwargs)
        if self.vector_ema is not None:
            self.vector_ema.update(self.embedding_manager)

    # ---- freezing ---------------------------------------------------------------------------
    @property
    def new_parameter_prefixes(self):
        """State-dict prefixes a base checkpoint lacks: the learned vectors (and their average), and new
        conditioner modules."""
        extra = getattr(self.cond_stage_model, "new_parameter_prefixes", ())
        return ("embedding_manager.", "vector_ema.") + tuple(f"cond_stage_model.{p}" for p in extra)

    def unfreeze_trainable_modules(self):
        """In TI mode, `trainable_modules` train beside (or, without train_embedding, instead of) the vectors."""
        if self.embedding_manager is None:
            if self.trainable_modules or not self.train_embedding:
                raise ValueError("trainable_modules and train_embedding apply to textual inversion: "
                                 "add a personalization_config")
            return
        for path in self.trainable_modules:
            self.get_submodule(path).requires_grad_(True)
        for p in self.embedding_manager.embedding_parameters():
            p.requires_grad_(self.train_embedding)
        if not self.trainable_parameters():
            raise ValueError("nothing to train: set train_embedding true or list trainable_modules")

    def frozen_modules(self):
        parts = [getattr(self, name) for name in (*self.generator_parts, "first_stage_model", "cond_stage_model")]
        return [m for m in parts if not any(p.requires_grad for p in m.parameters())]

    def train(self, mode=True):
        """Frozen parts stay in eval mode whatever Lightning asks (dropout off, as at inference);
        of a partly trained part only its `trainable_modules` follow `mode`."""
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        for path in self.trainable_modules:
            self.get_submodule(path.split(".")[0]).eval()
        for path in self.trainable_modules:
            self.get_submodule(path).train(mode)
        return self

    def param_groups(self, lr):
        """Optimizer groups: the vectors at `lr`, each trainable module at its own rate (or `lr`)."""
        if self.embedding_manager is None:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]
        vectors = list(self.embedding_manager.embedding_parameters())
        groups = [{"params": vectors, "lr": lr}] if self.train_embedding else []
        groups += [{"params": list(self.get_submodule(path).parameters()), "lr": lr if mlr is None else mlr}
                   for path, mlr in self.trainable_modules.items()]
        return groups

    def trainable_parameters(self):
        return [p for group in self.param_groups(0.0) for p in group["params"]]

    def trainable_module_state(self):
        """{full state-dict key: tensor} of the trainable modules (what a TI run saves beside its vectors)."""
        prefixes = tuple(f"{path}." for path in self.trainable_modules)
        return {k: v.detach() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    # ---- conditioning ---------------------------------------------------------------------------
    def get_learned_conditioning(self, c, band=0):
        """c: list of B strings, band: the manager's timestep band, an int or (B,) int64 per row -> (B, T, D) context.

        A TI batch repeats its few templates: with the whole text encoder in eval mode (no dropout to draw
        per row) each distinct (caption, band) is encoded once and its rows are gathered (gradients add up).
        """
        if self.num_bands > 1 and not self.timestep_bands_ok:
            raise ValueError(f"these vectors hold one set per diffusion timestep band "
                             f"{list(self.embedding_manager.timestep_bands)}, but {type(self).__name__} has no "
                             "timesteps: train them without timestep_bands")
        captions = list(c)
        keys = list(zip(captions, band.tolist() if torch.is_tensor(band) else [band] * len(captions)))
        rows = {key: k for k, key in enumerate(dict.fromkeys(keys))}
        if len(rows) == len(keys) or any(m.training for m in self.cond_stage_model.modules()):
            return self._encode(captions, band)
        unique_band = torch.tensor([k for _, k in rows], device=band.device) if torch.is_tensor(band) else band
        context = self._encode([caption for caption, _ in rows], unique_band)
        return context[torch.tensor([rows[key] for key in keys], device=context.device)]

    def _encode(self, captions, band):
        """captions: B strings, band: int or (B,) int64 -> (B, T, D), through the manager's vectors of `band`."""
        return self.cond_stage_model.encode(captions, embedding_manager=self.embedding_manager, band=band)

    @property
    def num_bands(self):
        """Timestep bands of the embedding manager's vectors (1 without a manager or bands)."""
        return 1 if self.embedding_manager is None else self.embedding_manager.num_bands

    def banded_conditioning(self, captions):
        """-> list of (B, T, D) contexts of `captions`, one per timestep band of the manager (one without bands)."""
        return [self.get_learned_conditioning(captions, k) for k in range(self.num_bands)]

    def conditioning_by_band(self, captions, band):
        """captions: B strings, band: (B,) int64 -> (B, T, D), row b through the vectors of timestep band band[b],
        in one pass of the text encoder."""
        return self.get_learned_conditioning(captions, band if self.num_bands > 1 else 0)

    def captions_from_batch(self, batch):
        """The batch's captions; while pretraining, each is dropped to "" with probability cond_drop_prob."""
        captions = list(batch[self.cond_stage_key])
        if self.training and self.cond_drop_prob > 0:
            captions = ["" if random.random() < self.cond_drop_prob else c for c in captions]
        return captions

    def add_embedding_regulariser(self, loss, logs):
        """loss + embedding_reg_weight x the manager's distance to its initial vectors (when both are set)."""
        if self.embedding_manager is not None and self.embedding_reg_weight > 0:
            reg = self.embedding_manager.embedding_to_coarse_loss().mean()
            loss = loss + self.embedding_reg_weight * reg
            logs["loss_embedding_reg"] = reg.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    # ---- training -------------------------------------------------------------------------------
    def on_train_start(self):
        """Lightning fits with the modes the modules were loaded in (all eval); set the training modes (trainable
        modules train, frozen parts eval) before the first step, as they are after each sampled image grid, so a
        run's steps do not depend on when, or whether, it logged images, and a resumed run matches."""
        self.train(True)

    def training_step(self, batch, batch_idx):
        loss, logs = self.shared_step(batch)
        n = len(batch[self.cond_stage_key])
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"}, on_step=True, batch_size=n)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        _, logs = self.shared_step(batch)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True,
                      batch_size=len(batch[self.cond_stage_key]))

    def configure_optimizers(self):
        """AdamW at `learning_rate`; with lr_decay "cosine" the rate falls to 0 by the run's last optimizer step."""
        lr = getattr(self, "learning_rate", 1e-4)
        optimizer = torch.optim.AdamW(self.param_groups(lr), lr=lr)
        if self.lr_decay == "none":
            return optimizer
        total = self.trainer.estimated_stepping_batches  # max_steps, or what max_epochs amounts to
        if not math.isfinite(total):
            raise ValueError("lr_decay=cosine needs a run of known length: set lightning.trainer.max_steps")
        total = max(1, int(total))
        factor = functools.partial(_cosine_factor, total=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints: in TI mode only the trainable state is written ----------------------------
    def on_save_checkpoint(self, checkpoint):
        if self.embedding_manager is not None:
            keep = ("embedding_manager.", "vector_ema.") + tuple(f"{path}." for path in self.trainable_modules)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(keep)}

    def on_load_checkpoint(self, checkpoint):
        if self.embedding_manager is not None:
            self.strict_loading = False
