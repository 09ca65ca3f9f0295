"""Hostile uploads, third round: bounded shape expressions and graphs, a model's first run, names that lie."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from streamlit.testing.v1 import AppTest
from torch import nn

from conftest import ROOT, cli, refused_in_child, shown
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


# ---------------------------------------------------------------------------------------------
# Hostile programs: one exported model, its archive rewritten as an attacker would

def _rewritten(raw: bytes, change) -> bytes:
    """The .pt2 archive `raw` with `change(members, prefix)` applied to its members."""
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    change(members, next(n for n in members if n.endswith("archive_format"))[: -len("archive_format")])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, body in members.items():
            z.writestr(name, body)
    return out.getvalue()


def _json_member(member: str, edit):
    def change(members, prefix):
        doc = json.loads(members[prefix + member])
        edit(doc)
        members[prefix + member] = json.dumps(doc).encode()
    return change


def _weight_meta(name: str, **fields):
    """Declare other sizes, strides or dtype for the stored weight `name` (its bytes unchanged)."""
    def edit(doc):
        meta = doc["config"][name]["tensor_meta"]
        for key, value in fields.items():
            meta[key] = [{"as_int": v} for v in value] if isinstance(value, list) else value
    return _json_member("data/weights/model_weights_config.json", edit)


def _conv_argument(argument: str, value):
    """Give the graph's conv2d call `argument` (stride, padding, groups) = `value`."""
    order = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    defaults = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}

    def edit(doc):
        node = next(n for n in doc["graph_module"]["graph"]["nodes"] if "conv2d" in n["target"])
        given = {i["name"]: i for i in node["inputs"]}
        given[argument] = {"name": argument, "arg": {"as_int" if argument == "groups" else "as_ints": value}, "kind": 1}
        last = max(order.index(n) for n in given)
        node["inputs"] = [given.get(n, {"name": n, "arg": {"as_ints": defaults.get(n)}, "kind": 1})
                          for n in order[:last + 1]]
    return _json_member("models/model.json", edit)


def _input_size(height: int, width: int):
    def edit(doc):
        x = doc["graph_module"]["graph"]["tensor_values"]["x"]
        x["sizes"] = x["sizes"][:2] + [{"as_int": height}, {"as_int": width}]
    return _json_member("models/model.json", edit)


def _sample_inputs(value):
    def change(members, prefix):
        buf = io.BytesIO()
        torch.save(value, buf)
        members[prefix + "data/sample_inputs/model.pt"] = buf.getvalue()
    return change


def hostile_programs(good: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (a rewritten copy of the program `good`, the sentence the user must read)."""
    return {
        "empty_record.pt2": (_rewritten(good, _weight_meta("conv.weight", sizes=[2**24, 1, 1, 1],
                                                           strides=[1, 1, 1, 1])),
                             "declares 16,777,216 values of float32 (67,108,864 bytes), but the file holds 288 bytes"),
        "repeated_values.pt2": (_rewritten(good, _weight_meta("fc.weight", sizes=[8, 1, 5000, 5000],
                                                              strides=[0, 0, 0, 0])),
                                "declares 200,000,090 weights values (each repeat of a shared or repeated value "
                                "counted), more than the 50,000,000 parameters"),
        "dtype999.pt2": (_rewritten(good, _weight_meta("conv.weight", dtype=999)),
                         "the weight 'conv.weight' has the type code 999, which is not a real tensor type"),
        "padding.pt2": (_rewritten(good, _conv_argument("padding", [2900, 2900])),
                        "the convolution in `conv` has the padding [2900, 2900]; each must be from 0 to 64"),
        "stride0.pt2": (_rewritten(good, _conv_argument("stride", [0, 0])),
                        "has the stride [0, 0]; each must be from 1 to 64"),
        "groups0.pt2": (_rewritten(good, _conv_argument("groups", 0)),
                        "has groups = 0; groups must be at least 1 and divide its 8 output channels"),
        "input1025.pt2": (_rewritten(good, _input_size(1025, 1025)),
                          "takes inputs of 1x1025x1025; this server accepts at most 16 channels and 1024x1024"),
        "sample_bytearray.pt2": (_rewritten(good, _sample_inputs((bytearray(2**10),))),
                                 "builds a 'builtins.bytearray'"),
        "sample_large.pt2": (_rewritten(good, _sample_inputs((torch.zeros(1).expand(2**23),))),
                             "sample inputs take 32 MB, more than the 16 MB"),
    }


def test_hostile_programs_are_refused_in_bounded_time_and_memory(tmp_path):
    good = tmp_path / "good.pt2"
    program.save(Conv().eval(), (1, 28, 28), good)
    files = hostile_programs(good.read_bytes())
    results = refused_in_child(tmp_path, "checkpoint", {n: raw for n, (raw, _) in files.items()}, good.read_bytes())
    assert set(results) == set(files)
    for name, (seconds, grown, message) in results.items():
        assert files[name][1] in message, (name, message)
        assert "\n" not in message and "Traceback" not in message, (name, message)
        assert seconds < 3 and grown < 100, (name, seconds, grown)  # each declares gigabytes or a terabyte pass


@pytest.mark.slow
def test_a_program_refused_at_its_first_run_leaves_the_session_as_it_was(tmp_path):
    wide = tmp_path / "wide.pt2"
    big = nn.Sequential(nn.Conv2d(1, 2048, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 10))
    program.save(big.eval(), (1, 28, 28), wide)  # fine on one image; a batch of 1,000 takes 6.4 GB
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/1_load.py").run()
    before = list(at.selectbox(key="model").options)
    at.file_uploader(key="upload").set_value(("wide.pt2", wide.read_bytes(), "application/octet-stream")).run()
    assert not at.exception, at.exception
    assert any("of activations (estimated on the meta device), more than the 4.0 GB" in shown(e.value) for e in at.error), \
        [e.value for e in at.error]
    assert list(at.selectbox(key="model").options) == before and at.selectbox(key="model").value == "fmnist_vgg"
    at.switch_page("pages/3_curve.py").run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])


def _tower(doc):
    """An exponent tower as the batch size's shape expression (it froze the server for minutes)."""
    x = doc["graph_module"]["graph"]["tensor_values"]["x"]
    x["sizes"][0] = {"as_expr": {"expr_str": "9**9**8", "hint": {"as_int": 2}}}


WORST_REASONS = {  # the sentence each worst file is refused with
    "tower.pt2": "raises to a power other than a symbol or number to at most 4",
    "empty_record.pt2": "but the file holds 288 bytes", "counter.pt": "builds a 'collections.Counter'",
    "bytearray.pt": "builds a 'builtins.bytearray'", "expand.pt": "more than the 381 MB",
    "bomb_key.pt": "(a decompression bomb)",
    "wide.pt2": "of activations (estimated on the meta device), more than the 4.0 GB"}


def worst_files(tmp_path) -> dict[str, bytes]:
    """The files that froze or filled the server before this round, each as small as it was then."""
    from test_robustness import hostile_checkpoints

    good = tmp_path / "good.pt2"
    program.save(Conv().eval(), (1, 28, 28), good)
    wide = tmp_path / "wide.pt2"
    program.save(nn.Sequential(nn.Conv2d(1, 2048, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(2048, 10)).eval(), (1, 28, 28), wide)
    checkpoints_ = hostile_checkpoints()
    return {"tower.pt2": _rewritten(good.read_bytes(), _json_member("models/model.json", _tower)),
            "empty_record.pt2": hostile_programs(good.read_bytes())["empty_record.pt2"][0],
            "wide.pt2": wide.read_bytes(),
            **{name: checkpoints_[name][0] for name in ("counter.pt", "bytearray.pt", "expand.pt", "bomb_key.pt")}}


def test_the_worst_files_are_refused_in_bounded_time_and_memory(tmp_path):
    files = worst_files(tmp_path)
    wide = files.pop("wide.pt2")  # its bytes are fine: its first run refuses it (the app test below)
    for name, (seconds, grown, message) in refused_in_child(tmp_path, "checkpoint", files, wide).items():
        assert WORST_REASONS[name] in message, (name, message)
        assert seconds < 3 and grown < 300, (name, seconds, grown)


CLI_CHILD = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
from core.__main__ import main
for path in sys.argv[2:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["info", path])
    print(json.dumps([path, code, err.getvalue()]), flush=True)
"""


def test_cli_refuses_every_hostile_file_with_exit_2_and_one_line(tmp_path):
    from test_robustness import hostile_checkpoints

    good = tmp_path / "good.pt2"
    program.save(Conv().eval(), (1, 28, 28), good)
    files = {**{n: raw for n, (raw, _) in hostile_programs(good.read_bytes()).items()},
             **{n: raw for n, (raw, _) in hostile_checkpoints().items()}, **worst_files(tmp_path)}
    files.pop("wide.pt2")  # one image of it is fine: `info` runs a batch of one
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    res = subprocess.run([sys.executable, "-c", CLI_CHILD, str(ROOT), *[str(tmp_path / n) for n in files]],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    results = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(results) == len(files)
    for path, code, err in results:
        first = err.splitlines()[0] if err else ""
        assert code == 2 and first.startswith("error: ") and "unexpected" not in first, (path, code, err)
        assert "Traceback" not in err and "\x1b" not in err, (path, err)
