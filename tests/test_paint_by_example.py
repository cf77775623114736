"""Paint-by-Example rows: a TINY RANDOM PaintByExamplePipeline saved in diffusers' layout and
loaded by path. Its outputs and scores are random-weight smoke, not Paint-by-Example's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.benchmark import load_benchmark, write_synthetic_benchmark
from evaluation import paint_by_example as pbe
from evaluation import refinement as R
from models.export import load_pipeline
from tests.conftest import compose_config, save_random_pipeline

ROWS = ["paint_by_example_oracle_crop", "paint_by_example_aligned_crop"]


@pytest.fixture(scope="module")
def tiny_pbe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """UNet (9 inputs, context 32), VAE (factor 2), image encoder on a tiny CLIPVisionConfig,
    PNDM scheduler and CLIP image processor at 32 px, written by ``save_pretrained``."""
    from diffusers import (
        AutoencoderKL,
        PaintByExamplePipeline,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=9,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                        sample_size=32)
    vision = CLIPVisionConfig(hidden_size=32, projection_dim=32, intermediate_size=37,
                              num_attention_heads=4, num_hidden_layers=5, image_size=32,
                              patch_size=4)
    pipe = PaintByExamplePipeline(
        vae=vae, image_encoder=PaintByExampleImageEncoder(vision, proj_size=32), unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    out = tmp_path_factory.mktemp("pbe") / "tiny-paint-by-example"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    return load_pipeline(save_random_pipeline(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory):
    """2 synthetic cases, the second without a reference_mask (no ground-truth crop)."""
    root = tmp_path_factory.mktemp("bench")
    write_synthetic_benchmark(root, 2, seed=0)
    found, skipped = load_benchmark(root)
    assert not skipped and all(c.reference_mask is not None for c in found)
    found[1].reference_mask = None
    return found


def test_loads_the_diffusers_layout_by_path_and_its_resolution(tiny_pbe: Path) -> None:
    pipe = pbe.load_pipeline(str(tiny_pbe))
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pbe.resolution(pipe, {}) == 32  # 16 latent px x VAE factor 2
    # the published model_index.json names the encoder's library "paint_by_example"
    index = json.loads((tiny_pbe / "model_index.json").read_text())
    index["image_encoder"] = ["paint_by_example", "PaintByExampleImageEncoder"]
    (tiny_pbe / "model_index.json").write_text(json.dumps(index))
    again = pbe.load_pipeline(str(tiny_pbe))
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(pipe.image_encoder(x), again.image_encoder(x))


def test_offline_uncached_hub_id_names_what_to_fetch() -> None:
    from models.hub import NotCachedError

    with pytest.raises(NotCachedError, match=r"Paint-by-Example Fantasy-Studio/Paint-by-Example "
                                             r"is not in the local cache.*snapshot_download"):
        pbe.load_pipeline("Fantasy-Studio/Paint-by-Example")


def test_a_folder_that_fails_to_load_is_named(tiny_pbe: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pbe, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(RuntimeError, match=f"Paint-by-Example {broken} failed to load"):
        pbe.load_pipeline(str(broken))


def test_rows_on_two_cases_pasted_with_the_right_references(tiny_pbe, pipe, cases,
                                                            monkeypatch) -> None:
    """Both rows run next to ours with the same metrics: image size kept, every pixel outside
    the mask the input's (the method pastes), the ground-truth crop our oracle_crop gets and
    our aligned crop as references, the case without a reference_mask skipped and counted."""
    seen: dict[str, list[torch.Tensor]] = {}
    refine = pbe.refine

    def spy(pipe, batch, references, *args, **kwargs):
        for case, ref in zip(batch, references, strict=True):
            seen.setdefault(case.id, []).append(ref.clone())
        return refine(pipe, batch, references, *args, **kwargs)

    monkeypatch.setattr(pbe, "refine", spy)
    cfg = OmegaConf.merge(R.default_config(), {
        "methods": ["input", "aligned_crop"], "num_steps": 2, "batch_size": 2})
    pbe_cfg = OmegaConf.create({"model": str(tiny_pbe), "num_steps": 2, "batch_size": 2,
                                "guidance_scale": 5.0})
    from models.pipeline import AlignmentConfig

    alignment = AlignmentConfig(**{
        k: cfg.alignment[k] for k in ("timestep", "block", "threshold", "margin", "readout")})
    alignments = {c.id: pipe.align(c.image, c.mask, c.reference, 0, alignment) for c in cases}
    result = R.evaluate_refinement(cases, pipe, alignments, cfg, progress=False,
                                   paint_by_example=pbe_cfg)
    outputs = result.pop("outputs")
    json.dumps(result)

    assert list(result["methods"]) == ["input", "aligned_crop", *ROWS]
    for row in ROWS:
        assert isinstance(result["methods"][row]["psnr"], float)
        assert result["methods"][row]["clip"] == result["methods"]["input"]["clip"]
    assert result["baseline_methods"] == ROWS
    assert result["counts"]["paint_by_example_oracle_crop_skipped_no_reference_mask"] == 1
    assert result["counts"]["scored"] == {"input": 2, "aligned_crop": 2, ROWS[0]: 1, ROWS[1]: 2}
    for case in cases:
        for row in ROWS:
            if row == ROWS[0] and case.reference_mask is None:
                assert row not in outputs[case.id]
                continue
            out = outputs[case.id][row]
            assert out.shape == case.image.shape and out.dtype == np.uint8
            assert np.array_equal(out[~case.mask], case.image[~case.mask])
            assert not np.array_equal(out[case.mask], case.image[case.mask])
    first, second = cases
    oracle = R.oracle_crop(first.reference, first.reference_mask, float(cfg.alignment.margin))
    assert torch.equal(seen[first.id][0], oracle)  # oracle row first, the crop oracle_crop gets
    for case in cases:
        assert torch.equal(seen[case.id][-1], alignments[case.id].crop.float())
    assert len(seen[second.id]) == 1  # no reference_mask: only the aligned row


def test_eval_report_has_both_rows(tiny_pbe: Path, tmp_path: Path) -> None:
    """eval.py on a 4-case benchmark (2 report cases), then again in the same run folder with
    baselines.paint_by_example.model=<tiny folder>: the run resumes (our rows reused) and
    report.json / report.md have both rows, each paired with ours."""
    import eval as eval_script
    from evaluation.report import validate_report

    export = save_random_pipeline(tmp_path / "export")
    base = [f"ckpt_path={export}", "bench_cases=4", "sweep.num_timesteps=2", "sweep.topk=[1]",
            "sweep.bootstrap=0", "sweep.compare_readouts=[]", "progress=false", "num_threads=1",
            "qualitative.num_cases=1", "refinement.num_steps=2",
            "refinement.methods=[input,aligned_crop]"]
    previous = torch.get_num_threads()
    try:
        first = json.loads(eval_script.evaluate(compose_config(base, config_name="eval"),
                                                tmp_path / "run").read_text())
        path = eval_script.evaluate(compose_config(
            [*base, f"baselines.paint_by_example.model={tiny_pbe}",
             "baselines.paint_by_example.num_steps=2"], config_name="eval"), tmp_path / "run")
    finally:
        torch.set_num_threads(previous)
    assert not set(ROWS) & set(first["refinement"]) and not first["refinement_paired"]
    report = json.loads(path.read_text())
    validate_report(report)
    cache = report["meta"]["cache"]
    assert cache["resumed"] and cache["reused"]["refinement/aligned_crop"] == 2
    assert report["refinement_per_case"]["aligned_crop"] == \
        first["refinement_per_case"]["aligned_crop"]
    assert set(ROWS) <= set(report["refinement"])
    assert report["refinement_per_case"][ROWS[1]].keys() == \
        report["refinement_per_case"]["aligned_crop"].keys()
    paired = report["refinement_paired"]
    assert set(paired) == set(ROWS)
    assert paired[ROWS[1]]["vs"]["aligned_crop"]["l1"]["cases"] == 2
    assert paired[ROWS[0]]["vs"]["aligned_crop"]["l1"]["cases"] == \
        report["refinement_counts"]["scored"][ROWS[0]]
    md = (tmp_path / "run" / "report.md").read_text()
    assert all(f"| {row} |" in md and f"### `{row}` vs ours (paired)" in md for row in ROWS)
