"""DeepSpec-format checkpoints: exact names and shapes load; malformed ones fail
at start-up with a message naming the field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from dspark_vllm import DSparkConfigError, engine_kwargs
from dspark_vllm.config import LOOKUP_NUM_SPECULATIVE_TOKENS
from dspark_vllm.model.checkpoint import TargetInfo, expected_shapes, load_draft_model, validate_checkpoint
from dspark_vllm.model.config import DSparkConfig

# The 64 tensor names of a published 5-layer Qwen3 DSpark drafter.
PER_LAYER = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]
GLOBAL = [
    "embed_tokens.weight", "norm.weight", "fc.weight", "hidden_norm.weight", "lm_head.weight",
    "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
    "confidence_head.proj.weight", "confidence_head.proj.bias",
]


def qwen3_4b_draft_config() -> dict:
    return {
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 5,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
        "block_size": 7, "target_layer_ids": [1, 9, 17, 25, 33], "mask_token_id": 151669,
        "num_target_layers": 36, "markov_rank": 256, "markov_head_type": "vanilla",
        "enable_confidence_head": True, "confidence_head_with_markov": True,
    }


def test_published_qwen3_4b_names_and_shapes():
    shapes = expected_shapes(DSparkConfig.from_dict(qwen3_4b_draft_config()))
    names = {f"layers.{i}.{n}" for i in range(5) for n in PER_LAYER} | set(GLOBAL)
    assert len(names) == 64 and set(shapes) == names
    assert shapes["fc.weight"] == (2560, 12800)
    assert shapes["markov_head.markov_w2.weight"] == (151936, 256)
    assert shapes["confidence_head.proj.weight"] == (1, 2816)


@pytest.fixture
def target_info(fixture_paths):
    return TargetInfo.from_hf_config(AutoConfig.from_pretrained(fixture_paths["target"]))


def test_fixture_checkpoint_loads(fixture_paths, target_info):
    cfg = validate_checkpoint(fixture_paths["dspark"], target_info, 7)
    model = load_draft_model(fixture_paths["dspark"])
    state = load_file(f"{fixture_paths['dspark']}/model.safetensors")
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert cfg.block_size == 7


def broken_copy(src, dst, edit_config=None, edit_weights=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_weights:
        w = load_file(str(dst / "model.safetensors"))
        edit_weights(w)
        save_file(w, str(dst / "model.safetensors"))
    return dst


CASES = {
    "missing_key": (None, lambda w: w.pop("markov_head.markov_w1.weight"), "markov_head.markov_w1.weight"),
    "wrong_shape": (None, lambda w: w.update({"fc.weight": torch.zeros(4, 4)}), "fc.weight"),
    "vocab_mismatch": (lambda c: c.update(vocab_size=1000), None, "vocab_size"),
    "hidden_mismatch": (lambda c: c.update(hidden_size=64, head_dim=16), None, "hidden_size"),
    "block_size_missing": (lambda c: c.pop("block_size"), None, "block_size"),
    "bad_layer_ids": (lambda c: c.update(target_layer_ids=[0, 3]), None, "target_layer_ids"),
    "unsorted_layer_ids": (lambda c: c.update(target_layer_ids=[1, 0]), None, "target_layer_ids"),
    "other_target_depth": (lambda c: c.update(num_target_layers=36), None, "num_target_layers"),
    "bad_mask_token": (lambda c: c.update(mask_token_id=10**6), None, "mask_token_id"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_checkpoint_names_the_field(fixture_paths, target_info, tmp_path, case):
    edit_cfg, edit_w, field = CASES[case]
    bad = broken_copy(fixture_paths["dspark"], tmp_path / case, edit_cfg, edit_w)
    with pytest.raises(DSparkConfigError, match=field.replace(".", r"\.")):
        validate_checkpoint(bad, target_info, None)


def test_num_speculative_tokens_above_block_size(fixture_paths, target_info):
    """Only prompt lookup's blocks may run past the drafter's; the error names the way out."""
    with pytest.raises(DSparkConfigError, match="block_size.*prompt_lookup"):
        validate_checkpoint(fixture_paths["dspark"], target_info, 8)
    with pytest.raises(DSparkConfigError, match="block_size"):
        engine_kwargs(fixture_paths["dspark"], num_speculative_tokens=8)
    with pytest.raises(DSparkConfigError, match="num_speculative_tokens=0"):
        engine_kwargs(fixture_paths["dspark"], num_speculative_tokens=0, prompt_lookup={})
    validate_checkpoint(fixture_paths["dspark"], target_info, 8, prompt_lookup=True)
    kwargs = engine_kwargs(fixture_paths["dspark"], num_speculative_tokens=9, prompt_lookup={})
    assert kwargs["speculative_config"]["num_speculative_tokens"] == 9
    # unset: the block size without prompt lookup, LOOKUP_NUM_SPECULATIVE_TOKENS with it
    assert engine_kwargs(fixture_paths["dspark"])["speculative_config"]["num_speculative_tokens"] == 7
    kwargs = engine_kwargs(fixture_paths["dspark"], prompt_lookup={})
    assert kwargs["speculative_config"]["num_speculative_tokens"] == LOOKUP_NUM_SPECULATIVE_TOKENS == 23


def test_missing_path(tmp_path):
    with pytest.raises(DSparkConfigError, match="draft_model"):
        engine_kwargs(str(tmp_path / "nope"))


def test_unknown_option(fixture_paths):
    with pytest.raises(Exception, match="verification"):
        engine_kwargs(fixture_paths["dspark"], verification="sometimes")


def test_unknown_draft_dtype_names_the_field(fixture_paths):
    with pytest.raises(Exception, match="draft_dtype"):
        engine_kwargs(fixture_paths["dspark"], draft_dtype="float16")


def test_draft_dtype_resolution(monkeypatch):
    """auto: float32 only on a CPU that would emulate the model dtype's GEMMs."""
    import torch

    from dspark_vllm import vllm_integration as vi

    cpu, cuda, bf16, f32 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16, torch.float32
    assert vi.draft_dtype("model", bf16, cpu) == bf16 and vi.draft_dtype("float32", bf16, cuda) == f32
    assert vi.draft_dtype("auto", f32, cpu) == f32 and vi.draft_dtype("auto", bf16, cuda) == bf16
    for native in (True, False):
        monkeypatch.setattr(vi, "_cpu_gemm_is_native", lambda dtype, native=native: native)
        assert vi.draft_dtype("auto", bf16, cpu) == (bf16 if native else f32)
    monkeypatch.undo()
    assert vi._cpu_gemm_is_native(f32)
    x86 = vi.platform.machine().lower() in ("x86_64", "amd64")
    if x86:  # the capability torch reports decides, e.g. False on AVX2-only parts
        assert vi._cpu_gemm_is_native(bf16) == (torch.cpu._is_avx512_bf16_supported()
                                                or torch.cpu._is_amx_tile_supported())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vocab_mismatch", "missing_key"])
def test_engine_start_fails_with_the_field(fixture_paths, tmp_path, case):
    """The same checks run when vLLM builds its config, before any engine starts."""
    from vllm import LLM

    edit_cfg, edit_w, field = CASES[case]
    bad = broken_copy(fixture_paths["dspark"], tmp_path / case, edit_cfg, edit_w)
    kwargs = engine_kwargs(fixture_paths["dspark"])
    kwargs["additional_config"]["dspark"]["draft_model"] = str(bad)
    with pytest.raises(Exception, match=field.replace(".", r"\.")):
        LLM(model=fixture_paths["target"], max_model_len=256, enforce_eager=True, **kwargs)


def test_one_rule_for_target_layer_ids_in_serving_and_training():
    """-1 (the embedding output) is allowed by the loader, the data builder and the feature
    extractor alike; the last layer by none of them."""
    from dspark_vllm.model.config import check_target_layer_ids

    check_target_layer_ids([-1, 0, 2], 4)
    for bad in ([0, 3], [2, 1], [-2, 0]):
        with pytest.raises(DSparkConfigError, match="target_layer_ids"):
            check_target_layer_ids(bad, 4)


def test_sized_fixtures_load_in_their_dtype(tmp_path):
    """scripts/make_fixtures.py's sizes (the README's per-step cost at larger models): a
    bf16 target and a one-layer drafter of the asked shape that the loader accepts as is."""
    from dspark_vllm.fixtures import make_fixtures

    paths = make_fixtures(tmp_path, draft_kw={"num_layers": 1, "markov_rank": 8, "target_layer_ids": [0, 1]},
                          dtype=torch.bfloat16, vocab_size=300, hidden_size=64, num_layers=3)
    target = TargetInfo.from_hf_config(AutoConfig.from_pretrained(paths["target"]))
    assert target.hidden_size == 64 and target.num_hidden_layers == 3
    assert {t.dtype for t in load_file(f"{paths['target']}/model.safetensors").values()} == {torch.bfloat16}
    cfg = validate_checkpoint(paths["dspark"], target, 7)
    assert (cfg.num_hidden_layers, cfg.markov_rank, list(cfg.target_layer_ids), cfg.block_size) == (1, 8, [0, 1], 7)
    assert {t.dtype for t in load_file(f"{paths['dspark']}/model.safetensors").values()} == {torch.bfloat16}
    assert load_draft_model(paths["dspark"], torch.bfloat16, torch.device("cpu")).fc.weight.dtype == torch.bfloat16
