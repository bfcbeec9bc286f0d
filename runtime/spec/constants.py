"""Lance constants that upstream keeps in code, shell scripts and config factories rather than in any
shipped JSON. One place for all of them; every value cites where upstream sets it (docs/design/model.md tags).
"""

from __future__ import annotations

# --- Checkpoint layout (HF repo bytedance-research/Lance) [L:config/path_default.yaml] ---------------
HF_REPO_ID = "bytedance-research/Lance"
IMAGE_CKPT_DIR = "Lance_3B"
VIDEO_CKPT_DIR = "Lance_3B_Video"
VIT_DIR = "Qwen2.5-VL-ViT"
VAE_FILE = "Wan2.2_VAE.pth"
LLM_WEIGHTS_FILE = "model.safetensors"
LLM_CONFIG_FILE = "llm_config.json"
VIT_WEIGHTS_FILE = "vit.safetensors"
VIT_CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")

# --- Special tokens: stock Qwen2.5 ids [L:data/data_utils.py add_special_tokens; docs/design/model.md §6] ----
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
# Every special token of stock Qwen2.5 with its id; the tokenizer length is 151665.
QWEN2_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
TOKENIZER_LEN = 151665
# Lance uses <|video_pad|> as the placeholder of every visual block [L:inference_lance.py].
VISUAL_PLACEHOLDER_ID = QWEN2_SPECIAL_TOKENS[VIDEO_PAD]

# --- Generation side [L:inference_lance.sh, L:modeling/lance/lance.py; docs/design/model.md §2] ------------
LATENT_CHANNELS = 48            # Wan2.2 z_dim; latent_patch_size (1,1,1) => one token per latent cell
VAE_DOWNSAMPLE_SPATIAL = 16
VAE_DOWNSAMPLE_TEMPORAL = 4
MAX_LATENT_SIZE = 64            # latent cells per side => 1024 px
LATENT_POS_SPLIT_DIVISOR = 3    # 3-D sin-cos table: d//3 (even) for t and h, the rest for w
TIMESTEP_EMBED_DIM = 256        # DiT timestep frequency embedding size

# --- Sampling defaults [L:inference_lance.sh; L:config/config_factory.py; docs/design/model.md §3] --------
DEFAULT_STEPS = 30
DEFAULT_TIMESTEP_SHIFT = 3.5
DEFAULT_CFG_SCALE = 4.0
CFG_INTERVAL = (0.4, 1.0)       # CFG active iff lo < t <= hi
CFG_RENORM_MIN = 0.0
DEFAULT_SEED = 42
DEFAULT_HEIGHT = 768
DEFAULT_WIDTH = 768
DEFAULT_MAX_NEW_TOKENS = 256

# --- Wan2.2 latent normalisation [L:modeling/vae/wan/vae2_2.py = W:wan/modules/vae2_2.py] ----------
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

# --- Image preprocessing [L:data/datasets_custom/validation_dataset.py; docs/design/model.md §4.4] ----------
VIT_MEAN = (0.48145466, 0.4578275, 0.40821073)
VIT_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_CROP_MULTIPLE = 28
VIT_RESOLUTION_IMAGE = 672      # image_768res -> ViT side 672
VAE_RESOLUTION_IMAGE = 768      # image_768res -> VAE side 768
VIT_RESOLUTION_VIDEO = 616      # video_480p -> ViT side 616 (input videos of x2t and video edit)
ASPECT_RATIOS = ((21, 9), (16, 9), (4, 3), (1, 1), (3, 4), (9, 16))

# --- Prompts [L:data/common.py generate_system_prompt; L:common/val/instructions.py] ---------------
SYSTEM_PROMPT_T2I = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, spatial "
    "relationships of the objects and background:"
)
SYSTEM_PROMPT_T2V = (
    "Describe the video by detailing the color, quantity, visible text, shape, size, texture, spatial "
    "relationships and motion/camera movements of the objects and background:"
)


def system_prompt_edit(vision_type: str = "image") -> str:
    """Edit system prompt; upstream spells "user’s" with the typographic apostrophe (U+2019)."""
    return (
        f"Describe the key features of the input {vision_type} (color, shape, size, texture, objects, "
        f"background), then explain how the user\u2019s text instruction should alter or modify the "
        f"{vision_type}. Generate a new {vision_type} that meets the user\u2019s requirements while "
        f"maintaining consistency with the original input where appropriate."
    )


X2T_QA_INSTRUCTION = "Look at the image carefully and answer the question."
X2T_VIDEO_QA_INSTRUCTION = "Watch the video carefully and answer the question."   # config/examples/x2t_video_example

# --- MaPE (modality-aware RoPE) offsets [L:data/common.py shift_position_ids pro_type=10] ----------
MAPE_VIT_T_OFFSET = 1000
MAPE_REF_IMAGE_T_OFFSET = 2000
