"""LoRA helpers: default targets per architecture, atomic save, PEFT round trip, packing."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
)

from seco_core.lora import (
    ADAPTER_FILES,
    attach_lora,
    default_target_modules,
    load_adapter,
    pack_adapter,
    save_adapter,
)
from service.archives import safe_extract

TINY: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 64,
    "intermediate_size": 64,
}


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2)).eval()


def _lora_names(model: nn.Module) -> list[str]:
    """Qualified names (relative to the base model) of the layers LoRA wrapped."""
    return sorted(
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in model.named_modules()
        if name.endswith(".lora_A")
    )


def _randomise_lora(model: PeftModel) -> None:
    """LoRA B starts at zero (adapter = identity); make it matter so round trips are tested."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)


@pytest.mark.parametrize(
    ("build", "expected", "wrapped"),
    [
        (_llama, ["k_proj", "o_proj", "q_proj", "v_proj"], "model.layers.1.self_attn.v_proj"),
        (
            lambda: Phi3ForCausalLM(Phi3Config(**TINY, pad_token_id=0)),
            ["o_proj", "qkv_proj"],
            "model.layers.1.self_attn.qkv_proj",
        ),
        (
            lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**TINY)),
            ["dense", "query_key_value"],
            "gpt_neox.layers.1.attention.dense",
        ),
    ],
    ids=["llama", "phi3", "gpt_neox"],
)
def test_default_targets_are_attention_projections(build, expected: list[str], wrapped: str) -> None:
    model: PreTrainedModel = build()
    assert default_target_modules(model) == expected
    peft_model = attach_lora(model, r=4, alpha=8)
    names = _lora_names(peft_model)
    assert len(names) == 2 * len(expected)  # every projection of both layers, nothing else
    assert wrapped in names
    assert all(".mlp." not in n for n in names)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_gpt2_shared_leaf_name_uses_a_regex_limited_to_attention() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, bos_token_id=0, eos_token_id=0))
    # c_proj exists in both attention and MLP; a suffix list would wrap the MLP too.
    assert default_target_modules(model) == r"(.*\.)?(attn)\.(c_attn|c_proj)"
    names = _lora_names(attach_lora(model, r=2))
    assert names == [f"transformer.h.{i}.attn.{leaf}" for i in (0, 1) for leaf in ("c_attn", "c_proj")]


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.down = nn.Linear(8, 4)


def test_no_attention_is_refused_with_the_linear_layers() -> None:
    with pytest.raises(ValueError, match=r"TinyMLP.*linear layers \['down', 'up'\]"):
        attach_lora(TinyMLP())


def test_explicit_target_modules() -> None:
    names = _lora_names(attach_lora(_llama(), target_modules=["q_proj", "down_proj"]))
    assert names == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.q_proj")]


def test_unknown_target_modules_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\['qq_proj'\] match no linear layer of LlamaForCausalLM; .*'q_proj'"):
        attach_lora(_llama(), target_modules=["q_proj", "qq_proj"])
    with pytest.raises(ValueError, match="match no linear layer"):
        attach_lora(_llama(), target_modules=r".*\.nothing")
    with pytest.raises(ValueError, match="r must be a positive integer"):
        attach_lora(_llama(), r=0)
    with pytest.raises(ValueError, match="dropout"):
        attach_lora(_llama(), dropout=1.0)


def test_save_then_peft_from_pretrained_gives_identical_outputs(tmp_path: Path) -> None:
    model = attach_lora(_llama(), r=4, alpha=8)
    _randomise_lora(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base_logits = _llama()(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits)  # the adapter changes the outputs

    out = save_adapter(model, tmp_path / "adapter", base_model_name="tiny-llama")
    assert out == tmp_path / "adapter"
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left behind
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    loaded = PeftModel.from_pretrained(_llama(), str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(_llama(), out)(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_save_replaces_an_existing_adapter(tmp_path: Path) -> None:
    model = attach_lora(_llama(), r=2)
    first = save_adapter(model, tmp_path / "adapter", base_model_name="a")
    _randomise_lora(model)
    second = save_adapter(model, tmp_path / "adapter", base_model_name="b")
    assert first == second
    assert json.loads((second / "adapter_config.json").read_text())["base_model_name_or_path"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_pack_and_extract_round_trip(tmp_path: Path) -> None:
    model = attach_lora(_llama(), r=4)
    _randomise_lora(model)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name="tiny-llama")
    archive = pack_adapter(adapter, tmp_path / "out" / "adapter.tar.gz")
    assert sorted(p.name for p in archive.parent.iterdir()) == ["adapter.tar.gz"]
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        assert sorted(m.name for m in members) == sorted(ADAPTER_FILES)  # at the root, no leading dir
        assert all(m.isfile() and m.uname == "" for m in members)
        tar.extractall(tmp_path / "plain", filter="data")
    for name in ADAPTER_FILES:
        assert (tmp_path / "plain" / name).read_bytes() == (adapter / name).read_bytes()

    extracted = tmp_path / "extracted"
    safe_extract(archive, extracted)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        actual = PeftModel.from_pretrained(_llama(), str(extracted))(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_pack_refuses_an_incomplete_directory(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        pack_adapter(tmp_path / "adapter", tmp_path / "a.tar.gz")
    assert not (tmp_path / "a.tar.gz").exists()
