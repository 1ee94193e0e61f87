"""mmkit calls only current transformers APIs, and the suite fails when mmkit calls a deprecated one."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from mmkit.compat import cache_name, enable_activation_checkpointing, transformers_version

ROOT = Path(__file__).resolve().parent.parent


def _tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_switches_pick_the_names_the_installed_transformers_has():
    assert cache_name() in inspect.signature(LlamaForCausalLM.forward).parameters
    assert hasattr(PreTrainedModel, "activation_checkpointing_enable") == (transformers_version() >= (5, 23))


def test_enable_activation_checkpointing_turns_it_on():
    llm = _tiny_llama()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in llm.modules())
    assert enable_activation_checkpointing(llm)
    assert any(getattr(m, "gradient_checkpointing", False) for m in llm.modules())
    assert not enable_activation_checkpointing(torch.nn.Linear(2, 2))  # no such switch: nothing to do


def test_kv_cache_round_trips_through_the_model_forward():
    import mmkit

    model = mmkit.build(ROOT / "recipes" / "tiny.yaml", ["model.llm.config.num_hidden_layers=1",
                                                         "model.vision.config.num_hidden_layers=1"]).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :3], use_cache=True)
        assert first.past_key_values is not None
        rest = model(input_ids=ids[:, 3:], past_key_values=first.past_key_values, use_cache=True,
                     position_ids=torch.arange(3, 5)[None])
    torch.testing.assert_close(rest.logits, full[:, 3:], atol=1e-5, rtol=1e-4)


def test_future_warning_attributed_to_mmkit_is_an_error():
    # pyproject's filterwarnings: what an mmkit module issues (or a library attributes to it) fails the run
    with pytest.raises(FutureWarning):
        warnings.warn_explicit("old", FutureWarning, "mmkit/model.py", 1, module="mmkit.model")
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("old", DeprecationWarning, "kernels/mmkit_kernels/x.py", 1, module="mmkit_kernels.x")
    with warnings.catch_warnings(record=True) as seen:  # keeps the configured filters
        warnings.warn_explicit("old", FutureWarning, "transformers/x.py", 1, module="transformers.x")
    assert [w.category for w in seen] == [FutureWarning]  # a library's own internals only warn


THROWAWAY = '''
import types

import pytest
import torch

import mmkit
import mmkit.compat
from mmkit.train.stages import apply_lora

IDS = torch.tensor([[1, 5, 6, 7]])
LORA = types.SimpleNamespace(lora_r=2, lora_alpha=4, lora_dropout=0.0)


@pytest.fixture
def model():
    return mmkit.build({recipe!r}, ["model.llm.config.num_hidden_layers=1",
                                    "model.vision.config.num_hidden_layers=1"]).eval()


@pytest.fixture
def old_transformers(monkeypatch):  # mmkit's switches pick the old names, as before the renames
    monkeypatch.setattr(mmkit.compat, "transformers_version", lambda: (5, 22))


def test_current_names(model):
    model(input_ids=IDS, use_cache=True)
    mmkit.compat.enable_activation_checkpointing(model.llm)


def test_mmkit_passes_past_key_values(model, old_transformers):
    model(input_ids=IDS, use_cache=True)


def test_mmkit_passes_past_key_values_through_peft(model, old_transformers):
    apply_lora(model, LORA)
    model(input_ids=IDS, use_cache=True)


def test_mmkit_calls_gradient_checkpointing_enable(model, old_transformers):
    mmkit.compat.enable_activation_checkpointing(model.llm)


def test_test_code_passes_past_key_values(model):
    model.llm(input_ids=IDS, past_key_values=None, use_cache=True)


def test_peft_reads_is_gradient_checkpointing(model):
    apply_lora(model, LORA)  # peft's own deprecated call, made while mmkit calls peft
'''


@pytest.mark.skipif(transformers_version() < (5, 24), reason="the old names are deprecated from transformers 5.24")
def test_mmkit_calling_a_deprecated_api_fails_the_suite(tmp_path):
    test_file = tmp_path / "test_throwaway.py"
    test_file.write_text(textwrap.dedent(THROWAWAY.format(recipe=str(ROOT / "recipes" / "tiny.yaml"))))
    report = tmp_path / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), f"--junitxml={report}", str(test_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    outcome = {}
    for case in ET.parse(report).iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        outcome[case.get("name")] = "ok" if bad is None else bad.get("message", "") + (bad.text or "")
    assert len(outcome) == 6, proc.stdout[-3000:]
    for name in ("test_current_names", "test_test_code_passes_past_key_values",
                 "test_peft_reads_is_gradient_checkpointing"):
        assert outcome[name] == "ok", f"{name}: {outcome[name]}"
    for name, where, what in [("test_mmkit_passes_past_key_values", "mmkit/model.py", "past_key_values"),
                              ("test_mmkit_passes_past_key_values_through_peft", "mmkit/model.py", "past_key_values"),
                              ("test_mmkit_calls_gradient_checkpointing_enable", "mmkit/compat.py",
                               "gradient_checkpointing_enable")]:
        assert "mmkit called a deprecated API" in outcome[name], f"{name} did not fail: {outcome[name]}"
        assert where in outcome[name] and what in outcome[name], outcome[name]
    assert proc.returncode == 1
