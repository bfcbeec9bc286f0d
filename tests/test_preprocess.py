"""runtime/preprocess.py: bucket geometry against hand-computed values (docs/design/model.md §4.4), patch rows against
transformers' Qwen2-VL image processor and the ViT's Conv3d, upstream's uint8 rounding, and image decoding errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from runtime.spec import constants
from runtime.models.vit import Qwen25VisionPatchEmbed, VisionConfig
from runtime.pipeline.preprocess import (
    aspect_bucket,
    bucket_crop_box,
    bucket_table,
    center_crop_to_multiple,
    load_image,
    patchify,
    resize_to_bucket,
    to_uint8_image,
    vae_image_input,
    vit_image_input,
)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random content (bicubic-upsampled noise), so resampling and crop offsets change the pixels."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


# --- Buckets -----------------------------------------------------------------------------------------------------


def test_bucket_tables_hand_computed() -> None:
    # 672^2, 16:9: width first 896 -> height 504/16 = 31.5 -> 32 (half to even) -> 512x896, ratio 1.75;
    # height first 504 -> 512, width 910.2 -> 912 -> 512x912, ratio 1.781 (closer to 16/9): 512x912, crop-28 504x896.
    # 4:3: width first 776 -> 784, height 588 -> 592 (1.324); height first 582 -> 576, width 768 (1.3333): 576x768.
    vit = bucket_table(constants.VIT_RESOLUTION_IMAGE, 16)
    assert vit[constants.ASPECT_RATIOS.index((1, 1))] == (672, 672)
    assert vit[constants.ASPECT_RATIOS.index((16, 9))] == (512, 912)
    assert vit[constants.ASPECT_RATIOS.index((4, 3))] == (576, 768)
    vae = dict(zip(constants.ASPECT_RATIOS, bucket_table(constants.VAE_RESOLUTION_IMAGE, 16)))
    assert vae[(1, 1)] == (768, 768)
    assert vae[(16, 9)] == (576, 1024)
    assert vae[(4, 3)] == (672, 896)
    assert vae[(21, 9)] == (496, 1152)
    assert vae[(9, 16)] == (1024, 576) and vae[(3, 4)] == (896, 672)


def test_nearest_bucket() -> None:
    assert aspect_bucket(1080, 1920, 672) == (512, 912)
    assert aspect_bucket(800, 1000, 768) == (672, 896)      # 1.25: 4:3 (1.333) is nearer than 1:1
    assert aspect_bucket(1000, 800, 768) == (896, 672)      # 0.8: 3:4
    assert aspect_bucket(100, 1000, 768) == (496, 1152)     # very wide: 21:9
    assert aspect_bucket(1000, 100, 768) == (1024, 576)     # very tall: 9:16
    with pytest.raises(ValueError):
        aspect_bucket(0, 10, 768)


def test_crop_boxes_hand_computed() -> None:
    # 1000x800 (W x H) into 4:3 = 896/672: too tall -> full width, height round(1000 / 1.3333) = 750, top 25.
    assert bucket_crop_box(800, 1000, (672, 896)) == (0, 25, 1000, 775)
    # 800x1000 into 3:4: too wide -> full height, width 750, left 25.
    assert bucket_crop_box(1000, 800, (896, 672)) == (25, 0, 775, 1000)
    # 1920x1080 into 912/512 = 1.78125 (> 16/9): the first draw needs width 1922 > 1920 -> full width,
    # height round(1920 / 1.78125) = 1078, top 1.
    assert bucket_crop_box(1080, 1920, (512, 912)) == (0, 1, 1920, 1079)
    # An image already of the bucket's ratio is taken whole.
    assert bucket_crop_box(576, 1024, (576, 1024)) == (0, 0, 1024, 576)


def test_center_crop_offsets() -> None:
    x = torch.arange(33 * 60).reshape(1, 33, 60)
    crop = center_crop_to_multiple(x, 28)
    # H 33 -> 28: offset round(2.5) = 2 (half to even); W 60 -> 56: offset 2.
    assert crop.shape == (1, 28, 56)
    assert crop[0, 0, 0].item() == 2 * 60 + 2
    x = torch.arange(35 * 60).reshape(1, 35, 60)
    assert center_crop_to_multiple(x, 28)[0, 0, 0].item() == 4 * 60 + 2      # round(3.5) = 4


def test_vit_input_geometry() -> None:
    patches, grid = vit_image_input(random_image(1920, 1080, seed=0))
    assert grid == (1, 36, 64)                     # 504 x 896 after the crop to multiples of 28
    assert patches.shape == (36 * 64, 1176) and patches.dtype == torch.float32
    patches, grid = vit_image_input(random_image(640, 480, seed=1))
    assert grid == (1, 40, 54)                     # 576 x 768 -> 560 x 756
    patches, grid = vit_image_input(random_image(300, 300, seed=2))
    assert grid == (1, 48, 48) and patches.shape[0] // 4 == 576   # upsampled to 672^2: 576 LLM tokens


# --- Patch rows ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1000, 800), (640, 1100), (1920, 1080)])
def test_patch_rows_match_qwen2vl_processor(size: tuple[int, int]) -> None:
    processing = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    image = random_image(*size, seed=sum(size))
    patches, grid = vit_image_input(image)
    # The same resized pixels, cropped to multiples of 28 (centred offsets: the crops here are even).
    resized = resize_to_bucket(image, constants.VIT_RESOLUTION_IMAGE)
    height, width = resized.height // 28 * 28, resized.width // 28 * 28
    top, left = (resized.height - height) // 2, (resized.width - width) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    processor = processing.Qwen2VLImageProcessorPil(
        do_resize=False, image_mean=list(constants.VIT_MEAN), image_std=list(constants.VIT_STD)
    )
    out = processor(images=[cropped], return_tensors="np")
    assert tuple(out["image_grid_thw"][0]) == grid
    reference = torch.from_numpy(np.asarray(out["pixel_values"], dtype=np.float32))
    assert reference.shape == patches.shape
    assert torch.isfinite(patches).all()
    err = (patches - reference).abs().max().item()
    print(f"patches {size}: max-abs {err:.3e} vs Qwen2VLImageProcessor")
    assert err <= 1e-5


def test_patch_rows_feed_the_conv3d() -> None:
    """Patch rows through the ViT's MatMul == the Conv3d over the video, reordered into 2x2 merge groups."""
    config = VisionConfig.tiny(64)
    embed = Qwen25VisionPatchEmbed(config)
    torch.nn.init.normal_(embed.proj.weight, std=config.patch_dim**-0.5, generator=torch.Generator().manual_seed(0))
    video = torch.randn(3, 4, 56, 84, generator=torch.Generator().manual_seed(1))    # 2 temporal groups, 4 x 6 patches
    with torch.no_grad():
        rows = embed(patchify(video))
        conv = F.conv3d(video[None], embed.proj.weight, stride=embed.proj.stride)[0]  # (hidden, 2, 4, 6)
    conv = conv.reshape(-1, 2, 2, 2, 3, 2).permute(1, 2, 4, 3, 5, 0).reshape(-1, conv.shape[0])
    torch.testing.assert_close(rows, conv, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        patchify(torch.zeros(3, 2, 50, 56))


# --- VAE side ------------------------------------------------------------------------------------------------------


def test_vae_input_values() -> None:
    image = Image.new("RGB", (1000, 800), (255, 0, 51))
    x = vae_image_input(image)
    assert x.shape == (1, 3, 672, 896) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]), rtol=0, atol=1e-6)
    x = vae_image_input(random_image(1920, 1080, seed=3), area_side=512)
    assert x.shape == (1, 3, 384, 688) and x.min() >= -1 and x.max() <= 1


# --- Output rounding ---------------------------------------------------------------------------------------------


def test_to_uint8_rounding() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 1 / 255 - 1, 2 / 255 - 1]).reshape(1, 1, 7).expand(3, 1, 7)
    out = to_uint8_image(x)
    assert out.shape == (1, 7, 3) and out.dtype == np.uint8
    # 0 -> 127.5 -> 128 (half to even); 1/255 - 1 -> 0.5 -> 0; 2/255 - 1 -> 1.0 -> 1 (up to fp32 rounding)
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255, 0, 1]
    rng = np.random.default_rng(0)
    values = rng.uniform(-1.2, 1.2, (1, 3, 16, 24)).astype(np.float32)
    expected = np.round((np.clip(values[0], -1, 1) * np.float32(0.5) + np.float32(0.5)) * np.float32(255))
    expected = expected.astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(to_uint8_image(torch.from_numpy(values)), expected)
    with pytest.raises(ValueError):
        to_uint8_image(torch.zeros(4, 8, 8))


# --- Decoding ------------------------------------------------------------------------------------------------------


def test_load_image_modes(tmp_path) -> None:
    rgb = random_image(40, 30, seed=4)
    assert np.array_equal(np.asarray(load_image(encode(rgb))), np.asarray(rgb))
    path = tmp_path / "x.png"
    path.write_bytes(encode(rgb))
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(rgb))
    assert load_image(encode(rgb, "JPEG")).size == (40, 30)
    # Transparent pixels become white, as upstream composites RGBA on white.
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    loaded = np.asarray(load_image(encode(rgba)))
    assert loaded.shape == (4, 4, 3)
    assert loaded[1, 1].tolist() == [255, 255, 255] and loaded[0, 0].tolist() == [10, 20, 30]
    gray = Image.new("L", (5, 5), 77)
    assert load_image(encode(gray)).mode == "RGB"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, a valid IHDR claiming ``width x height`` and an empty IDAT: a header with no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"definitely not an image", "not a decodable"),
    (encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:-40], "corrupt or truncated"),
    (encode(Image.new("RGB", (8, 8)), "BMP"), "not a decodable"),       # outside the accepted formats
    (png_header_only(10_000, 5_000), "over the limit"),                 # refused before decoding
    (png_header_only(100_000, 100_000), "not a decodable|over the limit"),  # Pillow's own bomb guard
])
def test_load_image_rejects(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        load_image(data)
    assert "<_io." not in str(err.value) and " object at 0x" not in str(err.value)


def test_unrecognised_data_is_described_not_the_stream() -> None:
    with pytest.raises(ValueError) as err:
        load_image(b"GIF89a, not accepted")
    assert str(err.value) == "not a decodable PNG/JPEG/WEBP image (it starts with b'GIF89a, ')"


def test_load_image_pixel_limit_argument() -> None:
    data = encode(Image.new("RGB", (100, 60)))
    assert load_image(data, max_pixels=6000).size == (100, 60)
    with pytest.raises(ValueError, match="over the limit of 5999"):
        load_image(data, max_pixels=5999)
