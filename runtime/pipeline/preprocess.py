"""Image preprocessing for the ViT and the VAE, as upstream Lance does it (docs/design/model.md §4.4).

Upstream [L:data/datasets_custom/validation_dataset.py] builds two ``VideoTransform``s in ``bucket`` mode:

* ViT: bucket at area 672² (stride 16), center-crop to multiples of 28, CLIP mean/std, image repeated to 2 frames,
  patchified in Qwen2-VL order [L:data/data_utils.py ``patchify_video_with_merge``];
* VAE: bucket at area 768² (stride 16), center-crop to multiples of 16, mean/std 0.5 (values in [-1, 1]).

A bucket is the nearest-aspect-ratio entry of `constants.ASPECT_RATIOS` [L:data/video/transforms/bucket_resize.py];
the image is cropped to the bucket's ratio and resized to it by torchvision's ``RandomResizedCrop(scale=(1, 1),
ratio=(r, r))``, whose crop box we compute the same way (`bucket_crop_box`), and whose PIL path is PIL's own
``crop`` + ``resize(BICUBIC)``, called identically here: the pixels match upstream exactly (checked bit-exact
against upstream's transforms under torchvision 0.28 on 56 image sizes). One corner differs: when the image's ratio
is within rounding of the bucket's (e.g. 913x512 -> 912x512), torchvision's first draw succeeds and it picks the crop
offset within one pixel of slack at random; we take the centred offset, as its fallback does.

torchvision is not used: its PyPI wheel does not install beside the CPU torch wheel.
"""

from __future__ import annotations

import io
import logging
import math
import os
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from runtime.spec import constants
from runtime.models.vit import VisionConfig

logger = logging.getLogger(__name__)

BUCKET_STRIDE = 16              # NaResize's default stride, used by both upstream transforms
VAE_CROP_MULTIPLE = 16
VAE_MEAN = VAE_STD = 0.5
_VISION = VisionConfig()        # the real tower: patch 14, temporal patch 2, merge 2
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000   # decoded-pixel cap of `load_image` (~120 MB as RGB)
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


# --- Decoding --------------------------------------------------------------------------------------------------------


def load_image(
    data: bytes | str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    formats: Sequence[str] = DEFAULT_IMAGE_FORMATS,
) -> Image.Image:
    """Decode an image to RGB as upstream does: palette images via RGBA, alpha composited over white, every other
    mode converted with ``convert("RGB")`` (so LA/PA drop their alpha, as upstream); no EXIF rotation (upstream
    applies none).

    Args:
        data: encoded bytes or a file path.
        max_pixels: largest accepted ``width * height``, checked from the header before any pixel is decoded.
        formats: Pillow format names to try; the default leaves out formats whose decoders run external programs.
    Returns:
        A loaded RGB image.
    Raises:
        ValueError: empty, unrecognised, truncated or corrupt data, or an image over ``max_pixels``.
        FileNotFoundError: ``data`` is a path that does not exist.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ValueError("image data is empty")
        stream = io.BytesIO(data)
    else:
        stream = open(data, "rb")
    # Pillow raises many exception types on malformed input (OSError, SyntaxError, struct.error, ValueError, ...):
    # any failure to decode untrusted bytes is the caller's bad data, hence the broad catches below.
    with stream:
        try:
            image = Image.open(stream, formats=list(formats))
        except UnidentifiedImageError:
            # Pillow's own message names the stream object ("<_io.BytesIO object at 0x...>"): say what came instead.
            stream.seek(0)
            start = stream.read(8)
            raise ValueError(f"not a decodable {'/'.join(formats)} image (it starts with {start!r})") from None
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"not a decodable {'/'.join(formats)} image: {err}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
        try:
            image.load()
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"corrupt or truncated {image.format} image: {err}") from None
    logger.debug("decoded %s image %dx%d, mode %s", image.format, width, height, image.mode)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


# --- Videos ----------------------------------------------------------------------------------------------------------

VIDEO_FORMATS = ("mp4", "matroska", "avi")
"""The demuxers an input video may use, tried in order (MP4/MOV, Matroska/WebM, AVI). Forcing one keeps FFmpeg's
probing away from formats that open other files (HLS, concat); the MOV demuxer's external references stay off."""
DEFAULT_FPS = 24                # upstream's fallback when a video's average rate cannot be read


def sample_frame_indices(total: int, fps: float, sample_fps: int = 12, max_seconds: float = 6.0,
                         temporal: int = 4) -> list[int]:
    """The frames upstream's ``MultiClipsFrameSampler`` takes from a video of ``total`` frames at ``fps`` (inference
    settings: one clip, ``kn+1`` lengths, no truncation): ``n = round(min(duration, max_seconds) * sample_fps)``
    brought to ``temporal * k + 1``, spread evenly over the **whole** video (``linspace(0, total - 1, n)``, floored).

    Raises:
        ValueError: the video is too short for one frame at ``sample_fps``.
    """
    duration = min(total / fps, max_seconds)
    n = int(round(duration * sample_fps))
    n = n // temporal * temporal + 1 if n % temporal else n // temporal * temporal + 1 - temporal
    if total < 1 or n < 1:
        raise ValueError(f"the video holds {total} frames at {fps:g} fps: too short for one frame at {sample_fps} fps")
    return np.linspace(0, total - 1, n, dtype=int).tolist()


def _open_video(data: bytes):  # -> av.container.InputContainer
    import av

    for name in VIDEO_FORMATS:
        try:
            container = av.open(io.BytesIO(data), format=name)
        except (av.FFmpegError, ValueError) as err:
            logger.debug("not %s: %s", name, err)
            continue
        if container.streams.video:
            return container
        container.close()
    raise ValueError(f"not a decodable MP4, Matroska/WebM or AVI video with a video stream (it starts with "
                     f"{data[:8]!r})")


def load_video(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, sample_fps: int = 12,
               max_seconds: float = 6.0) -> list[Image.Image]:
    """The RGB frames upstream samples from an encoded video (`sample_frame_indices`; its rate rounded to an integer
    as decord's ``get_avg_fps`` is there, 24 when unknown).

    Raises:
        ValueError: not a video in `VIDEO_FORMATS`, frames over ``max_pixels``, too short, or truncated.
    """
    import av

    if not data:
        raise ValueError("video data is empty")
    with _open_video(data) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise ValueError(f"frames are {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
        fps = int(round(float(stream.average_rate))) if stream.average_rate else DEFAULT_FPS
        total = sum(1 for packet in container.demux(stream) if packet.size)
    wanted = sample_frame_indices(total, fps or DEFAULT_FPS, sample_fps, max_seconds)
    keep = set(wanted)
    frames: dict[int, Image.Image] = {}
    with _open_video(data) as container:
        try:
            for index, frame in enumerate(container.decode(video=0)):
                if index in keep:
                    frames[index] = frame.to_image().convert("RGB")
                if index >= wanted[-1]:
                    break
        except av.FFmpegError as err:
            raise ValueError(f"corrupt or truncated video after {len(frames)} sampled frames: {err}") from None
    missing = keep - set(frames)
    if missing:
        raise ValueError(f"truncated video: frame {min(missing)} of {total} cannot be decoded")
    logger.debug("decoded %d of %d frames (%dx%d, %d fps)", len(wanted), total, width, height, fps)
    return [frames[index] for index in wanted]


# --- Aspect-ratio buckets --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def bucket_table(area_side: int, stride: int = BUCKET_STRIDE) -> tuple[tuple[int, int], ...]:
    """``(height, width)`` per entry of `constants.ASPECT_RATIOS` (w:h), multiples of ``stride`` with area about
    ``area_side**2``, as upstream ``BucketResize.init_buckets``: fit the width first or the height first, keep the
    candidate whose ratio is closer to the nominal one (ties: area closer to the target, width-first on equal).
    Python's ``round`` (half to even) as upstream.
    """
    if stride < 1 or area_side < 2 * stride:
        # Below two strides the 21:9 bucket's short side rounds to zero.
        raise ValueError(f"need stride >= 1 and area_side >= 2 * stride, got area_side {area_side}, stride {stride}")
    area = area_side**2
    buckets = []
    for w_ratio, h_ratio in constants.ASPECT_RATIOS:
        ratio = w_ratio / h_ratio
        width1 = round(math.sqrt(area * ratio) / stride) * stride
        height1 = round(width1 / ratio / stride) * stride
        height2 = round(math.sqrt(area / ratio) / stride) * stride
        width2 = round(height2 * ratio / stride) * stride
        miss1, miss2 = abs(width1 / height1 - ratio), abs(width2 / height2 - ratio)
        if miss1 < miss2 or (miss1 == miss2 and abs(width1 * height1 - area) <= abs(width2 * height2 - area)):
            buckets.append((height1, width1))
        else:
            buckets.append((height2, width2))
    return tuple(buckets)


def aspect_bucket(height: int, width: int, area_side: int, stride: int = BUCKET_STRIDE) -> tuple[int, int]:
    """The ``(H, W)`` bucket for an image of ``height x width``: the first bucket whose ratio ``W / H`` is nearest
    ``width / height`` (upstream ``find_nearest_bucket``; the crop to multiples of 14/28/16 comes later)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    image_ratio = width / height
    return min(bucket_table(area_side, stride), key=lambda hw: abs(image_ratio - hw[1] / hw[0]))


def bucket_crop_box(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box that torchvision's ``RandomResizedCrop(scale=(1, 1),
    ratio=(r, r))`` cuts from a ``height x width`` image before resizing it to ``bucket``, with ``r = W / H``."""
    bucket_h, bucket_w = bucket
    ratio = bucket_w / bucket_h
    # torchvision draws log(r) as a float32 tensor and exponentiates it: reproduce that rounding.
    drawn = torch.exp(torch.log(torch.tensor([ratio, ratio]))[:1]).item()
    area = float(height * width)
    crop_w = int(round(math.sqrt(area * drawn)))
    crop_h = int(round(math.sqrt(area / drawn)))
    if not (0 < crop_w <= width and 0 < crop_h <= height):
        # torchvision's fallback: the largest centred box of ratio r.
        image_ratio = width / height
        if image_ratio < ratio:
            crop_w, crop_h = width, int(round(width / ratio))
        elif image_ratio > ratio:
            crop_w, crop_h = int(round(height * ratio)), height
        else:
            crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return left, top, left + crop_w, top + crop_h


def resize_to_bucket(image: Image.Image, area_side: int, stride: int = BUCKET_STRIDE) -> Image.Image:
    """Crop ``image`` to its bucket's ratio and resize it to the bucket with PIL bicubic (upstream ``BucketResize``)."""
    bucket = aspect_bucket(image.height, image.width, area_side, stride)
    box = bucket_crop_box(image.height, image.width, bucket)
    return image.crop(box).resize((bucket[1], bucket[0]), Image.Resampling.BICUBIC)


# --- Tensors ---------------------------------------------------------------------------------------------------------


def center_crop_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Crop ``(..., H, W)`` to the largest multiples of ``multiple``, centred with torchvision's ``center_crop``
    offsets (``round((H - h) / 2)``, half to even), as upstream ``DivisibleCrop``."""
    height, width = x.shape[-2:]
    crop_h, crop_w = height - height % multiple, width - width % multiple
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return x[..., top:top + crop_h, left:left + crop_w]


def _bucket_tensor(
    image: Image.Image, area_side: int, crop_multiple: int,
    mean: float | Sequence[float], std: float | Sequence[float],
) -> torch.Tensor:
    """Bucket resize, ``to_tensor`` (/255), crop to multiples, normalise: ``(3, H, W)`` float32."""
    image = resize_to_bucket(image.convert("RGB"), area_side)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    x = center_crop_to_multiple(x, crop_multiple)
    # torchvision's Normalize: sub then div by float32 tensors shaped (C, 1, 1) (or 0-d for a scalar).
    mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    if mean_t.ndim == 1:
        mean_t, std_t = mean_t.view(-1, 1, 1), std_t.view(-1, 1, 1)
    return x.sub(mean_t).div(std_t)


def patchify(video: torch.Tensor, config: VisionConfig = _VISION) -> torch.Tensor:
    """Qwen2-VL patch rows: groups of ``temporal_patch_size`` frames, then 2x2 merge groups in raster order, then the
    4 patches of a group in raster order; each row is ``(C, tp, p, p)`` flattened, the layout of the ViT's Conv3d.

    Args:
        video: ``(C, T, H, W)`` float, T a multiple of ``config.temporal_patch_size``, H and W of
            ``config.patch_size * config.spatial_merge_size``.
        config: the vision tower's patch, temporal patch and merge sizes.
    Returns:
        ``(T/tp * H/p * W/p, C * tp * p * p)``.
    Raises:
        ValueError: T, H or W not divisible as above.
    """
    channels, frames, height, width = video.shape
    p, tp, m = config.patch_size, config.temporal_patch_size, config.spatial_merge_size
    if frames % tp or height % (p * m) or width % (p * m):
        raise ValueError(f"video (T, H, W) = {(frames, height, width)} needs T % {tp} == 0 and H, W % {p * m} == 0")
    gt, gh, gw = frames // tp, height // p, width // p
    x = video.reshape(channels, gt, tp, gh // m, m, p, gw // m, m, p)
    # -> (gt, gh/m, gw/m, m, m, C, tp, p, p)
    x = x.permute(1, 3, 6, 4, 7, 0, 2, 5, 8)
    return x.reshape(gt * gh * gw, channels * tp * p * p)


def vit_image_input(
    image: Image.Image, area_side: int = constants.VIT_RESOLUTION_IMAGE
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """ViT input of one image: bucket at ``area_side**2`` (upstream's image_768res: 672), crop to multiples of 28,
    CLIP normalisation, the frame repeated to 2, Qwen2-VL patch rows.

    Returns:
        patches ``(P, 1176)`` float32 and ``grid_thw = (1, H / 14, W / 14)``; the LLM gets ``P / 4`` tokens.
    """
    x = _bucket_tensor(image, area_side, constants.VIT_CROP_MULTIPLE,
                       constants.VIT_MEAN, constants.VIT_STD)
    video = x[:, None].repeat(1, _VISION.temporal_patch_size, 1, 1)
    grid = (1, x.shape[1] // _VISION.patch_size, x.shape[2] // _VISION.patch_size)
    return patchify(video), grid


def vit_video_input(
    frames: Sequence[Image.Image], area_side: int = constants.VIT_RESOLUTION_VIDEO
) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
    """ViT input of sampled video frames: each frame as `vit_image_input` prepares it (one bucket, the frames share a
    size), an odd count padded by repeating the last frame (upstream), then patch rows per frame pair. The tower
    attends within one temporal patch only (its windows and its full-attention blocks are per ``t``), so running it
    per pair and concatenating in ``t`` order is the whole video's forward.

    Returns:
        patch rows ``(P, 1176)`` per frame pair, and the video's ``grid_thw = (T/2, H/14, W/14)``.
    """
    video = torch.stack([_bucket_tensor(frame, area_side, constants.VIT_CROP_MULTIPLE, constants.VIT_MEAN,
                                        constants.VIT_STD) for frame in frames], dim=1)
    tp = _VISION.temporal_patch_size
    if video.shape[1] % tp:
        video = torch.cat([video, video[:, -1:].repeat(1, tp - video.shape[1] % tp, 1, 1)], dim=1)
    pairs = [patchify(video[:, start:start + tp]) for start in range(0, video.shape[1], tp)]
    return pairs, (len(pairs), video.shape[2] // _VISION.patch_size, video.shape[3] // _VISION.patch_size)


def vae_video_input(frames: Sequence[Image.Image], area_side: int) -> torch.Tensor:
    """VAE input of sampled video frames: each frame as `vae_image_input` prepares it (they share one bucket).

    Returns:
        ``(1, 3, T, H, W)`` float32 in [-1, 1].
    """
    return torch.stack([_bucket_tensor(frame, area_side, VAE_CROP_MULTIPLE, VAE_MEAN, VAE_STD) for frame in frames],
                       dim=1)[None]


def vae_image_input(image: Image.Image, area_side: int = constants.VAE_RESOLUTION_IMAGE) -> torch.Tensor:
    """VAE input of one image: bucket at ``area_side**2`` (stride 16), crop to multiples of 16, scaled to [-1, 1].

    Returns:
        ``(1, 3, H, W)`` float32.
    """
    return _bucket_tensor(image, area_side, VAE_CROP_MULTIPLE, VAE_MEAN, VAE_STD)[None]


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """Decoded pixels to an image array with upstream's rounding: ``((x.clip(-1, 1) * 0.5 + 0.5) * 255).round()``
    in fp32 (half to even), then uint8.

    Args:
        x: ``(3, H, W)`` or ``(1, 3, H, W)`` float in [-1, 1].
    Returns:
        ``(H, W, 3)`` uint8.
    """
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}")
    pixels = x.detach().float().cpu().clip(-1, 1).mul(0.5).add(0.5).mul(255).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy()


def to_uint8_video(x: torch.Tensor) -> np.ndarray:
    """Decoded frames ``(1, 3, T, H, W)`` in [-1, 1] -> ``(T, H, W, 3)`` uint8, each frame rounded as
    `to_uint8_image` (upstream rounds its videos the same way)."""
    if x.ndim != 5 or tuple(x.shape[:2]) != (1, 3):
        raise ValueError(f"expected (1, 3, T, H, W), got {tuple(x.shape)}")
    return np.stack([to_uint8_image(x[0, :, index]) for index in range(x.shape[2])])
