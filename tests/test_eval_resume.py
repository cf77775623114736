"""Resumable evaluation: a killed eval.py resumes from its run folder's cache to the report an
uninterrupted run writes, and a cache made under another setup is refused, naming the change."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.benchmark import write_synthetic_benchmark
from evaluation.cache import (
    TMP_PREFIX,
    CacheMismatch,
    CaseRecord,
    RunCache,
    Store,
    benchmark_listing,
    differences,
    export_digests,
    result_settings,
)
from tests.conftest import compose_config, save_random_pipeline

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["sweep.num_timesteps=3", "sweep.batch_size=1", "sweep.topk=[1]",
            "sweep.bootstrap=20", "refinement.num_steps=2", "refinement.batch_size=1",
            "refinement.methods=[input,telea,ours_whole_reference,aligned_crop]",
            "qualitative.num_cases=1", "num_threads=1", "progress=false"]


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_pipeline(Path(tmp_path_factory.mktemp("export")))


def _command(bench: Path, export: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "eval.py"), f"bench_dir={bench}", f"ckpt_path={export}",
            f"run_dir={run_dir}", *SETTINGS, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def _cached(run_dir: Path, stage: str) -> int:
    return len(list((run_dir / "cache" / stage).rglob("*.npz")))


def _kill_when(cmd: list[str], run_dir: Path, stage: str, files: int) -> None:
    """Start ``cmd``, SIGKILL it once ``files`` batch files of ``stage`` are cached."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while _cached(run_dir, stage) < files:
            if proc.poll() is not None:
                pytest.fail(f"eval ended (rc {proc.returncode}) before {files} {stage} files "
                            f"were cached: {proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert not (run_dir / "report.json").exists(), "killed too late: the run had finished"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _results(run_dir: Path) -> str:
    """report.json without ``meta`` (dates, paths, the cache's counts), as canonical text
    (NaN compares equal to NaN this way)."""
    report = json.loads((run_dir / "report.json").read_text())
    report.pop("meta")
    return json.dumps(report, sort_keys=True)


@pytest.mark.slow
def test_eval_resume_after_kill_matches_uninterrupted(tmp_path: Path, export_dir: Path) -> None:
    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 6, seed=0, image_size=64, reference_size=224)
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    cmd = _command(bench, export_dir, resumed)
    _kill_when(cmd, resumed, "sweep", 3)  # killed in the sweep
    _kill_when(cmd, resumed, "refinement", 2)  # then, resumed, killed in the refinement
    out = _run(cmd)
    report = json.loads((resumed / "report.json").read_text())
    cache = report["meta"]["cache"]
    assert cache["resumed"] and cache["reused"]["refinement/input"] >= 1
    assert sum(cache["reused"].values()) >= 5
    assert "resumed" in (resumed / "report.md").read_text()
    assert "case result(s) reused" in out.stdout + out.stderr  # said in the log too

    _run(_command(bench, export_dir, fresh))
    assert not json.loads((fresh / "report.json").read_text())["meta"]["cache"]["resumed"]
    assert _results(resumed) == _results(fresh)

    # a finished run reruns from its cache alone
    _run(cmd)
    cache = json.loads((resumed / "report.json").read_text())["meta"]["cache"]
    assert sum(cache["computed"].values()) == 0 and _results(resumed) == _results(fresh)


def test_a_changed_setting_is_refused_naming_it(tmp_path: Path, export_dir: Path) -> None:
    import eval as eval_script

    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 2, seed=0)
    quick = [f"bench_dir={bench}", f"ckpt_path={export_dir}", "run_refinement=false",
             "sweep.num_timesteps=2", "sweep.topk=[1]", "sweep.bootstrap=0",
             "sweep.compare_readouts=[]", "progress=false", "num_threads=1"]
    previous = torch.get_num_threads()
    try:
        eval_script.evaluate(compose_config(quick, config_name="eval"), tmp_path / "run")
        with pytest.raises(eval_script.EvalError,
                           match=r"stage 'cache'.*setting sweep\.num_timesteps: 2 -> 3"):
            eval_script.evaluate(compose_config([*quick, "sweep.num_timesteps=3"],
                                                config_name="eval"), tmp_path / "run")
        # what only selects or presents results does not refuse the cache
        path = eval_script.evaluate(compose_config([*quick, "qualitative.num_cases=1"],
                                                   config_name="eval"), tmp_path / "run")
    finally:
        torch.set_num_threads(previous)
    assert json.loads(path.read_text())["meta"]["cache"]["resumed"]


def test_changed_weights_and_cases_are_named(tmp_path: Path, export_dir: Path) -> None:
    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 3, seed=0)
    export = tmp_path / "export"
    shutil.copytree(export_dir, export)
    before = {"settings": {"seed": 0}, "export": export_digests(export),
              "benchmark": benchmark_listing(bench)}
    RunCache(tmp_path / "run", before)
    data = bytearray((export / UNET_WEIGHTS).read_bytes())
    data[-1] ^= 1
    (export / UNET_WEIGHTS).write_bytes(bytes(data))
    (bench / "00001" / "meta.json").write_text("{}")
    shutil.rmtree(bench / "00002")
    after = {"settings": {"seed": 0}, "export": export_digests(export),
             "benchmark": benchmark_listing(bench)}
    assert differences(before, after)[0].startswith(f"export file {UNET_WEIGHTS}: ")
    with pytest.raises(CacheMismatch) as err:
        RunCache(tmp_path / "run", after)
    message = str(err.value)
    assert f"export file {UNET_WEIGHTS}" in message
    assert "benchmark cases removed: 00002" in message
    assert "benchmark cases changed: 00001" in message and "00000" not in message


def test_the_fingerprint_holds_what_changes_results_and_resolves_only_that() -> None:
    from models.config import compose_config as plain_compose

    cfg = plain_compose(["sweep.num_timesteps=7", "progress=false"], "eval")
    settings = result_settings(cfg)  # paths.output_dir (${hydra:...}) is never resolved
    assert settings["sweep.num_timesteps"] == 7 and settings["sweep.seeds"] == [0]
    assert settings["refinement.num_steps"] == 25 and "refinement.metrics.clip.model" in settings
    for key in ("progress", "paths.output_dir", "refinement.methods", "bench_dir",
                "sweep.compare_readouts", "qualitative.num_cases", "run_dir"):
        assert key not in settings


def test_store_writes_whole_files_and_reads_them_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "stage")
    rng = np.random.default_rng(0)
    records = {"a": CaseRecord({"psnr": float("inf"), "flags": {}},
                               {"x": rng.random((2, 3)).astype(np.float32)}),
               "b": CaseRecord({"psnr": None}, {})}
    store.put("batch00000", records, compress=True)
    (tmp_path / "stage" / f"{TMP_PREFIX}123-batch00001.npz").write_bytes(b"cut short")
    again = Store(tmp_path / "stage")
    assert not list((tmp_path / "stage").glob(f"{TMP_PREFIX}*"))  # a write killed midway
    assert again.get(["a", "c"]) is None and not again.reused
    a, b = again.get(["a", "b"])
    assert a.values == {"psnr": float("inf"), "flags": {}} and b.values == {"psnr": None}
    np.testing.assert_array_equal(a.arrays["x"], records["a"].arrays["x"])
    assert a.arrays["x"].dtype == np.float32 and again.reused == {"a", "b"}
