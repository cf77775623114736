"""Calibration sweep: schedule, one forward per timestep, table shapes, choices, top-k maths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from data.benchmark import BenchmarkCase
from evaluation.sweep import (
    SweepConfig,
    aggregate_grids,
    best_cell,
    calibrate,
    case_noise_seed,
    case_tensors,
    choice_stability,
    collect_vectors,
    normalised_grids,
    run_sweep,
    score_grids,
    split_ids,
    sweep_timesteps,
    top_cells,
)
from models.attention_capture import cross_attention_blocks
from models.correspondence import correspondence_scores, mask_iou
from models.export import load_pipeline
from models.pipeline import AlignmentConfig
from tests.conftest import save_random_pipeline


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spin-waiting threads are ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    """A random tiny pipeline folder, saved and loaded the way eval.py does."""
    return load_pipeline(save_random_pipeline(Path(tmp_path_factory.mktemp("export"))))


def make_case(i: int, size: int = 64, ref: int = 224, with_gt: bool = True) -> BenchmarkCase:
    rng = np.random.default_rng(i)
    mask = np.zeros((size, size), bool)
    mask[10 + i: 30 + i, 12:34] = True
    gt = np.zeros((ref, ref), bool)
    gt[40 + 5 * i: 120, 60:150] = True
    return BenchmarkCase(
        id=f"c{i}", image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mask=mask,
        reference=rng.integers(0, 256, (ref, ref, 3), dtype=np.uint8),
        reference_mask=gt if with_gt else None, meta={"category": "synthetic"})


def test_timesteps_are_ddim_schedule_noisiest_first(pipe) -> None:
    steps = sweep_timesteps(pipe, 50)
    ref = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
    ref.set_timesteps(50)
    assert steps == [int(t) for t in ref.timesteps]  # the refinement sampler's own schedule
    assert steps[-1] == 1
    assert len(steps) == 50 and steps[0] == max(steps) and steps == sorted(steps, reverse=True)


def test_one_forward_per_batch_and_timestep_regardless_of_blocks(pipe) -> None:
    cases = [make_case(i) for i in range(3)]
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        n_blocks = len(cross_attention_blocks(pipe.unet))
        for blocks in ([0], list(range(n_blocks))):
            calls.clear()
            out = collect_vectors(pipe, cases, [900, 500, 100], blocks, [0],
                                  batch_size=2, progress=False)
            assert len(calls) == 2 * 3  # 2 batches x 3 timesteps
            assert out.shape == (3, 1, 3, len(blocks), pipe.reference_encoder.num_tokens)
            assert torch.allclose(out.sum(-1), torch.ones(out.shape[:-1]), atol=1e-4)
    finally:
        handle.remove()


def test_a_cases_maps_depend_on_the_case_not_on_its_place_in_the_run(pipe) -> None:
    """Noise seeds follow the case id: a case swept alone, or after other cases, or in another
    order, gets the same maps (what lets a resumed run reuse cases swept by an earlier one)."""
    cases = [make_case(i) for i in range(3)]
    steps = sweep_timesteps(pipe, 3)
    together = collect_vectors(pipe, cases, steps, [0, 2], [0, 1], batch_size=2,
                               progress=False)
    reordered = collect_vectors(pipe, cases[::-1], steps, [0, 2], [0, 1], batch_size=3,
                                progress=False)
    alone = collect_vectors(pipe, cases[2:], steps, [0, 2], [0, 1], batch_size=1,
                            progress=False)
    torch.testing.assert_close(reordered.flip(0), together, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(alone[0], together[2], rtol=1e-4, atol=1e-6)
    assert case_noise_seed(0, "c2") != case_noise_seed(1, "c2") != case_noise_seed(0, "c1")


def test_deployed_align_is_the_sweep_cell_under_the_same_noise(pipe) -> None:
    """The deployed stage (``align`` at one (t, l), one case at a time) and the sweep (batched,
    every cell at once) differ only in the noise they draw: given the sweep's per-case noise
    seed, ``align`` returns the sweep's vector and the same region IoU. So a gap between the
    deployed mIoU and the swept cell on the same cases is noise-draw variance, not a second
    code path."""
    cases = [make_case(i) for i in range(3)]
    steps = sweep_timesteps(pipe, 5)
    timestep, block, seed = steps[2], 3, 2
    vectors = collect_vectors(pipe, cases, steps, [block], [seed], batch_size=2,
                              progress=False)
    encoder = pipe.reference_encoder
    grids = normalised_grids(vectors, encoder.grid, encoder.num_prefix_tokens)
    for i, case in enumerate(cases):
        image, mask, reference = case_tensors(case, pipe.image_size)
        noise_seed = case_noise_seed(seed, case.id)  # collect_vectors' noise seed for it
        found = pipe.align_tensors(image, mask, reference, noise_seed,
                                   AlignmentConfig(timestep=timestep, block=block))
        torch.testing.assert_close(found.vector, vectors[i, 0, 2, 0], rtol=1e-4, atol=1e-6)
        gt = torch.from_numpy(case.reference_mask)
        swept, _ = score_grids(grids[i, 0, 2], gt.float(), threshold=0.5)
        assert float(mask_iou(found.region[None], gt[None])[0]) == pytest.approx(
            float(swept[0]), abs=1e-6)


def test_run_sweep_tables_curves_and_topk(pipe) -> None:
    cases = [make_case(i) for i in range(4)] + [make_case(9, with_gt=False)]
    cfg = SweepConfig(num_timesteps=3, seeds=[0, 1], batch_size=4, topk=[1, 2, 50])
    result = run_sweep(pipe, cases, cfg, progress=False)
    n_layers = len(cross_attention_blocks(pipe.unet))
    assert result.case_ids == ["c0", "c1", "c2", "c3"]  # the case without GT is not scored
    assert result.table_mask.shape == result.table_box.shape == (3, n_layers)
    assert result.scores_mask.shape == (4, 2, 3, n_layers)
    curves = result.curves()
    assert len(curves["timestep"]["mask"]) == 3 and len(curves["layer"]["box"]) == n_layers
    # (t*, l*): argmax over the calibration cases, scored on the others
    cal, rep = result.split["calibration_ids"], result.split["report_ids"]
    assert result.split["held_out"] and len(cal) == len(rep) == 2
    assert sorted(cal + rep) == result.case_ids
    cal_idx = [result.case_ids.index(i) for i in cal]
    rep_idx = [result.case_ids.index(i) for i in rep]
    best = result.best
    ti, li = best["t_index"], result.blocks.index(best["layer"])
    cal_table = result.scores_mask[cal_idx].mean(axis=(0, 1))
    assert cal_table[ti, li] == pytest.approx(cal_table.max())
    assert best["calibration"]["miou_mask"] == pytest.approx(cal_table.max())
    assert best["miou_mask"] == pytest.approx(result.scores_mask[rep_idx][:, :, ti, li].mean())
    assert result.in_sample_best["miou_mask"] == pytest.approx(result.table_mask.max())
    assert best["t"] == result.timesteps[best["t_index"]]
    assert [r["k"] for r in result.topk["in_sample"]] == [1, 2, 50]
    assert len(result.topk["in_sample"][2]["cells"]) == 3 * n_layers  # k capped at T x L
    held = result.topk["held_out"]
    assert held["num_select"] == 2 and held["num_score"] == 2
    assert held["best_cell"]["miou_mask"] == pytest.approx(best["miou_mask"])
    assert result.stability["resamples"] == 200
    assert result.best_heat(0, (224, 224)).shape == (224, 224)
    d = result.to_dict()
    assert len(d["table"]["mask"]) == 3 and len(d["table"]["mask"][0]) == n_layers


def test_best_cell_on_constructed_table() -> None:
    mask = np.zeros((4, 3))
    mask[2, 1] = 0.7
    mask[0, 2] = 0.7  # a tie: the noisier timestep (lower index) wins
    box = np.full((4, 3), 0.1)
    best = best_cell(mask, box, [900, 600, 300, 0], [4, 5, 6])
    assert best == {"t": 900, "t_index": 0, "layer": 6, "miou_mask": 0.7, "miou_box": 0.1}


def test_split_ids_is_seeded_disjoint_and_complete() -> None:
    ids = [f"c{i}" for i in range(11)]
    cal, rep = split_ids(ids, 0.5, seed=3)
    assert len(cal) == 6 and len(rep) == 5 and not set(cal) & set(rep)
    assert sorted(cal + rep) == sorted(ids) and cal == sorted(cal)  # input order kept
    assert split_ids(ids, 0.5, seed=3) == (cal, rep)
    assert split_ids(ids, 0.5, seed=4) != (cal, rep)
    assert len(split_ids(ids, 0.99, 0)[1]) == 1  # the report part is never empty
    assert split_ids(["only"], 0.5, 0) == (["only"], ["only"])


def test_calibrate_chooses_on_calibration_and_scores_on_report() -> None:
    """Calibration cases prefer cell (0, 1), report cases prefer (1, 0): the choice is the
    calibration's, its score the report's, whatever the whole table's argmax."""
    mask = np.zeros((4, 1, 2, 2))
    mask[:2, 0, 0, 1] = 0.6  # calibration cases c0, c1
    mask[2:, 0, 1, 0] = 0.9  # report cases c2, c3
    mask[2:, 0, 0, 1] = 0.2
    best, cal, rep = calibrate((mask, mask / 2), ["c0", "c1", "c2", "c3"], ["c0", "c1"],
                               [800, 200], [5, 7])
    assert (best["t_index"], best["layer"], best["t"]) == (0, 7, 800)
    assert best["calibration"]["miou_mask"] == pytest.approx(0.6)
    assert best["miou_mask"] == pytest.approx(0.2) and best["miou_box"] == pytest.approx(0.1)
    assert (cal, rep) == ([0, 1], [2, 3])


def test_choice_stability_on_constructed_scores() -> None:
    rng = np.random.default_rng(0)
    # one dominant cell: it wins every resample; a flat table: wins spread over cells
    dominant = rng.uniform(0.0, 0.1, (20, 1, 3, 2))
    dominant[:, 0, 2, 1] = 0.8
    stab = choice_stability(dominant, range(10), range(10, 20), (2, 1), [900, 500, 100],
                            [3, 4], resamples=100)
    assert stab["chosen_win_frequency"] == 1.0 and stab["distinct_winners"] == 1
    assert stab["wins"] == [{"t": 100, "t_index": 2, "layer": 4, "frequency": 1.0}]
    assert stab["chosen_held_out"]["mean"] == pytest.approx(0.8)
    flat = rng.uniform(0.3, 0.5, (20, 1, 3, 2))
    stab = choice_stability(flat, range(10), range(10, 20), (0, 0), [900, 500, 100], [3, 4],
                            resamples=200)
    assert stab["distinct_winners"] >= 3 and stab["chosen_win_frequency"] < 0.7
    assert sum(w["frequency"] for w in stab["wins"]) <= 1.0 + 1e-9
    spread = stab["chosen_held_out"]
    assert spread["low"] < spread["mean"] < spread["high"]
    assert spread["mean"] == pytest.approx(flat[10:, 0, 0, 0].mean(), abs=0.02)


def test_top_cells_and_aggregation_math() -> None:
    table = np.array([[0.1, 0.5], [0.9, 0.3]])
    assert top_cells(table, 3) == [(1, 0), (0, 1), (1, 1)]
    grids = torch.rand(2, 3, 2, 2, 4, 4)  # N, S, T, L, gh, gw
    cells = [(1, 0), (0, 1)]
    agg = aggregate_grids(grids, cells)
    expected = (grids[:, :, 1, 0] + grids[:, :, 0, 1]).sum(1) / 6
    assert torch.allclose(agg, expected)
    assert torch.allclose(aggregate_grids(grids, [(1, 1)], seeds=[2]), grids[:, 2, 1, 1])


def test_score_grids_matches_correspondence_scores() -> None:
    torch.manual_seed(0)
    vectors = torch.rand(5, 256)
    gt = torch.zeros(100, 150, dtype=torch.bool)
    gt[20:60, 30:90] = True
    grids = normalised_grids(vectors, (16, 16), 0)
    m, b = score_grids(grids, gt, 0.5, chunk_pixels=100 * 150 * 2)  # exercise chunking
    ref = correspondence_scores(vectors, gt.expand(5, -1, -1).float(), (16, 16), 0, 0.5)
    assert torch.allclose(m, ref["mask"]) and torch.allclose(b, ref["box"])


def test_case_tensors_resize_image_not_reference() -> None:
    case = make_case(0, size=32, ref=100)
    image, mask, reference = case_tensors(case, 64)
    assert image.shape == (1, 3, 64, 64) and mask.shape == (1, 1, 64, 64)
    assert reference.shape == (1, 3, 100, 100)
    assert image.min() >= -1 and image.max() <= 1 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum() == 4 * case.mask.sum()  # nearest-cell upsampling doubles each side


def test_case_noise_does_not_depend_on_the_batch():
    """A case's captured vectors are the same alone and inside a larger batch."""
    import torch

    from models.alignment import attention_vectors

    comp, image, mask, context = _random_case_batch(3)
    both = attention_vectors(*comp, image, mask, context, [500], [0], noise_seeds=[7, 8, 9])
    alone = attention_vectors(*comp, image[1:2], mask[1:2], context[1:2], [500], [0],
                              noise_seeds=[8])
    torch.testing.assert_close(both[500][0][1:2], alone[500][0])


def test_trajectory_readout_follows_algorithm_1() -> None:
    """Read along DDIM sampling from z_T: one forward per schedule step down to the cleanest
    requested timestep, maps that differ from the forward-noised read-out, clear errors."""
    import pytest
    import torch

    from models.alignment import attention_vectors
    from models.refinement import build_sampler

    comp, image, mask, context = _random_case_batch(2)
    ddim = build_sampler("ddim", comp[2].config, comp[1])
    ddim.set_timesteps(10)
    schedule = [int(t) for t in ddim.timesteps]
    wanted = [schedule[2], schedule[5]]
    calls = []
    handle = comp[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        traj = attention_vectors(*comp, image, mask, context, wanted, [0, 2], noise_seeds=[1, 2],
                                 readout="trajectory", num_steps=10)
        assert len(calls) == 6  # steps 0..5 of the trajectory, then it stops
        calls.clear()
        fwd = attention_vectors(*comp, image, mask, context, wanted, [0, 2], noise_seeds=[1, 2])
        assert len(calls) == 2
    finally:
        handle.remove()
    assert set(traj) == set(wanted) and set(traj[wanted[0]]) == {0, 2}
    assert not torch.allclose(traj[wanted[1]][0], fwd[wanted[1]][0])
    # the first step reads z_T itself, yet the masked-image conditioning already counts
    first = attention_vectors(*comp, image, mask, context, [schedule[0]], [0], noise_seeds=[1, 2],
                              readout="trajectory", num_steps=10)
    other = attention_vectors(*comp, -image, mask, context, [schedule[0]], [0],
                              noise_seeds=[1, 2], readout="trajectory", num_steps=10)
    assert not torch.allclose(first[schedule[0]][0], other[schedule[0]][0])  # masked image
    with pytest.raises(ValueError, match="not on the 10-step"):
        attention_vectors(*comp, image, mask, context, [schedule[1] + 1], [0], readout="trajectory",
                          num_steps=10)
    with pytest.raises(ValueError, match="read-out"):
        attention_vectors(*comp, image, mask, context, wanted, [0], readout="sideways")


def _random_case_batch(n: int):
    """A random-weight tiny model at 32 px and ``n`` random cases (image, mask, context)."""
    import torch
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config(["data.image_size=32"])
    unet, encoder, ae, scheduler = (instantiate(cfg.model[k]) for k in (
        "denoiser", "reference_encoder", "autoencoder", "noise_scheduler"))
    torch.manual_seed(0)
    image = torch.rand(n, 3, 32, 32) * 2 - 1
    mask = torch.zeros(n, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    with torch.no_grad():
        context = encoder.eval()(torch.rand(n, 3, 224, 224))
    return (unet.eval(), ae, scheduler), image, mask, context
