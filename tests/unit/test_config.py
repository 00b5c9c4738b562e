import pytest

from edgellm import config as cfg


def test_defaults():
    c = cfg.parse([], env={})
    assert c.model.dtype == "fp32"
    assert (c.network.gateway_port, c.network.prefill_port, c.network.decode_port, c.network.monitor_port) == (
        50051,
        50052,
        50053,
        50054,
    )
    assert c.network.decode_addresses == ("127.0.0.1:50053",)


def test_flag_beats_environment_beats_default():
    env = {"EDGELLM_DTYPE": "bf16", "EDGELLM_DECODE_PORT": "6000"}
    c = cfg.parse(["--dtype", "fp16"], env=env)
    assert c.model.dtype == "fp16"  # flag wins
    assert c.network.decode_port == 6000  # environment over default
    assert c.network.prefill_port == 50052


def test_address_lists():
    c = cfg.parse(["--decode-addrs", "a:1, b:2"], env={})
    assert c.network.decode_addresses == ("a:1", "b:2")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "int3"], "dtype"),
        (["--gateway-port", "70000"], "gateway_port"),
        (["--gateway-port", "abc"], "cannot parse"),
        (["--kv-max-chunk-bytes", str(64 << 20)], "kv_max_chunk_bytes"),
        (["--down-after", "0"], "down_after"),
    ],
)
def test_bad_values_are_rejected_with_the_option_named(argv, message):
    with pytest.raises(ValueError, match=message):
        cfg.parse(argv, env={})


def test_to_argv_round_trips():
    c = cfg.parse(["--dtype", "bf16", "--decode-addrs", "x:1,y:2", "--health-interval-s", "0.5"], env={})
    again = cfg.parse(cfg.to_argv(c), env={"EDGELLM_DTYPE": "fp16"})
    assert again == c
    assert again.network.decode_addresses == ("x:1", "y:2")


def test_precision_per_phase_falls_back_to_dtype():
    c = cfg.parse(["--dtype", "fp16", "--prefill-dtype", "bf16"], env={})
    assert (c.model.dtype_for("prefill"), c.model.dtype_for("decode")) == ("bf16", "fp16")
    with pytest.raises(ValueError, match="prefill-dtype"):
        cfg.parse(["--prefill-dtype", "int4"], env={})
