"""The tiny Qwen2-format tokenizer: real special ids, real length, faithful round trips, identical bytes per build,
and the checks `load_tokenizer` makes on a checkpoint's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from runtime.spec import constants
from runtime.models.tokenizer import (
    TokenizerError,
    _qwen2_pipeline,
    build_tokenizer_files,
    load_tokenizer,
)

EMBEDDING_ROWS = 151936  # rows of embed_tokens / lm_head in the real checkpoint (checkpoint_keys.json)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def loaded(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


def test_files_are_the_qwen2_set(tokenizer_dir: Path) -> None:
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == sorted(constants.TOKENIZER_FILES)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        v: k for k, v in constants.QWEN2_SPECIAL_TOKENS.items()
    }


def test_special_ids_at_real_positions(loaded) -> None:
    tokenizer, ids = loaded
    for token, token_id in constants.QWEN2_SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert tokenizer.convert_ids_to_tokens(token_id) == token, token
    assert len(tokenizer) == constants.TOKENIZER_LEN == 151665
    assert (ids.im_start, ids.im_end, ids.vision_start, ids.vision_end, ids.video_pad, ids.endoftext) == (
        151644, 151645, 151652, 151653, 151656, 151643
    )
    assert ids.newline == 198  # the real Qwen2 id of "\n" ("Ċ"): the byte alphabet is in Qwen2's order
    assert ids.len == 151665
    assert ids.video_pad == constants.VISUAL_PLACEHOLDER_ID


def test_vocab_is_dense_below_the_specials(tokenizer_dir: Path) -> None:
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(151643))
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert len(merges) - 1 >= 200  # a real merge list, not a byte-only tokenizer


def test_masking_padded_rows_keeps_im_end(loaded) -> None:
    tokenizer, ids = loaded
    logits = torch.randn(EMBEDDING_ROWS, generator=torch.Generator().manual_seed(0))
    logits[ids.len:] = 100.0  # padding rows of the 151936-row head would win if left in
    logits[ids.im_end] = 50.0
    masked = logits.masked_fill(torch.arange(EMBEDDING_ROWS) >= ids.len, float("-inf"))
    assert int(masked.argmax()) == ids.im_end == constants.QWEN2_SPECIAL_TOKENS["<|im_end|>"]
    assert ids.im_end < ids.len and ids.len < EMBEDDING_ROWS
    assert tokenizer.decode([int(masked.argmax())]) == "<|im_end|>"


@pytest.mark.parametrize("text", [
    constants.SYSTEM_PROMPT_T2I,
    constants.system_prompt_edit("image"),  # the typographic apostrophe U+2019
    "the user\u2019s requirements",
    "Ünïcödé 漢字 🙂 — naïve café\n\n  tabs\tand  spaces ",
    "e\u0301",  # NFC composes it to é: decoding gives the normalised text
])
def test_round_trip(loaded, text: str) -> None:
    import unicodedata

    tokenizer, _ = loaded
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_english_tokenizes_into_multibyte_tokens(loaded) -> None:
    tokenizer, _ = loaded
    text = constants.SYSTEM_PROMPT_T2I
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) < len(text.encode()) // 2


def test_special_tokens_inside_text(loaded) -> None:
    tokenizer, ids = loaded
    encoded = tokenizer.encode("<|im_start|>user\nA cat<|im_end|>\n<|vision_start|><|video_pad|><|vision_end|>",
                               add_special_tokens=False)
    assert encoded[0] == ids.im_start
    assert encoded[-5:] == [ids.im_end, ids.newline, ids.vision_start, ids.video_pad, ids.vision_end]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "user\nA cat\n"


def test_every_file_encodes_alike(tokenizer_dir: Path, loaded) -> None:
    """tokenizer.json read directly (what transformers 4.x does) and vocab.json + merges.txt give the same ids as
    the transformers 5 tokenizer (which rebuilds the backend from the vocabulary and merges)."""
    tokenizer, _ = loaded
    from_json = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    from_vocab = _qwen2_pipeline(Tokenizer(models.BPE.from_file(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))))
    for text in (constants.SYSTEM_PROMPT_T2V, constants.system_prompt_edit("video"), "1234 apples, 漢字!"):
        expected = tokenizer.encode(text, add_special_tokens=False)
        assert from_json.encode(text, add_special_tokens=False).ids == expected
        assert from_vocab.encode(text, add_special_tokens=False).ids == expected


def test_deterministic_files(tokenizer_dir: Path, tmp_path: Path) -> None:
    again = build_tokenizer_files(tmp_path)
    for name in constants.TOKENIZER_FILES:
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_wrong_special_id_is_named(tokenizer_dir: Path, tmp_path: Path) -> None:
    for name in constants.TOKENIZER_FILES:
        text = (tokenizer_dir / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(text.replace("<|vision_end|>", "<|vision_stop|>"), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"<\|vision_end\|>"):
        load_tokenizer(tmp_path)


def test_missing_file_is_named(tokenizer_dir: Path, tmp_path: Path) -> None:
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_alone_suffices(tokenizer_dir: Path, tmp_path: Path, loaded) -> None:
    """The real repo's tokenizer_config.json is unverified: loading must not depend on it (ids are unchanged)."""
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    tokenizer, ids = load_tokenizer(tmp_path)
    assert ids == loaded[1]
    text = constants.system_prompt_edit("video")
    assert tokenizer.encode(text, add_special_tokens=False) == loaded[0].encode(text, add_special_tokens=False)


def test_pipeline_is_qwen2s(tokenizer_dir: Path) -> None:
    """The normaliser and split regex are those transformers' own Qwen2 tokenizer builds (an independent copy)."""
    from transformers.models.qwen2 import tokenization_qwen2

    from runtime.models.tokenizer import QWEN2_PRETOKENIZE_REGEX

    assert QWEN2_PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX
    pipeline = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert pipeline["normalizer"] == {"type": "NFC"}
    assert pipeline["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": QWEN2_PRETOKENIZE_REGEX}
    assert pipeline["decoder"]["type"] == "ByteLevel" and pipeline["model"]["type"] == "BPE"
