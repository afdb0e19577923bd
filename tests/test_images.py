import cv2
import numpy as np
import pytest

from leukemia_mlops.data.images import (
    ImageDecodeError,
    area_downscale,
    bgr_to_rgb,
    cell_box,
    center_window,
    decode_bgr,
    to_training_image,
)


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def disc(size: int, radius: int, colour=(200, 100, 150)) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    cv2.circle(image, (size // 2, size // 2), radius, colour, -1)
    return image


def test_decode_keeps_bgr_order_until_converted_to_rgb():
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    decoded = decode_bgr(encode(bgr, ".bmp"))
    assert decoded[0, 0].tolist() == [255, 0, 0]
    assert bgr_to_rgb(decoded)[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize(
    "image",
    [
        np.full((10, 12), 90, np.uint8),
        np.full((10, 12, 4), 90, np.uint8),
        np.full((10, 12, 3), 90 * 257, np.uint16),
    ],
    ids=["grayscale", "rgba", "16-bit"],
)
def test_decode_brings_other_modes_to_8bit_rgb(image):
    decoded = decode_bgr(encode(image))
    assert decoded.shape == (10, 12, 3) and decoded.dtype == np.uint8
    assert int(decoded.max()) == 90


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty file"), (b"not an image at all", "not a decodable image")],
)
def test_decode_rejects_bad_bytes(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_bgr(data)


def test_decode_rejects_truncated_bmp():
    data = encode(disc(64, 20), ".bmp")
    with pytest.raises(ImageDecodeError):
        decode_bgr(data[: len(data) // 3])


def test_cell_box_finds_the_non_black_region():
    image = np.zeros((50, 60, 3), np.uint8)
    image[10:20, 30:45] = 100
    assert cell_box(image) == (30, 10, 45, 20)
    assert cell_box(np.zeros((5, 5, 3), np.uint8)) is None


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_cell_box_counts_a_pixel_bright_in_any_one_channel(channel):
    image = np.zeros((40, 30, 3), np.uint8)
    image[5, 7, channel] = 11
    image[30, 20, channel] = 10  # at the threshold: background
    assert cell_box(image) == (7, 5, 8, 6)


@pytest.mark.parametrize("source", [450, 1000, 257])
def test_area_downscale_matches_one_area_resize_within_a_grey_level(source):
    rng = np.random.default_rng(source)
    image = cv2.resize(rng.integers(0, 256, (40, 40, 3), np.uint8), (source, source))
    image = cv2.add(image, disc(source, source // 3))
    reference = cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA)
    scaled = area_downscale(image, 128)
    assert scaled.shape == (128, 128, 3)
    assert np.abs(scaled.astype(int) - reference).mean() < 0.5
    flat = np.full((source, source, 3), 77, np.uint8)
    assert (area_downscale(flat, 128) == 77).all()


def test_center_window_crops_and_pads_around_the_centre():
    image = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    framed = center_window(image, 8)
    assert framed.shape == (8, 8, 3)
    assert (framed[0] == 0).all() and (framed[-1] == 0).all()  # padded rows
    assert (framed[1:7] == image[:, 1:9]).all()  # cropped columns


def test_window_fit_keeps_absolute_cell_scale():
    small, large = disc(450, 60), disc(450, 78)
    area = [int((to_training_image(im, 90, 450).max(axis=2) > 10).sum()) for im in (small, large)]
    assert area[1] / area[0] == pytest.approx((78 / 60) ** 2, rel=0.1)
    # An image of another size is framed, not stretched: the same cell keeps its size.
    same_cell = center_window(small, 600)
    area_600 = int((to_training_image(same_cell, 90, 450).max(axis=2) > 10).sum())
    assert area_600 == pytest.approx(area[0], rel=0.02)


def test_box_fit_rescales_each_cell_to_the_frame():
    small, large = disc(450, 60), disc(450, 78)
    areas = [
        int((to_training_image(im, 90, 450, "box").max(axis=2) > 10).sum()) for im in (small, large)
    ]
    assert areas[0] == pytest.approx(areas[1], rel=0.05)


def test_unknown_fit_is_a_clear_error():
    with pytest.raises(ValueError, match=r"prepare\.fit"):
        to_training_image(disc(20, 5), 10, 20, "stretch")
