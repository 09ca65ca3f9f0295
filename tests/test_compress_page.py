"""The Compress page in Streamlit's AppTest: the chart fills in, a point shows its exact numbers, a wiped-out
layer is said, fine-tuning runs in the background and its model downloads."""
import time

from streamlit.testing.v1 import AppTest

from conftest import ROOT
from core import compressed, tradeoff
from core.tasks import count_correct


def wait(at, until, seconds=240):
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        time.sleep(1.5)
        at.run()
        assert not at.exception, at.exception
        if until(at):
            return
    raise AssertionError("the page did not get there in time")


def metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def test_the_chart_fills_in_and_a_point_shows_its_exact_plan_and_fine_tunes():
    from ui import compress, keys

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/6_compress.py").run()
    assert not at.exception, at.exception
    assert "Press **Compute the chart**" in at.info[0].value
    at.button(key=keys.CMP_START).click().run()
    job = next(j for k, j in compress._jobs()[0].items() if k[0] == "chart")
    wait(at, lambda at: ("global-uncapped", 0.25) in job.points and ("random:2", 0.25) in job.points)
    at.button(key=keys.CMP_STOP).click().run()
    wait(at, lambda at: not job.running)
    assert any("Resume" == b.label for b in at.button)

    # the best point at 50% is shown first; its numbers are the naive procedure's
    net = compress.network(job_ckpt(), "cpu")
    s = tradeoff.Settings()
    line, target = at.selectbox(key=keys.CMP_LINE).value, at.selectbox(key=keys.CMP_TARGET).value
    assert target == 0.5 and line in tradeoff.LINES
    pt = job.points[(line, target)]
    right = count_correct(compressed.masked(net, tradeoff.as_plan(net, pt, s)), net.x, net.y)
    assert metric(at, "Test accuracy") == f"{right / 10000:.2%}"
    assert metric(at, "MACs kept") == f"{pt.macs / net.base_macs:.1%}"

    # global with the cap off, at 25% of the MACs: the first layers are wiped out, and the page says so
    at.selectbox(key=keys.CMP_LINE).set_value("global-uncapped").run()
    at.selectbox(key=keys.CMP_TARGET).set_value(0.25).run()
    assert any("Wiped out (every channel pruned" in c.value and "features.0.0" in c.value for c in at.caption)
    assert any("A layer lost every channel" in w.value for w in at.warning)

    # fine-tune the uniform point at 50% for a few steps: the model's own count, and its download
    at.selectbox(key=keys.CMP_LINE).set_value("uniform").run()
    at.selectbox(key=keys.CMP_TARGET).set_value(0.5).run()
    at.number_input(key=keys.CMP_STEPS).set_value(50).run()
    at.button(key=keys.CMP_FT_START).click().run()
    wait(at, lambda at: any(m.label == "After fine-tuning" for m in at.metric))
    ft = compress.job(compress.finetune_key(compress.chart_key(job_ckpt(), s, "cpu"), 50))
    model = ft.models[("uniform", 0.5)]
    assert metric(at, "After fine-tuning") == f"{compressed.count_model(model, net) / 10000:.2%}"
    assert any(c.value.startswith("No argument of small_vgg sets every pruned layer's width") for c in at.caption)


def job_ckpt():
    from ui import catalogue

    return catalogue.bundled_checkpoints()["fmnist_vgg"]
