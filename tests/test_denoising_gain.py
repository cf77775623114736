"""Denoising gain: exact on constructed denoisers (identity gains 0, an oracle reaches the
cap), the x0 formulas are diffusers', a wrong parametrisation shows, and every place that
reports it (validation callback, eval.py's report, validate_export.py) does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from hydra.utils import instantiate
from torch import nn

from data.modes import decode_pixels
from models.alignment import case_noise, case_noise_seed
from models.autoencoder import VAE, PixelSpace
from models.denoising_gain import (
    PSNR_CAP,
    LogDenoisingGain,
    gain_rows,
    noise_left,
    one_step_predictions,
    predicted_x0,
    score_batch,
)
from models.ema import EMA
from models.image_metrics import gradient_similarity, psnr_in_box
from models.image_processor import to_uint8
from models.refinement import blend
from tests.conftest import compose_config

KINDS = ("epsilon", "v_prediction", "sample")
TIMESTEPS = [10, 100, 400, 700, 999]
SEEDS = [case_noise_seed(0, str(i)) for i in range(3)]


def _scheduler(kind: str) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=kind,
                         clip_sample=False)


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    """3 targets of uint8 values in [-1,1] (a textured square on a gradient), box masks."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-0.8, 0.8, 32)
    target = ramp.view(1, 1, 1, 32).expand(3, 3, 32, 32).clone()
    target[:, :, 8:24, 8:24] = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    target = (((target + 1) * 127.5).round() / 127.5 - 1).float()
    mask = torch.zeros(3, 1, 32, 32)
    mask[:, :, 6:22, 10:26] = 1
    return target, mask


class _Constructed(nn.Module):
    """A denoiser built from the truth: ``identity`` outputs what makes its x0 prediction its
    own noisy input; ``oracle`` outputs the true noise, velocity or clean sample (as
    ``emits``, whatever the scheduler it is scored with says)."""

    def __init__(self, scheduler: DDPMScheduler, kind: str, emits: str, clean: torch.Tensor,
                 noise: torch.Tensor) -> None:
        super().__init__()
        self.scheduler, self.kind, self.emits = scheduler, kind, emits
        self.clean, self.noise = clean, noise
        self.anchor = nn.Parameter(torch.zeros(1))  # the dtype score_batch casts inputs to

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> SimpleNamespace:
        noisy = x[:, : self.clean.shape[1]]
        if self.kind == "identity":
            alpha = self.scheduler.alphas_cumprod[int(t[0])].double()
            a, b = alpha.sqrt(), (1 - alpha).sqrt()
            out = {"epsilon": noisy.double() * (1 - a) / b,
                   "v_prediction": noisy.double() * (a - 1) / b,
                   "sample": noisy}[self.emits]
        else:
            out = {"epsilon": self.noise,
                   "v_prediction": self.scheduler.get_velocity(self.clean, self.noise, t),
                   "sample": self.clean}[self.emits]
        return SimpleNamespace(sample=out)


def _run(kind: str, emits: str, prediction_type: str, autoencoder=None) -> dict:
    autoencoder = autoencoder or PixelSpace()
    scheduler = _scheduler(prediction_type)
    target, mask = _case()
    with torch.no_grad():
        clean = autoencoder.encode(target)
    noise = case_noise(clean.shape, noise_seeds=SEEDS)
    denoiser = _Constructed(scheduler, kind, emits, clean, noise)
    return score_batch(denoiser, autoencoder, scheduler, target, mask, torch.zeros(3, 4, 8),
                       TIMESTEPS, SEEDS)


@pytest.mark.parametrize("kind", KINDS)
def test_predicted_x0_is_diffusers_pred_original_sample(kind):
    scheduler = _scheduler(kind)
    g = torch.Generator().manual_seed(1)
    sample, output = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t in (1, 10, 500, 999):
        expected = scheduler.step(output, t, sample, generator=g).pred_original_sample
        assert torch.allclose(predicted_x0(scheduler, output, sample, t).float(), expected,
                              atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_denoiser_that_returns_its_input_gains_exactly_zero(kind):
    scores = _run("identity", kind, kind)
    for metric in ("psnr", "gms"):
        assert np.array_equal(scores[f"{metric}_x0"], scores[f"{metric}_noisy"])
    assert all(r["psnr_gain"] == 0.0 and r["gms_gain"] == 0.0
               for r in gain_rows(scores, TIMESTEPS))
    # and the noisy input really is noisy: its score falls with t
    assert np.all(np.diff(scores["psnr_noisy"].mean(0)) < 0)


@pytest.mark.parametrize("kind", KINDS)
def test_an_oracle_reaches_the_cap_at_every_timestep(kind):
    scores = _run("oracle", kind, kind)
    assert np.all(scores["psnr_x0"] == PSNR_CAP) and np.all(scores["gms_x0"] == 1.0)
    rows = gain_rows(scores, TIMESTEPS)
    for row in rows:
        assert row["psnr_gain"] == pytest.approx(PSNR_CAP - row["psnr_noisy"])
        assert row["gms_gain"] == pytest.approx(1.0 - row["gms_noisy"])
    assert rows[-1]["psnr_gain"] > rows[0]["psnr_gain"] > 0


@pytest.mark.parametrize(("emits", "read_as"), [("epsilon", "v_prediction"),
                                                 ("v_prediction", "epsilon")])
def test_a_wrong_x0_formula_shows_as_a_far_lower_score(emits, read_as):
    """The true noise read as a velocity (and the reverse) is far from the target at high t."""
    scores = _run("oracle", emits, read_as)
    high = [TIMESTEPS.index(t) for t in (400, 700, 999)]
    assert np.all(scores["psnr_x0"][:, high] < 40)


def test_latent_models_score_the_decoded_prediction():
    """Through a VAE the oracle's x0 is the autoencoder's reconstruction, not the target."""
    torch.manual_seed(0)
    vae = VAE(AutoencoderKL(block_out_channels=[8, 8], latent_channels=4, norm_num_groups=4,
                            down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1))
    target, mask = _case()
    with torch.no_grad():
        recon = blend(target, vae.decode(vae.encode(target)), mask)
    masks = (mask[:, 0] > 0).numpy()
    expected = [min(psnr_in_box(to_uint8(r), to_uint8(t), m), PSNR_CAP)
                for r, t, m in zip(recon, target, masks, strict=True)]
    expected_gms = [gradient_similarity(to_uint8(r), to_uint8(t), m)
                    for r, t, m in zip(recon, target, masks, strict=True)]
    scores = _run("oracle", "v_prediction", "v_prediction", vae)
    for i in range(len(TIMESTEPS)):
        assert scores["psnr_x0"][:, i] == pytest.approx(expected, abs=1e-3)
        assert scores["gms_x0"][:, i] == pytest.approx(expected_gms, abs=1e-4)
    assert max(expected) < 40  # a random VAE: far from the cap, so the check means something
    identity = _run("identity", "v_prediction", "v_prediction", vae)
    assert np.array_equal(identity["psnr_x0"], identity["psnr_noisy"])


# ----------------------------------------------------------------------------- training
FAST = ["data.image_size=32", "data.batch_size=2", "data.num_workers=0", "data.val_length=4",
        "model.val_sample_steps=1", "model.val_num_samples=1"]


def test_callback_is_registered_and_logs_under_the_ema_weights(tmp_path):
    cfg = compose_config(FAST)
    torch.manual_seed(0)
    module = instantiate(cfg.model)
    (ema,) = [c for c in module.configure_callbacks() if isinstance(c, EMA)]
    # EMA weights far from the trained ones: the logged gain must be the EMA model's
    for p in ema.track(module).shadow_params:
        p.add_(torch.randn_like(p) * 0.05)
    callback = instantiate(cfg.callbacks.denoising_gain, timesteps=[50, 400], num_cases=3)
    assert isinstance(callback, LogDenoisingGain)
    data = instantiate(cfg.data)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback],
                         default_root_dir=tmp_path)
    trainer.validate(module, datamodule=data)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()
              if k.startswith("val/denoise_gain_")}
    assert set(logged) == {f"val/denoise_gain_{m}_t{t}" for m in ("psnr", "gms")
                           for t in (50, 400)}

    module.eval()
    batches = [decode_pixels(b) for b in data.val_dataloader()]
    target = torch.cat([b["target"] for b in batches])[:3]
    mask = torch.cat([b["mask"] for b in batches])[:3]
    reference = torch.cat([b["reference"] for b in batches])[:3]
    index = torch.cat([b["index"] for b in batches])[:3].tolist()

    def expected() -> list[dict]:
        with torch.no_grad():
            context = module.reference_encoder(reference)
            scores = score_batch(module.denoiser, module.autoencoder, module.noise_scheduler,
                                 target, mask, context, [50, 400],
                                 [case_noise_seed(0, str(i)) for i in index])
        return gain_rows(scores, [50, 400])

    with ema.swapped_in(module):
        averaged = expected()
    raw = expected()
    for row in averaged:
        assert logged[f"val/denoise_gain_psnr_t{row['t']}"] == pytest.approx(row["psnr_gain"],
                                                                             abs=1e-4)
        assert logged[f"val/denoise_gain_gms_t{row['t']}"] == pytest.approx(row["gms_gain"],
                                                                            abs=1e-5)
    assert any(abs(r["psnr_gain"] - o["psnr_gain"]) > 1e-3 for r, o in zip(averaged, raw,
                                                                           strict=True))


# ----------------------------------------------------------------------------- the script
def test_validate_export_prints_the_table_on_the_shipped_export(tmp_path, capsys):
    from scripts.validate_export import main

    out, plot = tmp_path / "gain.json", tmp_path / "gain.png"
    main(["--measure", "denoising_gain", "--cases", "4", "--references", "whole",
          "--timesteps", "10", "400", "--out", str(out), "--plot", str(plot)])
    printed = capsys.readouterr().out
    assert "whole reference, 4 case(s)" in printed and "PSNR noisy" in printed
    result = json.loads(out.read_text())
    gain = result["denoising_gain"]
    assert gain["cases"] == {"namespace": "benchmark", "bench_seed": 0, "num": 4}
    rows = gain["references"]["whole"]["rows"]
    assert [r["t"] for r in rows] == [10, 400]
    for r in rows:  # the printed table is the JSON's
        assert f"{r['t']:>5} {r['psnr_noisy']:>11.2f} {r['psnr_x0']:>9.2f}" in printed
    assert len(gain["references"]["whole"]["per_case"]) == 4
    assert rows[1]["psnr_gain"] > 1  # the shipped model denoises at t=400
    assert plot.stat().st_size > 0 and "correspondence" not in result


def test_versus_baseline_pairs_each_case_and_signs_the_difference():
    from scripts.validate_export import versus_baseline

    def section(x0_by_case: dict[str, list[float]]) -> dict:
        per_case = {c: {"psnr_noisy": [20.0, 30.0], "psnr_x0": x0,
                        "gms_noisy": [0.5, 0.6], "gms_x0": [0.5, 0.6]}
                    for c, x0 in x0_by_case.items()}
        return {"timesteps": [50, 100], "references": {"whole": {"per_case": per_case}}}

    baseline = section({"a": [21.0, 31.0], "b": [22.0, 30.0], "c": [20.0, 29.0]})
    ours = section({"c": [23.0, 29.0], "a": [21.5, 31.0], "b": [22.0, 30.0]})  # order differs
    rows = {(r["metric"], r["t"]): r for r in versus_baseline(ours, baseline, "base")["rows"]}
    t50 = rows[("psnr", 50)]
    assert t50["baseline_gain"] == pytest.approx((1 + 2 + 0) / 3)
    assert t50["gain"] == pytest.approx((1.5 + 2 + 3) / 3)
    assert t50["mean_difference"] == pytest.approx((0.5 + 0 + 3) / 3)
    assert t50["b_better_cases"] == 2 and t50["cases"] == 3
    assert rows[("psnr", 100)]["mean_difference"] == pytest.approx(0)
    assert rows[("gms", 50)]["mean_difference"] == pytest.approx(0)


def test_validate_export_against_itself_differs_by_nothing(tmp_path, capsys):
    from scripts.validate_export import main

    out = tmp_path / "gain.json"
    main(["--measure", "denoising_gain", "--cases", "2", "--references", "whole",
          "--timesteps", "50", "--baseline", "checkpoints/tiny_synthetic", "--out", str(out)])
    rows = json.loads(out.read_text())["denoising_gain"]["versus_baseline"]["rows"]
    assert [(r["metric"], r["t"]) for r in rows] == [("psnr", 50), ("gms", 50)]
    for r in rows:
        assert r["mean_difference"] == 0 and r["ci95"] == [0, 0] and r["cases"] == 2
    assert "paired per case" in capsys.readouterr().out


def test_a_saved_baseline_is_read_instead_of_scored_and_a_mismatch_is_refused(tmp_path):
    from scripts.validate_export import main

    args = ["--measure", "denoising_gain", "--cases", "2", "--references", "whole"]
    saved = tmp_path / "shipped.json"
    main(args + ["--timesteps", "50", "--out", str(saved)])

    def rows(baseline: Path) -> list[dict]:
        result = main(args + ["--timesteps", "50", "--baseline", str(baseline)])
        return result["denoising_gain"]["versus_baseline"]["rows"]

    assert rows(saved) == rows(Path("checkpoints/tiny_synthetic"))
    worse = json.loads(saved.read_text())
    first = sorted(worse["denoising_gain"]["references"]["whole"]["per_case"])[0]
    worse["denoising_gain"]["references"]["whole"]["per_case"][first]["psnr_x0"][0] -= 1.0
    saved.write_text(json.dumps(worse))
    psnr = next(r for r in rows(saved) if r["metric"] == "psnr")
    assert psnr["mean_difference"] == pytest.approx(0.5)  # its values, not a re-scoring
    with pytest.raises(SystemExit, match="timesteps"):
        main(args + ["--timesteps", "100", "--baseline", str(saved)])


def test_classical_yardstick_scores_like_the_model_and_a_bilateral_filter_denoises(tmp_path):
    from benchmarks.classical_denoisers import METHODS, classical_scores, synthetic_cases
    from evaluation.denoising_gain import GainConfig, measure_cases
    from models.export import DEFAULT_EXPORT, load_pipeline

    pipe = load_pipeline(DEFAULT_EXPORT)
    cases = synthetic_cases(tmp_path / "cases", 3, 5, "validation", pipe)
    model = measure_cases(pipe, cases, GainConfig(timesteps=[10, 50]), progress=False,
                          per_case=True)["references"]["whole"]["per_case"]
    same = classical_scores(pipe, cases, lambda image, _: image, 0.0, [10, 50], seed=0)
    bilateral = classical_scores(pipe, cases, METHODS["bilateral"][0], 40.0, [10, 50], seed=0)
    for n, case in enumerate(cases):  # the same noisy input as the model's, case by case
        np.testing.assert_allclose(bilateral["psnr_noisy"][n], model[case.id]["psnr_noisy"])
    # x_t / sqrt(alpha_bar) back through the uint8 round trip: at t = 10 the input itself
    assert np.abs(same["psnr_x0"][:, 0] - same["psnr_noisy"][:, 0]).max() < 0.1
    assert (bilateral["psnr_x0"][:, 1] > bilateral["psnr_noisy"][:, 1]).all()


def test_classical_denoiser_sees_the_rescaled_noisy_target():
    from benchmarks.classical_denoisers import ClassicalDenoiser

    scheduler = _scheduler("sample")
    seen = []
    denoiser = ClassicalDenoiser(scheduler, 3, lambda image, _: seen.append(image) or image, 0.0)
    x = torch.rand(2, 7, 8, 8) * 1.2 - 0.6
    out = denoiser(x, torch.tensor([700, 700]), torch.zeros(2, 1, 1)).sample
    expected = (x[:, :3] / scheduler.alphas_cumprod[700].sqrt()).clamp(-1, 1)
    assert seen[0].dtype == np.uint8 and seen[0].shape == (8, 8, 3)
    assert (out - expected).abs().max() <= 1 / 127.5 + 1e-6


def test_noise_left_is_one_for_the_rescaled_input_and_zero_for_an_oracle():
    scheduler = _scheduler("v_prediction")
    target, mask = _case()
    noise = case_noise(target.shape, noise_seeds=SEEDS)
    oracle = _Constructed(scheduler, "oracle", "v_prediction", target, noise)
    select = (mask > 0.5).expand_as(target)
    for t, clean, noisy, x0 in one_step_predictions(oracle, PixelSpace(), scheduler, target, mask,
                                                    torch.zeros(3, 4, 8), TIMESTEPS, SEEDS):
        alpha_bar = float(scheduler.alphas_cumprod[t])
        found = noise_left(clean, noisy, x0, alpha_bar, select)
        assert abs(found["noise_left"]) < 1e-5 and found["error_ratio"] < 1e-9
        same = noise_left(clean, noisy, noisy / alpha_bar ** 0.5, alpha_bar, select)
        assert same["noise_left"] == pytest.approx(1.0, abs=1e-6)
        assert same["other_error"] == pytest.approx(0.0, abs=1e-9)
        assert same["error_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_noise_left_separates_shrinkage_from_an_error_of_its_own():
    g = torch.Generator().manual_seed(3)
    clean = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    eps, own = torch.randn(2, 4, 3, 16, 16, generator=g)
    alpha_bar = 0.9
    noisy = alpha_bar ** 0.5 * clean + (1 - alpha_bar) ** 0.5 * eps
    n = noisy / alpha_bar ** 0.5 - clean
    x0 = clean + 0.3 * n + 0.1 * own  # 30% of the noise left, plus an error uncorrelated to it
    row = noise_left(clean, noisy, x0, alpha_bar)
    power = float((n * n).mean())
    assert row["noise_left"] == pytest.approx(0.3, abs=0.03)
    assert row["other_error"] == pytest.approx(0.01 / power, rel=0.1)
    half = noise_left(clean, noisy, x0, alpha_bar, clean > 0)  # a selection counts only itself
    assert half["elements"] == int((clean > 0).sum())


def test_noise_left_benchmark_splits_the_mask_and_runs_the_bilateral(tmp_path):
    from benchmarks.noise_left import edge_pixels, main

    step = torch.full((1, 3, 8, 8), -0.5)
    step[..., 4:] = 0.5
    edges = edge_pixels(step)[0, 0]
    assert edges[:, 2:6].all() and not edges[:, :2].any() and not edges[:, 6:].any()
    classical = tmp_path / "classical.json"
    classical.write_text(json.dumps({"rows": {"bilateral": [{"t": 50, "parameter": 40.0}]}}))
    out = tmp_path / "noise_left.json"
    result = main(["--cases", "2", "--namespace", "validation", "--case-seed", "17",
                   "--timesteps", "50", "--bilateral", str(classical), "--out", str(out)])
    assert json.loads(out.read_text())["denoisers"].keys() == {"tiny_synthetic", "bilateral"}
    for rows in result["denoisers"].values():
        regions = rows["50"]
        assert regions.keys() == {"mask", "mask_flat", "mask_edge"}
        parts = regions["mask_flat"]["elements"] + regions["mask_edge"]["elements"]
        assert parts == regions["mask"]["elements"]
    assert result["denoisers"]["bilateral"]["50"]["mask"]["noise_left"] < 0.9
    with pytest.raises(ValueError, match="no bilateral parameter for t = \\[100\\]"):
        main(["--cases", "1", "--timesteps", "100", "--bilateral", str(classical),
              "--out", str(out)])


# ----------------------------------------------------------------------------- reference use
def test_other_reference_is_the_next_case_and_never_the_own():
    from evaluation.denoising_gain import reference_sources

    cases = [SimpleNamespace(id=str(i)) for i in range(3)]
    assert [c.id for c in reference_sources(cases, "other")] == ["1", "2", "0"]
    assert reference_sources(cases, "whole") == cases
    with pytest.raises(ValueError, match="at least 2 cases"):
        reference_sources(cases[:1], "other")


def test_reference_use_is_zero_for_a_model_blind_to_its_reference(tmp_path, monkeypatch):
    from benchmarks.classical_denoisers import synthetic_cases
    from evaluation.denoising_gain import GainConfig, measure_cases
    from models.export import DEFAULT_EXPORT, load_pipeline
    from scripts.validate_export import reference_use

    pipe = load_pipeline(DEFAULT_EXPORT)
    cases = synthetic_cases(tmp_path / "cases", 3, 5, "validation", pipe)
    cfg = GainConfig(timesteps=[50, 700], references=["whole", "other"])
    seeing = measure_cases(pipe, cases, cfg, progress=False, per_case=True)
    forward = pipe.unet.forward  # the same denoiser with every reference token zeroed
    monkeypatch.setattr(pipe.unet, "forward", lambda x, t, encoder_hidden_states: forward(
        x, t, encoder_hidden_states=torch.zeros_like(encoder_hidden_states)))
    blind = measure_cases(pipe, cases, cfg, progress=False, per_case=True)
    for row in reference_use(blind):
        assert row["mean_difference"] == 0 and row["cases"] == 3
    own, other = (seeing["references"][r]["per_case"] for r in ("whole", "other"))
    for case in own:  # the same noise under both references; the shipped model reads them
        assert own[case]["psnr_noisy"] == other[case]["psnr_noisy"]
    assert any(own[c]["psnr_x0"] != other[c]["psnr_x0"] for c in own)


def test_reference_scale_counts_tokens_across_the_region_whole_and_cropped():
    from benchmarks.reference_scale import region_scale

    reference, target = np.zeros((224, 224), bool), np.zeros((64, 64), bool)
    reference[100:128, 50:78] = True  # 28 px: two 14-px patches of a 16-token grid
    target[10:17, 20:27] = True  # 7 px
    scale = region_scale(reference, target, margin=0.25, grid=16)
    assert scale["tokens_whole"] == pytest.approx(2.0)
    assert scale["crop_px"] == 42  # 28 * (1 + 2 * 0.25)
    assert scale["tokens_crop"] == pytest.approx(16 * 28 / 42)
    assert scale["px_per_target_px_whole"] == pytest.approx(4.0)
    assert scale["px_per_target_px_crop"] == pytest.approx(28 * 224 / 42 / 7)
    with pytest.raises(ValueError, match="empty"):
        region_scale(reference, np.zeros_like(target), 0.25, 16)


def test_refinement_by_scale_pairs_each_crop_with_the_whole_reference_per_third():
    from benchmarks.reference_scale import refinement_by_scale

    psnr = {"ours_whole_reference": [10, 11, 12, 13], "oracle_crop": [11, 11, 12, 15],
            "aligned_crop": [10, 10, 12, 13]}
    report = {"refinement_per_case": {m: {str(i): {"psnr": v} for i, v in enumerate(values)}
                                      for m, values in psnr.items()}}
    rows = {r["group"]: r for r in refinement_by_scale(report, [["0", "1"], ["2"], ["3"]])}
    assert rows["third 1"]["minus_whole"]["oracle_crop"]["mean_difference"] == 0.5
    assert rows["third 1"]["minus_whole"]["aligned_crop"]["mean_difference"] == -0.5
    assert rows["third 3"]["minus_whole"]["oracle_crop"]["mean_difference"] == 2
    assert rows["all"]["cases"] == 4
    assert rows["all"]["minus_whole"]["oracle_crop"]["mean_difference"] == 0.75


def test_validate_export_pairs_own_and_other_reference_and_skips_them_for_one_case(tmp_path,
                                                                                 capsys):
    from scripts.validate_export import main

    out = tmp_path / "gain.json"
    main(["--measure", "denoising_gain", "--cases", "3", "--references", "whole", "other",
          "--timesteps", "400", "--out", str(out)])
    gain = json.loads(out.read_text())["denoising_gain"]
    rows = {r["metric"]: r for r in gain["reference_use"]}
    refs = gain["references"]
    assert rows["psnr"]["cases"] == 3 and rows["psnr"]["mean_difference"] == pytest.approx(
        refs["whole"]["rows"][0]["psnr_gain"] - refs["other"]["rows"][0]["psnr_gain"])
    assert "another case's" in capsys.readouterr().out
    main(["--measure", "denoising_gain", "--cases", "1", "--references", "whole", "other",
          "--timesteps", "400", "--out", str(out)])
    gain = json.loads(out.read_text())["denoising_gain"]
    assert gain["references"]["other"]["num_cases"] == 0 and "reference_use" not in gain
