"""Sharded prediction under torch.distributed.run (2 CPU processes) and the resumable RLE journal.

Every run is compared with one single-process reference run: the 2-process submission and masks must be
the same bytes. Crashes are simulated with predict's test hook (``_UNET_DEPLOY_TEST_CRASH_AFTER=RANK:K``
makes rank RANK exit abruptly after journaling K rows); the re-run with ``--resume`` must reuse exactly
the trusted journal rows, predict only the rest, and write each row once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARD_TEST_SIZES
from PIL import Image
from predict_summary import summary_counts

from unet_deploy.images.rle import read_submission
from unet_deploy.predict.resume import CRASH_ENV
from unet_deploy.predict.shard import JournalRow, JournalWriter, journal_dir, read_journal, rle_fits, split

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 4 * len(SHARD_TEST_SIZES)  # conftest.tiny_model_and_test_images: 4 JPEGs per size
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="400", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", CRASH_ENV):
        if key not in extra:
            env.pop(key, None)
    return env


def _single(*args: object, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unet_deploy", "predict", *map(str, args)], env=_env(**env),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _torchrun(*args: object, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "unet_deploy", "predict", *map(str, args)]
    return subprocess.run(cmd, env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=120)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _counts(out: str) -> tuple[int, int]:
    """(predicted, reused) from the one summary line of a run (printed by rank 0 only)."""
    counts = summary_counts(out)
    assert counts.total == N_IMAGES and counts.skipped == 0, out
    return counts.predicted, counts.reused


def _journal_rows(folder: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) - 1 for p in folder.glob("*.jsonl"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_and_test_images) -> dict[str, Path]:
    """A base-8 U-Net trained a few steps on synthetic cars, 12 test JPEGs of 3 sizes, and the single-process
    reference outputs (masks folder and submission)."""
    root = tmp_path_factory.mktemp("shard")
    ckpt, test = tiny_model_and_test_images(root)
    ref = root / "ref.csv"
    out = _ok(_single(test, "-m", ckpt, "-o", root / "ref_masks", "--rle", ref))
    assert _counts(out) == (N_IMAGES, 0)
    rows = read_submission(ref)
    assert [r[0] for r in rows] == sorted(p.name for p in test.iterdir())
    assert sum(bool(r[1]) for r in rows) >= N_IMAGES // 2  # most masks are not empty
    assert not journal_dir(ref).exists()
    return {"root": root, "model": ckpt, "test": test, "ref": ref, "ref_masks": root / "ref_masks"}


def _same_masks(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == N_IMAGES
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ------------------------------------------------------------------------------- 2 processes
@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_equal_single_process(setup, tmp_path):
    sub, masks = tmp_path / "sub.csv", tmp_path / "masks"
    out = _ok(_torchrun(setup["test"], "-m", setup["model"], "-o", masks, "--rle", sub))
    assert _counts(out) == (N_IMAGES, 0)
    assert "on 2 processes" in out
    assert sub.read_bytes() == setup["ref"].read_bytes()
    _same_masks(masks, setup["ref_masks"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks", "sub.csv"]  # journal removed, no temp files


@pytest.mark.distributed
@pytest.mark.slow
def test_crash_then_resume_reuses_trusted_rows_only(setup, tmp_path):
    sub = tmp_path / "sub.csv"
    args = (setup["test"], "-m", setup["model"], "--no-save", "--rle", sub)
    crashed = _torchrun(*args, **{CRASH_ENV: "1:2"})  # rank 1 dies after journaling 2 rows
    assert crashed.returncode != 0
    assert not sub.exists()
    folder = journal_dir(sub)
    files = sorted(folder.glob("*.jsonl"))
    assert len(files) == 2  # one per rank
    fp = json.loads(files[0].read_bytes().splitlines()[0].split(b" ", 1)[1])["fingerprint"]
    rows, untrusted = read_journal(folder, fp)
    done = len(rows)
    assert 2 <= done < N_IMAGES
    # A torn write (a row cut short) and, in a file of another rank, a row with a bad checksum and a
    # checksummed row whose runs leave the image: none of them may be trusted.
    first = files[1].read_bytes().splitlines()[1]
    with files[1].open("ab") as f:
        f.write(first[: len(first) // 2])
    pending = sorted(p for p in setup["test"].iterdir() if str(p) not in rows)
    w, h = Image.open(pending[0]).size
    forged = folder / "0-forged.rank0-of-1.jsonl"
    with JournalWriter(forged, fp) as jw:
        jw.append(JournalRow(str(pending[0]), pending[0].name, h, w, f"1 {w * h + 1}"))
    assert rle_fits("1 5", 1, 5) and not rle_fits(f"1 {w * h + 1}", h, w)
    lines = forged.read_bytes().splitlines(keepends=True)
    with forged.open("ab") as f:
        f.write(lines[1].replace(b'"rle":"1 ', b'"rle":"2 '))  # checksum no longer matches
    resumed = _ok(_torchrun(*args, "--resume"))
    assert _counts(resumed) == (N_IMAGES - done, done)
    assert f"{untrusted + 3} journal lines not trusted" in resumed
    assert sub.read_bytes() == setup["ref"].read_bytes()  # each row once, in input order
    assert not folder.exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_failed_input_fails_every_rank_and_keeps_the_journal(setup, tmp_path):
    """--nproc 2 relaunches under torchrun; a corrupt input fails the run on every rank, the submission holds
    the other rows, and a re-run after fixing the file predicts only that one."""
    test = tmp_path / "test"
    test.mkdir()
    for p in setup["test"].iterdir():
        (test / p.name).write_bytes(p.read_bytes())
    bad = sorted(test.iterdir())[5]
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:100])  # a truncated JPEG
    sub = tmp_path / "sub.csv"
    args = (test, "-m", setup["model"], "--no-save", "--rle", sub, "--batch-size", "1", "-t", "0.5")
    failed = _single(*args, "--nproc", "2")
    assert failed.returncode != 0
    assert failed.stderr.count(str(bad)) == 1, failed.stderr  # reported once, by the rank that had it
    assert re.search(r"rank\s*:\s*0", failed.stderr) and re.search(r"rank\s*:\s*1", failed.stderr)  # both exit 1
    assert "add --skip-existing" in failed.stderr
    ref = read_submission(setup["ref"])
    assert read_submission(sub) == [r for r in ref if r[0] != bad.name]
    assert journal_dir(sub).is_dir()
    bad.write_bytes(good_bytes)
    resumed = _ok(_single(*args, "--nproc", "2", "--skip-existing"))
    assert _counts(resumed) == (1, N_IMAGES - 1)
    assert sub.read_bytes() == setup["ref"].read_bytes()
    assert not journal_dir(sub).exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_nproc_stops_every_process_like_ctrl_c(setup, tmp_path):
    """SIGTERM to `predict --nproc 2` (a scheduler stopping the job): torchrun passes it to the workers, which
    stop as on Ctrl-C; one line, no traceback, exit code 143, no process left, and --resume goes on."""
    import signal
    import time

    import psutil

    folder = tmp_path / "in"
    folder.mkdir()
    source = next(setup["test"].iterdir()).read_bytes()
    n = 300
    for i in range(n):
        (folder / f"c{i:03d}.jpg").write_bytes(source)
    out, sub = tmp_path / "out", tmp_path / "sub.csv"
    args = [sys.executable, "-m", "unet_deploy", "predict", folder, "-m", setup["model"], "-o", out, "--rle", sub,
            "--nproc", "2"]
    proc = subprocess.Popen([str(a) for a in args], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("*.png"))) < 4:
            time.sleep(0.05)
        family = psutil.Process(proc.pid).children(recursive=True)  # torchrun and its 2 workers
        assert proc.poll() is None and len(family) >= 3, "predict finished before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stdout + stderr
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and "--resume" in lines[0], stderr
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    resumed = _ok(_single(folder, "-m", setup["model"], "-o", out, "--rle", sub, "--nproc", "2", "--resume"))
    counts = summary_counts(resumed)  # a mask written just before its journal row is "skipped (output exists)"
    assert counts.skipped <= 2, resumed  # at most one such file per process
    assert counts.reused + counts.skipped >= 4, resumed
    assert counts.predicted + counts.reused + counts.skipped == n and len(read_submission(sub)) == n


# ------------------------------------------------------------------------------- one process
@pytest.mark.slow
def test_single_process_crash_then_resume(setup, tmp_path):
    sub = tmp_path / "sub.csv"
    args = (setup["test"], "-m", setup["model"], "--no-save", "--rle", sub)
    assert _single(*args, **{CRASH_ENV: "0:5"}).returncode != 0
    assert _journal_rows(journal_dir(sub)) == 5
    again = _ok(_single(*args, "--resume"))
    assert _counts(again) == (N_IMAGES - 5, 5)
    assert sub.read_bytes() == setup["ref"].read_bytes()
    # without --resume a run starts over: the journal of a crashed run is dropped, nothing is reused
    assert _single(*args, **{CRASH_ENV: "0:3"}).returncode != 0
    assert _counts(_ok(_single(*args))) == (N_IMAGES, 0)
    assert sub.read_bytes() == setup["ref"].read_bytes()


@pytest.mark.slow
def test_resume_ignores_rows_of_other_options(setup, tmp_path):
    sub = tmp_path / "sub.csv"
    args = (setup["test"], "-m", setup["model"], "--no-save", "--rle", sub)
    assert _single(*args, "-t", "0.9", **{CRASH_ENV: "0:6"}).returncode != 0
    again = _ok(_single(*args, "--resume"))  # threshold 0.5: the 0.9 rows are not the same masks
    assert _counts(again) == (N_IMAGES, 0)
    assert "6 journal lines not trusted" in again
    assert sub.read_bytes() == setup["ref"].read_bytes()


def test_nproc_checks_the_model_before_launching(tmp_path):
    proc = _single(tmp_path, "-m", tmp_path / "missing.pth", "--nproc", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.pth'}: model file not found; train one with `unet-deploy train` or pass -m"]


# ------------------------------------------------------------------------------- pieces
def test_split_gives_each_input_to_one_rank():
    for n in (0, 1, 5, 12):
        for world in (1, 2, 3, 8):
            parts = [split(n, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_journal_trusts_complete_checksummed_rows_only(tmp_path):
    folder = tmp_path / ".s.csv.parts"
    with JournalWriter(folder / "a.rank0-of-2.jsonl", "fp") as jw:
        jw.append(JournalRow("d/x.jpg", "x.jpg", 2, 3, "1 2 5 2"))
        jw.append(JournalRow("d/y.jpg", "y.jpg", 2, 3, ""))
    with JournalWriter(folder / "b.rank1-of-2.jsonl", "fp") as jw:
        jw.append(JournalRow("d/x.jpg", "x.jpg", 2, 3, "2 1"))  # a later run's row replaces the older one
    with JournalWriter(folder / "c.rank0-of-1.jsonl", "other") as jw:
        jw.append(JournalRow("d/z.jpg", "z.jpg", 2, 3, "1 1"))  # another model / options
    data = (folder / "a.rank0-of-2.jsonl").read_bytes()
    (folder / "a.rank0-of-2.jsonl").write_bytes(data + data.splitlines(keepends=True)[1][:-5])  # torn tail
    rows, untrusted = read_journal(folder, "fp", last="b")
    assert {k: r.rle for k, r in rows.items()} == {"d/x.jpg": "2 1", "d/y.jpg": ""}
    assert untrusted == 2
    rows, _ = read_journal(folder, "fp", last="a")
    assert rows["d/x.jpg"].rle == "1 2 5 2"
    for bad in ("1", "0 2", "1 0", "5 3", "3 2 2 1", "1 -1", "a b", "１ 1"):
        assert not rle_fits(bad, 2, 3), bad
    assert read_journal(tmp_path / "none", "fp") == ({}, 0)


def test_nproc_relaunch_reproduces_the_parsed_command():
    """The workers' command line parses back to the same options (lists, flags, seed-style -i/-o, arguments)."""
    import typer

    from unet_deploy.cli import app
    from unet_deploy.cli._launch import command_args

    predict = typer.main.get_command(app).get_command(None, "predict")
    for argv in (["-m", "m.pth", "-i", "a.jpg", "b.jpg", "-o", "a.png", "b.png", "--tta", "--nproc", "2"],
                 ["d/", "x.jpg", "--no-save", "--rle", "s.csv", "--resume", "-t", "0.25", "--no-crf", "--nproc", "4"],
                 ["--nproc", "2", "--transposed", "--mask-values", "0,255", "-b", "3", "--", "--odd name.jpg"]):
        ctx = predict.make_context("predict", list(argv))
        args = command_args(ctx)
        assert args[0] == "predict" and "--nproc" not in args
        again = predict.make_context("predict", args[1:])
        assert {k: v for k, v in again.params.items() if k != "nproc"} == \
               {k: v for k, v in ctx.params.items() if k != "nproc"}


def test_model_digest_reuses_the_hash_taken_at_load(tmp_path):
    from unet_deploy.fileio import sha256_file
    from unet_deploy.predict.shard import model_digest

    f = tmp_path / "m.pth"
    f.write_bytes(b"weights")
    assert model_digest(f) == sha256_file(f)
    assert model_digest(f, {"path": str(f), "sha256": "feedbeef"}) == "feedbeef"  # not read again
    other = {"path": str(tmp_path / "source.pth"), "sha256": "feedbeef"}  # an export's source checkpoint
    assert model_digest(f, other) == sha256_file(f)
