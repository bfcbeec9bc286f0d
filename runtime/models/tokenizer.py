"""Lance's tokenizer: stock Qwen2.5 byte-level BPE (docs/design/model.md §6).

Two jobs:

* `load_tokenizer(dir)` loads the tokenizer files of a checkpoint folder (`Lance_3B/` or `Lance_3B_Video/`) and reads
  the ids the pipeline needs into `SpecialIds`, refusing a tokenizer whose special tokens are not at the stock Qwen2.5
  ids (`constants.QWEN2_SPECIAL_TOKENS`) that the checkpoint's embedding rows were trained with.
* `build_tokenizer_files(out_dir)` writes a small but real tokenizer in exactly Qwen2's format for tiny checkpoints:
  Qwen2's normaliser, pre-tokenizer, byte-level model and decoder, a few hundred merges learned from a built-in text
  (so English tokenizes into multi-byte tokens), the vocabulary filled densely up to id 151642 and the 22 special tokens
  at their real ids, hence `len(tokenizer) == 151665` as for stock Qwen2.5.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, Qwen2TokenizerFast

from runtime.spec import constants

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenizer split (transformers `models/qwen2/tokenization_qwen2.py` PRETOKENIZE_REGEX, same in the
# tokenizer.json Qwen ships): contractions, letter runs with one optional leading non-letter, single digits,
# punctuation runs, newlines, spaces.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Ids below this are ordinary BPE tokens in stock Qwen2.5 (vocab.json holds exactly these); specials start here.
_FIRST_SPECIAL_ID = min(constants.QWEN2_SPECIAL_TOKENS.values())
# Qwen2.5 marks these added tokens "special": false (they survive `skip_special_tokens=True` when decoding).
_NON_SPECIAL_ADDED = frozenset(
    ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
     "<|repo_name|>", "<|file_sep|>")
)
# Qwen2.5(-VL) special-token map: no BOS, EOS = <|im_end|> (also llm_config's eos_token_id), PAD = <|endoftext|>.
_ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
)
_MODEL_MAX_LENGTH = 131072
# The one file loading needs: the fast tokenizer reads its vocabulary, merges and added tokens from it (vocab.json,
# merges.txt and tokenizer_config.json are written and fetched too, but the real repo's set is not verified).
TOKENIZER_JSON = "tokenizer.json"
_MAX_MERGES = 2000

# Text the tiny tokenizer's merges are learned from: the prompts Lance really sends plus ordinary English, so the
# prompts of the tests tokenize into multi-byte tokens, as they do with the real vocabulary.
_TRAINING_TEXT = (
    constants.SYSTEM_PROMPT_T2I,
    constants.SYSTEM_PROMPT_T2V,
    constants.system_prompt_edit("image"),
    constants.system_prompt_edit("video"),
    constants.X2T_QA_INSTRUCTION,
    "A photo of a red apple on a wooden table next to a glass of water.",
    "A small cat is sitting on the window and looking at the birds in the garden.",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the mountains.",
    "Make the sky blue and add two white clouds above the house.",
    "What is the color of the car in the image? The car in the image is red.",
    "A cinematic video of a dog running along the beach at sunset, the camera follows it slowly.",
    "There are three people standing in front of a large building with many windows.",
    "Generate an image of a city street at night with bright lights and tall buildings.",
    "She said that it's the best painting they've ever seen, and we'll keep it in the living room.",
    "Two children are playing with a yellow ball in the park, and their parents are watching them from a bench.",
    "Replace the background with a snowy forest and keep the person in the center of the picture unchanged.",
    "An old man with a long white beard is reading a book by the fire in a cozy room.",
    "Describe what is happening in this video: a woman opens the door and walks into the kitchen.",
    "The text on the sign says 'Welcome' in large green letters; the sign is made of metal.",
    "Remove the person on the left, change the weather to rain and make the colors warmer.",
    "system\nuser\nassistant\n",
)


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the Lance pipeline uses, read from the loaded tokenizer and checked against the stock Qwen2.5 ids.

    `len` is `len(tokenizer)` (151665): ids at or above it are padding rows of the 151936-row embedding / lm_head
    and must be masked out of the logits before sampling.
    """

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    video_pad: int
    endoftext: int
    newline: int
    len: int


class TokenizerError(ValueError):
    """The tokenizer files do not match what Lance's checkpoint was trained with."""


def _byte_alphabet() -> list[str]:
    """The 256 byte-level characters in GPT-2 `bytes_to_unicode` order: printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards. Qwen2's vocab.json starts with exactly this order ("!" = 0, "\\n" = 198)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return [chars[b] for b in (*printable, *shifted)]


def _qwen2_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Attach Qwen2's normaliser, pre-tokenizer, post-processor and decoder (as in Qwen2.5's tokenizer.json)."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tokenizer


def _learn_merges() -> list[tuple[str, str]]:
    """Byte-level BPE merges learned from `_TRAINING_TEXT`, in rank order.

    Deterministic: every byte is in the initial alphabet, so the trainer assigns no ids in hash order, and it breaks
    count ties by pair id.
    """
    trainer_tokenizer = _qwen2_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=256 + _MAX_MERGES, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    trainer_tokenizer.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    merges = json.loads(trainer_tokenizer.to_str())["model"]["merges"]
    # tokenizers serialises a merge as "a b" (older releases) or ["a", "b"] (newer ones).
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _dense_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Ids 0..151642: the byte alphabet, one token per merge in rank order, then unique filler tokens.

    Fillers are never produced by encoding (no merge builds them) and decode to readable ASCII.
    """
    tokens = [*_byte_alphabet(), *(a + b for a, b in merges)]
    tokens += [f"<filler{i}>" for i in range(len(tokens), _FIRST_SPECIAL_ID)]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == _FIRST_SPECIAL_ID, "a merge or filler token collides with another token"
    return vocab


def _added_token(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                      special=content not in _NON_SPECIAL_ADDED)


def _tokenizer_config() -> dict:
    """tokenizer_config.json as Qwen2.5(-VL) ships it (minus the chat template, which Lance does not use)."""
    added = {}
    for content, token_id in sorted(constants.QWEN2_SPECIAL_TOKENS.items(), key=lambda kv: kv[1]):
        token = _added_token(content)
        added[str(token_id)] = {
            "content": content, "lstrip": token.lstrip, "normalized": token.normalized, "rstrip": token.rstrip,
            "single_word": token.single_word, "special": token.special,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": constants.IM_END,
        "errors": "replace",
        "model_max_length": _MODEL_MAX_LENGTH,
        "pad_token": constants.ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_tokenizer_files(out_dir: str | Path) -> Path:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json (Qwen2 format) into `out_dir`.

    The files are byte-identical from run to run. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = _learn_merges()
    vocab = _dense_vocab(merges)

    tokenizer = _qwen2_pipeline(Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
    )))
    # Added tokens take the next free ids, so adding them in id order puts each at its real id.
    for content, token_id in sorted(constants.QWEN2_SPECIAL_TOKENS.items(), key=lambda kv: kv[1]):
        tokenizer.add_tokens([_added_token(content)])
        assert tokenizer.token_to_id(content) == token_id, content
    assert tokenizer.get_vocab_size(with_added_tokens=True) == constants.TOKENIZER_LEN

    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    logger.debug("wrote a Qwen2-format tokenizer with %d merges to %s", len(merges), out_dir)
    return out_dir


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """Id of `token`, checked against the stock Qwen2.5 id."""
    expected = constants.QWEN2_SPECIAL_TOKENS[token]
    found = tokenizer.convert_tokens_to_ids(token)
    if found != expected:
        raise TokenizerError(
            f"special token {token!r} has id {found} in this tokenizer, expected {expected} (stock Qwen2.5): the "
            "checkpoint's embedding rows were trained with the stock ids"
        )
    return found


def read_special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """The `SpecialIds` of a loaded tokenizer; raises `TokenizerError` naming the first token not at its real id."""
    for token in constants.QWEN2_SPECIAL_TOKENS:
        _token_id(tokenizer, token)
    if len(tokenizer) != constants.TOKENIZER_LEN:
        raise TokenizerError(f"tokenizer has {len(tokenizer)} tokens, expected {constants.TOKENIZER_LEN} (Qwen2.5)")
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) != 1:
        raise TokenizerError(f"'\\n' must be a single token, this tokenizer encodes it as {newline}")
    return SpecialIds(
        im_start=_token_id(tokenizer, constants.IM_START),
        im_end=_token_id(tokenizer, constants.IM_END),
        vision_start=_token_id(tokenizer, constants.VISION_START),
        vision_end=_token_id(tokenizer, constants.VISION_END),
        video_pad=_token_id(tokenizer, constants.VIDEO_PAD),
        endoftext=_token_id(tokenizer, constants.ENDOFTEXT),
        newline=newline[0],
        len=len(tokenizer),
    )


def load_tokenizer(tokenizer_dir: str | Path) -> tuple[PreTrainedTokenizerBase, SpecialIds]:
    """Load the Qwen2 tokenizer in `tokenizer_dir` (the folder holding tokenizer.json & co.) and its `SpecialIds`.

    Upstream loads the folder with `Qwen2Tokenizer.from_pretrained`; the fast class gives the same ids (transformers 5
    has only the fast one, under both names). tokenizer_config.json, when present, sets eos/pad as shipped.

    Raises `TokenizerError` if tokenizer.json is missing or a special token is not at its stock Qwen2.5 id.
    """
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / TOKENIZER_JSON).is_file():
        raise TokenizerError(f"tokenizer file missing: {tokenizer_dir / TOKENIZER_JSON}")
    tokenizer = Qwen2TokenizerFast.from_pretrained(str(tokenizer_dir))
    return tokenizer, read_special_ids(tokenizer)
