"""Benchmark folder format: synthetic writer -> reader round trip, malformed cases, artifacts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data.artifacts import ARTIFACTS, apply_artifact
from data.benchmark import load_benchmark, write_case, write_synthetic_benchmark
from data.objects import render_object


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ids = write_synthetic_benchmark(root, num=5, seed=4, image_size=64)
    return root, ids


def test_round_trip(bench):
    root, ids = bench
    cases, skipped = load_benchmark(root)
    assert skipped == [] and [c.id for c in cases] == ids
    kinds = set()
    for c in cases:
        assert c.image.shape == (64, 64, 3) and c.mask.shape == (64, 64) and c.mask.any()
        assert c.reference.shape == (224, 224, 3)
        assert c.reference_mask.shape == (224, 224) and c.reference_mask.any()
        assert c.category == "synthetic" and c.meta["seed"] == 4
        kinds.add(c.meta["artifact"])
        # the artifact is confined to the mask and does change it
        assert np.array_equal(c.image[~c.mask], c.target[~c.mask])
        assert not np.array_equal(c.image[c.mask], c.target[c.mask])
    assert kinds == set(ARTIFACTS)


def test_writer_is_deterministic(bench, tmp_path):
    root, ids = bench
    write_synthetic_benchmark(tmp_path, num=2, seed=4, image_size=64)
    for cid in ids[:2]:
        for name in ("image.png", "mask.png", "reference_mask.png"):
            a = np.asarray(Image.open(root / cid / name))
            b = np.asarray(Image.open(tmp_path / cid / name))
            assert np.array_equal(a, b), (cid, name)


def test_malformed_cases_are_reported(bench, tmp_path):
    root, ids = bench
    work = tmp_path / "b"
    shutil.copytree(root, work)
    shutil.copytree(work / ids[0], work / "good_jpg")
    img = Image.open(work / "good_jpg" / "image.png")
    (work / "good_jpg" / "image.png").unlink()
    img.save(work / "good_jpg" / "image.jpg")  # any Pillow extension is accepted
    (work / "optional_absent").mkdir()
    for name in ("image.png", "mask.png", "reference.png"):
        shutil.copy(work / ids[1] / name, work / "optional_absent" / name)

    (work / ids[0] / "mask.png").unlink()  # missing required file
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(work / ids[1] / "mask.png")  # empty
    Image.fromarray(np.full((32, 64), 255, np.uint8)).save(work / ids[2] / "mask.png")  # size
    (work / ids[3] / "reference.png").write_bytes(b"not an image")  # unreadable
    (work / ids[4] / "meta.json").write_text("{broken")  # invalid optional file

    cases, skipped = load_benchmark(work)
    reasons = dict(skipped)
    assert set(reasons) == set(ids)
    assert "missing" in reasons[ids[0]] and "mask" in reasons[ids[0]]
    assert "empty mask" in reasons[ids[1]]
    assert "size" in reasons[ids[2]]
    assert "unreadable" in reasons[ids[3]] and "reference" in reasons[ids[3]]
    assert "meta.json" in reasons[ids[4]]
    by_id = {c.id: c for c in cases}
    assert set(by_id) == {"good_jpg", "optional_absent"}
    assert by_id["good_jpg"].image.shape == (64, 64, 3)
    assert by_id["optional_absent"].target is None and by_id["optional_absent"].meta == {}
    assert by_id["optional_absent"].reference_mask is None


def test_rgb_mask_and_missing_root(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    rgb_mask = np.zeros((8, 8, 3), np.uint8)
    rgb_mask[2:4, 2:4, 1] = 7  # any nonzero channel counts
    d = tmp_path / "c"
    write_case(d, img, np.ones((8, 8), bool), img, meta={"category": "try_on"})
    Image.fromarray(rgb_mask).save(d / "mask.png")
    cases, skipped = load_benchmark(tmp_path)
    assert skipped == [] and cases[0].mask.sum() == 4 and cases[0].category == "try_on"
    with pytest.raises(FileNotFoundError):
        load_benchmark(tmp_path / "nope")
    assert json.loads((d / "meta.json").read_text())["category"] == "try_on"


@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_artifacts_change_only_inside_mask(kind):
    rng = np.random.default_rng(3)
    view = render_object(96, rng)
    mask = np.zeros((96, 96), bool)
    ys, xs = np.nonzero(view.detail)
    cy, cx = int(ys.mean()), int(xs.mean())
    mask[cy - 12:cy + 12, cx - 16:cx + 16] = True
    out = apply_artifact(kind, view.rgb, mask, rng)
    assert out.dtype == np.uint8 and out.shape == view.rgb.shape
    assert np.array_equal(out[~mask], view.rgb[~mask])
    changed = np.abs(out[mask].astype(int) - view.rgb[mask]).sum(-1) > 0
    assert changed.mean() > 0.2
