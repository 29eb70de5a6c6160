"""Early stopping of a TI run on its fit to its own images: no evaluator, no held-out images needed.

    lightning:
      callbacks:
        early_stop:
          target: ldm.callbacks.FitPlateauStop
          params: {every_n_steps: 50, patience: 2, min_delta: 0.01, min_steps: 100}
"""
import logging

import pytorch_lightning as pl
import torch

from ldm.data.images import to_model_range

log = logging.getLogger(__name__)


class FitPlateauStop(pl.Callback):
    """Ends the run once the concept's fixed-noise denoising loss stops falling.

    Every `every_n_steps` steps each training image, under its own plain caption (`PersonalizedBase.plain_caption`),
    is noised at `timesteps` evenly spaced t with noise drawn from `seed`: the same pairs at every check, so the
    loss moves only with the vectors (the training loss, on fresh t and noise each step, is far noisier). A check
    that does not beat the best so far by `min_delta` (relative) counts against `patience`; after `patience` such
    checks in a row, past `min_steps`, the run ends as finished (exit 0, vectors written). The loss is logged as
    `val/fit_loss`. The state (best, checks without improvement) travels in last.ckpt, so a resumed run decides
    as the uninterrupted one would; the check draws from its own generator, never from the run's.
    """

    def __init__(self, every_n_steps=50, patience=2, min_delta=0.01, min_steps=100, timesteps=10, seed=0):
        super().__init__()
        if every_n_steps < 1 or patience < 1 or timesteps < 1 or min_steps < 0 or not 0 <= min_delta < 1:
            raise ValueError(f"FitPlateauStop(every_n_steps={every_n_steps}, patience={patience}, "
                             f"min_delta={min_delta}, min_steps={min_steps}, timesteps={timesteps}): use positive "
                             "counts, min_steps >= 0 and min_delta in [0, 1), e.g. 50, 2, 0.01, 100, 10")
        self.every_n_steps, self.patience, self.min_delta = every_n_steps, patience, min_delta
        self.min_steps, self.timesteps, self.seed = min_steps, timesteps, seed
        self.best, self.bad_checks, self.history = None, 0, []

    def state_dict(self):
        return {"best": self.best, "bad_checks": self.bad_checks, "history": list(self.history)}

    def load_state_dict(self, state):
        self.best, self.bad_checks, self.history = state["best"], state["bad_checks"], list(state["history"])

    def on_fit_start(self, trainer, pl_module):
        if (not hasattr(pl_module, "q_sample") or getattr(pl_module, "embedding_manager", None) is None
                or getattr(pl_module, "conditions_on_size", False)):
            raise ValueError("FitPlateauStop measures the denoising loss of a diffusion TI run with one text "
                             "context (not SDXL's): leave lightning.callbacks.early_stop out for this model")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        with pl_module.averaged_vectors():  # judge the vectors the run would save
            loss = fit_loss(pl_module, trainer.datamodule.datasets["train"], self.timesteps, self.seed)
        pl_module.log("val/fit_loss", loss, on_step=True, batch_size=1)
        self.history.append((step, loss))
        if self.best is None or loss < self.best * (1 - self.min_delta):
            self.best, self.bad_checks = loss, 0
        else:
            self.bad_checks += 1
        if step >= self.min_steps and self.bad_checks >= self.patience and not trainer.should_stop:
            trainer.should_stop = True
            log.info("early stop after step %d: the fit loss %.5f has not beaten %.5f by %g in %d checks",
                     step, loss, self.best, self.min_delta, self.bad_checks)


@torch.no_grad()
def fit_loss(model, dataset, timesteps=10, seed=0):
    """The mean denoising loss of `model` (a LatentDiffusion with its manager) on every image of `dataset`
    (a PersonalizedBase) at `timesteps` evenly spaced t, noise from a generator seeded `seed` -> float.

    Latents are the first stage's posterior means and captions the dataset's plain ones: nothing random but the
    seeded noise, so two calls with the same vectors agree exactly.
    """
    n, k = dataset.num_images, timesteps
    images = torch.stack([torch.from_numpy(to_model_range(dataset.prepared(i)[0]).copy()) for i in range(n)])
    x = images.permute(0, 3, 1, 2).to(model.device, memory_format=torch.contiguous_format)
    z0 = model.get_first_stage_encoding(model.encode_first_stage(x).mode()).repeat_interleave(k, 0)  # (n k, C, h, w)
    step = model.num_timesteps // k
    t = torch.arange(step // 2, model.num_timesteps, step, device=z0.device)[:k].repeat(n)  # (n k,)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    captions = [dataset.plain_caption(i) for i in range(n) for _ in range(k)]
    c = model.conditioning_by_band(captions, model.timestep_band(t))
    loss, _ = model.p_losses(z0, c, t, noise, uc=model.training_uc(len(captions)))
    return float(loss)
