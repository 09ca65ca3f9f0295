"""Hostile uploads, third round: bounded shape expressions and graphs, a model's first run, names that lie."""
from __future__ import annotations

import io
import time

import pytest
import torch
from torch import nn

from conftest import cli
from core import program, trial, untrusted


@pytest.mark.parametrize("expr, reason", [
    ("9**9**8", "raises to a power other than a symbol or number to at most 4"),
    ("PowByNatural(s0, 100)", "raises to a power"),
    ("Max(" + ", ".join(f"s{i}" for i in range(300)) + ")", "parts, more than the 200 a shape needs"),
    ("Max(s0, s1, s2, s3, s4, s5, s6, s7, s8)", "reads 9 shape symbols, more than the 8"),
    ("99999999999*s0", "has a number beyond 2,147,483,648"),
    ("__import__('os')", "is not plain arithmetic over shape symbols"),
])
def test_shape_expressions_that_cost_without_bound_are_refused_at_once(expr, reason):
    start = time.perf_counter()
    with pytest.raises(program.ProgramError, match="Refused: the program's graph holds a shape expression") as err:
        program._check_expr(expr)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("expr", ["s0", "784*s0", "Max(1, s0)", "s0**2", "Symbol('s77', positive=True, integer=True)"])
def test_the_shape_expressions_an_export_writes_are_accepted(expr):
    program._check_expr(expr)


def test_graphs_and_numbers_beyond_their_bounds_are_refused():
    nodes = [{"target": "x"}] * (program.MAX_GRAPH_NODES + 1)
    with pytest.raises(program.ProgramError, match="has 10,001 operators, more than the 10,000"):
        program._check_graph_json({"graph_module": {"graph": {"nodes": nodes}}})
    with pytest.raises(program.ProgramError, match="holds a number of 4,001 digits"):
        program._check_graph_json({"graph_module": {"graph": {"nodes": [{"sizes": [10**4000]}]}}})


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_activation_memory_is_estimated_on_the_meta_device_before_any_real_pass():
    start = time.perf_counter()
    with pytest.raises(trial.TrialError, match=r"one batch of 1,000 images would take about [\d,.]+ GB of "
                                               r"activations \(estimated on the meta device\), more than the 4\.0 GB"):
        trial.check_memory(Conv().eval(), (1, 6000, 6000))
    assert time.perf_counter() - start < 5
    trial.check_memory(Conv().eval(), (1, 28, 28))


def test_a_model_that_fails_its_first_real_pass_is_refused_in_words():
    x = torch.rand(8, 1, 28, 28)
    with pytest.raises(trial.TrialError, match=r"Refused: the model fails on a batch of 1x28x28 images \(RuntimeError: "
                                               r"Input type \(float\) and bias type \(double\)"):
        trial.check(Conv().double().eval(), (1, 28, 28), x, "multiclass", 10)  # float64 weights: already on meta
    with pytest.raises(trial.TrialError, match=r"gives \[8, 10\], not logits of shape \[8, 5000\]"):
        trial.check(Conv().eval(), (1, 28, 28), x, "multiclass", 5000)
    trial.check(Conv().eval(), (1, 28, 28), x, "multiclass", 10)


def test_names_from_a_file_are_shown_as_one_safe_line():
    assert untrusted.printable("conv\n\x1b[2JTraceback") == "conv\\n\\x1b[2JTraceback"
    assert untrusted.printable("x" * 100, 10) == "x" * 10 + "..."


def test_cli_prints_a_refusal_quoting_a_lying_name_as_one_line(tmp_path):
    buf = io.BytesIO()
    torch.save({"encoder\nTraceback (most recent call last):\x1b[2J": torch.zeros(3)}, buf)
    path = tmp_path / "names.pt"
    path.write_bytes(buf.getvalue())
    result = cli("info", str(path))
    assert result.returncode == 2, result.stderr
    first, *rest = result.stderr.splitlines()  # the sentence, then the lines that export a model as a .pt2
    assert "\x1b" not in result.stderr and not any(line.startswith("Traceback") for line in rest), result.stderr
    assert first.startswith("error: ") and "encoder\\nTraceback" in first, first
