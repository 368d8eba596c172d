"""Config: options over HPUOPT_* variables over defaults; unknown keys and bad values are errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo

import hpuopt
from hpuopt import Config, ConfigError


def test_defaults_env_and_options_layer_in_that_order():
    env = {"HPUOPT_MAX_GRAPHS": "7", "HPUOPT_STRICT": "true", "HPUOPT_DYNAMIC_OPS": "aten.cos, aten.sin"}
    cfg = Config.from_options({"max_graphs": 3}, environ=env)
    assert cfg.max_graphs == 3  # the option wins over the variable
    assert cfg.strict is True
    assert cfg.dynamic_ops == ("aten.cos", "aten.sin")
    assert Config.from_options(environ={}).max_graphs == Config().max_graphs


def test_unrelated_environment_is_ignored():
    assert Config.from_options(environ={"PATH": "/bin", "HPUOPTX": "1"}) == Config()


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        Config.from_options({"max_graph": 3}, environ={})
    message = str(err.value)
    assert "max_graph" in message
    for name in Config.field_names():
        assert name in message


def test_unknown_variable_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="HPUOPT_NOPE"):
        Config.from_options(environ={"HPUOPT_NOPE": "1"})


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"max_graphs": "8"}, "must be an int"),
        ({"max_graphs": True}, "must be an int"),
        ({"max_graphs": 0}, "at least 1"),
        ({"strict": 1}, "must be a bool"),
        ({"runtime": "tpu"}, "runtime='tpu'"),
        ({"dynamic_ops": "aten.cos"}, "list of strings"),
        ({"bucket_sizes": [8, 4]}, "strictly ascending"),
        ({"bucket_sizes": ["8"]}, "integers only"),
        ({"max_pad_waste": 1.5}, "max_pad_waste"),
        ({"above_largest": "pad"}, "above_largest"),
        ({"disable_passes": [3]}, "strings only"),
    ],
)
def test_bad_values_are_clear_errors(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Config.from_options(options, environ={})


@pytest.mark.parametrize("raw", ["maybe", "2x"])
def test_bad_variable_values_are_clear_errors(raw):
    with pytest.raises(ConfigError, match="HPUOPT_"):
        Config.from_options(environ={"HPUOPT_STRICT": raw, "HPUOPT_MAX_GRAPHS": "1"} if raw == "maybe" else {"HPUOPT_MAX_GRAPHS": raw})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().strict = True  # type: ignore[misc]


def test_unknown_option_through_torch_compile_raises():
    f = torch.compile(lambda x: x + 1, backend="hpugraph", options={"bogus": 1})
    with pytest.raises(Exception, match="bogus"):
        f(torch.randn(3))


def test_hpuopt_compile_checks_options_eagerly():
    with pytest.raises(ConfigError, match="bogus"):
        hpuopt.compile(lambda x: x, bogus=1)


def test_hpuopt_compile_sets_dynamo_flags_for_its_calls_only():
    seen = []

    def f(x):
        seen.append(
            (
                torch._dynamo.config.capture_dynamic_output_shape_ops,
                torch._dynamo.config.capture_scalar_outputs,
            )
        )
        return x[x > 0].sum()

    before = (
        torch._dynamo.config.capture_dynamic_output_shape_ops,
        torch._dynamo.config.capture_scalar_outputs,
    )
    compiled = hpuopt.compile(f)
    x = torch.randn(10)
    torch.testing.assert_close(compiled(x), f(x))
    assert seen[0] == (True, True)  # traced with the flags on
    after = (
        torch._dynamo.config.capture_dynamic_output_shape_ops,
        torch._dynamo.config.capture_scalar_outputs,
    )
    assert after == before
    assert any(r.reason == "data_dependent_shape" for r in compiled.explain().splits)


def test_disabled_split_captures_whole_graph():
    lin = torch.nn.Linear(4, 4)
    f = torch.compile(lin, backend="hpugraph", options={"disable_passes": ["split"]})
    with torch.no_grad():
        x = torch.randn(2, 4)
        torch.testing.assert_close(f(x), lin(x))
    report = hpuopt.explain()
    (aot,) = report.graphs[0].aot_graphs
    assert "split" not in aot.passes and len(aot.pieces) == 1 and aot.pieces[0].captured


def test_capture_false_runs_pieces_uncaptured():
    lin = torch.nn.Linear(4, 4)
    f = torch.compile(lin, backend="hpugraph", options={"capture": False})
    with torch.no_grad(), hpuopt.counters.expect(graphs_captured=0, replays=0, uncaptured_runs=2):
        for _ in range(2):
            x = torch.randn(2, 4)
            torch.testing.assert_close(f(x), lin(x))


def test_debug_and_dump_dir(tmp_path):
    f = torch.compile(
        lambda x: x.sin() * 2,
        backend="hpugraph",
        options={"debug": True, "dump_dir": str(tmp_path)},
    )
    x = torch.randn(5)
    torch.testing.assert_close(f(x), x.sin() * 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".split.py") for n in names)
    assert any(n.endswith(".input.py") for n in names)


def test_backend_registers_itself_without_an_installed_entry_point(monkeypatch):
    import importlib.metadata

    from torch._dynamo.backends import registry

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: _NoEntryPoints())
    monkeypatch.delitem(registry._COMPILER_FNS, "hpugraph", raising=False)
    monkeypatch.setitem(registry._BACKENDS, "hpugraph", None)
    hpuopt._register_backend()
    assert registry._COMPILER_FNS["hpugraph"] is hpuopt.hpugraph_backend
    hpuopt._register_backend()  # a second import-time call is not a duplicate registration
    x = torch.randn(4)
    torch.testing.assert_close(torch.compile(torch.sin, backend="hpugraph")(x), torch.sin(x))


class _NoEntryPoints:
    names: tuple[str, ...] = ()
