"""``predict --ray-address`` on a local two-node Ray cluster (``ray.cluster_utils.Cluster`` on this machine; its
address is this machine's IP, as Ray turns 127.0.0.1 into it when a driver connects).

Every Ray run is compared with a single-process ``predict`` of the same files: the submission, masks and
overlays must be the same bytes and the failed file reported with the same line. A run whose worker node is
removed midway must still finish with the same submission; a driver killed after K journal rows (predict's
test hook ``_UNET_DEPLOY_TEST_CRASH_AFTER=0:K``) must be resumed by ``--resume`` predicting only the rest.
Without Ray, ``--ray-address`` is one line saying how to install it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARD_TEST_SIZES
from predict_summary import summary_counts

from unet_deploy.images.rle import read_submission
from unet_deploy.predict.resume import CRASH_ENV
from unet_deploy.predict.shard import journal_dir

ROOT = Path(__file__).resolve().parents[1]
N_GOOD = 4 * len(SHARD_TEST_SIZES)  # conftest.tiny_model_and_test_images: 4 JPEGs per size
RUN_TIMEOUT = 150
COPIES = 6  #: the node-removal run predicts each good test image this many times (72 files, 18 batches)

#: Runs the CLI as if Ray were not installed (``import ray`` raises ImportError).
WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from unet_deploy.cli import main; main(sys.argv[1:])"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="400", RAY_DEDUP_LOGS="0", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS",
                CRASH_ENV):
        if key not in extra:
            env.pop(key, None)
    return env


def _predict(*args: object, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unet_deploy", "predict", *map(str, args)], env=_env(**env),
                          cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def _counts(out: str) -> tuple[int, int, int]:
    """(predicted, skipped, reused) from the one summary line of a run."""
    counts = summary_counts(out)
    return counts.predicted, counts.skipped, counts.reused


def _errors(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("error: "))


@pytest.fixture(scope="module")
def cluster():
    """A head node (1 CPU) and a worker node (2 CPUs), 100 MB of object store each; the workers import this
    checkout (PYTHONPATH, inherited from here). Shut down at the end of the module."""
    cluster_utils = pytest.importorskip("ray.cluster_utils", reason='needs the ray extra: pip install -e ".[ray]"')
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    store = 100 * 1024 ** 2
    nodes = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
    try:
        worker = nodes.add_node(num_cpus=2, object_store_memory=store)
        nodes.wait_for_nodes()
        yield {"cluster": nodes, "worker": worker, "address": nodes.address}
    finally:
        nodes.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_and_test_images) -> dict[str, Path]:
    """A base-8 U-Net trained a few steps on synthetic cars; ``test``: 12 JPEGs of 3 sizes and one truncated
    JPEG; the single-process reference outputs of ``test`` (masks, overlays, submission, error lines)."""
    root = tmp_path_factory.mktemp("ray")
    ckpt, test = tiny_model_and_test_images(root)
    (test / "s1_bad.jpg").write_bytes(next(test.iterdir()).read_bytes()[:100])  # a truncated JPEG
    ref = root / "ref.csv"
    proc = _predict(test, "-m", ckpt, "-o", root / "ref_masks", "--viz", "--rle", ref)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _counts(proc.stderr) == (N_GOOD, 0, 0)
    assert len(_errors(proc.stderr)) == 1 and "s1_bad.jpg" in _errors(proc.stderr)[0]
    assert len(read_submission(ref)) == N_GOOD
    return {"root": root, "model": ckpt, "test": test, "ref": ref, "ref_masks": root / "ref_masks",
            "ref_errors": _errors(proc.stderr)}


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 2 * N_GOOD  # masks and overlays
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_without_ray_one_line_says_how_to_install(data, tmp_path):
    """Nothing imports Ray unless --ray-address is given; with it, a missing Ray is one line and exit code 2."""
    image = sorted(data["test"].iterdir())[0]
    base = [sys.executable, "-c", WITHOUT_RAY, "predict", str(image), "-m", str(data["model"]), "-o",
            str(tmp_path / "m.png"), "--rle", str(tmp_path / "s.csv")]
    plain = subprocess.run(base, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert plain.returncode == 0 and (tmp_path / "m.png").is_file(), plain.stdout + plain.stderr
    proc = subprocess.run([*base, "--ray-address", "auto"], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        'error: --ray-address needs Ray (with Ray Data): pip install "unet-deploy[ray]"']


@pytest.mark.ray
def test_ray_run_equals_single_process_predict(cluster, data, tmp_path):
    sub, masks = tmp_path / "sub.csv", tmp_path / "masks"
    proc = _predict(data["test"], "-m", data["model"], "-o", masks, "--viz", "--rle", sub,
                    "--ray-address", cluster["address"])
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the truncated JPEG, reported as predict does
    assert _errors(proc.stderr) == data["ref_errors"]
    assert _counts(proc.stderr) == (N_GOOD, 0, 0)
    assert "Ray: 3 actors of 1 CPU on 2 nodes" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sub.read_bytes() == data["ref"].read_bytes()
    _same_files(masks, data["ref_masks"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sub.csv.parts", "masks", "sub.csv"]  # no temp files


@pytest.mark.ray
def test_killed_driver_then_resume_redoes_only_the_rest(cluster, data, tmp_path):
    sub = tmp_path / "sub.csv"
    args = (data["test"], "-m", data["model"], "--no-save", "--rle", sub, "--ray-address", cluster["address"])
    killed = _predict(*args, **{CRASH_ENV: "0:5"})  # the driver exits abruptly after journaling 5 rows
    assert killed.returncode == 3, killed.stdout + killed.stderr
    assert not sub.exists()
    resumed = _predict(*args, "--ray-concurrency", "2", "--resume")
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    assert _counts(resumed.stderr) == (N_GOOD - 5, 0, 5)
    assert "Ray: 2 actors" in resumed.stderr
    assert sub.read_bytes() == data["ref"].read_bytes()  # each row once, in input order


@pytest.mark.ray
def test_resume_reuses_the_masks_an_earlier_run_wrote(cluster, data, tmp_path):
    masks, sub = tmp_path / "masks", tmp_path / "sub.csv"
    first = _predict(str(data["test"] / "s0_*.jpg"), "-m", data["model"], "-o", masks, "--viz")
    assert first.returncode == 0, first.stdout + first.stderr
    proc = _predict(data["test"], "-m", data["model"], "-o", masks, "--viz", "--rle", sub, "--resume",
                    "--ray-address", cluster["address"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _counts(proc.stderr) == (N_GOOD - 4, 4, 0)  # the 4 images of the first size were done
    assert sub.read_bytes() == data["ref"].read_bytes()
    _same_files(masks, data["ref_masks"])


@pytest.mark.ray
def test_worker_node_removed_midway_still_completes(cluster, data, tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    good = sorted(p for p in data["test"].iterdir() if p.name != "s1_bad.jpg")
    for copy in range(COPIES):
        for p in good:
            (many / f"c{copy}_{p.name}").write_bytes(p.read_bytes())
    ref = tmp_path / "ref.csv"
    assert _predict(many, "-m", data["model"], "--no-save", "--rle", ref).returncode == 0
    sub = tmp_path / "sub.csv"
    cmd = [sys.executable, "-m", "unet_deploy", "predict", many, "-m", data["model"], "--no-save", "--rle", sub,
           "--ray-address", cluster["address"]]
    proc = subprocess.Popen([str(c) for c in cmd], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        folder = journal_dir(sub)
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None and _rows(folder) < N_GOOD:
            time.sleep(0.02)
        assert proc.poll() is None and _rows(folder) < COPIES * N_GOOD, "the run ended before the node could be removed"
        cluster["cluster"].remove_node(cluster["worker"])  # its actors and the blocks it held are lost
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert _counts(stdout) == (COPIES * N_GOOD, 0, 0)
    assert "results from 2 nodes" in stdout  # the worker node predicted some before it went
    assert sub.read_bytes() == ref.read_bytes()


def _rows(folder: Path) -> int:
    return sum(max(0, len(p.read_bytes().splitlines()) - 1) for p in folder.glob("*.jsonl"))


def test_committed_ray_figures_are_the_render_of_the_committed_json():
    """benchmarks/RESULTS-ray.md holds no typed-in number: it is the render of benchmarks/results-ray.json."""
    proc = subprocess.run([sys.executable, "benchmarks/ray_predict.py", "--table", "benchmarks/results-ray.json"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (ROOT / "benchmarks" / "RESULTS-ray.md").read_text()
    result = json.loads((ROOT / "benchmarks" / "results-ray.json").read_text())
    assert f"Machine: {result['machine']['cpu']}" in proc.stdout and "not a speed-up" in proc.stdout
    assert {c["name"] for c in result["configs"]} >= {"predict --nproc 2 (torchrun)", "--ray-address, 2 nodes x 1 CPU"}
