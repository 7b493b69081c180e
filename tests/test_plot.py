import json
import math

import pytest

from nanolm import metrics, plot


def _run(path, scale):
    with metrics.MetricsWriter(path, {"model": {"n_layer": 2}, "lr": 1e-3}) as w:
        for step in range(0, 200, 10):
            w.log("train", step, tokens=step * 4096, loss=scale * (3 + math.exp(-step / 50)),
                  lr=1e-3, tokens_per_s=40000.0 + 100 * step)
            if step % 50 == 0:
                w.log("eval", step, tokens=step * 4096, val_loss=scale * (3.1 + math.exp(-step / 50)))


def test_metrics_records_and_config(tmp_path):
    _run(tmp_path, 1.0)
    assert json.loads((tmp_path / "config.json").read_text())["model"] == {"n_layer": 2}
    records = metrics.read_metrics(tmp_path)
    assert len(records) == 24 and records[0]["kind"] == "train" and records[1]["kind"] == "eval"
    assert all({"kind", "step", "time"} <= r.keys() for r in records)


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    _run(tmp_path, 1.0)
    with metrics.MetricsWriter(tmp_path, {}, resume_step=100) as w:
        w.log("train", 110, loss=1.0)
    steps = [r["step"] for r in metrics.read_metrics(tmp_path) if r["kind"] == "train"]
    assert steps == list(range(0, 101, 10)) + [110]


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    _run(tmp_path / "a", 1.0)
    _run(tmp_path / "b", 0.9)
    out = tmp_path / "cmp.png"
    plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    _run(tmp_path, 1.0)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(SystemExit, match=r"nanolm\[plot\]"):
        plot.main([str(tmp_path)])
