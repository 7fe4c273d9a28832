import json

import pytest

from llmopt.report import Report, plot_roofline


def make():
    r = Report(title="t", env={"cpu": "x86"})
    r.add("baseline", size_mb=26.5, perplexity=10.123456, tok_s_b1=100.0)
    r.add("int8", size_mb=7.0, perplexity=10.2, extra="yes")
    return r


def test_rows_and_replacement():
    r = make()
    assert [row["method"] for row in r.rows] == ["baseline", "int8"]
    r.add("baseline", size_mb=1.0)
    assert r["baseline"] == {"method": "baseline", "size_mb": 1.0} and len(r.rows) == 2
    with pytest.raises(KeyError, match="int4"):
        r["int4"]
    assert r.columns[:2] == ["method", "size_mb"]


def test_text_and_html():
    r = make()
    text = str(r)
    assert "size MB" in text and "perplexity" in text and "10.123" in text and "26.50" in text
    assert "machine: cpu=x86" in text
    lines = text.splitlines()
    assert len({len(lines[1]), len(lines[2]), len(lines[3])}) == 1  # aligned columns
    assert "-" in lines[4]  # a missing value prints as '-'
    html = r._repr_html_()
    assert "<table>" in html and "<td>int8</td>" in html


def test_json_round_trip(tmp_path):
    r = make()
    r.to_json(tmp_path / "r.json")
    back = Report.load(tmp_path / "r.json")
    assert back.rows == r.rows and back.env == r.env
    assert json.loads(r.to_json())["title"] == "t"


def test_plots(tmp_path):
    r = make()
    r.plot("size_mb", "perplexity", path=tmp_path / "q.png")
    plot_roofline({"a": 10.0, "b": 30.0}, 100.0, path=tmp_path / "roof.png")
    assert (tmp_path / "q.png").stat().st_size > 1000 and (tmp_path / "roof.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="tok_s_b16"):
        r.plot("size_mb", "tok_s_b16")
