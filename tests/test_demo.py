"""scripts/demo.py: the Gradio demo served in-process and called through gradio_client."""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from data.benchmark import load_case
from models.export import DEFAULT_EXPORT, PIPELINE_INDEX, write_alignment
from models.pipeline import AlignmentConfig, RefinementConfig

# a read-out unlike the shipped one's, so the controls' defaults can only have come from it
DEPLOYED = AlignmentConfig(timestep=120, block=5, threshold=0.4, margin=0.2)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


demo_script = _load_script()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped weights with a calibrated read-out of their own (:data:`DEPLOYED`)."""
    out = tmp_path_factory.mktemp("export")
    for name in ("unet", "reference_encoder", "scheduler", "model.yaml"):
        (out / name).symlink_to(DEFAULT_EXPORT / name)
    (out / PIPELINE_INDEX).write_text((DEFAULT_EXPORT / PIPELINE_INDEX).read_text())
    write_alignment(out, DEPLOYED, "a read-out of this test")
    return out


@pytest.fixture(scope="module")
def served(export_dir: Path) -> Iterator[tuple]:
    demo = demo_script.build_demo(export_dir)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


@pytest.fixture
def case(tmp_path: Path) -> dict:
    """A 48x40 image with a painted 12x10 rectangle (an RGBA layer) and a 150x120 reference."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
    mask = np.zeros((40, 48), bool)
    mask[12:22, 20:32] = True
    layer = np.zeros((40, 48, 4), np.uint8)
    layer[mask] = (255, 40, 40, 255)
    reference = rng.integers(0, 256, (120, 150, 3)).astype(np.uint8)
    files = {name: tmp_path / f"{name}.png" for name in ("image", "layer", "empty", "reference")}
    Image.fromarray(image).save(files["image"])
    Image.fromarray(layer).save(files["layer"])
    Image.fromarray(np.zeros_like(layer)).save(files["empty"])
    Image.fromarray(reference).save(files["reference"])
    return {"image": image, "mask": mask, "reference": reference, "files": files}


def _editor(case: dict, layer: str = "layer") -> dict:
    files = case["files"]
    return {"background": handle_file(files["image"]), "layers": [handle_file(files[layer])],
            "composite": None}


def _read(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_controls_default_to_the_exports_readout(served: tuple) -> None:
    demo, _ = served
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    deployed = DEPLOYED
    assert by_id["timestep"].value == deployed.timestep == 120
    assert by_id["block"].value == deployed.block == 5
    assert by_id["threshold"].value == deployed.threshold
    assert by_id["margin"].value == deployed.margin
    assert by_id["readout"].value == deployed.readout


def test_upload_only_refines_inside_the_mask(served: tuple, case: dict) -> None:
    _, client = served
    heat_file, crop_file, shown_file, refined_file, details = client.predict(
        editor=_editor(case), reference=handle_file(case["files"]["reference"]), steps=2,
        api_name="/refine")
    image, mask, reference = case["image"], case["mask"], case["reference"]
    refined = _read(refined_file)
    assert refined.shape == image.shape
    assert np.array_equal(refined[~mask], image[~mask])
    assert not np.array_equal(refined[mask], image[mask])
    assert np.array_equal(_read(shown_file), image)
    assert details["mask_pixels"] == mask.sum()
    # nothing but the uploads given: the export's calibrated read-out ran
    deployed = DEPLOYED
    assert (details["alignment"]["timestep"], details["alignment"]["block"]) == (
        deployed.timestep, deployed.block)

    heat = _read(heat_file)
    assert heat.shape == reference.shape
    assert not np.array_equal(heat, reference)  # the map and box are drawn over it
    x0, y0, x1, y1 = details["box_xyxy"]
    assert 0 <= x0 < x1 <= reference.shape[1] and 0 <= y0 < y1 <= reference.shape[0]
    assert np.array_equal(_read(crop_file), reference[y0:y1, x0:x1])


def test_threshold_control_reaches_the_crop(served: tuple, case: dict, export_dir: Path
                                            ) -> None:
    _, client = served
    pipe = demo_script.load_demo_model(export_dir).pipe
    boxes = {}
    for threshold in (0.05, 0.95):
        *_, details = client.predict(
            editor=_editor(case), reference=handle_file(case["files"]["reference"]),
            threshold=threshold, steps=1, api_name="/refine")
        boxes[threshold] = tuple(details["box_xyxy"])
        expected = pipe.align(case["image"], case["mask"], case["reference"],
                              alignment=replace(DEPLOYED, threshold=threshold))
        assert boxes[threshold] == expected.box
    assert boxes[0.05] != boxes[0.95]


def test_early_x0_option_reaches_the_sampler(served: tuple, case: dict, export_dir: Path
                                             ) -> None:
    _, client = served
    given = {"editor": _editor(case), "reference": handle_file(case["files"]["reference"]),
             "steps": 3, "seed": 0, "api_name": "/refine"}
    *_, early_file, details = client.predict(early_x0=True, x0_timestep=1000, **given)
    assert details["refinement"]["final_x0_timestep"] == 1000
    pipe = demo_script.load_demo_model(export_dir).pipe
    expected = pipe(case["image"], case["mask"], case["reference"],
                    RefinementConfig(num_steps=3, final_x0_timestep=1000), seed=0).images[0]
    assert np.array_equal(_read(early_file), expected)
    *_, plain_file, plain_details = client.predict(x0_timestep=1000, **given)  # box unticked
    assert plain_details["refinement"]["final_x0_timestep"] is None
    assert not np.array_equal(_read(plain_file), expected)


def test_bad_inputs_are_clear_errors(served: tuple, case: dict) -> None:
    _, client = served
    reference = handle_file(case["files"]["reference"])
    with pytest.raises(AppError, match="mask is empty"):
        client.predict(editor=_editor(case, "empty"), reference=reference, steps=1,
                       api_name="/refine")
    with pytest.raises(AppError, match="reference"):
        client.predict(editor=_editor(case), reference=None, steps=1, api_name="/refine")
    with pytest.raises(AppError, match="not on the 50-step DDIM trajectory"):
        client.predict(editor=_editor(case), reference=reference, readout="trajectory",
                       timestep=7, steps=1, api_name="/refine")


def test_examples_are_benchmark_cases_painted(tmp_path: Path) -> None:
    examples = demo_script.write_examples(tmp_path, 64, 224)
    assert len(examples) == len(demo_script.EXAMPLE_INDICES)
    for (editor, reference_path), index in zip(examples, demo_script.EXAMPLE_INDICES,
                                               strict=True):
        case = load_case(tmp_path / f"{index:05d}")
        assert case.meta["namespace"] == "benchmark"
        loaded = {"background": np.asarray(Image.open(editor["background"]).convert("RGBA")),
                  "layers": [np.asarray(Image.open(p)) for p in editor["layers"]]}
        image, mask = demo_script.editor_case(loaded)
        scale = demo_script.EXAMPLE_SCALE
        assert np.array_equal(image[::scale, ::scale], case.image)
        assert np.array_equal(mask, case.mask.repeat(scale, 0).repeat(scale, 1))
        assert np.array_equal(_read(reference_path), case.reference)
