"""Paint-by-Example (Yang et al., CVPR 2023) as a refinement baseline, through diffusers.

diffusers' ``PaintByExamplePipeline`` (weights by hub id, ``Fantasy-Studio/Paint-by-Example``,
or a local folder in diffusers' layout) refines every benchmark case with two references: the
ground-truth region crop, as the paper gave its baselines (``paint_by_example_oracle_crop``,
the very crop our ``oracle_crop`` gets), and the crop our alignment stage found
(``paint_by_example_aligned_crop``). Both rows run in evaluation/refinement.py's loop (batched,
cached, each case with its own noise seed), are scored with the same metrics in the same
tables as the other refinement methods, and eval.py pairs each with ours case by case, as it
does external methods.

The pipeline sees the image and mask at its own square resolution (512 for the published
weights; the same resizing as our model's inputs) and returns the whole decoded image. As for
every method here, that image is resized to the case's size and pasted into the (dilated) mask:
pixels outside it are the input's, bit for bit.

Loading: diffusers 0.42 keeps the pipeline under ``pipelines/deprecated`` and its
``from_pretrained`` no longer resolves the image encoder named in ``model_index.json``
(neither the published entry nor what its own ``save_pretrained`` writes), so every component
loads from its subfolder with its own class's ``from_pretrained`` and the pipeline is
assembled from them. The safety checker is left out: it blacks out flagged images, which
would change the scores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from data.benchmark import BenchmarkCase
from evaluation.sweep import case_noise_seed
from models.alignment import Alignment
from models.hub import offline_reason, require_cached
from models.image_processor import ImageProcessor, MaskProcessor

PREFIX = "paint_by_example_"
CROPS = ("oracle_crop", "aligned_crop")  # the reference each row gets, named as our methods
ReferenceFor = Callable[[str, BenchmarkCase, Mapping[str, Alignment], float],
                        "torch.Tensor | None"]


def enabled(cfg: Mapping[str, Any] | None) -> bool:
    """On when a model (hub id or local folder) is configured."""
    return bool(cfg and cfg.get("model"))


def method_names(cfg: Mapping[str, Any]) -> list[str]:
    """The report rows of ``cfg.crops``: ``paint_by_example_<crop>``."""
    crops = list(cfg.get("crops") or CROPS)
    unknown = sorted(set(crops) - set(CROPS))
    if unknown:
        raise ValueError(f"baselines.paint_by_example.crops: unknown {unknown}; choose from "
                         f"{list(CROPS)}")
    return [PREFIX + c for c in crops]


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, str(name))


def load_pipeline(model: str, device: str = "cpu", dtype: str | None = "auto"):
    """``PaintByExamplePipeline`` from a hub id or local folder in diffusers' layout, each
    component from its subfolder (module docstring), without the safety checker."""
    import diffusers
    from diffusers import AutoencoderKL, PaintByExamplePipeline, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    require_cached("Paint-by-Example", model, "set baselines.paint_by_example.model=/local/folder",
                   filename="model_index.json")
    kw = {"local_files_only": offline_reason() is not None}
    torch_dtype = _dtype(dtype, device)
    try:
        index = PaintByExamplePipeline.load_config(model, **kw)
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        pipe = PaintByExamplePipeline(
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch_dtype,
                                              **kw),
            image_encoder=PaintByExampleImageEncoder.from_pretrained(
                model, subfolder="image_encoder", torch_dtype=torch_dtype,
                config=CLIPVisionConfig.from_pretrained(model, subfolder="image_encoder", **kw),
                **kw),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet",
                                                      torch_dtype=torch_dtype, **kw),
            scheduler=scheduler_cls.from_pretrained(model, subfolder="scheduler", **kw),
            safety_checker=None,
            feature_extractor=CLIPImageProcessor.from_pretrained(
                model, subfolder="feature_extractor", **kw),
            requires_safety_checker=False,
        )
    except Exception as err:
        raise RuntimeError(f"Paint-by-Example {model} failed to load: "
                           f"{err.__class__.__name__}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def resolution(pipe, cfg: Mapping[str, Any]) -> int:
    """``cfg.resolution``, else the UNet's sample size in pixels (512 for the published model)."""
    return int(cfg.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _to_pil(crop: torch.Tensor) -> Image.Image:
    """[3,h,w] in [0,1] (``Alignment.crop``'s layout) -> RGB image for the feature extractor."""
    return Image.fromarray((crop.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
                           .cpu().numpy())


def refine(pipe, cases: Sequence[BenchmarkCase], references: Sequence[torch.Tensor],
           seeds: Sequence[int], size: int, steps: int, guidance_scale: float, dilate: int = 0,
           feather: int = 0) -> list[np.ndarray]:
    """Each case's image with its mask refined from its reference, pasted back; case ``i``'s
    noise comes from its own generator seeded ``seeds[i]``."""
    images_in, masks_in = ImageProcessor(), MaskProcessor()
    dtype = pipe.unet.dtype
    images = pipe(
        example_image=[_to_pil(r) for r in references],
        image=torch.cat([images_in.preprocess(c.image, size) for c in cases]).to(dtype),
        mask_image=torch.cat([masks_in.preprocess(c.mask, size) for c in cases]).to(dtype),
        height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds], output_type="np",
    ).images
    generated = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return [images_in.apply_overlay(c.mask, c.image, g, None, dilate, feather)
            for c, g in zip(cases, generated, strict=True)]


def run_batch(pipe, method: str, batch: Sequence[BenchmarkCase],
              alignments: Mapping[str, Alignment], cfg: Mapping[str, Any],
              pbe_cfg: Mapping[str, Any], reference_for: ReferenceFor
              ) -> dict[str, tuple[np.ndarray | None, dict[str, bool]]]:
    """One row on a batch, in evaluation/refinement.py's ``run_batch`` format: {case_id:
    (uint8 output or None, flags)}, ``skipped`` where the case has no such reference.

    ``reference_for(crop, case, alignments, margin)`` is the reference our method of that name
    gets; ``cfg`` is the refinement config (seed, dilate, feather, alignment margin): each
    case's noise seed is :func:`evaluation.sweep.case_noise_seed`, as for our methods.
    """
    refs = [(c, reference_for(method[len(PREFIX):], c, alignments,
                              float(cfg["alignment"]["margin"]))) for c in batch]
    todo = [(c, r) for c, r in refs if r is not None]
    done: dict[str, np.ndarray] = {}
    if todo:
        try:
            results = refine(pipe, [c for c, _ in todo], [r for _, r in todo],
                             [case_noise_seed(int(cfg["seed"]), c.id) for c, _ in todo],
                             resolution(pipe, pbe_cfg), int(pbe_cfg.get("num_steps", 50)),
                             float(pbe_cfg.get("guidance_scale", 5.0)), int(cfg["dilate"]),
                             int(cfg["feather"]))
        except Exception as err:
            raise RuntimeError(f"method {method} failed on case(s) "
                               f"{', '.join(c.id for c, _ in todo)}: "
                               f"{err.__class__.__name__}: {err}") from err
        done = {c.id: out for (c, _), out in zip(todo, results, strict=True)}
    return {c.id: (done[c.id], {}) if c.id in done else (None, {"skipped": True})
            for c, _ in refs}


def stage_name(method: str, pbe_cfg: Mapping[str, Any]) -> str:
    """The run cache's stage of a row: its settings' digest in the name, so turning the rows
    on (or changing them) in a resumed run adds stages instead of invalidating the cache."""
    settings = {k: v for k, v in dict(pbe_cfg).items() if k != "crops"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    return f"refinement/{method}-{digest.hexdigest()[:12]}"
