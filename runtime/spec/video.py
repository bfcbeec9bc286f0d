"""Video files on both sides of the wire: MP4 written from generated frames (``lance-trt run``, ``lance-client``).

PyAV (``av``) is imported when a video is written: its wheels carry their own FFmpeg, so no system codec is needed,
and neither the client nor the spec imports it until a video task runs. H.264 in yuv420p is what every player opens;
it needs even sides, which every Lance video has (sides are multiples of 16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.spec.limits import VIDEO_FPS


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> None:
    """Write ``(T, H, W, 3)`` uint8 RGB frames to ``path`` as H.264 MP4 at ``fps``: exactly ``T`` frames.

    Raises:
        ValueError: ``frames`` is not a non-empty ``(T, H, W, 3)`` uint8 array with even sides.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 in yuv420p needs even sides, got {frames.shape[2]}x{frames.shape[1]}")
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "17"}     # visually lossless: the file is the product
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def read_frames(path: str | Path) -> np.ndarray:
    """Every frame of a video file as ``(T, H, W, 3)`` uint8 RGB (tests and tools read back what was written)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
