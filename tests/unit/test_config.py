import pytest

from edgellm import config as cfg


def test_defaults():
    c = cfg.parse([], env={})
    # the hybrid: high-precision prefill, INT4-AWQ decode (bf16 activations)
    assert (c.model.prefill_dtype, c.model.decode_weights) == ("bf16", "int4-awq")
    assert (c.model.dtype_for("prefill"), c.model.dtype_for("decode")) == ("bf16", "bf16")
    assert (c.network.gateway_port, c.network.prefill_port, c.network.decode_port, c.network.monitor_port) == (
        50051,
        50052,
        50053,
        50054,
    )
    assert c.network.decode_addresses == ("127.0.0.1:50053",)


def test_flag_beats_environment_beats_default():
    env = {"EDGELLM_PREFILL_DTYPE": "bf16", "EDGELLM_DECODE_PORT": "6000"}
    c = cfg.parse(["--prefill-dtype", "fp16"], env=env)
    assert c.model.prefill_dtype == "fp16"  # flag wins
    assert c.network.decode_port == 6000  # environment over default
    assert c.network.prefill_port == 50052


def test_address_lists():
    c = cfg.parse(["--decode-addrs", "a:1, b:2"], env={})
    assert c.network.decode_addresses == ("a:1", "b:2")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prefill-dtype", "int3"], "prefill-dtype"),
        (["--decode-weights", "int3"], "decode-weights"),
        (["--int4-group-size", "48"], "int4_group_size"),
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
    c = cfg.parse(["--prefill-dtype", "fp32", "--decode-addrs", "x:1,y:2", "--health-interval-s", "0.5"], env={})
    again = cfg.parse(cfg.to_argv(c), env={"EDGELLM_PREFILL_DTYPE": "fp16"})
    assert again == c
    assert again.network.decode_addresses == ("x:1", "y:2")


def test_precision_per_phase():
    c = cfg.parse(["--prefill-dtype", "fp32", "--decode-weights", "fp16"], env={})
    assert (c.model.dtype_for("prefill"), c.model.dtype_for("decode")) == ("fp32", "fp16")
    assert not c.model.int4
    c = cfg.parse(["--decode-weights", "int4-rtn", "--int4-group-size", "32"], env={})
    assert c.model.int4 and c.model.dtype_for("decode") == "bf16"


def test_up_gives_the_two_engines_disjoint_cpus_unless_placed():
    from edgellm.placement import split_engine_cpus

    split = split_engine_cpus(cfg.parse([], env={}), (0, 1, 2))
    assert (split.placement.prefill_cpus, split.placement.decode_cpus) == ("0,1", "2")
    assert split.placement.cpus("prefill") == (0, 1) and split.placement.threads("decode") == 0  # threads follow
    placed = cfg.parse(["--decode-cpus", "1"], env={})
    assert split_engine_cpus(placed, (0, 1)) == placed
    assert split_engine_cpus(cfg.parse([], env={}), (0,)).placement.prefill_cpus == ""


def test_a_section_replaced_after_parsing_reaches_the_children_argv():
    """`edgellm up` splits the CPUs with dataclasses.replace; the argv its children get must carry it
    (it once read a shadow dict of the parsed values and dropped the split)."""
    from edgellm.placement import split_engine_cpus

    split = split_engine_cpus(cfg.parse([], env={}), (0, 1))
    child = cfg.parse(cfg.to_argv(split), env={})
    assert (child.placement.prefill_cpus, child.placement.decode_cpus) == ("0", "1")
    assert child == split


def test_every_option_lives_in_exactly_one_place():
    import dataclasses

    homes = [f.name for section in dataclasses.fields(cfg.Config) if section.name != "log_level"
             for f in dataclasses.fields(section.type if isinstance(section.type, type) else getattr(cfg, section.type))]
    assert sorted(homes + ["log_level"]) == sorted(o.name for o in cfg.OPTIONS)
