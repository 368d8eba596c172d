"""What explain()'s summary says: numbers, the costliest reasons with source line and fix, and
Dynamo's notes. These pin the content (what is said), not the wording."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import hpuopt
from hpuopt.diagnostics import wording
from hpuopt.diagnostics.dynamo import GraphBreak, _parse, notes
from hpuopt.diagnostics.summary import TOP


class MaskModel(torch.nn.Module):
    """A linear layer, a boolean mask (data-dependent rows), another linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(8, 8)
        self.expert = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.encoder(x))
        kept = h[h.sum(-1) > 0]  # MASK-LINE
        return self.expert(kept)


class Centered(torch.nn.Module):
    """Rows that pad (the MLP) and a mean over the batch that does not."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)
        )

    def forward(self, x):
        h = self.mlp(x)
        return h - h.mean(dim=0)  # MEAN-LINE


def _text_and_summary(compiled):
    report = compiled.explain()
    return report, str(report), report.summary


def _head(text: str) -> str:
    return text.split("\nDetails:")[0]


def test_dynamic_op_summary_counts_calls_and_names_the_line_and_the_fix():
    model = MaskModel().eval()
    compiled = hpuopt.compile(model, dynamic=True)
    with torch.no_grad():
        for batch in (4, 6, 9, 5):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))
    report, text, s = _text_and_summary(compiled)

    assert s.dynamo_graphs == 1 and s.calls == 4
    assert s.dynamic_pieces == 1 and s.captured_pieces == 2
    assert s.piece_runs == 12 and s.replays == 8 and s.uncaptured_runs == 4 and s.fallback_runs == 0
    assert s.device_graphs == sum(len(p.graphs) for p in report.pieces) and s.held_bytes > 0

    top = s.costs[0]
    assert top.kind == "not captured" and top.category == "data_dependent_shape"
    assert top.calls == 4
    assert "MASK-LINE" in top.source
    assert re.match(r"[\w/.-]*test_summary\.py:\d+ in forward", top.source), top.source
    assert "torch.where" in top.fix and top.link == wording.link("not_captured")

    head = _head(text)
    assert "called 4 times" in head and "8 of 12 piece runs" in head
    assert "uncaptured: 4 piece runs" in head
    assert "not captured (4 calls)" in head and "MASK-LINE" in head
    assert "docs/troubleshooting.md#a-piece-is-not-captured" in head
    # the internals the issue named are translated or gone
    for internal in ("sym_size", "_assert_scalar", "host-side node", "(u0)", "(u1)", "(u2)",
                     "mark_step", "(pad ", "input 2 dim 0"):
        assert internal not in text, internal
    assert "shape arithmetic on the host" in text
    assert "x dim 0" in text  # the symbolic size, named after the input it comes from


def test_padded_and_exact_pieces_summary_says_which_size_pads_and_what_blocks_padding():
    model = Centered().eval()
    compiled = hpuopt.compile(model, dynamic=True)
    with torch.no_grad():
        for batch in (3, 5, 6, 7, 9):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))
    report, text, s = _text_and_summary(compiled)
    assert s.exact_pieces == 1 and s.padded_pieces == 0
    (cost,) = s.costs
    assert cost.kind == "not padded" and cost.category == "padding"
    assert cost.calls == 5 and cost.captures == 5
    assert "mean" in cost.what and "x dim 0" in cost.what and "MEAN-LINE" in cost.source
    assert "max_graphs" in cost.fix and cost.link == wording.link("not_padded")
    (piece,) = report.pieces
    assert piece.not_padded and piece.not_padded[0].size == "x dim 0"
    assert piece.padding.startswith("exact shapes")  # the data form keeps the runtime's words
    assert "not padded (5 calls, 5 captures)" in _head(text)

    # without the mean the same rows pad to buckets: fewer graphs, and the waste is reported
    torch._dynamo.reset()
    hpuopt.reset()
    mlp = model.mlp
    compiled = hpuopt.compile(mlp, dynamic=True)
    with torch.no_grad():
        for batch in (3, 5, 6, 7, 9):
            compiled(torch.randn(batch, 8))
    report, text, s = _text_and_summary(compiled)
    (piece,) = report.pieces
    assert piece.padded == ("args[0] dim 0",) or piece.padded[0].endswith("dim 0")
    assert s.padded_pieces == 1 and not s.costs
    assert s.device_graphs == 3 and s.pad_waste is not None and 0 < s.pad_waste < 0.5
    head = _head(text)
    assert "1 piece pads to buckets" in head and "were padding" in head
    assert f"pads {piece.padded[0]} to powers of two" in text
    assert "buckets 4x8, 8x8, 16x8" in text


def test_fallback_summary_counts_uncaptured_runs_and_says_what_to_do():
    def f(x):
        y = torch.sin(x)
        return y[y > 0].sum() * y

    compiled = hpuopt.compile(f, disable_passes=["split"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            x = torch.randn(4, 3)
            torch.testing.assert_close(compiled(x), f(x))
    report, text, s = _text_and_summary(compiled)
    assert s.fallback_runs == 3 and s.uncaptured_runs == 3 and s.replays == 0
    assert s.device_graphs == 0
    (cost,) = s.costs
    assert cost.kind == "runs uncaptured" and cost.category == "fallback" and cost.calls == 3
    assert "boolean mask" in cost.what
    assert 'dynamic_ops=["aten.index"]' in cost.fix
    assert cost.link == wording.link("fallback")
    (piece,) = report.pieces
    assert piece.uncaptured_runs == 3 and piece.fallbacks
    assert "runs uncaptured (3 calls)" in _head(text)
    assert "runs uncaptured for some inputs" in text  # the detail line stays


def test_costs_are_ranked_by_calls_and_the_text_shows_the_top_ones():
    class Two(torch.nn.Module):
        def forward(self, x, flag):
            y = x[x > 0]  # one dynamic op
            if flag:
                z = x.nonzero()  # another, on one call only
                return y.sum() + z.sum()
            return y.sum()

    compiled = hpuopt.compile(Two())
    for flag in (False, False, False, True):
        compiled(torch.randn(6), flag)
    s = compiled.explain().summary
    calls = [c.calls for c in s.costs]
    assert calls == sorted(calls, reverse=True) and len(s.costs) >= 2
    assert s.costs[0].calls > s.costs[-1].calls
    text = str(compiled.explain())
    assert text.count("what to do:") <= TOP + len(s.dynamo)


def test_capture_disabled_is_a_cost_of_its_own():
    compiled = hpuopt.compile(torch.nn.Linear(3, 3), capture=False)
    with torch.no_grad():
        for _ in range(2):
            compiled(torch.randn(2, 3))
    (cost,) = compiled.explain().summary.costs
    assert cost.kind == "runs uncaptured" and "capture=False" in cost.what and cost.calls == 2


# -- Dynamo ------------------------------------------------------------------------------------


def test_lstm_without_allow_rnn_says_nothing_was_compiled_and_why():
    lstm = torch.nn.LSTM(4, 4, batch_first=True)
    compiled = hpuopt.compile(lstm)
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=False):
        compiled(torch.randn(2, 3, 4))
    report = compiled.explain()
    assert not report.graphs
    kinds = [n.kind for n in report.dynamo]
    assert kinds[0] == "nothing_compiled" and "rnn" in kinds
    rnn = next(n for n in report.dynamo if n.kind == "rnn")
    assert "allow_rnn = True" in rnn.fix and rnn.link == wording.link("dynamo")
    text = str(report)
    assert "nothing compiled" in text and "allow_rnn" in text


def test_nothing_called_yet_says_so():
    report = hpuopt.compile(torch.nn.Linear(2, 2)).explain()
    (note,) = report.dynamo
    assert note.kind == "nothing_compiled" and "call the model first" in note.fix
    assert "nothing compiled" in str(report)


def test_graph_break_names_the_user_line_and_dynamos_reason():
    def f(x):
        y = x.sin()
        print("", end="")  # BREAK-LINE
        return y.cos()

    compiled = torch.compile(f, backend="hpugraph")
    compiled(torch.randn(3))
    report = hpuopt.explain()
    (brk,) = [n for n in report.dynamo if n.kind == "graph_break"]
    assert brk.source and "BREAK-LINE" in brk.source and "print" in brk.what
    assert "graph break" in _head(str(report)) and "BREAK-LINE" in str(report)
    assert len(report.graphs) == 2


def test_plain_compile_break_at_a_dynamic_op_suggests_hpuopt_compile():
    def f(x):
        return x[x > 0].sum() * x

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        compiled = torch.compile(f, backend="hpugraph")
        compiled(torch.randn(5))
    notes_ = [n for n in hpuopt.explain().dynamo if n.kind == "graph_break"]
    assert notes_ and "hpuopt.compile" in notes_[0].fix


def test_recompile_for_a_new_size_names_the_input_and_mark_dynamic():
    model = torch.nn.Linear(4, 4).eval()
    compiled = hpuopt.compile(model)
    with torch.no_grad():
        for batch in (3, 5, 7):
            compiled(torch.randn(batch, 4))
    report = compiled.explain()
    (note,) = report.dynamo
    assert note.kind == "recompiled" and "dim 0" in note.what and "mark_dynamic" in note.fix
    assert [g.dynamic_inputs for g in report.graphs][0] == ()
    assert report.graphs[1].dynamic_inputs and report.graphs[1].dynamic_inputs[0].endswith("dim 0")


def test_breaks_before_a_session_are_not_its_own():
    def f(x):
        print("", end="")
        return x + 1

    torch.compile(f, backend="hpugraph")(torch.randn(2))
    compiled = hpuopt.compile(torch.nn.Linear(2, 2))  # a new session: the break came before it
    with torch.no_grad():
        compiled(torch.randn(1, 2))
    assert not [n for n in compiled.explain().dynamo if n.kind == "graph_break"]


def test_dynamo_notes_never_raise_on_odd_records(monkeypatch):
    from torch._dynamo import utils

    monkeypatch.setattr(utils, "graph_break_reasons", [object(), "a plain string"], raising=False)
    report = hpuopt.explain()
    assert isinstance(str(report), str)
    assert notes((GraphBreak("x"),), 1)[0].kind == "graph_break"
    parsed = _parse("First\n  Explanation: why\n  Hint: do this\n  Hint: Please report an issue.")
    assert parsed.reason == "First" and parsed.explanation == "why" and parsed.hints == ("do this",)


# -- wording -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, words",
    [
        (("(static)",), "1 graph (fixed shapes)"),
        (("(2x64)", "(4x64)"), "2 graphs (exact 2x64, 4x64)"),
        (("(pad 1x64)", "(pad 0x64)"), "2 graphs (buckets 1x64, 0x64 (no rows))"),
        (("(static) (uncaptured)",), "1 graph (uncaptured fixed shapes)"),
        ((), "no graph held"),
    ],
)
def test_graph_keys_in_words(keys, words):
    assert wording.describe_keys(keys) == words


def test_source_lines_are_relative_and_squeezed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = f"{tmp_path}/pkg/model.py:12 in forward: y = f(x)          # note"
    assert wording.short_source(src) == "pkg/model.py:12 in forward: y = f(x)  # note"
    assert wording.short_source("/elsewhere/m.py:3 in f: x").startswith("/elsewhere/m.py:3")
