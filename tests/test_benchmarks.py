"""The benchmark scripts' smoke modes run in-process and write the JSON keys their summaries read.

The train and infer smokes run in the default suite (CI); the variant sweep is marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _run(module: str, tmp_path, *extra: str) -> dict:
    import importlib

    out = tmp_path / f"{module}.json"
    result = importlib.import_module(f"benchmarks.{module}").main(
        ["--smoke", "--out", str(out), *extra])
    on_disk = json.loads(out.read_text())
    assert on_disk["benchmark"] == result["benchmark"]
    for key in ("device", "date", "versions", "smoke"):
        assert key in on_disk
    return on_disk


def test_benchmark_data_smoke(tmp_path) -> None:
    res = _run("benchmark_data", tmp_path, "--gpu-rate", "70")
    for source in ("synthetic", "shards"):
        assert res[source]["samples_per_s_per_worker"] > 0
        assert res[source]["workers_needed"] >= 1


def test_benchmark_train_smoke(tmp_path) -> None:
    res = _run("benchmark_train", tmp_path)
    assert res["full_step"]["samples_per_s"] > 0
    assert res["anchor"]["samples_per_s"] > 0
    assert res["ratio"] == pytest.approx(
        res["full_step"]["samples_per_s"] / res["anchor"]["samples_per_s"], rel=0.01)
    assert set(res["full_step"]["breakdown_ms"]) == {
        "vae_encode_x2", "dinov2_mlp_forward", "unet_fwd_bwd", "optimizer_clip_ema"}
    assert res["full_step"]["train_tflop_per_sample"] > 0


@pytest.mark.slow
def test_benchmark_train_variants_smoke(tmp_path) -> None:
    res = _run("benchmark_train", tmp_path, "--precomputed-latents", "--fused-adamw",
               "--grad-ckpt", "--channels-last", "--anchor", "none", "--no-breakdown")
    assert res["variant"] == "fused_adamw+channels_last+grad_ckpt+precomputed_latents"
    assert res["ratio"] is None and res["full_step"]["samples_per_s"] > 0


def test_benchmark_train_loader_smoke(tmp_path) -> None:
    """--loader-workers: the step reads a real latent-shard DataLoader (no target pixels),
    and a stand-in encoder's shards fit the model (else encode_inputs raises)."""
    res = _run("benchmark_train", tmp_path, "--loader-workers", "1", "--anchor", "none")
    assert res["variant"] == "precomputed_latents+loader1"
    assert "latent-shard DataLoader, 1 workers" in res["full_step"]["data"]
    assert "vae_encode_x2" not in res["full_step"]["breakdown_ms"]
    assert res["full_step"]["breakdown_ms"]["data_next_and_copy"] > 0


def test_benchmark_infer_smoke(tmp_path) -> None:
    res = _run("benchmark_infer", tmp_path)
    assert res["alignment"]["ratio"] > 0
    assert res["sweep"]["forwards_per_batch"] == 2
    assert set(res["refinement"]) == {"autocast", "bf16_weights"}
    assert all(r["seconds"] > 0 for r in res["refinement"].values())


def test_benchmark_infer_parts(tmp_path) -> None:
    res = _run("benchmark_infer", tmp_path, "--parts", "refine", "--refine-variants",
               "bf16_weights")
    assert "alignment" not in res and "sweep" not in res
    assert list(res["refinement"]) == ["bf16_weights"]


def test_benchmark_data_probe_measures_the_compact_path() -> None:
    """The before/after probe reads the three training loaders end to end: a quarter of
    float32's bytes through the worker, float32 model inputs after the DataModule's hook."""
    from benchmarks.benchmark_data import training_path_rates

    res = training_path_rates(64, 56, items=2, batch_size=2, batches=1)
    assert res["getitem"]["samples_per_cpu_s"] > 0 and res["shards_read"]["samples_per_s"] > 0
    float_kib = (3 * 64 * 64 + 64 * 64 + 3 * 56 * 56 + 56 * 56) * 4 / 1024
    assert res["latent_shards_read"]["samples_per_cpu_s"] > 0
    for path in ("loader", "shards_loader", "latent_shards_loader"):
        assert res[path]["samples_per_s"] > 0
        assert res[path]["kib_per_sample_through_ipc"] < float_kib / 3, path
        dtypes = res[path]["model_input_dtypes"]
        assert {dtypes[k] for k in ("target", "mask", "reference", "reference_mask")} == {
            "float32"}, path


@pytest.mark.slow
def test_benchmark_data_baseline_compares_two_checkouts(tmp_path) -> None:
    """--baseline: each side probed in its own process, medians and after/before ratios."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    res = _run("benchmark_data", tmp_path, "--baseline", root)
    assert res["benchmark"] == "data_path_ab" and res["repeats"] == 1
    assert set(res["runs"]) == {"before", "after"}
    for key, ratio in res["ratios_after_over_before"].items():
        before, after = res["medians"]["before"][key], res["medians"]["after"][key]
        assert before > 0 and ratio == pytest.approx(after / before, rel=0.02), key


def test_flops_by_part_adds_up_and_sees_the_attention_it_removes(tmp_path) -> None:
    from benchmarks.flops_by_part import main as flops_main

    small = ["data.reference_size=56",
             "model.reference_encoder.backbone.config.num_hidden_layers=1"]
    result = flops_main([*(f"--override={o}" for o in small),
                         "--variant", "cross_only=+model.denoiser.config.only_cross_attention=true",
                         "--out", str(tmp_path / "flops.json")])
    preset, cross_only = result["variants"]["preset"], result["variants"]["cross_only"]
    for r in (preset, cross_only):  # every forward FLOP lands in exactly one part, none twice
        assert sum(r["forward_gflop_by_part"].values()) == pytest.approx(r["forward_gflop"],
                                                                         rel=1e-6)
        assert min(r["forward_gflop_by_part"].values()) >= 0
        assert r["gflop_per_sample"] > 2.5 * r["forward_gflop"]  # the backward is counted
    self_32 = "down_blocks.1@32/self_attention"
    # attn1 attending to 256 reference tokens instead of 1,024 positions is cheaper
    assert 0 < cross_only["forward_gflop_by_part"][self_32] < preset["forward_gflop_by_part"][
        self_32]
    assert cross_only["ratio_to_preset"] < 1
    assert preset["forward_gflop_by_part"]["down_blocks.0@64/resnets"] > 0


def test_recipe_budget_pairs_checkpoints_of_equal_flops() -> None:
    from benchmarks.recipe_budget import match_budgets, parse_gflops

    gflops = parse_gflops(["preset=16.90", "wider=57.49"], ["preset", "wider"])
    preset = {s: s * 8 * gflops["preset"] / 1000 for s in (100, 200, 300, 400)}
    wider = {s: s * 8 * gflops["wider"] / 1000 for s in (29, 58, 87, 116)}
    assert match_budgets(preset, wider, 0.05) == [(100, 29), (200, 58), (300, 87), (400, 116)]
    # a recipe checkpointed at other budgets is paired with none rather than the nearest
    assert match_budgets(preset, {s: v * 1.2 for s, v in wider.items()}, 0.05) == []
    with pytest.raises(ValueError, match="wider"):
        parse_gflops(["preset=16.90"], ["preset", "wider"])
    with pytest.raises(ValueError, match="RECIPE=GFLOP"):
        parse_gflops(["preset:16.90"], ["preset"])


def test_recipe_budget_reads_each_recipes_batch_size(tmp_path: Path) -> None:
    from benchmarks.recipe_budget import recipe_batch_sizes

    def run(name: str, batch: int | None) -> Path:
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        if batch is not None:
            (folder / ".hydra" / "config.yaml").write_text(f"data:\n  batch_size: {batch}\n")
        return folder

    runs = {("preset", 1): run("preset_s1", 8), ("preset", 2): run("preset_s2", 8),
            ("batch16", 1): run("batch16_s1", 16), ("old", 1): run("old_s1", None)}
    assert recipe_batch_sizes(runs, fallback=4) == {"preset": 8, "batch16": 16, "old": 4}
    with pytest.raises(ValueError, match="--batch-size"):
        recipe_batch_sizes(runs, fallback=None)
    runs[("batch16", 2)] = run("batch16_s2", 32)
    with pytest.raises(ValueError, match="different batch sizes"):
        recipe_batch_sizes(runs, fallback=4)
