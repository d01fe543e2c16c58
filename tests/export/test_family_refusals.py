"""Checkpoints the exporter cannot serve faithfully are refused in one line that names the reason, with no bundle."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import run_cli, write_hf_checkpoint


def assert_refused(tmp_path, source, *words: str) -> None:
    out = tmp_path / "bundle"
    result = run_cli("export", "--source", str(source), "--out", str(out))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def edit_config(directory, **changes) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def llama_dir(tmp_path):
    directory = tmp_path / "src"
    write_hf_checkpoint(directory, "llama")
    return directory


def test_unknown_model_type(llama_dir, tmp_path):
    edit_config(llama_dir, model_type="falcon")
    assert_refused(tmp_path, llama_dir, "unsupported architecture", "falcon")


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])  # transformers >= 5 and older configs
def test_unknown_rope_scaling_type(llama_dir, tmp_path, key):
    edit_config(llama_dir, **{"rope_parameters": None, key: {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
    assert_refused(tmp_path, llama_dir, "rope scaling", "yarn")


def test_missing_tensor(llama_dir, tmp_path):
    weights = llama_dir / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(weights))
    assert_refused(tmp_path, llama_dir, "lacks", "blocks.1.mlp.up_proj.weight")


def test_mistral_sliding_window_smaller_than_the_context(tmp_path):
    directory = tmp_path / "src"
    write_hf_checkpoint(directory, "mistral", sliding_window=64)
    assert_refused(tmp_path, directory, "sliding_window 64", "--max-context 64")


def test_mistral_sliding_window_is_accepted_when_the_context_fits_inside(tmp_path):
    directory = tmp_path / "src"
    write_hf_checkpoint(directory, "mistral", sliding_window=64)
    out = tmp_path / "bundle"
    result = run_cli("export", "--source", str(directory), "--out", str(out), "--max-context", "64")
    assert result.returncode == 0, result.stderr
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert (model["arch"], model["sliding_window"], model["family"]) == ("mistral", 64, "llama")


def test_old_style_llama3_rope_scaling_is_read(tmp_path):
    """Configs written before transformers 5 keep rope_theta at the top and the scaling in `rope_scaling`."""
    from export.checkpoints import _hf_config

    cfg = json.loads(json.dumps(CONFIG_LLAMA31))
    config = _hf_config(cfg, tmp_path)
    assert config.rope_theta == 500000.0 and config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


CONFIG_LLAMA31 = {  # Llama 3.1 8B Instruct's config.json, shrunk
    "model_type": "llama",
    "vocab_size": 400,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "eos_token_id": [128001, 128008, 128009],
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize("changes", [{"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False}])
def test_gpt2_attention_scaled_otherwise_is_refused(tmp_path, changes):
    """Stanford CRFM's GPT-2 checkpoints scale attention by 1/layer too: exported as plain GPT-2 they would pass
    parity against a torch model built the same wrong way."""
    directory = tmp_path / "src"
    write_hf_checkpoint(directory, "gpt2")
    edit_config(directory, **changes)
    assert_refused(tmp_path, directory, "GPT-2 attention scaled")
