"""Kaggle RLE encoding/decoding and the Carvana submission file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unet_deploy.errors import UserError
from unet_deploy.images.rle import read_submission, rle_decode, rle_encode, write_submission


def test_hand_computed_3x4():
    mask = np.array([[0, 1, 1, 0],
                     [1, 0, 0, 1],
                     [1, 1, 1, 1]], dtype=np.uint8)
    # flattened: 0110 1001 1111 -> runs at 1-indexed 2 (len 2), 5 (len 1), 8 (len 5)
    assert rle_encode(mask) == "2 2 5 1 8 5"
    np.testing.assert_array_equal(rle_decode("2 2 5 1 8 5", (3, 4)), mask)


def test_run_touching_both_ends():
    mask = np.array([[1, 0, 0], [0, 0, 1]])
    assert rle_encode(mask) == "1 1 6 1"


def test_nonzero_values_are_foreground():
    mask = np.array([[0, 255, 7], [0, -1, 0]], dtype=np.int16)
    assert rle_encode(mask) == "2 2 5 1"
    assert rle_encode(mask.astype(bool)) == "2 2 5 1"


def test_empty_and_full():
    assert rle_encode(np.zeros((5, 7), np.uint8)) == ""
    assert rle_encode(np.ones((5, 7), np.uint8)) == "1 35"
    np.testing.assert_array_equal(rle_decode("", (5, 7)), np.zeros((5, 7), np.uint8))
    np.testing.assert_array_equal(rle_decode("  \n", (5, 7)), np.zeros((5, 7), np.uint8))
    np.testing.assert_array_equal(rle_decode("1 35", (5, 7)), np.ones((5, 7), np.uint8))


@pytest.mark.parametrize("r,c", [(0, 0), (2, 3), (4, 0), (0, 6), (4, 6)])
def test_row_major_single_pixel(r, c):
    h, w = 5, 7
    mask = np.zeros((h, w), np.uint8)
    mask[r, c] = 1
    assert rle_encode(mask) == f"{r * w + c + 1} 1"
    decoded = rle_decode(f"{r * w + c + 1} 1", (h, w))
    assert decoded[r, c] == 1 and decoded.sum() == 1


def test_decode_dtype_and_values():
    out = rle_decode("3 4", (2, 5))
    assert out.dtype == np.uint8 and out.shape == (2, 5)
    assert set(np.unique(out)) == {0, 1}


@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 0.98, 1.0])
def test_random_round_trip(density):
    rng = np.random.default_rng(int(density * 100))
    for shape in [(1, 1), (1, 13), (17, 1), (31, 29), (64, 96)]:
        mask = (rng.random(shape) < density).astype(np.uint8)
        rle = rle_encode(mask)
        np.testing.assert_array_equal(rle_decode(rle, shape), mask)
        # pairs are strictly increasing and never touch (encoder merges adjacent pixels)
        nums = [int(t) for t in rle.split()]
        assert len(nums) % 2 == 0
        starts, lengths = np.array(nums[::2]), np.array(nums[1::2])
        assert (starts[1:] > starts[:-1] + lengths[:-1]).all()


def test_matches_naive_encoder():
    rng = np.random.default_rng(1)
    mask = rng.random((20, 30)) < 0.4
    flat = mask.flatten()
    runs, i = [], 0
    while i < flat.size:
        if flat[i]:
            j = i
            while j < flat.size and flat[j]:
                j += 1
            runs += [i + 1, j - i]
            i = j
        else:
            i += 1
    assert rle_encode(mask) == " ".join(map(str, runs))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_round_trip_through_mask_image(tmp_path, fmt):
    yy, xx = np.mgrid[:120, :180]
    mask = ((((yy - 60) / 40) ** 2 + ((xx - 90) / 70) ** 2) < 1).astype(np.uint8)
    mask[10:14, 5:9] = 1
    path = tmp_path / f"car_mask.{fmt.lower()}"
    if fmt == "PNG":
        Image.fromarray(mask * 255, mode="L").save(path)
    else:  # Carvana's train_masks are palette GIFs with values 0/1
        img = Image.fromarray(mask, mode="P")
        img.putpalette([0, 0, 0, 255, 255, 255] + [0] * (256 * 3 - 6))
        img.save(path)
    loaded = np.array(Image.open(path))
    assert loaded.shape == mask.shape
    rle = rle_encode(loaded)
    decoded = rle_decode(rle, loaded.shape)
    np.testing.assert_array_equal(decoded, mask)
    np.testing.assert_array_equal(decoded, (loaded != 0).astype(np.uint8))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_encode_rejects_non_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros(shape))


@pytest.mark.parametrize("rle,match", [
    ("1", "odd number"),
    ("1 2 3", "odd number"),
    ("1 x", "not an integer"),
    ("1.5 2", "not an integer"),
    ("0 2", "1-indexed"),
    ("-3 2", "1-indexed"),
    ("1 0", "length"),
    ("3 -1", "length"),
    ("10 2", "ends past"),
    ("11 1", "ends past"),
    ("5 2 1 1", "out of order"),
    ("1 3 3 1", "overlaps"),
])
def test_decode_rejects_malformed(rle, match):
    with pytest.raises(ValueError, match=match):
        rle_decode(rle, (2, 5))


def test_decode_accepts_touching_runs():
    np.testing.assert_array_equal(rle_decode("1 2 3 1", (1, 4)), [[1, 1, 1, 0]])


def test_decode_rejects_bad_shape():
    with pytest.raises(ValueError, match="2-D shape"):
        rle_decode("1 1", (4,))


def test_encode_speed_full_size():
    import time

    yy, xx = np.mgrid[:1280, :1918]
    mask = (((yy - 640) / 400) ** 2 + ((xx - 959) / 800) ** 2) < 1
    rle_encode(mask)
    start = time.perf_counter()
    rle = rle_encode(mask)
    assert time.perf_counter() - start < 0.5  # a few ms in practice; generous for slow CI
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask)


# --- submission file ----------------------------------------------------------------------------------

def test_submission_round_trip(tmp_path):
    path = tmp_path / "sub" / "submission.csv"
    rows = [("0cdf5b5d0ce1_01.jpg", "2 2 5 1 8 5"), ("0cdf5b5d0ce1_02.jpg", "")]
    assert write_submission(path, iter(rows)) == 2
    assert path.read_text() == "img,rle_mask\n0cdf5b5d0ce1_01.jpg,2 2 5 1 8 5\n0cdf5b5d0ce1_02.jpg,\n"
    assert read_submission(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]


def test_submission_generator_failure_leaves_original(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("img,rle_mask\nold.jpg,1 1\n")

    def rows():
        yield "a.jpg", "1 1"
        yield "b.jpg", "3 2"
        raise RuntimeError("prediction crashed")

    with pytest.raises(RuntimeError, match="prediction crashed"):
        write_submission(path, rows())
    assert path.read_text() == "img,rle_mask\nold.jpg,1 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def test_submission_failure_creates_nothing(tmp_path):
    path = tmp_path / "submission.csv"
    with pytest.raises(ValueError, match="image name"):
        write_submission(path, [("a,b.jpg", "1 1")])
    assert list(tmp_path.iterdir()) == []


def test_read_submission_bad_header(tmp_path):
    path = tmp_path / "wrong.csv"
    path.write_text("id,mask\na.jpg,1 1\n")
    with pytest.raises(UserError, match="wrong.csv") as exc:
        read_submission(path)
    assert "img,rle_mask" in str(exc.value) and "\n" not in str(exc.value)


def test_read_submission_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.csv"):
        read_submission(empty)
    with pytest.raises(UserError, match="missing.csv.*not found"):
        read_submission(tmp_path / "missing.csv")


def test_read_submission_bad_row(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("img,rle_mask\na.jpg,1 1\nb.jpg,1 1,extra\n")
    with pytest.raises(UserError, match=r"sub.csv:3"):
        read_submission(path)
