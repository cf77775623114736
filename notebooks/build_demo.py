"""Build notebooks/demo.ipynb with nbformat and execute it with nbclient (saved with outputs).

  python notebooks/build_demo.py            # build + execute (about a minute on CPU)
  python notebooks/build_demo.py --no-run   # only write the cells

The kernel is `python3` of the running interpreter's environment; install its spec once with
`python -m ipykernel install --prefix <venv>` if Jupyter cannot find it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "demo.ipynb"
log = logging.getLogger("build_demo")

INTRO = """# Refine-by-Align: the two stages on one case

1. **Alignment**: one denoiser forward with the *whole* reference as context; the
   cross-attention of a chosen block at a chosen timestep, averaged over the artifact-mask
   queries, is a map over the reference's 16x16 patch tokens -> region -> box -> crop.
2. **Refinement**: the masked region is re-sampled with the *crop* as the reference and
   blended back inside the mask only.

Figure 3 of the paper shows how the map depends on the block and the timestep; the grid
below does the same for our model (rows = cross-attention blocks, columns = timesteps)."""

SETUP = """import sys, tempfile, warnings
from pathlib import Path

warnings.filterwarnings("ignore", module="tqdm")

ROOT = Path.cwd()
while not (ROOT / "configs").is_dir() and ROOT != ROOT.parent:
    ROOT = ROOT.parent

import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import OmegaConf

from data.benchmark import load_benchmark, write_synthetic_benchmark
from evaluation.figures import correspondence_overlay
from models.alignment import attention_vectors, postprocess
from models.attention_capture import cross_attention_blocks
from models.export import DEFAULT_EXPORT, PIPELINE_INDEX, load_pipeline, save_pretrained
from models.image_processor import reference_tensor

%matplotlib inline
# (after the imports: evaluation.figures selects the Agg backend for its PNG writers)
torch.manual_seed(0)
TMP = Path(tempfile.mkdtemp(prefix="rba-demo-"))"""

LOAD = """if (DEFAULT_EXPORT / PIPELINE_INDEX).is_file():
    export_dir, trained = DEFAULT_EXPORT, True
else:  # no shipped checkpoint yet: the same architecture with random weights
    import hydra
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train")
    module = hydra.utils.instantiate(cfg.model)
    export_dir = save_pretrained(module.inference_state_dict(), cfg.model, TMP / "random_export")
    trained = False
pipe = load_pipeline(export_dir)
size = pipe.image_size
blocks = cross_attention_blocks(pipe.unet)
shown = export_dir.relative_to(ROOT) if export_dir.is_relative_to(ROOT) else export_dir
print(f"pipeline: {shown} ({'trained' if trained else 'RANDOM weights'}); "
      f"model size {size} px; {len(blocks)} cross-attention blocks")"""

CASE = """bench = TMP / "bench"
write_synthetic_benchmark(bench, 1, seed=3)
case = load_benchmark(bench)[0][0]
align_cfg = pipe.alignment  # calibrated (t*, block*)
print(case.id, case.meta, "alignment:", align_cfg)

fig, axes = plt.subplots(1, 4, figsize=(12, 3))
for ax, img, title in zip(axes, [case.image, case.mask, case.reference, case.target],
                          ["image (artifact)", "mask", "reference", "target (GT)"]):
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.set_title(title)
    ax.set_axis_off()
correspondence_overlay(axes[2], case.reference, gt_mask=case.reference_mask,
                       title="reference (GT region)")
plt.show()"""

GRID_MD = """## Correspondence maps across blocks and timesteps (paper Figure 3)

One forward per timestep captures every block at once (the same noise at every timestep).
White contour: ground-truth region; red box: the thresholded region's box."""

GRID = """image = pipe.image_processor.preprocess(case.image, size)
mask = pipe.mask_processor.preprocess(case.mask, size)
encoder = pipe.reference_encoder
context = pipe.encode_reference(reference_tensor(case.reference)[None])
timesteps = [900, 700, 500, 300, 100]
vectors = attention_vectors(pipe.unet, pipe.autoencoder, pipe.scheduler, image, mask, context,
                            timesteps, None, torch.Generator().manual_seed(0))

fig, axes = plt.subplots(len(blocks), len(timesteps),
                         figsize=(2.0 * len(timesteps), 2.0 * len(blocks)))
for row, block in enumerate(blocks):
    for col, t in enumerate(timesteps):
        heat, region, boxes = postprocess(vectors[t][block.index], encoder.grid,
                                          encoder.num_prefix_tokens, case.reference.shape[:2],
                                          align_cfg.threshold, 0.0)
        ax = correspondence_overlay(axes[row, col], case.reference, heat[0].numpy(),
                                    case.reference_mask, boxes[0].tolist())
        if row == 0:
            ax.set_title(f"t = {t}", fontsize=9)
        if col == 0:
            ax.text(-0.08, 0.5, f"block {block.index}\\n({block.name.split('.attn')[0]})",
                    transform=ax.transAxes, ha="right", va="center", fontsize=7)
plt.tight_layout()
plt.show()"""

REFINE_MD = """## Both stages at the deployed (t, block)

Pixels outside the mask are the input's, bit for bit."""

REFINE = """out = pipe(case.image, case.mask, case.reference, seed=0)
refined, found = out.images[0], out.alignments[0]
crop = (found.crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
assert np.array_equal(refined[~case.mask], case.image[~case.mask])

fig, axes = plt.subplots(1, 5, figsize=(15, 3))
correspondence_overlay(axes[0], case.reference, found.heat.numpy(), case.reference_mask,
                       found.box, f"map (t={align_cfg.timestep}, block {align_cfg.block})")
for ax, img, title in zip(axes[1:], [crop, case.image, refined, case.target],
                          ["crop (reference for refinement)", "input", "refined", "target"]):
    ax.imshow(img)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
plt.show()
print("box on the reference (x0, y0, x1, y1):", found.box)"""


def random_weights_note() -> str:
    """The markdown cell that says when the demo runs on random weights."""
    if (REPO_ROOT / "checkpoints" / "tiny_synthetic" / "model_index.json").is_file():
        return ("**Weights:** the shipped export `checkpoints/tiny_synthetic` (a tiny model "
                "trained on synthetic pairs).")
    return ("**Weights: RANDOM.** `checkpoints/tiny_synthetic` did not exist when this notebook "
            "was built, so a randomly initialised tiny export of the same architecture is used: "
            "the maps and the refined result show the mechanics only, not the method's quality. "
            "Re-run `python notebooks/build_demo.py` once the checkpoint ships.")


def build() -> nbformat.NotebookNode:
    """The demo's cells, in order."""
    nb = new_notebook()
    nb.cells = [
        new_markdown_cell(INTRO), new_markdown_cell(random_weights_note()),
        new_code_cell(SETUP), new_code_cell(LOAD), new_code_cell(CASE),
        new_markdown_cell(GRID_MD), new_code_cell(GRID),
        new_markdown_cell(REFINE_MD), new_code_cell(REFINE),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--no-run", action="store_true", help="write cells without outputs")
    parser.add_argument("--out", type=Path, default=NOTEBOOK)
    parser.add_argument("--timeout", type=int, default=600, help="per-cell timeout (s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    nb = build()
    if not args.no_run:
        start = time.time()
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
        log.info("executed in %.0f s", time.time() - start)
    nbformat.write(nb, args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
