"""Every limit of a Lance request, in one place: what the wire format accepts, what validation refuses, and what the
engine profiles (`runtime.spec.contract`) are sized for.

Validation rejects, it never rounds or clamps. A limit that is upstream's own choice cites it; the others are the
product's, each with the reason.
"""

from __future__ import annotations

# --- Output size -------------------------------------------------------------------------------------------------
SIZE_MULTIPLE = 16              # one latent cell (the VAE's spatial factor)
MIN_SIZE = 256
MAX_SIZE = 1024                 # 64 latent cells per side: the latent position table's extent

# --- Video ---------------------------------------------------------------------------------------------------------
FRAMES_STEP = 4                 # the VAE's temporal factor: 1 + 4k frames make 1 + k latent frames
MAX_FRAMES = 121                # 31 latent frames: the video checkpoint's position table (upstream's max_num_frames)
DEFAULT_FRAMES = 49             # upstream's inference_lance.sh: NUM_FRAMES 50, i.e. 13 latent frames, 49 decoded
VIDEO_FPS = 12                  # upstream saves its videos at 12 fps, and samples input videos at 12 fps
MAX_VIDEO_SECONDS = 6.0         # upstream's max_duration of an input video (its sampler spreads the frames over all)
MAX_INPUT_FRAMES = int(MAX_VIDEO_SECONDS * VIDEO_FPS) + 1
"""Frames sampled from an input video at most (73: 6 s at 12 fps, brought to 4k + 1)."""
MAX_VIDEO_AREA = 640 * 640
"""Output area of the video tasks at most: upstream's video_480p buckets (480 x 848 and its siblings). It bounds the
latent tokens of a video (121 frames: about 50k) and the ViT rows of an input video, and so the engines' profiles."""
MAX_VIDEO_BYTES = 64 * 2**20
"""Encoded size cap of an input video (64 MiB)."""

# --- Generation options --------------------------------------------------------------------------------------------
STEPS_RANGE = (1, 200)
MAX_NEW_TOKENS_RANGE = (1, 2048)
CFG_SCALE_RANGE = (1.0, 20.0)
SEED_MAX = 2**32 - 1
"""The CPU ``torch.Generator`` (mt19937) keeps only the low 32 bits of a seed (measured: ``manual_seed(5)`` and
``manual_seed(5 + 2**32)`` draw identical noise), so larger seeds would silently alias smaller ones."""

# --- Text ----------------------------------------------------------------------------------------------------------
MAX_PROMPT_TOKENS = 1024
"""The user text split; longer prompts are refused with a ``RequestError`` on ``prompt``."""
MAX_PROMPT_CHARS = 16 * MAX_PROMPT_TOKENS
"""A cheap bound applied before tokenization (no Qwen2 token is longer than 16 characters of ordinary text); the
pipeline then refuses prompts over `MAX_PROMPT_TOKENS` tokens."""
MAX_TEXT_ROWS = MAX_PROMPT_TOKENS + 256
"""Text rows of a whole plan: the user text plus the template around it."""

# --- Input images --------------------------------------------------------------------------------------------------
MAX_IMAGE_BYTES = 20 * 2**20
"""Encoded size cap (20 MiB); pixel limits are checked when the image is decoded."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Decoded input images: larger ones are refused before any resize."""
