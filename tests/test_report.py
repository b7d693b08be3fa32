"""A version's report.html (smocsd/report.py) and `smocsd models show`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from faults import _unavailable
from helpers import smocsd, write_config

from smocsd import modelfile, report
from smocsd.data import demo

MODELS = Path("models/autoencoder")
SPARK = "▁▂▃▄▅▆▇█"
TITLES = (
    "Training and validation loss by epoch",
    "Validation score distribution and threshold",
    "Reconstruction error by channel",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two versions: v1 on 3000 demo rows, v2 warm-started on 1000 more and compared with v1."""
    root = tmp_path_factory.mktemp("report")
    state = root / "state"
    config = write_config(root / "c.toml", state, training={"epochs": 8})
    demo.write(state / "readings.db", 3000)
    smocsd("train-once", config=config, check=True)
    demo.write(state / "readings.db", 1000)
    smocsd("train-once", "--force", config=config, check=True)
    return state, config


def version_dir(state: Path, version: int) -> Path:
    return state / MODELS / f"v{version:06d}"


def test_each_version_has_its_report_listed_and_verified_like_its_other_files(trained):
    state, _ = trained
    for version in (1, 2):
        directory = version_dir(state, version)
        meta = json.loads((directory / "metadata.json").read_text())
        html = (directory / "report.html").read_bytes()
        assert meta["files"]["report.html"] == {
            "sha256": hashlib.sha256(html).hexdigest(),
            "bytes": len(html),
        }
        assert modelfile.check(directory) is None
        # The losses of every epoch run, each finite; the report is the metadata's alone.
        history = meta["history"]
        assert (
            len(history["train_loss"]) == len(history["val_loss"]) == meta["metrics"]["epochs_run"]
        )
        # the three networks' epochs in turn; the validation loss is the saved model's
        assert all(v is not None for v in history["val_loss"])
        assert meta["metrics"]["val_loss"] == pytest.approx(meta["eval"]["val_loss"], rel=1e-4)
        assert report.render(meta) == html.decode("utf-8")


def test_a_changed_report_makes_the_version_damaged(tmp_path, trained):
    state, _ = trained
    directory = tmp_path / "v000001"
    shutil.copytree(version_dir(state, 1), directory)
    html = (directory / "report.html").read_text()
    (directory / "report.html").write_text(html.replace("promoted", "rejected"))  # same size
    assert modelfile.check(directory) == (
        "v000001/report.html: sha256 does not match metadata.json (file damaged)"
    )


def test_the_report_holds_its_figures_and_nothing_it_would_have_to_fetch(trained):
    state, _ = trained
    html = (version_dir(state, 2) / "report.html").read_text()
    assert html.count("<svg") == 3
    for title in TITLES:
        assert f"<title>{title}</title>" in html
    assert html.count("<polyline") >= 3  # two loss curves and the fitted log-normal
    assert "threshold " in html and "Compared with v1 on the same validation windows" in html
    for fetching in ("<script", "<link", "<img", "<iframe", "src=", "url(", "@import"):
        assert fetching not in html.lower()
    # The only address is SVG's namespace, which is a name, not a fetch.
    assert set(re.findall(r"https?://[^'\" ]+", html)) == {"http://www.w3.org/2000/svg"}


def test_every_string_from_the_metadata_is_escaped():
    evil = "<script>alert(1)</script>"
    html = report.render(
        {
            "name": evil,
            "version": 3,
            "outcome": evil,
            "channels": [evil],
            "channel_error": {evil: {"val_mse": 1.0, "share": 1.0}},
            "eval": {"champion_problem": evil, "previous_version": 2},
            "threshold_fit": {"method": evil},
            "software": {evil: evil},
            "history": {"train_loss": [1.0, None, 0.5], "val_loss": [2.0, 1.0, None]},
        }
    )
    assert "<script" not in html
    assert "&lt;script&gt;" in html


def test_metadata_without_the_newer_keys_still_renders():
    html = report.render({})
    assert "No losses by epoch were recorded" in html
    assert "<svg" not in html
    # An older version: no history, no fit; one finite loss; NaN-free numbers only.
    html = report.render({"version": 1, "threshold": 0.5, "history": {"val_loss": [0.3]}})
    assert html.count("<svg") == 2


def read_png(path: Path) -> np.ndarray:
    """The pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = np.frombuffer(data[pos : pos + 4], ">u4")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height = (int(v) for v in np.frombuffer(header[:8], ">u4"))
    depth, colour, interlace = header[8], header[9], header[12]
    assert (depth, interlace) == (8, 0) and colour in (2, 6), header
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.uint8)
    prior = np.zeros(width * bpp, np.int64)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if kind == 0:
            row = line
        elif kind == 1:  # Sub: a running sum per channel
            row = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            row = (line + prior) % 256
        else:  # Average and Paeth depend on the byte just decoded: one at a time
            row, up = [0] * len(line), prior.tolist()
            for i, value in enumerate(line.tolist()):
                left = row[i - bpp] if i >= bpp else 0
                if kind == 3:
                    row[i] = (value + (left + up[i]) // 2) % 256
                else:
                    corner = up[i - bpp] if i >= bpp else 0
                    p = left + up[i] - corner
                    pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else up[i] if pb <= pc else corner
                    row[i] = (value + pred) % 256
            row = np.array(row, np.int64)
        out[y], prior = row, row
    return out.reshape(height, width, bpp)[:, :, :3]


def screenshot(html: Path, png: Path, height: int = 1400) -> None:
    """html rendered by headless Chromium into png, 1000 pixels wide."""
    chromium = shutil.which("chromium")
    if chromium is None:
        _unavailable("chromium is not installed (tests/provision installs it)")
    proc = subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",  # as root, in a container
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={png.parent / 'chromium-profile'}",
            f"--screenshot={png}",
            f"--window-size=1000,{height}",
            html.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and png.is_file(), proc.stderr


def test_the_report_renders_in_a_browser(tmp_path, trained):
    state, _ = trained
    png = tmp_path / "report.png"
    screenshot(version_dir(state, 2) / "report.html", png)
    pixels = read_png(png)
    assert pixels.shape == (1400, 1000, 3)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 20  # text, axes, curves, bars, antialiasing
    not_white = (pixels < 250).any(axis=2)
    assert 0.02 < not_white.mean() < 0.5
    # The figures are drawn, not only text: the loss curves' and bars' red is there.
    red = (pixels[:, :, 0] > 180) & (pixels[:, :, 1] < 90) & (pixels[:, :, 2] < 90)
    assert red.sum() > 500


def test_models_show_prints_the_essentials(trained):
    state, config = trained
    meta = json.loads((version_dir(state, 2) / "metadata.json").read_text())
    out = smocsd("models", "show", "2", config=config, check=True).stdout
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["version"].strip() == "v000002"
    assert lines["outcome"].strip() == meta["outcome"]
    assert lines["backend"].strip() == meta["backend"]
    assert lines["threshold"].strip() == f"{meta['threshold']:.4g}"
    spark = lines["by epoch"].split()[0]
    assert len(spark) == meta["metrics"]["epochs_run"] and set(spark) <= set(SPARK)
    assert SPARK[0] in spark  # the best epoch is the lowest bar
    previous = meta["eval"]["previous_val_loss"]
    assert f"(v1's {previous:.4g})" in lines["val_loss"]
    assert lines["data"].strip().startswith(f"{meta['data']['rows']} rows")
    assert lines["report"].strip().endswith("v000002/report.html")
    shown = json.loads(smocsd("models", "show", "2", "--json", config=config, check=True).stdout)
    assert shown == meta


LEFT_OUT_ROW = re.compile(r"<tr><th>(.*?)</th><td[^>]*>(.*?)</td></tr>")


def test_the_left_out_section_says_which_rows_why_and_what_was_accepted():
    rejection = (
        "alarms on 50% of the 108 windows v2 alarmed on (rows it was not trained on), "
        "98% needed: it would learn the fault as <normal>"
    )
    meta = {
        "version": 3,
        "outcome": "rejected",
        "data": {
            "left_out": {
                "rows": 420,
                "ranges": [
                    {"first": 3283, "last": 3420, "why": "alarm", "rows": 138},
                    {"first": 3500, "last": 3510, "why": "spike", "rows": 11},
                    {"first": 3600, "last": 3870, "why": "excluded", "rows": 271},
                    {"first": 3900, "last": 3900, "why": "a future reason", "rows": 1},
                ],
                "accepted": [{"first": 4000, "last": 4600, "rows": 601}],
            }
        },
        "eval": {"champion_alarm_windows": 108, "alarm_windows_kept": 0.5, "rejection": rejection},
    }
    section = report.left_out_section(meta)
    assert f"<h2>Left out of training</h2>{section}<h2>Against the champion</h2>" in (
        report.render(meta)
    )
    assert LEFT_OUT_ROW.findall(section) == [
        ("rows left out", "420"),
        ("3283 … 3420: the model that was current alarmed on them", "138"),
        ("3500 … 3510: one window far above its threshold", "11"),
        ("3600 … 3870: an excluded period (smocsd exclude)", "271"),
        ("3900 … 3900: ?", "1"),
        ("4000 … 4600: accepted as normal, trained on", "601"),
        ("of the 108 windows the champion alarms on there, this version alarms on", "50.0%"),
    ]
    assert section.endswith(
        "<p>Not promoted: alarms on 50% of the 108 windows v2 alarmed on (rows it was not "
        "trained on), 98% needed: it would learn the fault as &lt;normal&gt;.</p>"
    )


def test_the_left_out_section_of_a_version_with_nothing_left_out_or_not_recorded():
    # A first version: screened, nothing left out, no champion to keep the alarms of.
    meta = {"data": {"left_out": {"rows": 0, "ranges": [], "accepted": []}}, "eval": {}}
    assert LEFT_OUT_ROW.findall(report.left_out_section(meta)) == [("rows left out", "0")]
    assert "Not promoted" not in report.left_out_section(meta)
    # Saved before smocsd screened new rows: no left_out at all.
    not_recorded = "<p class='note'>Not recorded (saved before smocsd screened new rows).</p>"
    for old in ({}, {"data": {"rows": 3000}, "eval": {"val_loss": 0.5}}):
        assert report.left_out_section(old) == not_recorded
        assert f"<h2>Left out of training</h2>{not_recorded}" in report.render(old)
