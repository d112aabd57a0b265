"""Both loaders refuse what is not the guard asked for, with one clear error naming the directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM

from guard_core import GenGuard, GuardUnavailableError, StreamGuard
from guard_core.stream_model import Qwen3ForGuardModel
from guard_core.testing import GEN_CASES, gen_checkpoint, stream_checkpoint

Loader = Callable[[str], object]
LOADERS: dict[str, Loader] = {
    "gen": lambda path: GenGuard.from_pretrained(path),
    "stream": lambda path: StreamGuard.from_pretrained(path),
}


def _copy(kind: str, tmp_path: Path) -> Path:
    source = gen_checkpoint() if kind == "gen" else stream_checkpoint("random")
    return Path(shutil.copytree(source, tmp_path / f"{kind}-copy"))


def _edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _refusal(load: Loader, path: Path) -> str:
    with pytest.raises(GuardUnavailableError) as info:
        load(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert info.value.__cause__ is None
    return message


@pytest.mark.parametrize("kind", ["gen", "stream"])
@pytest.mark.parametrize("drop", ["model.norm.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"])
def test_missing_weights_are_refused(tmp_path: Path, kind: str, drop: str) -> None:
    path = _copy(kind, tmp_path)
    _edit_weights(path, lambda t: t.pop(drop))
    message = _refusal(LOADERS[kind], path)
    assert "missing weights" in message and drop in message


@pytest.mark.parametrize("kind", ["gen", "stream"])
def test_unexpected_weights_are_refused(tmp_path: Path, kind: str) -> None:
    path = _copy(kind, tmp_path)
    _edit_weights(path, lambda t: t.update({"refusal_head.weight": torch.zeros(2, 16)}))
    message = _refusal(LOADERS[kind], path)
    assert "unexpected weights" in message and "refusal_head.weight" in message


@pytest.mark.parametrize("kind", ["gen", "stream"])
def test_weights_of_the_wrong_shape_are_refused(tmp_path: Path, kind: str) -> None:
    path = _copy(kind, tmp_path)
    _edit_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    message = _refusal(LOADERS[kind], path)
    assert "wrong shapes" in message and "model.norm.weight" in message


@pytest.mark.parametrize("kind", ["gen", "stream"])
def test_a_bert_checkpoint_is_refused_as_what_it_is(tmp_path: Path, kind: str) -> None:
    path = _copy("gen", tmp_path)
    (path / "model.safetensors").unlink()
    bert = BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    bert.save_pretrained(path)
    message = _refusal(LOADERS[kind], path)
    assert "BertForMaskedLM" in message and "'bert'" in message
    assert f"not a Qwen3Guard-{kind.capitalize()} checkpoint" in message


def test_a_stream_checkpoint_given_to_gen_says_it_is_stream(tmp_path: Path) -> None:
    message = _refusal(LOADERS["gen"], _copy("stream", tmp_path))
    assert "is a Qwen3Guard-Stream checkpoint" in message and "not a Qwen3Guard-Gen checkpoint" in message
    assert "StreamGuard.from_pretrained()" in message


def test_a_stream_config_is_recognised_without_its_architectures_entry(tmp_path: Path) -> None:
    path = _copy("stream", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.pop("architectures")
    (path / "config.json").write_text(json.dumps(config))
    assert "is a Qwen3Guard-Stream checkpoint" in _refusal(LOADERS["gen"], path)


@pytest.mark.parametrize("load", [LOADERS["stream"], lambda path: Qwen3ForGuardModel.load(path)], ids=["StreamGuard", "model"])
def test_a_gen_checkpoint_given_to_stream_says_it_is_gen(tmp_path: Path, load: Loader) -> None:
    message = _refusal(load, _copy("gen", tmp_path))
    assert "is a Qwen3Guard-Gen checkpoint" in message and "not a Qwen3Guard-Stream checkpoint" in message
    assert "GenGuard.from_pretrained()" in message and "--model" in message


@pytest.mark.parametrize("kind", ["gen", "stream"])
@pytest.mark.parametrize("keep", [0, 5, 20, 0.5, -100], ids=["empty", "5-bytes", "20-bytes", "half", "last-100-bytes-cut"])
def test_a_truncated_safetensors_file_names_the_file(tmp_path: Path, kind: str, keep: float) -> None:
    path = _copy(kind, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    message = _refusal(LOADERS[kind], path)
    assert str(weights) in message and "not a readable safetensors file" in message


def test_a_missing_shard_named_by_the_index_is_refused(tmp_path: Path) -> None:
    path = _copy("gen", tmp_path)
    names = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    weight_map = {name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(sorted(names))}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    message = _refusal(LOADERS["gen"], path)
    assert str(path / "model-00002-of-00002.safetensors") in message and "missing" in message


def test_no_weights_file_is_refused(tmp_path: Path) -> None:
    path = _copy("gen", tmp_path)
    (path / "model.safetensors").unlink()
    assert "has no model.safetensors" in _refusal(LOADERS["gen"], path)


@pytest.mark.parametrize("kind", ["gen", "stream"])
def test_a_config_that_is_not_json_names_the_file(tmp_path: Path, kind: str) -> None:
    path = _copy(kind, tmp_path)
    (path / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"],')
    message = _refusal(LOADERS[kind], path)
    assert str(path / "config.json") in message and "JSON" in message


@pytest.mark.parametrize("kind", ["gen", "stream"])
def test_an_unreadable_tokenizer_names_the_directory(tmp_path: Path, kind: str) -> None:
    path = _copy(kind, tmp_path)
    (path / "tokenizer.json").write_text("garbage")
    assert "cannot read the tokenizer" in _refusal(LOADERS[kind], path)


def test_a_checkpoint_without_tokenizer_config_still_loads_its_qwen_tokenizer(tmp_path: Path) -> None:
    path = _copy("gen", tmp_path)
    (path / "tokenizer_config.json").unlink()
    verdict = GenGuard.from_pretrained(str(path)).moderate(GEN_CASES[0].as_messages)
    assert (verdict.risk, verdict.categories) == (GEN_CASES[0].risk, GEN_CASES[0].categories)


def test_an_intact_copy_still_loads(tmp_path: Path) -> None:
    assert GenGuard.from_pretrained(str(_copy("gen", tmp_path))).moderate([{"role": "user", "content": "Hi"}]).role == "prompt"
    assert StreamGuard.from_pretrained(str(_copy("stream", tmp_path))) is not None


def test_hub_error_gives_advice_for_python_and_the_command_line() -> None:
    with pytest.raises(GuardUnavailableError) as info:
        GenGuard.from_pretrained("Qwen/Qwen3Guard-Gen-Nonexistent")
    message = str(info.value)
    assert "from_pretrained('./Qwen3Guard-Gen-Nonexistent')" in message
    assert "--model ./Qwen3Guard-Gen-Nonexistent" in message
    assert "\n" not in message


@pytest.mark.parametrize(("device", "reason"), [("meta", "meta tensors hold no data"), ("tpu", "is not one of cpu, mps, cuda")])
def test_a_device_that_cannot_run_the_model_is_refused_before_loading(device: str, reason: str) -> None:
    for load in (GenGuard.from_pretrained, StreamGuard.from_pretrained):
        with pytest.raises(ValueError, match=reason):
            load(str(gen_checkpoint()), device=device)
