"""AWQ on the tiny model: folding the scales keeps the full-precision model's output, the
search beats round-to-nearest on the calibration text, and the portable checkpoint
round-trips and refuses corrupt or mismatched files with a clear error."""

import copy
import pathlib

import pytest
import torch

from edgellm.engine.kv_cache import ForwardBatch
from edgellm.engine.weights import load_model
from edgellm.quant import checkpoint, cpu_kernel
from edgellm.quant.apply import apply_int4
from edgellm.quant.awq import awq_quantize, collect_stats, rtn_quantize
from edgellm.quant.prepare import Int4Settings, build_checkpoint, calibration_windows, load_int4_model


def logits(model, ids: list[int]) -> torch.Tensor:
    batch = ForwardBatch(token_ids=torch.tensor(ids), positions=torch.arange(len(ids)), is_prefill=True,
                         cu_seqlens=[0, len(ids)])
    return model(batch, None, all_logits=True).float()


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir):
    model = load_model(tiny_model_dir, "fp32").model
    windows = calibration_windows(pathlib.Path(tiny_model_dir))[:4]
    return model, windows, collect_stats(model, windows)


def test_folding_the_scales_keeps_the_full_precision_output(calibrated):
    model, windows, stats = calibrated
    folded = copy.deepcopy(model)
    awq_quantize(folded, copy.deepcopy(stats), 64, 4, quantize_lm_head=True)
    ids = windows[0][:100]
    assert torch.allclose(logits(folded, ids), logits(model, ids), atol=1e-3, rtol=1e-3)
    assert not torch.equal(folded.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.weight)


def test_awq_is_closer_to_full_precision_than_round_to_nearest(calibrated):
    model, windows, stats = calibrated
    ids = [t for w in windows[:2] for t in w][:512]
    reference = logits(model, ids)

    def error(quantized, source) -> float:
        int4 = apply_int4(source, quantized, torch.bfloat16)
        return float(((logits(int4, ids) - reference) ** 2).mean())

    rtn_model = copy.deepcopy(model)
    rtn = error(rtn_quantize(rtn_model, 64, True), rtn_model)
    awq_model = copy.deepcopy(model)
    awq = error(awq_quantize(awq_model, copy.deepcopy(stats), 64, 4, True), awq_model)
    assert awq < rtn


SETTINGS = Int4Settings("awq", 64, 4, True)


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("int4") / "tiny.safetensors"
    build_checkpoint(tiny_model_dir, SETTINGS, path)
    return path


def test_checkpoint_round_trip_serves_the_same_model(tiny_model_dir, saved):
    quantized, dense, meta = checkpoint.load(saved, {})
    assert meta["method"] == "awq" and meta["group_size"] == "64"
    assert set(quantized) >= {"layers.0.self_attn.q_proj", "layers.3.mlp.down_proj", "lm_head"}
    assert quantized["layers.0.mlp.up_proj"].outlier_channels.numel() == 4
    assert "layers.0.input_layernorm.weight" in dense  # AWQ scales are folded into the norms
    # the same file loads into the same model, and it approximates the fp32 model
    a = load_int4_model(tiny_model_dir, SETTINGS, str(saved)).model
    b = load_int4_model(tiny_model_dir, SETTINGS, str(saved)).model
    ids = list(range(100, 160))
    assert torch.equal(logits(a, ids), logits(b, ids))
    fp = logits(load_model(tiny_model_dir, "fp32").model, ids)
    cosine = torch.nn.functional.cosine_similarity(logits(a, ids), fp, dim=-1)
    assert float(cosine.mean()) > 0.75  # random weights N(0, 0.2): far more fragile than a trained model
    # the tiny model's embedding is untied, so it stays dense bf16; every linear layer is INT4
    embedding = a.embed_tokens.weight.numel() * 2
    assert a.weight_bytes() - embedding < 0.5 * (load_model(tiny_model_dir, "bf16").model.weight_bytes() - embedding)


@pytest.mark.skipif(cpu_kernel.library() is None, reason="no C compiler: the C INT4 kernel is unavailable")
def test_both_int4_kernels_serve_the_same_model(tiny_model_dir, saved):
    """--int4-kernel c (ours) and torch (torch's) compute the same weights; prompts of 20 and 100
    tokens take our kernel's register-blocked and dense paths."""
    ours = load_int4_model(tiny_model_dir, SETTINGS, str(saved), kernel="c").model
    torchs = load_int4_model(tiny_model_dir, SETTINGS, str(saved), kernel="torch").model
    assert ours.weight_bytes() < torchs.weight_bytes()
    for length in (20, 100):
        ids = list(range(200, 200 + length))
        cosine = torch.nn.functional.cosine_similarity(logits(ours, ids), logits(torchs, ids), dim=-1)
        assert float(cosine.min()) > 0.99  # bf16 activations in both; only the kernels' rounding differs


def test_a_corrupted_checkpoint_is_rejected(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit in the tensor data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load(bad, {})
    bad.write_bytes(saved.read_bytes()[: len(data) // 2])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(bad, {})


def test_a_checkpoint_of_another_format_version_is_rejected(saved, tmp_path):
    """A v1 file (bf16 scales and zeros) is never read as v2 (8-bit parameter codes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={**meta, "format_version": "1"})
    with pytest.raises(checkpoint.CheckpointError, match="not an edgellm-int4 v2 checkpoint"):
        checkpoint.load(old, {})
    del tensors["layers.0.mlp.up_proj.scale_codes"]  # well-formed, checksum right, a part missing
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial), metadata={**meta, "sha256": checkpoint._tensor_digest(tensors)})
    with pytest.raises(checkpoint.CheckpointError, match="lacks layers.0.mlp.up_proj.scale_codes"):
        checkpoint.load(partial, {})


def test_a_mismatched_checkpoint_is_rejected(tiny_model_dir, saved, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="group_size='64'.*group_size='32'"):
        load_int4_model(tiny_model_dir, Int4Settings("awq", 32, 4, True), str(saved))
    from tests.conftest import build_tiny_model

    other = build_tiny_model(str(tmp_path / "other"), num_layers=2)
    with pytest.raises(checkpoint.CheckpointError, match="source_model"):
        load_int4_model(other, SETTINGS, str(saved))


def test_awq_at_a_group_size_the_input_width_does_not_divide(calibrated):
    """128 does not divide the tiny model's 64-wide inputs: those layers use 64, as with RTN."""
    model, _, stats = calibrated
    quantized = awq_quantize(copy.deepcopy(model), copy.deepcopy(stats), 128, 0, quantize_lm_head=True)
    assert quantized["layers.0.self_attn.q_proj"].group_size == 64
    assert quantized["layers.0.mlp.down_proj"].group_size == 128
