"""Denoising gain: how much one denoiser forward improves a noised target, per timestep.

For each case and each timestep t of a fixed set, the clean target is noised to t with the
case's own fixed noise (:func:`models.alignment.case_noise_seed` of its id, the same at every t);
the denoiser runs once with the model's real conditioning (masked-image latent, mask,
reference tokens); its output becomes an x0 prediction by the scheduler's parametrisation
(:func:`predicted_x0`). The noisy input and the x0 prediction (both decoded, for latent
models) are pasted into the target inside the mask and scored against it: PSNR in the mask's
box and gradient magnitude similarity (gms) inside the mask (models/image_metrics.py), at the
model's resolution. The gain is the x0 prediction's score minus the noisy input's.

A denoiser that returns its input (x0 = x_t) gains exactly 0; a perfect one reaches the
autoencoder's reconstruction (pixel space: the target itself, PSNR capped at
:data:`PSNR_CAP` dB, gms 1). The refinement sampler's last steps run at low t: a gain near 0
there means they add no detail.

:class:`LogDenoisingGain` logs it at every validation; eval.py's report and
scripts/validate_export.py run it on benchmark cases (evaluation/denoising_gain.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from pytorch_lightning.strategies import FSDPStrategy

from data.modes import decode_pixels
from models.alignment import case_noise, case_noise_seed
from models.autoencoder import Autoencoder
from models.image_metrics import gradient_similarity, psnr_in_box
from models.image_processor import to_uint8
from models.refinement import blend, denoiser_input, latent_mask

log = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = (10, 50, 100, 200, 400, 700)
PSNR_CAP = 100.0  # dB: an exact reconstruction (PSNR inf) counts as this, so means stay finite
METRICS = ("psnr", "gms")
SOURCES = ("noisy", "x0")  # the noised input, the one-step x0 prediction
Scores = dict[str, np.ndarray]  # {f"{metric}_{source}": [cases, timesteps]}


def predicted_x0(scheduler: SchedulerMixin, model_output: torch.Tensor, sample: torch.Tensor,
                 timestep: int) -> torch.Tensor:
    """The x0 prediction of ``model_output`` at ``timestep`` from the noisy ``sample``.

    The formulas of diffusers' ``DDPMScheduler.step`` (``pred_original_sample``, without
    clipping) on the scheduler's ``alphas_cumprod``, for its ``prediction_type``; in float64
    so that an identity denoiser's x0 is its input to the last bit.
    """
    alpha = scheduler.alphas_cumprod[int(timestep)].double()
    a, b = alpha.sqrt(), (1 - alpha).sqrt()
    out, x_t = model_output.double(), sample.double()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - b * out) / a
    if kind == "v_prediction":
        return a * x_t - b * out
    if kind == "sample":
        return out
    raise ValueError(f"unsupported prediction_type {kind!r}")


def check_timesteps(timesteps: Sequence[int], scheduler: SchedulerMixin) -> list[int]:
    """The timesteps as ints, refused unless all lie on the training schedule."""
    steps = [int(t) for t in timesteps]
    high = int(scheduler.config.num_train_timesteps)
    bad = [t for t in steps if not 0 <= t < high]
    if not steps or bad:
        raise ValueError(f"denoising-gain timesteps must be a non-empty list in 0..{high - 1}, "
                         f"got {list(timesteps)}")
    return steps


def _scores(images: torch.Tensor, target: np.ndarray, masks: np.ndarray) -> tuple[list, list]:
    psnr, gms = [], []
    for image, goal, mask in zip(images, target, masks, strict=True):
        out = to_uint8(image)
        psnr.append(min(psnr_in_box(out, goal, mask), PSNR_CAP))
        gms.append(gradient_similarity(out, goal, mask))
    return psnr, gms


@torch.no_grad()
def one_step_predictions(
    denoiser: UNet2DConditionModel,
    autoencoder: Autoencoder,
    scheduler: SchedulerMixin,
    target: torch.Tensor,
    mask: torch.Tensor,
    context: torch.Tensor,
    timesteps: Sequence[int],
    noise_seeds: Sequence[int],
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(t, clean, noisy, x0)`` latents per timestep: the clean target's latents, noised to t
    with each case's own noise, and the denoiser's one-step x0 prediction from them.

    ``target`` [B,3,H,W] in [-1,1] at the model's size, ``mask`` [B,1,H,W] (1 = regenerate),
    ``context`` the reference tokens, one noise seed per case.
    """
    dtype = next(denoiser.parameters()).dtype
    latents = autoencoder.encode(target)
    masked_latent = autoencoder.encode(target * (1 - mask))
    mask_lat = latent_mask(mask, latents.shape[-2:])
    noise = case_noise(latents.shape, noise_seeds=noise_seeds).to(latents.device, latents.dtype)
    for t in timesteps:
        t_batch = torch.full((len(target),), int(t), device=latents.device, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, t_batch)
        pred = denoiser(denoiser_input(noisy, masked_latent, mask_lat).to(dtype), t_batch,
                        encoder_hidden_states=context.to(dtype)).sample
        yield int(t), latents, noisy, predicted_x0(scheduler, pred, noisy, int(t)).to(latents.dtype)


@torch.no_grad()
def score_batch(
    denoiser: UNet2DConditionModel,
    autoencoder: Autoencoder,
    scheduler: SchedulerMixin,
    target: torch.Tensor,
    mask: torch.Tensor,
    context: torch.Tensor,
    timesteps: Sequence[int],
    noise_seeds: Sequence[int],
) -> Scores:
    """Per-case scores of one batch: {"psnr_noisy", "psnr_x0", "gms_noisy", "gms_x0"}, each
    [B, T]. Arguments as :func:`one_step_predictions`."""
    goal = np.stack([to_uint8(t) for t in target])
    masks = (mask[:, 0] > 0.5).cpu().numpy()
    out: dict[str, list] = {f"{m}_{s}": [] for m in METRICS for s in SOURCES}
    for _, _, noisy, x0 in one_step_predictions(denoiser, autoencoder, scheduler, target, mask,
                                                context, timesteps, noise_seeds):
        for source, latent in (("noisy", noisy), ("x0", x0)):
            image = autoencoder.decode(latent).clamp(-1, 1)
            psnr, gms = _scores(blend(target, image, mask), goal, masks)
            out[f"psnr_{source}"].append(psnr)
            out[f"gms_{source}"].append(gms)
    return {k: np.asarray(v, dtype=np.float64).T for k, v in out.items()}


def noise_left(clean: torch.Tensor, noisy: torch.Tensor, x0: torch.Tensor, alpha_bar: float,
               select: torch.Tensor | None = None) -> dict[str, float]:
    """How an x0 prediction's error splits into noise left in and error of its own.

    In x0 units the noisy input is ``clean + n`` (n = x_t / sqrt(alpha_bar) - clean); the
    prediction's error r = x0 - clean is projected on n over the ``select``ed elements (all
    when None): ``noise_left`` k = <r, n> / <n, n> (1: x_t / sqrt(alpha_bar) returned, 0: all
    the noise removed) and ``other_error`` = mean((r - k n)^2) / mean(n^2), what the
    prediction adds that is not the input's noise (structure lost or invented).
    ``error_ratio`` = mean(r^2) / mean(n^2) (its -10 log10 is the gain in dB).
    """
    n = noisy.double() / float(alpha_bar) ** 0.5 - clean.double()
    r = x0.double() - clean.double()
    if select is not None:
        n, r = n[select], r[select]
    if n.numel() == 0:
        raise ValueError("noise_left: the selection is empty")
    power = float((n * n).mean())
    k = float((r * n).mean()) / power
    return {"noise_left": k, "other_error": float(((r - k * n) ** 2).mean()) / power,
            "error_ratio": float((r * r).mean()) / power, "elements": int(n.numel())}


def concat_scores(parts: Sequence[Scores]) -> Scores:
    """Scores of several batches as one [cases, T] array per key."""
    if not parts:
        raise ValueError("no scored batch")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def gain_rows(scores: Scores, timesteps: Sequence[int]) -> list[dict[str, float]]:
    """One row per timestep: mean noisy-input and x0 scores over the cases, their difference
    (``*_gain``) and its standard error over the cases (``*_gain_se``; 0 for one case)."""
    cases = len(scores["psnr_x0"])
    rows = []
    for i, t in enumerate(timesteps):
        row: dict[str, float] = {"t": int(t)}
        for metric in METRICS:
            noisy, x0 = scores[f"{metric}_noisy"][:, i], scores[f"{metric}_x0"][:, i]
            diff = x0 - noisy
            row[f"{metric}_noisy"] = float(noisy.mean())
            row[f"{metric}_x0"] = float(x0.mean())
            row[f"{metric}_gain"] = float(diff.mean())
            row[f"{metric}_gain_se"] = float(diff.std(ddof=1) / np.sqrt(cases)) if cases > 1 \
                else 0.0
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping[str, float]]) -> str:
    """The rows as a fixed-width text table (CLI output)."""
    head = (f"{'t':>5} {'PSNR noisy':>11} {'PSNR x0':>9} {'gain dB':>9} {'+-se':>6}"
            f" {'gms noisy':>10} {'gms x0':>8} {'gain':>8} {'+-se':>6}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['t']:>5} {r['psnr_noisy']:>11.2f} {r['psnr_x0']:>9.2f} "
                     f"{r['psnr_gain']:>+9.2f} {r['psnr_gain_se']:>6.2f} {r['gms_noisy']:>10.3f} "
                     f"{r['gms_x0']:>8.3f} {r['gms_gain']:>+8.3f} {r['gms_gain_se']:>6.3f}")
    return "\n".join(lines)


class LogDenoisingGain(pl.Callback):
    """Logs ``val/denoise_gain_{psnr,gms}_t{t}`` at every validation.

    Scores the first ``num_cases`` validation cases as the validation batches pass (so under
    the weights validation runs with: EMA, where the module keeps one), with the pl_module's
    ``denoiser``, ``reference_encoder`` (the batch's reference: the whole reference on the
    alignment-mode validation set), ``autoencoder`` and ``noise_scheduler``. A case's id for
    its noise seed is its dataset ``index`` (else its position). Skipped in the sanity check,
    and under FSDP (the submodules hold only shards outside the module's own steps).
    """

    def __init__(self, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, num_cases: int = 16,
                 seed: int = 0) -> None:
        if num_cases < 1:
            raise ValueError(f"denoising gain num_cases must be >= 1, got {num_cases}")
        self.timesteps, self.num_cases, self.seed = list(timesteps), int(num_cases), int(seed)
        self._parts: list[Scores] = []
        self._seen = 0
        self._warned = False

    def _active(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if isinstance(trainer.strategy, FSDPStrategy):
            if not self._warned:
                log.warning("denoising gain is not measured under FSDP")
                self._warned = True
            return False
        return True

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                                  ) -> None:
        check_timesteps(self.timesteps, pl_module.noise_scheduler)
        self._parts, self._seen = [], 0

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if "target" not in batch:  # latents only: nothing to score pixels against
            return
        batch = decode_pixels(batch)  # a no-op on the Trainer's (already decoded) batches
        take = min(len(batch["target"]), self.num_cases - self._seen)
        if take <= 0 or not self._active(trainer):
            return
        index = batch.get("index")
        ids = (index[:take].tolist() if index is not None
               else list(range(self._seen, self._seen + take)))
        ids = [str(i) for i in ids]
        with torch.no_grad():
            context = pl_module.reference_encoder(batch["reference"][:take])
        self._parts.append(score_batch(
            pl_module.denoiser, pl_module.autoencoder, pl_module.noise_scheduler,
            batch["target"][:take].float(), batch["mask"][:take].float(), context,
            self.timesteps, [case_noise_seed(self.seed, i) for i in ids]))
        self._seen += take

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                                ) -> None:
        if not self._parts:
            return
        rows = gain_rows(concat_scores(self._parts), self.timesteps)
        for row in rows:
            for metric in METRICS:
                pl_module.log(f"val/denoise_gain_{metric}_t{row['t']}", row[f"{metric}_gain"],
                              sync_dist=True, batch_size=self._seen)
        self._parts = []
