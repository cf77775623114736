"""Interactive demo (Gradio): paint the artifact, give a reference, see both stages.

  python scripts/demo.py                          # shipped model, http://127.0.0.1:7860
  python scripts/demo.py --export EXPORT_DIR --port 7861 --share
  make demo

Upload a generated image and paint over the artifact (the painted pixels are the mask), upload
a reference, and press Refine: the demo shows the alignment stage's heat map and crop box on
the reference, the crop the refinement was conditioned on, and the refined image beside the
input. The read-out controls start at the pipeline folder's calibrated values (its
model_index.json), so a user who only uploads gets the calibrated behaviour. Inference is
models.pipeline.RefineByAlignPipeline; this file is UI glue. Needs requirements-demo.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls of its own
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py

import gradio as gr
import numpy as np
import torch
from PIL import Image

from data.benchmark import load_case, write_synthetic_benchmark
from evaluation.figures import correspondence_image
from models.alignment import READOUTS
from models.attention_capture import cross_attention_blocks
from models.export import DEFAULT_EXPORT, PIPELINE_INDEX, REPO_ROOT, load_pipeline
from models.pipeline import AlignmentConfig, RefineByAlignPipeline, RefinementConfig

# Examples: benchmark-namespace cases (never training or validation items), chosen by eye for
# visible lettering and emblems, shown 4x larger so the 64 px cases can be painted on.
EXAMPLE_SEED = 1
EXAMPLE_INDICES = (1, 2, 3)
EXAMPLE_SCALE = 4
PAINT_RGBA = (255, 40, 40, 255)
CSS = ".pixelated img, .pixelated canvas {image-rendering: pixelated;}"


@dataclass
class DemoModel:
    """The loaded pipeline; its deployed read-out is the controls' defaults."""

    pipe: RefineByAlignPipeline
    export_dir: Path

    @property
    def alignment(self) -> AlignmentConfig:
        return self.pipe.alignment

    @property
    def calibrated(self) -> bool:
        return self.pipe.calibrated

    @property
    def block_choices(self) -> list[tuple[str, int]]:
        """(label, index) of every cross-attention block, for the block control."""
        return [(f"{b.index}: {b.name.removesuffix('.transformer_blocks.0.attn2')}", b.index)
                for b in cross_attention_blocks(self.pipe.unet)]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    def describe(self) -> str:
        cfg = self.alignment
        source = (f"calibrated (`{PIPELINE_INDEX}` of the folder)" if self.calibrated else
                  "**UNCALIBRATED** (the model preset's default; run eval.py to calibrate)")
        shown = (self.export_dir.relative_to(REPO_ROOT)
                 if self.export_dir.is_relative_to(REPO_ROOT) else self.export_dir)
        return (f"Model `{shown}` ({self.pipe.image_size} px). Default read-out "
                f"{source}: t={cfg.timestep}, block {cfg.block}, threshold {cfg.threshold}, "
                f"margin {cfg.margin}, {cfg.readout}.")


def load_demo_model(export_dir: str | Path | None = None) -> DemoModel:
    """Load once per server: every request reuses these weights with its own settings."""
    export_dir = Path(export_dir or DEFAULT_EXPORT)
    pipe = load_pipeline(export_dir, "cuda" if torch.cuda.is_available() else "cpu")
    return DemoModel(pipe, export_dir)


# ----------------------------------------------------------------------------- inputs
def user_error(message: str) -> gr.Error:
    """An error shown in the UI (and raised by the API client) without a server traceback:
    it is the user's input, not a bug."""
    return gr.Error(message, print_exception=False)


def editor_case(editor: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """ImageEditor value -> (uint8 RGB image, bool mask of the pixels painted on any layer)."""
    background = None if editor is None else editor.get("background")
    if background is None:
        raise user_error("Upload the generated image first.")
    rgba = Image.fromarray(np.asarray(background, dtype=np.uint8)).convert("RGBA")
    image = np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
                       .convert("RGB"))
    mask = np.zeros(image.shape[:2], bool)
    for layer in editor.get("layers") or []:
        layer = np.asarray(layer)
        painted = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[2] == 4 else layer.any(-1)
        if painted.shape != mask.shape:  # a canvas of another size than the image
            painted = np.asarray(Image.fromarray(painted).resize(mask.shape[::-1],
                                                                 Image.NEAREST))
        mask |= painted
    if not mask.any():
        raise user_error("The artifact mask is empty: paint over the artifact with the brush.")
    return image, mask


def write_examples(out_dir: Path, image_size: int, reference_size: int) -> list[list[Any]]:
    """Benchmark cases as [editor value, reference path]: the image as background and its
    artifact mask as a painted layer, as if a user had painted it."""
    write_synthetic_benchmark(out_dir, max(EXAMPLE_INDICES) + 1, EXAMPLE_SEED, image_size,
                              reference_size)
    examples = []
    for index in EXAMPLE_INDICES:
        case = load_case(out_dir / f"{index:05d}")
        size = (case.image.shape[1] * EXAMPLE_SCALE, case.image.shape[0] * EXAMPLE_SCALE)
        image = Image.fromarray(case.image).resize(size, Image.NEAREST)
        mask = Image.fromarray(case.mask).resize(size, Image.NEAREST)
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        layer.paste(PAINT_RGBA, mask=mask)
        paths = {name: out_dir / f"{case.id}_{name}.png"
                 for name in ("image", "layer", "composite")}
        image.save(paths["image"])
        layer.save(paths["layer"])
        Image.alpha_composite(image.convert("RGBA"), layer).save(paths["composite"])
        editor = {"background": str(paths["image"]), "layers": [str(paths["layer"])],
                  "composite": str(paths["composite"])}
        examples.append([editor, str(out_dir / case.id / "reference.png")])
    return examples


# ----------------------------------------------------------------------------- inference
def refine_case(model: DemoModel, editor: dict[str, Any] | None, reference: np.ndarray | None,
                readout: str, timestep: float, block: int, threshold: float, margin: float,
                steps: float, guidance: float, seed: float, early_x0: bool = False,
                x0_timestep: float = 1000
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Both stages through the pipeline: (heat map + box on the reference, crop, input,
    refined, details). ``early_x0`` turns on the early-x0 option at ``x0_timestep``."""
    image, mask = editor_case(editor)
    if reference is None:
        raise user_error("Upload a reference image.")
    reference = np.asarray(reference, dtype=np.uint8)[..., :3]
    try:
        alignment = replace(model.alignment, readout=readout, timestep=int(timestep),
                            block=int(block), threshold=float(threshold), margin=float(margin))
        refinement = RefinementConfig(
            num_steps=int(steps), guidance_scale=float(guidance),
            final_x0_timestep=int(x0_timestep) if early_x0 else None)
        start = time.perf_counter()
        out = model.pipe(image, mask, reference, refinement, seed=int(seed),
                         alignment=alignment)
        refined, found = out.images[0], out.alignments[0]
    except ValueError as err:  # the pipeline's own input and read-out checks
        raise user_error(str(err)) from err
    seconds = time.perf_counter() - start
    heat = found.heat.float().cpu().numpy()
    crop = (found.crop.float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    details = {"box_xyxy": list(found.box), "reference_size_wh": list(reference.shape[1::-1]),
               "mask_pixels": int(mask.sum()), "seconds": round(seconds, 2),
               **model.pipe.describe(refinement), "alignment": asdict(alignment)}
    return correspondence_image(reference, heat, found.box), crop, image, refined, details


# ----------------------------------------------------------------------------- UI
def build_demo(export_dir: str | Path | None = None) -> gr.Blocks:
    """The demo over one export (default: the shipped tiny model); launch() it to serve."""
    model = load_demo_model(export_dir)
    cfg, sampling = model.alignment, RefinementConfig()
    examples = write_examples(Path(tempfile.mkdtemp(prefix="rba-demo-")), model.pipe.image_size,
                              model.pipe.reference_encoder.image_size)

    run = partial(refine_case, model)
    with gr.Blocks(title="Refine-by-Align demo", analytics_enabled=False) as demo:
        gr.Markdown(
            "## Refine-by-Align: reference-guided refinement of a painted artifact\n"
            "Paint over the artifact of a generated image, give a reference of the object, "
            "press **Refine**. The model first finds the matching region on the reference "
            "(cross-attention of one block at one timestep), then re-generates the painted "
            "region from that crop; pixels outside the mask are kept.\n\n" + model.describe())
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    editor = gr.ImageEditor(
                        label="Generated image (paint the artifact)", type="numpy",
                        image_mode="RGBA", format="png", sources=("upload", "clipboard"),
                        transforms=(), layers=False, height=380, elem_id="editor",
                        elem_classes="pixelated",
                        brush=gr.Brush(colors=["rgb(255, 40, 40)"], color_mode="fixed"))
                    reference = gr.Image(label="Reference", type="numpy", image_mode="RGB",
                                         format="png", sources=("upload", "clipboard"),
                                         height=380, elem_id="reference")
                shown = gr.Examples(
                    examples, [editor, reference], cache_examples=False,
                    label=f"Examples: synthetic benchmark cases (seed {EXAMPLE_SEED}, never "
                          "seen in training); one click loads and refines")
            with gr.Column(scale=1, min_width=280):
                with gr.Accordion("Read-out (alignment)", open=True):
                    readout = gr.Radio(list(READOUTS), value=cfg.readout, label="read-out",
                                       elem_id="readout")
                    timestep = gr.Slider(0, model.num_train_timesteps - 1, value=cfg.timestep,
                                         step=1, label="timestep t", elem_id="timestep")
                    block = gr.Dropdown(model.block_choices, value=cfg.block,
                                        label="cross-attention block", elem_id="block")
                    threshold = gr.Slider(0.0, 1.0, value=cfg.threshold, step=0.01,
                                          label="threshold on the heat map", elem_id="threshold")
                    margin = gr.Slider(0.0, 1.0, value=cfg.margin, step=0.01,
                                       label="crop margin", elem_id="margin")
                with gr.Accordion("Refinement", open=True):
                    steps = gr.Slider(1, 200, value=sampling.num_steps, step=1,
                                      label=f"steps ({sampling.sampler})", elem_id="steps")
                    guidance = gr.Slider(0.0, 10.0, value=sampling.guidance_scale, step=0.1,
                                         label="guidance scale", elem_id="guidance")
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    early_x0 = gr.Checkbox(
                        sampling.final_x0_timestep is not None, elem_id="early_x0",
                        label="option: stop early and keep the x0 prediction (smooth fill)")
                    x0_timestep = gr.Slider(
                        0, model.num_train_timesteps, step=1, elem_id="x0_timestep",
                        value=sampling.final_x0_timestep or model.num_train_timesteps,
                        label="stop at the first step at or below t (max = one step)")
                button = gr.Button("Refine", variant="primary", elem_id="run")
        with gr.Row(equal_height=True):
            heat = gr.Image(label="heat map + crop box (reference)", format="png",
                            interactive=False, height=280, elem_id="heat")
            crop = gr.Image(label="crop used to refine", format="png", interactive=False,
                            height=280, elem_id="crop")
            before = gr.Image(label="input", format="png", interactive=False, height=280,
                              elem_id="input", elem_classes="pixelated")
            after = gr.Image(label="refined", format="png", interactive=False, height=280,
                             elem_id="refined", elem_classes="pixelated")
        with gr.Accordion("details (box on the reference, settings, time)", open=False):
            details = gr.JSON(label="details", elem_id="details")
        controls = [readout, timestep, block, threshold, margin, steps, guidance, seed,
                    early_x0, x0_timestep]
        outputs = [heat, crop, before, after, details]
        button.click(run, [editor, reference, *controls], outputs, api_name="refine")
        shown.load_input_event.then(run, [editor, reference, *controls], outputs,
                                    api_visibility="undocumented")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--export", type=Path, default=DEFAULT_EXPORT,
                   help="pipeline folder (model_index.json, unet/, ...)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve on the network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="a public gradio.live link (off)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    build_demo(args.export).launch(server_name=args.host, server_port=args.port,
                                   share=args.share, css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
