"""Refinement comparison: exact pixels outside the mask, and the full evaluation on 3 cases."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.benchmark import load_benchmark, write_synthetic_benchmark
from evaluation import refinement as R
from evaluation.metrics import NOT_CACHED
from models.image_processor import ImageProcessor
from models.refinement import blend


@pytest.fixture(scope="session")
def pipe(tiny_pipeline_dir: Path):
    from models.export import load_pipeline

    return load_pipeline(tiny_pipeline_dir)


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory):
    """3 synthetic cases in 2 categories; one at a non-native size, one with no reference_mask."""
    root = tmp_path_factory.mktemp("bench")
    write_synthetic_benchmark(root, 3, seed=0)
    cases, skipped = load_benchmark(root)
    assert not skipped
    cases[0].meta["category"] = "logo"
    cases[1].meta["category"] = "logo"
    cases[2].meta["category"] = "try_on"
    # case 1 at 80x96: the model runs at 64 and the content is pasted back at 80x96
    big = cases[1]
    big.image = np.asarray(
        torch.nn.functional.interpolate(torch.from_numpy(big.image).permute(2, 0, 1)[None].float(),
                                        size=(80, 96), mode="bilinear")[0]
        .permute(1, 2, 0).round().byte())
    big.target = big.image.copy()
    big.mask = np.kron(big.mask[:, :48], np.ones((1, 2), bool))[:, :96]
    big.mask = np.repeat(big.mask, 2, axis=0)[:80]
    cases[2].reference_mask = None
    return cases


def test_paste_keeps_outside_bit_identical() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
    content = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)  # other size: upsampled
    mask = np.zeros((37, 53), bool)
    mask[10:20, 5:30] = True
    for dilate, feather in [(0, 0), (2, 0), (3, 2)]:
        out = ImageProcessor().apply_overlay(mask, image, content, None, dilate, feather)
        region = R.dilated_mask(mask, dilate)
        assert np.array_equal(out[~region], image[~region])
        assert not np.array_equal(out[mask], image[mask])


def test_blend_keeps_outside_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    original = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    generated = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:16, 4:20] = 1
    out = blend(original, generated, mask, dilate=2, feather=3)
    outside = R.dilated_mask(mask[0, 0].numpy() > 0, 2)
    assert torch.equal(out[..., ~torch.from_numpy(outside)],
                       original[..., ~torch.from_numpy(outside)])


def test_telea_changes_only_the_mask() -> None:
    image = np.random.default_rng(1).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[12:20, 12:30] = True
    out = R.telea(image, mask, dilate=1)
    region = R.dilated_mask(mask, 1)
    assert np.array_equal(out[~region], image[~region])


def test_copy_from_reference_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    fake = types.ModuleType("evaluation.baselines")
    fake.warp_reference_into_image = lambda im, m, ref: (None, {"reason": "no matches"})
    monkeypatch.setitem(sys.modules, "evaluation.baselines", fake)
    out, fell_back = R.copy_from_reference(image, mask, image)
    assert fell_back and np.array_equal(out, image)
    fake.warp_reference_into_image = lambda im, m, ref: (np.full_like(im, 200), {})
    out, fell_back = R.copy_from_reference(image, mask, image)
    assert not fell_back and (out[mask] == 200).all() and (out[~mask] == 0).all()


def test_oracle_crop_is_trainings_square_crop() -> None:
    from data.modes import crop_box

    reference = np.zeros((100, 120, 3), np.uint8)
    ref_mask = np.zeros((100, 120), bool)
    ref_mask[20:40, 30:80] = True
    crop = R.oracle_crop(reference, ref_mask, margin=0.1)
    assert tuple(crop.shape) == (3, 60, 60)  # the 50 px side + 2 x 5 px margin, square
    x0, y0, x1, y1 = crop_box(ref_mask, margin=0.1, jitter=0.0)  # training's crop, no draw
    assert (y1 - y0, x1 - x0) == tuple(crop.shape[1:])


def test_evaluate_refinement_all_methods(cases, pipe) -> None:
    cfg = OmegaConf.create({"num_steps": 2, "batch_size": 3, "dilate": 1, "feather": 1})
    result = R.evaluate_refinement(cases, pipe, None, cfg)
    outputs = result.pop("outputs")
    json.dumps(result)  # everything but the images is JSON-able

    assert set(result["methods"]) == set(R.METHODS)
    assert set(result["by_category"]) == {"logo", "try_on"}
    for metrics in result["by_category"].values():
        assert set(metrics) == set(R.METHODS)
    counts = result["counts"]
    assert counts["cases"] == 3 and counts["aligned_on_the_fly"] == 3
    assert counts["oracle_crop_skipped_no_reference_mask"] == 1
    assert counts["scored"]["oracle_crop"] == 2 and counts["scored"]["input"] == 3
    from evaluation.baselines import warp_reference_into_image
    from models.image_metrics import gradient_similarity, masked_l1

    unmatched = [c.id for c in cases
                 if warp_reference_into_image(c.image, c.mask, c.reference)[0] is None]
    assert counts.get("copy_from_reference_fallback", 0) == len(unmatched)
    for case_id in unmatched:
        assert np.array_equal(outputs[case_id]["copy_from_reference"],
                              next(c.image for c in cases if c.id == case_id))

    for name in ("clip", "dino", "fid"):
        assert result["methods"]["aligned_crop"][name] == NOT_CACHED
    for name in ("psnr", "ssim", "l1", "gms"):
        assert isinstance(result["methods"]["aligned_crop"][name], float)
    # the input row is the artifact's own score, case by case
    assert result["methods"]["input"]["l1"] == pytest.approx(
        np.mean([masked_l1(c.image, c.target, c.mask) for c in cases]))
    assert result["methods"]["input"]["gms"] == pytest.approx(
        np.mean([gradient_similarity(c.image, c.target, c.mask) for c in cases]))
    assert result["methods"]["input"]["l1"] > 0.01  # the artifacts really change the mask

    for case in cases:
        region = R.dilated_mask(case.mask, 1)
        for method, out in outputs[case.id].items():
            assert out.shape == case.image.shape and out.dtype == np.uint8
            assert np.array_equal(out[~region], case.image[~region]), (case.id, method)
    assert "oracle_crop" not in outputs[cases[2].id]


def test_a_cases_output_depends_on_the_case_not_on_its_batch_or_order(cases, pipe
                                                                      ) -> None:
    """Each case draws its own noise (seed, case id): the same output whether it is refined
    with other cases, alone, or in another order, so a resumed run can reuse it."""
    cfg = OmegaConf.create({"methods": ["ours_whole_reference"], "num_steps": 2, "batch_size": 3,
                            "sampler": "ddpm"})
    together = R.evaluate_refinement(cases, pipe, None, cfg, progress=False)["outputs"]
    alone = R.evaluate_refinement(cases[2:], pipe, None, {**cfg, "batch_size": 1},
                                  progress=False)["outputs"]
    reordered = R.evaluate_refinement(cases[::-1], pipe, None, cfg,
                                      progress=False)["outputs"]
    out = cases[2].id
    assert np.abs(alone[out]["ours_whole_reference"].astype(int)
                  - together[out]["ours_whole_reference"]).max() <= 1
    for case in cases:
        assert np.abs(reordered[case.id]["ours_whole_reference"].astype(int)
                      - together[case.id]["ours_whole_reference"]).max() <= 1


def test_a_failing_method_names_the_method_and_cases(cases, pipe,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(R.RefineByAlignPipeline, "__call__", broken)
    cfg = OmegaConf.create({"methods": ["input", "ours_whole_reference"], "num_steps": 1,
                            "batch_size": 2})
    with pytest.raises(R.RefinementError,
                       match=r"method ours_whole_reference failed on case\(s\) 00000, 00001: "
                             "RuntimeError: sampler exploded"):
        R.evaluate_refinement(cases, pipe, None, cfg)


def test_copy_from_reference_bugs_are_not_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    fake = types.ModuleType("evaluation.baselines")

    def bug(im, m, ref):
        raise KeyError("not a matching failure")

    fake.warp_reference_into_image = bug
    monkeypatch.setitem(sys.modules, "evaluation.baselines", fake)
    with pytest.raises(KeyError):
        R.copy_from_reference(image, mask, image)


def test_given_alignments_are_used(cases, pipe) -> None:
    from models.alignment import Alignment

    crop = torch.rand(3, 20, 30)
    alignments = {c.id: Alignment(torch.zeros(256), torch.zeros(224, 224),
                                  torch.zeros(224, 224, dtype=torch.bool), (0, 0, 30, 20), crop)
                  for c in cases}
    cfg = OmegaConf.create({"methods": ["aligned_crop"], "num_steps": 1, "guidance_scale": 1.0})
    result = R.evaluate_refinement(cases[:1], pipe, alignments, cfg)
    assert result["counts"]["aligned_on_the_fly"] == 0
    assert set(result["methods"]) == {"aligned_crop"}


def test_mask_resizing_covers_for_generation_and_keeps_shape_for_scoring():
    from models.refinement import resize_mask_tensor

    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 0, 0] = 1  # one pixel: under half of any 2x2 cell
    mask[..., 4:8, 4:8] = 1
    cover = resize_mask_tensor(mask, (4, 4), cover=True)
    shape = resize_mask_tensor(mask, (4, 4), cover=False)
    assert cover[0, 0, 0, 0] == 1 and shape[0, 0, 0, 0] == 0
    assert cover[0, 0, 2:, 2:].all() and shape[0, 0, 2:, 2:].all()
    assert cover.sum() == 5 and shape.sum() == 4
    thin = torch.zeros(1, 1, 8, 8)
    thin[..., 3, :] = 1  # a line that covers every cell it touches by half at most
    assert resize_mask_tensor(thin, (2, 2), cover=False).sum() == 2
    assert torch.equal(resize_mask_tensor(cover, (4, 4), cover=True), cover)
    assert resize_mask_tensor(mask, (16, 16), cover=True).sum() == 4 * mask.sum()


def test_compare_samplers_applies_each_variants_scheduler_options(tiny_pipeline_dir,
                                                                  tmp_path) -> None:
    from scripts.compare_samplers import VARIANTS
    from scripts.compare_samplers import main as compare

    out = tmp_path / "samplers.json"
    rows = compare(["--ckpt", str(tiny_pipeline_dir), "--cases", "2", "--steps", "2",
                    "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    assert [(r["sampler"], r["guidance"], r["options"]) for r in rows] == [
        (name, guidance, options) for name, _, guidance, options in VARIANTS]
    plain = next(r for r in rows if r["sampler"] == "ddpm" and r["guidance"] == 2.0
                 and not r["options"])
    unclipped = next(r for r in rows if r["options"] == {"clip_sample": False})
    assert unclipped["masked_mse"] != plain["masked_mse"]  # same noise: the option took effect
    assert all(r["steps"] == 2 and math.isfinite(r["masked_mse"]) for r in rows)


def test_compare_samplers_runs_the_variants_asked_for_with_per_case_errors(
        tiny_pipeline_dir) -> None:
    from scripts.compare_samplers import main as compare

    rows = compare(["--ckpt", str(tiny_pipeline_dir), "--cases", "3", "--variants",
                    "ddpm:2:1,ddim:3:2"])
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows] == [
        ("ddpm", 2, 1.0), ("ddim", 3, 2.0)]
    for row in rows:
        per_case = row["masked_mse_per_case"]
        assert len(per_case) == 3 and len(set(per_case)) == 3
        # the pooled error is the mask-area-weighted mean of the cases' errors
        assert min(per_case) <= row["masked_mse"] <= max(per_case)
    best = min(rows, key=lambda r: r["masked_mse"])
    other = next(r for r in rows if r is not best)
    assert best["vs_best"]["mean_difference"] == 0
    assert other["vs_best"]["mean_difference"] == pytest.approx(
        np.mean(other["masked_mse_per_case"]) - np.mean(best["masked_mse_per_case"]))
    with pytest.raises(SystemExit):
        compare(["--ckpt", str(tiny_pipeline_dir), "--variants", "ddpm:50"])


class _CountingDenoiser(torch.nn.Module):
    """Wraps a UNet and records the timesteps it is called at."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, sample, timestep, **kwargs):
        self.calls.append(int(timestep))
        return self.unet(sample, timestep, **kwargs)


def _inpaint_inputs(pipe, seed: int = 0):
    size = pipe.image_size
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, size, size, generator=gen) * 2 - 1
    mask = torch.zeros(2, 1, size, size)
    mask[..., size // 4: size // 2, size // 4: size // 2] = 1
    context = pipe.encode_reference(torch.rand(2, 3, 32, 32, generator=gen))
    return image, mask, context


def test_final_x0_stops_at_the_timestep_and_returns_that_steps_x0_prediction(pipe) -> None:
    from models.refinement import build_sampler, denoiser_input, latent_mask, sample_inpaint

    image, mask, context = _inpaint_inputs(pipe)
    counting = _CountingDenoiser(pipe.unet)
    sampler = build_sampler("ddpm", pipe.scheduler.config, pipe.autoencoder)
    out = sample_inpaint(counting, pipe.autoencoder, sampler, image, mask, context,
                         num_steps=10, generator=torch.Generator().manual_seed(3),
                         final_x0_timestep=450)
    schedule = [int(t) for t in sampler.timesteps]
    stop = next(i for i, t in enumerate(schedule) if t <= 450)
    assert counting.calls == schedule[: stop + 1] and len(counting.calls) < len(schedule)
    # the same run by hand: sample to the step before, then keep the step's x0 prediction
    reference = build_sampler("ddpm", pipe.scheduler.config, pipe.autoencoder)
    reference.set_timesteps(10)
    gen = torch.Generator().manual_seed(3)
    masked = pipe.autoencoder.encode(image * (1 - mask))
    mask_latent = latent_mask(mask, masked.shape[-2:])
    latents = torch.randn(masked.shape, generator=gen) * reference.init_noise_sigma
    for t in reference.timesteps[: stop + 1]:
        pred = pipe.unet(denoiser_input(latents, masked, mask_latent), t,
                         encoder_hidden_states=context).sample
        step = reference.step(pred, t, latents, generator=gen)
        latents = step.prev_sample
    expected = pipe.autoencoder.decode(step.pred_original_sample).clamp(-1, 1)
    torch.testing.assert_close(out, expected)
    full = sample_inpaint(pipe.unet, pipe.autoencoder, sampler, image, mask, context,
                          num_steps=10, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(out, full)


def test_final_x0_needs_a_sampler_with_an_x0_prediction(pipe) -> None:
    from models.refinement import build_sampler, sample_inpaint

    image, mask, context = _inpaint_inputs(pipe)
    sampler = build_sampler("dpm_solver", pipe.scheduler.config, pipe.autoencoder)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        sample_inpaint(pipe.unet, pipe.autoencoder, sampler, image, mask, context,
                       num_steps=4, final_x0_timestep=100)


def test_compare_samplers_reads_a_final_x0_variant(tiny_pipeline_dir) -> None:
    from scripts.compare_samplers import main as compare

    rows = compare(["--ckpt", str(tiny_pipeline_dir), "--cases", "2", "--variants",
                    "ddpm:4:1,ddpm:4:1:x0=600"])
    assert rows[1]["options"] == {"final_x0_timestep": 600}
    assert rows[0]["masked_mse"] != rows[1]["masked_mse"]
    with pytest.raises(SystemExit):
        compare(["--ckpt", str(tiny_pipeline_dir), "--variants", "ddpm:4:1:x0=soon"])


def test_compare_samplers_pairs_each_variant_with_a_baseline_export_or_its_json(
        tiny_pipeline_dir, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from scripts.compare_samplers import main as compare

    other = tmp_path / "other"
    shutil.copytree(tiny_pipeline_dir, other)
    weights = next((other / "unet").glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v * 0.5 if k.startswith("conv_out") else v for k, v in state.items()}, weights)
    variants = ["--cases", "3", "--variants", "ddpm:2:1,ddim:2:1"]
    base_json = tmp_path / "base.json"
    base = compare(["--ckpt", str(other), *variants, "--out", str(base_json)])
    rows = compare(["--ckpt", str(tiny_pipeline_dir), *variants, "--baseline", str(other)])
    for row, b in zip(rows, base, strict=True):
        diff = np.subtract(row["masked_mse_per_case"], b["masked_mse_per_case"])
        assert np.abs(diff).max() > 0  # the baseline really ran its own weights
        assert row["vs_baseline"]["masked_mse"]["mean_difference"] == pytest.approx(diff.mean())
        psnr = 10 * np.log10(4 / np.asarray(row["masked_mse_per_case"]))
        psnr_base = 10 * np.log10(4 / np.asarray(b["masked_mse_per_case"]))
        assert row["vs_baseline"]["masked_psnr"]["mean_difference"] == pytest.approx(
            (psnr - psnr_base).mean())
        assert row["vs_baseline"]["masked_mse"]["b_better_cases"] == int((diff < 0).sum())
    reused = compare(["--ckpt", str(tiny_pipeline_dir), *variants, "--baseline", str(base_json)])
    assert [r["vs_baseline"] for r in reused] == [r["vs_baseline"] for r in rows]
    itself = compare(["--ckpt", str(other), *variants, "--baseline", str(base_json)])
    assert all(r["vs_baseline"]["masked_psnr"]["mean_difference"] == 0 for r in itself)
    with pytest.raises(SystemExit, match="no rows"):
        compare(["--ckpt", str(tiny_pipeline_dir), "--cases", "3", "--variants", "ddpm:3:1",
                 "--baseline", str(base_json)])
    with pytest.raises(SystemExit, match="cases"):
        compare(["--ckpt", str(tiny_pipeline_dir), "--cases", "2", "--variants", "ddpm:2:1",
                 "--baseline", str(base_json)])
