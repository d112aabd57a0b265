"""Loading upstream-format Stream checkpoints with our own model class, and the packed forward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guard_core.stream_model import HEAD_MODULES, KVStore, LabelMaps, Qwen3ForGuardModel, packed_forward
from guard_core.testing.stream_fixture import stream_checkpoint
from guard_core.types import Category, GuardUnavailableError, RiskLevel


@pytest.fixture(scope="module")
def random_model() -> Qwen3ForGuardModel:
    return Qwen3ForGuardModel.load(stream_checkpoint("random"))


def _copy(tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(stream_checkpoint("random"), out)
    return out


def test_checkpoint_has_upstream_names_and_config_keys() -> None:
    path = stream_checkpoint("random")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForGuardModel"] and config["model_type"] == "qwen3"
    for key in ("guard_inner_size", "num_risk_level", "num_category", "num_query_risk_level", "num_query_category"):
        assert isinstance(config[key], int)
    assert config["response_risk_level_map"] == {"0": "Safe", "1": "Unsafe", "2": "Controversial"}
    names = set(load_file(str(path / "model.safetensors")))
    assert {n.split(".")[0] for n in names} == {"model", *HEAD_MODULES}
    assert "risk_level_category_layernorm.weight" in names and "query_category_head.weight" in names


def test_load_round_trip_matches_saved_weights(random_model: Qwen3ForGuardModel) -> None:
    saved = load_file(str(stream_checkpoint("random") / "model.safetensors"))
    state = random_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert random_model.dtype == torch.float32


@pytest.mark.parametrize("drop", ["risk_level_head.weight", "query_risk_level_category_layernorm.weight", "model.norm.weight"])
def test_missing_weight_fails_loudly(tmp_path: Path, drop: str) -> None:
    path = _copy(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GuardUnavailableError, match=drop.replace(".", r"\.")):
        Qwen3ForGuardModel.load(path)


def test_unexpected_head_weight_fails_loudly(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["refusal_head.weight"] = torch.zeros(2, 16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GuardUnavailableError, match="refusal_head"):
        Qwen3ForGuardModel.load(path)


def test_config_without_guard_sizes_fails(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["num_query_category"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GuardUnavailableError, match="num_query_category"):
        Qwen3ForGuardModel.load(path)


def test_label_maps_from_config_and_fallback(random_model: Qwen3ForGuardModel) -> None:
    maps = LabelMaps.from_config(random_model.config)
    assert maps.risk == (RiskLevel.SAFE, RiskLevel.UNSAFE, RiskLevel.CONTROVERSIAL)
    assert maps.query_category[8] is Category.JAILBREAK and maps.category[0] is Category.VIOLENT
    config = random_model.config.__class__(**{**random_model.config.to_dict(), "response_risk_level_map": None,
                                              "response_category_map": {str(i): c for i, c in enumerate(['"Violent"', *[x.value for x in list(Category)[1:8]]])}})
    fallback = LabelMaps.from_config(config)
    assert fallback.risk == maps.risk and fallback.category[0] is Category.VIOLENT


def test_packed_forward_equals_one_shot_per_stream(random_model: Qwen3ForGuardModel) -> None:
    torch.manual_seed(1)
    seqs = [torch.randint(0, 151000, (n,)).tolist() for n in (37, 5, 60)]
    with torch.inference_mode():
        full = [random_model(torch.tensor([s])) for s in seqs]
    stores = [KVStore(random_model.config, dtype=torch.float32, device=torch.device("cpu"), chunk=8) for _ in seqs]
    pos, got = [0, 0, 0], [[], [], []]
    chunks = [(0, 7), (1, 2), (2, 1), (0, 1), (1, 3), (2, 20), (0, 29), (2, 39)]
    for turn in range(3):
        active = [(i, k) for i, k in chunks[turn * 3 : turn * 3 + 3] if pos[i] < len(seqs[i])]
        if not active:
            continue
        logits = packed_forward(random_model, [stores[i] for i, _ in active], [seqs[i][pos[i] : pos[i] + k] for i, k in active])
        offset = 0
        for i, k in active:
            n = len(seqs[i][pos[i] : pos[i] + k])
            got[i].append(logits.risk_level_logits[0, offset : offset + n])
            offset, pos[i] = offset + n, pos[i] + n
    for i, seq in enumerate(seqs):
        rest = seq[pos[i] :]
        if rest:
            got[i].append(packed_forward(random_model, [stores[i]], [rest]).risk_level_logits[0])
        assert torch.allclose(torch.cat(got[i]), full[i].risk_level_logits[0], atol=1e-4)
