"""Image decoding of untrusted bytes (mmjax.data.decode): conversions, skips with reasons, crops."""

import io
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from mmjax.data import decode

NOISE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
_Y, _X = np.mgrid[0:48, 0:64]
SMOOTH = np.stack([_X * 4, _Y * 5, (_X + _Y) * 2], -1).astype(np.uint8)


def encode(image, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, fmt, **kw)
    return buf.getvalue()


def cmyk_profile(corners: dict) -> bytes:
    """A minimal ICC v2 CMYK printer profile: a 2-point lut8 A2B0 (CMYK -> Lab) whose corners
    {(c, m, y, k) in {0, 1}: (L, a, b)} are given (default white)."""

    def xyz(x, y, z):
        return b"".join(struct.pack(">i", round(v * 65536)) for v in (x, y, z))

    desc = b"desc\0\0\0\0" + struct.pack(">I", 5) + b"test\0" + b"\0" * 78
    clut = b"".join(
        bytes((round(L * 2.55), a + 128, b + 128))
        for L, a, b in (
            corners.get((c, m, y, k), (100, 0, 0))
            for c in (0, 1)
            for m in (0, 1)
            for y in (0, 1)
            for k in (0, 1)
        )
    )
    identity = bytes(range(256))
    matrix = b"".join(struct.pack(">i", 65536 if i % 4 == 0 else 0) for i in range(9))
    lut = b"mft1\0\0\0\0" + bytes((4, 3, 2, 0)) + matrix + identity * 4 + clut + identity * 3
    tags = [(b"desc", desc), (b"wtpt", b"XYZ \0\0\0\0" + xyz(0.9642, 1.0, 0.8249)), (b"A2B0", lut)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = struct.pack(">I", offset + len(data)) + b"lcms" + bytes((2, 0x10, 0, 0)) + b"prtrCMYKLab "
    header += b"\0" * 12 + b"acsp" + b"\0" * 28 + xyz(0.9642, 1.0, 0.8249)
    return header + b"\0" * (128 - len(header)) + struct.pack(">I", len(tags)) + table + data


@pytest.fixture
def pixel_limit():
    yield decode.set_limits
    decode.set_limits()


@pytest.mark.parametrize(
    "fmt, kw, exact",
    [
        ("PNG", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("BMP", {}, True),
        ("JPEG", {"quality": 95}, False),
        ("WEBP", {"quality": 90}, False),
    ],
)
def test_formats(fmt, kw, exact):
    image = NOISE if exact else SMOOTH
    out = decode.decode(encode(image, fmt, **kw))
    assert out.reason == "" and out.image.dtype == np.uint8 and out.image.shape == image.shape
    if exact:
        np.testing.assert_array_equal(out.image, image)
    else:  # lossy: close, not equal
        assert 0 < np.abs(out.image.astype(int) - image).mean() < 3


def test_bad_inputs_are_skips_with_reasons():
    jpeg, png, webp = encode(NOISE, "JPEG"), encode(NOISE, "PNG"), encode(NOISE, "WEBP")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    cases = {
        b"": "empty file",
        b"just some text, saved as photo.jpg\n": "not an image",
        eps: "not an image",  # Pillow could open it, through Ghostscript: not an allowed format
        jpeg[: len(jpeg) // 2]: "truncated or corrupt",
        png[: len(png) // 2]: "truncated or corrupt",
        webp[: len(webp) // 2]: "truncated or corrupt",
        jpeg[:40]: "truncated or corrupt",
    }
    for data, reason in cases.items():
        out = decode.decode(data)
        assert (out.image, out.reason) == (None, reason), data[:20]


def test_cmyk_plain_and_through_its_icc_profile():
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    plain = decode.decode(encode(cyan, "JPEG", quality=95)).image
    np.testing.assert_allclose(plain[0, 0], (0, 255, 255), atol=3)
    # a profile that prints pure cyan as red: the ICC conversion, not the naive one, was used
    profile = cmyk_profile({(1, 0, 0, 0): (54, 80, 67)})
    managed = decode.decode(encode(cyan, "JPEG", quality=95, icc_profile=profile)).image
    assert managed.shape == (8, 8, 3)
    assert managed[0, 0, 0] > 230 and managed[0, 0, 1] < 40 and managed[0, 0, 2] < 40
    # a broken profile falls back to the naive conversion
    broken = decode.decode(encode(cyan, "JPEG", quality=95, icc_profile=b"not a profile" * 20)).image
    np.testing.assert_allclose(broken[0, 0], (0, 255, 255), atol=3)


def test_grayscale_and_16_bit_scaled_not_clamped():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = decode.decode(encode(gray, "PNG")).image
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))
    deep = np.array([[0, 257, 32768, 65535]], np.uint16)
    im = Image.fromarray(deep)
    assert im.mode == "I;16"
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # stored and read back as 16-bit
    np.testing.assert_array_equal(decode.decode(data).image[0, :, 0], [0, 1, 128, 255])


def test_transparency_is_composited_onto_white():
    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0: black, 1: red
    pal.putdata([0, 0, 1, 1] * 2)
    out = decode.decode(encode(pal, "PNG", transparency=0)).image
    np.testing.assert_array_equal(out[:, :2], 255)  # transparent black -> white, not black
    np.testing.assert_array_equal(out[:, 2:], np.broadcast_to((255, 0, 0), (2, 2, 3)))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # half-transparent red
    out = decode.decode(encode(rgba, "PNG")).image
    np.testing.assert_allclose(out[0, 0], (255, 127, 127), atol=1)
    la = np.zeros((2, 2, 2), np.uint8)  # fully transparent black
    assert (decode.decode(encode(Image.fromarray(la, "LA"), "PNG")).image == 255).all()


def test_exif_rotation():
    image = np.zeros((10, 20, 3), np.uint8)  # left half red, right half blue
    image[:, :10], image[:, 10:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = decode.decode(encode(image, "JPEG", quality=95, exif=exif.tobytes())).image
    assert out.shape == (20, 10, 3)  # width and height swapped
    assert out[3, 5, 0] > 200 and out[3, 5, 2] < 50  # the left half is now on top
    assert out[16, 5, 2] > 200 and out[16, 5, 0] < 50


def test_decompression_bomb(pixel_limit):
    pixel_limit(100 * 100)
    assert (
        decode.decode(encode(np.zeros((110, 110), np.uint8), "PNG")).reason == "decompression bomb"
    )  # Pillow warns
    assert (
        decode.decode(encode(np.zeros((300, 300), np.uint8), "PNG")).reason == "decompression bomb"
    )  # Pillow raises
    assert decode.decode(encode(np.zeros((100, 100), np.uint8), "PNG")).image.shape == (100, 100, 3)
    with warnings.catch_warnings():  # Pillow's warning reset to a warning: decode's own check skips it
        warnings.simplefilter("ignore")
        assert decode.decode(encode(np.zeros((110, 110), np.uint8), "PNG")).reason == "decompression bomb"


def test_large_jpeg_decodes_at_reduced_size():
    y, x = np.mgrid[0:768, 0:1024]
    smooth = np.stack([x / 4, y / 3, (x + y) / 7], -1).astype(np.uint8)
    data = encode(smooth, "JPEG", quality=95)
    full, small = decode.decode(data).image, decode.decode(data, target=64).image
    assert full.shape == (768, 1024, 3)
    assert small.shape == (96, 128, 3)  # 1/8 scale: both sides still >= 64
    reduced = np.asarray(Image.fromarray(full).resize((128, 96), Image.Resampling.BOX))
    assert np.abs(small.astype(int) - reduced).mean() < 3
    assert decode.decode(data, target=500).image.shape == (768, 1024, 3)  # 1/2 would be < 500


def test_resize_crop_modes():
    image = np.zeros((20, 40, 3), np.uint8)  # red | green (the middle half) | blue
    image[:, :10], image[:, 10:30], image[:, 30:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    centre = decode.resize_crop(image, 20, "center_crop")
    np.testing.assert_array_equal(centre, np.broadcast_to((0, 255, 0), (20, 20, 3)))
    squashed = decode.resize_crop(image, 20, "resize")
    assert squashed.shape == (20, 20, 3)
    assert (squashed[:, 1] == (255, 0, 0)).all() and (squashed[:, 18] == (0, 0, 255)).all()
    assert (squashed[:, 7:13] == (0, 255, 0)).all()
    half = decode.resize_crop(image, 10, "center_crop")
    assert half.shape == (10, 10, 3) and (half[:, 1:-1] == (0, 255, 0)).all()
    assert (half[:, :, 1] > 200).all()  # the edge columns' filters reach past the crop, as a resize would
    with pytest.raises(ValueError, match="random_crop"):
        decode.resize_crop(image, 20, "random_crop")
    with pytest.raises(ValueError, match="crop mode"):
        decode.resize_crop(image, 20, "zoom")


def test_random_crop_and_flip_are_deterministic_per_rng():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :, 0] = np.arange(40) * 6  # a horizontal ramp: the crop offset and flip are visible

    def crop(seed, **kw):
        return decode.resize_crop(image, 20, "random_crop", np.random.default_rng(seed), **kw)

    np.testing.assert_array_equal(crop(3), crop(3))
    starts = {int(crop(s)[0, 0, 0]) // 6 for s in range(40)}
    assert len(starts) > 10 and starts <= set(range(21))  # many offsets, all inside the image
    flipped = [crop(s, flip=True)[0, :, 0] for s in range(20)]
    directions = {bool(f[0] > f[-1]) for f in flipped}
    assert directions == {True, False}  # both mirrored and unmirrored crops occur
    np.testing.assert_array_equal(crop(5, flip=True), crop(5, flip=True))
