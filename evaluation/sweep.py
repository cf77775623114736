"""Calibration sweep (Algorithm 1, Figure 5): which (timestep, block) best locates the artifact?

For every case with a ``reference_mask`` and every timestep of a T-step DDIM schedule over the
training scheduler's steps (index 0 = the noisiest, the paper's x-axis), ONE denoiser forward
per (case batch, timestep) captures the masked-query attention of every block
(:func:`models.alignment.attention_vectors`). Each map is scored on its reference's own pixel
grid as :func:`models.correspondence.correspondence_scores` does (mask IoU of the thresholded map;
box IoU of its box against the ground-truth region's box), giving T x L mIoU tables.

Calibration is held out: the cases are split (seeded) into a calibration part, on which
(t*, l*) and the top-k cells are chosen, and a report part, on which they are scored; the
in-sample choice (chosen and scored on every case, optimistic) is kept as a secondary number.
A bootstrap over the calibration cases says how stable the choice is: how often each cell
wins, and the spread of the chosen cell's held-out score.

Beyond the paper: the min-max normalised maps of the top-k cells (and of several noise seeds)
are averaged before thresholding.

Noise: each case's noise is drawn from its own generator seeded with (seed, case id), so a
case's maps depend neither on which cases share its batch nor on the other cases of the
benchmark. With a :class:`evaluation.cache.Store`, each batch's vectors and scores are kept as
it finishes and reused by a resumed run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.benchmark import BenchmarkCase
from evaluation.cache import CaseRecord, Store
from models.alignment import attention_vectors, case_noise_seed, resize_reference
from models.attention_capture import cross_attention_blocks
from models.correspondence import (
    boxes_to_masks,
    heatmap,
    mask_boxes,
    mask_iou,
    mask_iou_box_target,
    threshold_region,
    tokens_to_grid,
)
from models.pipeline import RefineByAlignPipeline
from models.refinement import build_sampler, resize_mask_tensor

log = logging.getLogger(__name__)


@dataclass
class SweepConfig:
    """What the sweep covers; mirrors the ``sweep`` node of configs/eval.yaml."""

    num_timesteps: int = 50
    seeds: list[int] = field(default_factory=lambda: [0])
    blocks: list[int] | None = None  # None: every cross-attention block
    batch_size: int = 16
    threshold: float = 0.5
    topk: list[int] = field(default_factory=lambda: [1, 3, 5, 10])
    split: bool = True  # choose on a calibration part, score on the rest (False: in-sample)
    split_seed: int = 0
    readout: str = "forward_noise"  # or "trajectory": see models.alignment.attention_vectors
    compare_readouts: list[str] = field(default_factory=list)  # eval.py sweeps these too
    calibration_fraction: float = 0.5
    bootstrap: int = 200  # resamples of the calibration cases for the stability of (t*, l*)
    bootstrap_seed: int = 0


@dataclass
class SweepResult:
    """Tables and choices of one sweep; ``grids`` keeps the normalised maps for aggregation."""

    case_ids: list[str]
    timesteps: list[int]  # T, index 0 = noisiest
    blocks: list[int]  # L
    seeds: list[int]
    scores_mask: np.ndarray  # [N, S, T, L] per-case IoU
    scores_box: np.ndarray
    grids: torch.Tensor  # [N, S, T, L, gh, gw] min-max normalised maps on the token grid
    threshold: float
    best: dict[str, Any]  # chosen on the calibration cases, scored on the report cases
    topk: dict[str, Any]
    in_sample_best: dict[str, Any] = field(default_factory=dict)  # chosen and scored on all
    split: dict[str, Any] = field(default_factory=dict)  # calibration / report case ids
    stability: dict[str, Any] = field(default_factory=dict)

    @property
    def table_mask(self) -> np.ndarray:
        """[T, L] mIoU, averaged over cases and seeds."""
        return self.scores_mask.mean(axis=(0, 1))

    @property
    def table_box(self) -> np.ndarray:
        return self.scores_box.mean(axis=(0, 1))

    def calibration_table(self, kind: str = "mask") -> np.ndarray:
        """[T, L] mIoU over the calibration cases only: what (t*, l*) was chosen on."""
        scores = self.scores_mask if kind == "mask" else self.scores_box
        index = [self.case_ids.index(i) for i in self.split["calibration_ids"]]
        return scores[index].mean(axis=(0, 1))

    def curves(self) -> dict[str, dict[str, list[float]]]:
        """Figure 5: per timestep (mean over blocks) and per block (mean over timesteps)."""
        return {
            "timestep": {"mask": self.table_mask.mean(1).tolist(),
                         "box": self.table_box.mean(1).tolist()},
            "layer": {"mask": self.table_mask.mean(0).tolist(),
                      "box": self.table_box.mean(0).tolist()},
        }

    def best_heat(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        """Case ``index``'s map at the best cell (seeds averaged), [H, W] in [0,1] at ``size``."""
        cell = [(self.best["t_index"], self.blocks.index(self.best["layer"]))]
        agg = aggregate_grids(self.grids[index: index + 1], cell)
        return heatmap(agg, size)[0]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able part (report.json's ``correspondence`` minus baselines)."""
        return {
            "num_cases": len(self.case_ids),
            "timesteps": list(self.timesteps),
            "layers": list(self.blocks),
            "seeds": list(self.seeds),
            "threshold": self.threshold,
            "table": {"mask": self.table_mask.tolist(), "box": self.table_box.tolist()},
            "curves": self.curves(),
            "best": dict(self.best),
            "in_sample_best": dict(self.in_sample_best),
            "split": dict(self.split),
            "stability": dict(self.stability),
            "topk": self.topk,
        }


# ----------------------------------------------------------------------------- inputs
def sweep_timesteps(pipe: RefineByAlignPipeline, num_timesteps: int) -> list[int]:
    """The DDIM schedule's timesteps over the training scheduler, noisiest first."""
    scheduler = build_sampler("ddim", pipe.scheduler.config, pipe.autoencoder)
    scheduler.set_timesteps(num_timesteps)
    return [int(t) for t in scheduler.timesteps]


def case_tensors(
    case: BenchmarkCase, image_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Case arrays -> image [1,3,S,S] in [-1,1], mask [1,1,S,S], reference [1,3,h,w] in [0,1].

    The image and mask are resized to the model's size when it differs; the reference keeps
    its own size (maps are scored on its grid).
    """
    image = torch.from_numpy(np.array(case.image)).permute(2, 0, 1)[None].float()
    mask = torch.from_numpy(np.array(case.mask))[None, None].float()
    reference = torch.from_numpy(np.array(case.reference)).permute(2, 0, 1)[None]
    image, reference = image / 127.5 - 1, reference.float() / 255
    if image_size is not None and tuple(image.shape[-2:]) != (image_size, image_size):
        size = (image_size, image_size)
        image = F.interpolate(image, size=size, mode="bilinear", antialias=True,
                              align_corners=False).clamp(-1, 1)
        mask = resize_mask_tensor(mask, size, cover=False)
    return image, mask, reference


def sweep_cases(cases: Sequence[BenchmarkCase]) -> tuple[list[BenchmarkCase], list[str]]:
    """Cases the sweep can score (those with a reference_mask) and the ids of the others."""
    usable = [c for c in cases if c.reference_mask is not None and c.reference_mask.any()]
    kept = {id(c) for c in usable}
    others = [c.id for c in cases if id(c) not in kept]
    return usable, others


# ----------------------------------------------------------------------------- capture
@torch.no_grad()
def collect_vectors(
    pipe: RefineByAlignPipeline,
    cases: Sequence[BenchmarkCase],
    timesteps: Sequence[int],
    blocks: Sequence[int],
    seeds: Sequence[int],
    batch_size: int = 16,
    progress: bool = True,
    readout: str = "forward_noise",
) -> torch.Tensor:
    """Masked-query attention of every case, seed, timestep and block -> [N, S, T, L, tokens].

    One denoiser forward per (batch, seed, timestep) captures all ``blocks`` at once; with the
    ``trajectory`` read-out the timesteps are the sampling trajectory's own steps.
    """
    device, encoder, size = pipe.device, pipe.reference_encoder, pipe.image_size
    out = torch.zeros(len(cases), len(seeds), len(timesteps), len(blocks), encoder.num_tokens)
    starts = range(0, len(cases), batch_size)
    bar = tqdm(total=len(starts) * len(seeds) * len(timesteps), desc="sweep forwards",
               unit="fwd", disable=not progress)
    for start in starts:
        chunk = cases[start: start + batch_size]
        tensors = [case_tensors(c, size) for c in chunk]
        image = torch.cat([t[0] for t in tensors]).to(device)
        mask = torch.cat([t[1] for t in tensors]).to(device)
        refs = torch.cat([resize_reference(t[2], encoder.image_size) for t in tensors])
        context = encoder(refs.to(device))
        for s, seed in enumerate(seeds):
            noise_seeds = [case_noise_seed(seed, c.id) for c in chunk]
            vectors = attention_vectors(pipe.unet, pipe.autoencoder, pipe.scheduler, image,
                                        mask, context, timesteps, blocks,
                                        noise_seeds=noise_seeds, readout=readout,
                                        num_steps=len(timesteps))
            for ti, t in enumerate(timesteps):
                for li, b in enumerate(blocks):
                    out[start: start + len(chunk), s, ti, li] = vectors[int(t)][b].float().cpu()
            bar.update(len(timesteps))
    bar.close()
    return out


def normalised_grids(vectors: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """[..., tokens] -> [..., gh, gw] min-max normalised maps on the patch grid."""
    lead = vectors.shape[:-1]
    flat = vectors.reshape(-1, vectors.shape[-1])
    grids = heatmap(tokens_to_grid(flat, grid, prefix), grid)  # same size: normalise only
    return grids.reshape(*lead, *grid)


def score_grids(
    grids: torch.Tensor, reference_mask: torch.Tensor, threshold: float, chunk_pixels: int = 2**24
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU (mask, box) of each [M, gh, gw] map against one [H, W] region, on its own grid.

    Same post-processing and scoring as :func:`correspondence_scores`, with the ground truth
    and its box computed once and broadcast instead of repeated per map.
    """
    height, width = reference_mask.shape[-2:]
    gt = reference_mask.reshape(1, height, width) > 0.5
    gt_box = mask_iou_box_target(gt)
    chunk = max(1, chunk_pixels // (height * width))
    masks, boxes = [], []
    for i in range(0, grids.shape[0], chunk):
        region = threshold_region(heatmap(grids[i: i + chunk], (height, width)), threshold)
        masks.append(mask_iou(region, gt))
        boxes.append(mask_iou(boxes_to_masks(mask_boxes(region), (height, width)), gt_box))
    return torch.cat(masks), torch.cat(boxes)


# ----------------------------------------------------------------------------- choices
def best_cell(table_mask: np.ndarray, table_box: np.ndarray, timesteps: Sequence[int],
              blocks: Sequence[int]) -> dict[str, Any]:
    """argmax of the mask table (Algorithm 1's Gamma), ties to the noisier timestep, lower block."""
    ti, li = np.unravel_index(int(np.argmax(table_mask)), table_mask.shape)
    return {"t": int(timesteps[ti]), "t_index": int(ti), "layer": int(blocks[li]),
            "miou_mask": float(table_mask[ti, li]), "miou_box": float(table_box[ti, li])}


def top_cells(table: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The ``k`` best (t_index, layer_index) cells of ``table``, best first (stable on ties)."""
    order = np.argsort(-table.ravel(), kind="stable")[:k]
    return [tuple(int(v) for v in np.unravel_index(i, table.shape)) for i in order]


def aggregate_grids(grids: torch.Tensor, cells: Sequence[tuple[int, int]],
                    seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Mean of [N, S, T, L, gh, gw] normalised maps over ``cells`` and seeds -> [N, gh, gw].

    The result is not re-normalised here; scoring does (min-max, then threshold).
    """
    if seeds is not None:
        grids = grids[:, list(seeds)]
    picked = torch.stack([grids[:, :, t, l] for t, l in cells], dim=2)  # [N, S, K, gh, gw]
    return picked.mean(dim=(1, 2))


def score_aggregate(grids: torch.Tensor, ref_masks: Sequence[torch.Tensor],
                    cells: Sequence[tuple[int, int]], threshold: float) -> dict[str, float]:
    """mIoU (mask, box) of the top-cell aggregated maps over the given cases."""
    agg = aggregate_grids(grids, cells)
    masks, boxes = [], []
    for i, gt in enumerate(ref_masks):
        m, b = score_grids(agg[i: i + 1], gt, threshold)
        masks.append(float(m[0]))
        boxes.append(float(b[0]))
    return {"miou_mask": float(np.mean(masks)) if masks else float("nan"),
            "miou_box": float(np.mean(boxes)) if boxes else float("nan")}


def topk_rows(grids: torch.Tensor, ref_masks: Sequence[torch.Tensor], select: np.ndarray,
              ks: Sequence[int], threshold: float, blocks: Sequence[int]) -> list[dict[str, Any]]:
    """For each k: cells chosen by ``select`` ([T, L] mask table) and their aggregate mIoU."""
    rows = []
    n_cells = select.size
    for k in ks:
        cells = top_cells(select, min(int(k), n_cells))
        row = score_aggregate(grids, ref_masks, cells, threshold)
        row.update(k=int(k), cells=[[t, int(blocks[l])] for t, l in cells])
        rows.append(row)
    return rows


def split_ids(ids: Sequence[str], fraction: float = 0.5, seed: int = 0
              ) -> tuple[list[str], list[str]]:
    """Seeded split of ``ids`` into (calibration, report), each in the input's order.

    Both parts are non-empty when there are at least two ids; with fewer, there is nothing to
    hold out and both are every id (the caller reports that as in-sample).
    """
    if len(ids) < 2:
        return list(ids), list(ids)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {fraction}")
    n_cal = min(len(ids) - 1, max(1, round(len(ids) * fraction)))
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen = set(order[:n_cal].tolist())
    return ([i for k, i in enumerate(ids) if k in chosen],
            [i for k, i in enumerate(ids) if k not in chosen])


def _interval(values: Sequence[float]) -> dict[str, float]:
    """Mean and central 95% interval (2.5th / 97.5th percentiles)."""
    low, high = np.percentile(values, [2.5, 97.5])
    return {"mean": float(np.mean(values)), "low": float(low), "high": float(high)}


def choice_stability(scores_mask: np.ndarray, calibration: Sequence[int],
                     report: Sequence[int], chosen: tuple[int, int], timesteps: Sequence[int],
                     blocks: Sequence[int], resamples: int = 200, seed: int = 0,
                     top: int = 5) -> dict[str, Any]:
    """Bootstrap over the calibration cases: how often each cell wins, what the choice scores.

    ``wins``: the ``top`` cells most often chosen (argmax of a resampled calibration table)
    with their frequency; ``held_out_of_resampled_choice``: mean and 95% interval of the
    report-case mIoU of the resampled choices (the spread the choice itself causes);
    ``chosen_held_out``: mean and 95% interval of the chosen cell's report-case mIoU over
    resampled report cases (the spread of the headline number).
    """
    per_case = scores_mask.mean(axis=1)  # [N, T, L], seeds averaged
    cal, rep = per_case[list(calibration)], per_case[list(report)]
    report_table = rep.mean(0)
    rng = np.random.default_rng(seed)
    wins: dict[tuple[int, int], int] = defaultdict(int)
    held = []
    for _ in range(resamples):
        table = cal[rng.integers(0, len(cal), len(cal))].mean(0)
        cell = tuple(int(v) for v in np.unravel_index(int(np.argmax(table)), table.shape))
        wins[cell] += 1
        held.append(float(report_table[cell]))
    chosen_scores = rep[:, chosen[0], chosen[1]]
    boot = [float(chosen_scores[rng.integers(0, len(rep), len(rep))].mean())
            for _ in range(resamples)]
    ranked = sorted(wins.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "resamples": int(resamples), "seed": int(seed),
        "chosen_win_frequency": wins.get(tuple(chosen), 0) / resamples,
        "distinct_winners": len(wins),
        "wins": [{"t": int(timesteps[t]), "t_index": t, "layer": int(blocks[li]),
                  "frequency": n / resamples} for (t, li), n in ranked[:top]],
        "held_out_of_resampled_choice": _interval(held),
        "chosen_held_out": _interval(boot),
    }


def topk_analysis(result_scores: tuple[np.ndarray, np.ndarray], grids: torch.Tensor,
                  ref_masks: Sequence[torch.Tensor], cfg: SweepConfig,
                  blocks: Sequence[int], calibration: Sequence[int] | None = None,
                  report: Sequence[int] | None = None) -> dict[str, Any]:
    """Top-k (and seed) aggregation, in-sample and chosen on ``calibration``, scored on
    ``report`` (held_out is None without a split)."""
    scores_mask, scores_box = result_scores
    table = scores_mask.mean(axis=(0, 1))
    single = float(table.max())
    in_sample = topk_rows(grids, ref_masks, table, cfg.topk, cfg.threshold, blocks)
    out: dict[str, Any] = {
        "ks": [int(k) for k in cfg.topk],
        "best_cell": {"miou_mask": single,
                      "miou_box": float(scores_box.mean(axis=(0, 1)).ravel()[table.argmax()])},
        "in_sample": in_sample,
        "in_sample_beats_best_cell": any(r["miou_mask"] > single for r in in_sample),
        "held_out": None,
        "note": ("in_sample chooses cells on the same cases it scores (optimistic); held_out "
                 "chooses the best cell and the top-k cells on the calibration cases and "
                 "scores the report cases."),
    }
    if calibration is not None and report is not None:
        sel, ev = np.asarray(calibration), np.asarray(report)
        sel_table = scores_mask[sel].mean(axis=(0, 1))
        ti, li = np.unravel_index(int(sel_table.argmax()), sel_table.shape)
        held_best = {"t_index": int(ti), "layer": int(blocks[li]),
                     "miou_mask": float(scores_mask[ev][:, :, ti, li].mean()),
                     "miou_box": float(scores_box[ev][:, :, ti, li].mean())}
        rows = topk_rows(grids[ev], [ref_masks[i] for i in ev], sel_table, cfg.topk,
                         cfg.threshold, blocks)
        out["held_out"] = {
            "num_select": int(len(sel)), "num_score": int(len(ev)),
            "best_cell": held_best, "rows": rows,
            "beats_best_cell": any(r["miou_mask"] > held_best["miou_mask"] for r in rows),
        }
    return out


def calibrate(scores: tuple[np.ndarray, np.ndarray], case_ids: Sequence[str],
              calibration_ids: Sequence[str], timesteps: Sequence[int], blocks: Sequence[int]
              ) -> tuple[dict[str, Any], list[int], list[int]]:
    """(t*, l*) = argmax of the calibration cases' table, scored on the other cases.

    Returns (best, calibration indices, report indices). ``best`` holds the report-case mIoU
    (the headline) and, under ``calibration``, the calibration-case mIoU it was chosen with.
    Without report cases (no split) both are every case and the score is in-sample.
    """
    scores_mask, scores_box = scores
    cal = [case_ids.index(i) for i in calibration_ids]
    rep = [k for k in range(len(case_ids)) if k not in set(cal)] or list(cal)
    chosen = best_cell(scores_mask[cal].mean(axis=(0, 1)), scores_box[cal].mean(axis=(0, 1)),
                       timesteps, blocks)
    ti, li = chosen["t_index"], list(blocks).index(chosen["layer"])
    best = {**chosen,
            "miou_mask": float(scores_mask[rep][:, :, ti, li].mean()),
            "miou_box": float(scores_box[rep][:, :, ti, li].mean()),
            "calibration": {"miou_mask": chosen["miou_mask"], "miou_box": chosen["miou_box"]}}
    return best, cal, rep


# ----------------------------------------------------------------------------- entry
def scored_vectors(pipe: RefineByAlignPipeline, cases: Sequence[BenchmarkCase],
                   timesteps: Sequence[int], blocks: Sequence[int], cfg: SweepConfig,
                   progress: bool = True, store: Store | None = None
                   ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Vectors [N, S, T, L, tokens] and IoU tables (mask, box) [N, S, T, L] of every case,
    batch by batch; with a ``store``, a batch found there is reused and a computed one kept."""
    encoder = pipe.reference_encoder
    n, s, t, l_ = len(cases), len(cfg.seeds), len(timesteps), len(blocks)
    vectors = torch.zeros(n, s, t, l_, encoder.num_tokens)
    scores_mask, scores_box = np.zeros((n, s, t, l_)), np.zeros((n, s, t, l_))
    bar = tqdm(total=n, desc=f"sweep ({cfg.readout})", unit="case", disable=not progress)
    for start in range(0, n, cfg.batch_size):
        chunk = cases[start: start + cfg.batch_size]
        ids = [c.id for c in chunk]
        found = store.get(ids) if store is not None else None
        if found is None:
            vec = collect_vectors(pipe, chunk, timesteps, blocks, cfg.seeds, len(chunk),
                                  False, cfg.readout)
            grids = normalised_grids(vec, encoder.grid, encoder.num_prefix_tokens)
            found = []
            for i, case in enumerate(chunk):
                gt = torch.from_numpy(np.array(case.reference_mask))
                m, b = score_grids(grids[i].reshape(-1, *grids.shape[-2:]), gt, cfg.threshold)
                found.append(CaseRecord(arrays={"vectors": vec[i].numpy(),
                                                "mask": m.view(s, t, l_).numpy(),
                                                "box": b.view(s, t, l_).numpy()}))
            if store is not None:
                store.put(f"batch{start // cfg.batch_size:05d}", dict(zip(ids, found,
                                                                          strict=True)))
        for i, record in enumerate(found, start):
            vectors[i] = torch.from_numpy(record.arrays["vectors"])
            scores_mask[i], scores_box[i] = record.arrays["mask"], record.arrays["box"]
        bar.update(len(chunk))
    bar.close()
    return vectors, scores_mask, scores_box


def run_sweep(pipe: RefineByAlignPipeline, cases: Sequence[BenchmarkCase],
              cfg: SweepConfig | None = None, progress: bool = True,
              calibration_ids: Sequence[str] | None = None,
              store: Store | None = None) -> SweepResult:
    """The full calibration sweep over the cases that have a ``reference_mask``.

    (t*, l*) is chosen on ``calibration_ids`` (default: a seeded split of the swept cases when
    ``cfg.split``, else every case) and scored on the other swept cases. With a ``store``
    (:mod:`evaluation.cache`), finished batches are kept there and reused.
    """
    cfg = cfg or SweepConfig()
    usable, others = sweep_cases(cases)
    if others:
        log.info("sweep: %d case(s) without reference_mask are not scored: %s", len(others),
                 ", ".join(others[:10]) + (" ..." if len(others) > 10 else ""))
    if not usable:
        raise ValueError("the sweep needs at least one case with a non-empty reference_mask")
    ids = [c.id for c in usable]
    if calibration_ids is None:
        calibration_ids = (split_ids(ids, cfg.calibration_fraction, cfg.split_seed)[0]
                           if cfg.split else ids)
    unknown = sorted(set(calibration_ids) - set(ids))
    if unknown:
        raise ValueError(f"calibration ids not among the swept cases: {unknown[:5]}")
    all_blocks = [b.index for b in cross_attention_blocks(pipe.unet)]
    blocks = list(cfg.blocks) if cfg.blocks is not None else all_blocks
    timesteps = sweep_timesteps(pipe, cfg.num_timesteps)
    encoder = pipe.reference_encoder
    vectors, scores_mask, scores_box = scored_vectors(pipe, usable, timesteps, blocks,
                                                      cfg, progress, store)
    grids = normalised_grids(vectors, encoder.grid, encoder.num_prefix_tokens)
    ref_masks = [torch.from_numpy(np.array(c.reference_mask)) for c in usable]
    in_sample = best_cell(scores_mask.mean(axis=(0, 1)), scores_box.mean(axis=(0, 1)),
                          timesteps, blocks)
    best, cal, rep = calibrate((scores_mask, scores_box), ids, list(calibration_ids), timesteps,
                               blocks)
    held_out = rep != cal
    topk = topk_analysis((scores_mask, scores_box), grids, ref_masks, cfg, blocks,
                         cal if held_out else None, rep if held_out else None)
    chosen = (best["t_index"], blocks.index(best["layer"]))
    stability = choice_stability(scores_mask, cal, rep, chosen, timesteps, blocks,
                                 cfg.bootstrap, cfg.bootstrap_seed) if cfg.bootstrap else {}
    split = {"held_out": held_out, "seed": int(cfg.split_seed),
             "calibration_fraction": float(cfg.calibration_fraction),
             "calibration_ids": [ids[k] for k in cal], "report_ids": [ids[k] for k in rep]}
    return SweepResult(ids, timesteps, blocks, list(cfg.seeds), scores_mask, scores_box, grids,
                       cfg.threshold, best, topk, in_sample, split, stability)
