"""The console script, run as a user would: a subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

CLI = [sys.executable, "-c", "from wsi_sampler.cli import main; main()"]


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_info_json(cmu_svs: Path) -> None:
    r = run("info", cmu_svs)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["width"] == 2220 and info["vendor"] == "aperio"


def test_demo_slide_and_plan_formats(tmp_path: Path) -> None:
    slide = tmp_path / "demo.svs"
    r = run("demo-slide", slide, "--width", "4096", "--height", "3072", "--mpp", "0.25")
    assert r.returncode == 0, r.stderr
    for name in ("c.csv", "c.geojson", "c.json", "c.h5"):
        r = run("plan", slide, "--out", tmp_path / name, "--mpp", "0.5", "--size", "224",
                "--overlay", tmp_path / "ov.png")
        assert r.returncode == 0, r.stderr
        assert "patches" in r.stderr
    rows = list(csv.DictReader((tmp_path / "c.csv").read_text().splitlines()))
    assert rows and rows[0]["width"] == "448"
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["coords"].shape == (len(rows), 2)
    assert len(json.loads((tmp_path / "c.json").read_text())["patches"]) == len(rows)
    assert (tmp_path / "ov.png").stat().st_size > 0


def test_patches_folder(demo_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    r = run("patches", demo_slide, "--out", out, "--strategy", "stratified", "-n", "8",
            "--format", "jpeg")
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.glob("*.jpg"))
    assert files == [f"{i:06d}.jpg" for i in range(8)]
    rows = list(csv.DictReader((out / "index.csv").read_text().splitlines()))
    assert [r["file"] for r in rows] == files
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["plan"]["strategy"] == "stratified"
    assert (out / "overlay.png").exists() and (out / "tissue_mask.png").exists()
    assert not list(out.glob(".*.tmp"))


def test_jpeg_patches_that_are_whole_stored_tiles_are_the_tiles(demo_slide: Path,
                                                                tmp_path: Path) -> None:
    """A 256 px grid at the native level of a slide tiled in 256 px: each .jpg is the stored
    tile, decoding to exactly what openslide reads there (a re-encode could not)."""
    import imagecodecs
    import numpy as np
    import openslide

    out = tmp_path / "tiles"
    r = run("patches", demo_slide, "--out", out, "--strategy", "grid", "--size", "256",
            "--format", "jpeg")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((out / "index.csv").read_text().splitlines()))
    assert len(rows) > 50
    with openslide.OpenSlide(str(demo_slide)) as osr:
        for row in rows[:: max(1, len(rows) // 40)]:
            assert (int(row["width"]), int(row["height"])) == (256, 256)
            region = osr.read_region((int(row["minx"]), int(row["miny"])), 0, (256, 256))
            decoded = imagecodecs.jpeg8_decode((out / row["file"]).read_bytes())
            assert np.array_equal(decoded, np.asarray(region)[:, :, :3]), row["file"]


def test_tissue_command(dapi_ndpi: Path, tmp_path: Path) -> None:
    r = run("tissue", dapi_ndpi, "--out", tmp_path / "m.png", "--geojson", tmp_path / "t.geojson")
    assert r.returncode == 0, r.stderr
    geo = json.loads((tmp_path / "t.geojson").read_text())
    assert geo["features"][0]["geometry"]["type"] == "MultiPolygon"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "/no/such/slide.svs"], "no such slide"),
        (["plan", "{kidney}", "--out", "{tmp}/x.csv"], "mpp_override"),
        (["plan", "{cmu}", "--out", "{tmp}/x.txt"], "unknown output type"),
        (["plan", "{cmu}", "--out", "{tmp}/x.csv", "--strategy", "random"], "needs n_patches"),
        (["plan", "{cmu}", "--out", "{tmp}/x.csv", "--size", "2"], "patch_size_px"),
        (["plan", "{cmu}", "--out", "{tmp}/x.csv", "--roi", "{tmp}/none.geojson"], "GeoJSON"),
        (["info", "{tmp}/empty.svs"], "empty"),
        (["info", "{tmp}/text.svs"], "not a supported"),
    ],
)
def test_user_errors_are_one_line(
    args: list[str], message: str, tmp_path: Path, cmu_svs: Path, kidney_tif: Path
) -> None:
    (tmp_path / "empty.svs").touch()
    (tmp_path / "text.svs").write_text("hello")
    subst = {"{cmu}": str(cmu_svs), "{kidney}": str(kidney_tif), "{tmp}": str(tmp_path)}
    filled = []
    for a in args:
        for k, v in subst.items():
            a = a.replace(k, v)
        filled.append(a)
    r = run(*filled)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_geojson_mask_replaces_detection(demo_slide: Path, tmp_path: Path) -> None:
    roi = {"type": "Polygon",
           "coordinates": [[[0, 0], [1024, 0], [1024, 1024], [0, 1024], [0, 0]]]}
    (tmp_path / "mask.geojson").write_text(json.dumps(roi))
    r = run("plan", demo_slide, "--out", tmp_path / "c.csv", "--mask", tmp_path / "mask.geojson",
            "--min-tissue", "1.0")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "c.csv").read_text().splitlines()))
    # the top-left corner of the demo slide is background, so only the mask puts patches there
    assert sorted((int(r["minx"]), int(r["miny"])) for r in rows) == [
        (x, y) for x in (0, 256, 512, 768) for y in (0, 256, 512, 768)
    ]


def test_worker_with_a_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    r = run("worker", "--model", tmp_path / "none.json", "--port", "1")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "none.json" in r.stderr


def test_fewer_patches_than_asked_is_said(demo_slide: Path, tmp_path: Path) -> None:
    r = run("plan", demo_slide, "--out", tmp_path / "p.json", "--strategy", "random",
            "-n", "100000")
    assert r.returncode == 0, r.stderr
    assert "fewer than the 100000 asked" in r.stderr


def test_patches_refuse_a_folder_holding_another_run(demo_slide: Path, cmu_svs: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "p"
    first = run("patches", cmu_svs, "--out", out, "--strategy", "random", "-n", "6")
    assert first.returncode == 0, first.stderr
    again = run("patches", demo_slide, "--out", out, "--strategy", "random", "-n", "3")
    assert again.returncode == 2 and "is not empty" in again.stderr
    assert len(list(out.glob("*.png"))) == 6 + 2  # untouched: 6 patches, overlay, mask
    (out / "notes.txt").write_text("mine")
    replaced = run("patches", demo_slide, "--out", out, "--strategy", "random", "-n", "3",
                   "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(3)]
    assert (out / "notes.txt").read_text() == "mine"  # only an earlier run's files go
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["slide"]["width"] == 8192  # the demo slide's, not CMU's


@pytest.mark.parametrize("args", [["--help"], ["models", "list"], ["info", "{slide}"],
                                  ["plan", "{slide}", "--out", "{tmp}/p.json"],
                                  ["tissue", "{slide}", "--out", "{tmp}/m.png"],
                                  ["score", "--help"]])
def test_commands_that_run_no_model_import_no_torch(args: list[str], cmu_svs: Path,
                                                    tmp_path: Path) -> None:
    argv = [a.format(slide=cmu_svs, tmp=tmp_path) for a in args]
    code = "\n".join([
        "import sys", f"sys.argv = ['wsi-sampler', *{argv!r}]",
        "from wsi_sampler.cli import main", "try:", "    main()",
        "except SystemExit as exc:", "    assert not exc.code, exc.code",
        "heavy = [m for m in ('torch', 'timm', 'distributed', 'botocore', 'fastapi')"
        " if m in sys.modules]", "print('HEAVY', heavy, file=sys.stderr)"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "HEAVY []", done.stderr


def _commands() -> list[tuple[str, object]]:
    import typer.main

    from wsi_sampler.cli import app

    root = typer.main.get_command(app)
    found = []
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        found += [(f"{name} {sub}", c) for sub, c in subs.items()] if subs else [(name, cmd)]
    return found


# Every command's --help in one process (one start instead of one per command).
_ALL_HELP = ("import sys\nfrom wsi_sampler.cli import main\nfor name in sys.argv[1:]:\n"
             "    sys.argv = ['wsi-sampler', *name.split(), '--help']\n"
             "    print('\\0' + name, flush=True)\n"
             "    try:\n        main()\n    except SystemExit as exc:\n"
             "        assert not exc.code, (name, exc.code)\n")


def test_every_option_says_what_it_does_and_80_columns_cut_no_name() -> None:
    import click

    commands = _commands()
    done = subprocess.run([sys.executable, "-c", _ALL_HELP, *(n for n, _ in commands)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    helps = dict(part.split("\n", 1) for part in done.stdout.split("\0")[1:])
    for name, cmd in commands:
        options = [p for p in cmd.params if isinstance(p, click.Option)]  # type: ignore[attr-defined]
        undocumented = [o.opts[0] for o in options if not (o.help or "").strip()]
        assert not undocumented, f"{name}: {undocumented}"
        text = helps[name]
        assert "Usage:" in text, name
        for option in options:
            for opt in option.opts:
                assert opt in text, f"{name}: {opt} cut or missing at 80 columns"
        assert max(len(line) for line in text.splitlines()) <= 80, name


def test_a_list_setting_that_is_not_json_says_what_is_expected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from api.config import Settings, load_settings

    lists = [n for n, f in Settings.model_fields.items()
             if str(f.annotation).startswith(("list", "dict"))]
    assert {"slide_roots", "api_keys", "remote_slide_roots", "cors_origins"} <= set(lists)
    for name in lists:
        with monkeypatch.context() as mp:
            mp.setenv(f"WSI_{name.upper()}", "/not/json-secret-value")
            with pytest.raises(ValueError, match=f"WSI_{name.upper()} must be JSON") as exc:
                load_settings()
            assert "e.g." in str(exc.value) and "secret-value" not in str(exc.value)
    done = subprocess.run([*CLI, "serve"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WSI_SLIDE_ROOTS": "/data/slides"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "WSI_SLIDE_ROOTS must be JSON (a list), e.g." in done.stderr


def test_demo_slide_reports_progress_tile_by_tile(tmp_path: Path) -> None:
    from wsi_sampler.demo import DemoSlideSpec, tile_count, write_demo_slide

    spec = DemoSlideSpec(width=4096, height=3072, mpp=0.25)
    calls: list[tuple[int, int]] = []
    write_demo_slide(tmp_path / "d.svs", spec, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (tile_count(spec), tile_count(spec)) == (204, 204)
    assert [d for d, _ in calls] == list(range(1, 205))


def test_plan_messages_use_the_plan_written_and_bad_outputs_write_nothing(
        demo_slide: Path, tmp_path: Path) -> None:
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "Polygon", "coordinates": [
        [[0, 0], [4000, 0], [4000, 3000], [0, 3000], [0, 0]]]}))
    args = ["plan", demo_slide, "--strategy", "medgemma", "--magnification", "20",
            "--roi", roi, "--messages", tmp_path / "m.json"]
    done = run(*args, "--out", tmp_path / "bag.json")
    assert done.returncode == 0, done.stderr
    bag = json.loads((tmp_path / "bag.json").read_text())
    body = json.loads((tmp_path / "m.json").read_text())
    assert len(body["messages"][-1]["content"]) - 1 == len(bag["patches"])  # the ROI's bag
    (tmp_path / "m.json").unlink()
    bad = run(*args, "--out", tmp_path / "bag.txt")
    assert bad.returncode == 2 and "unknown output type" in bad.stderr
    assert not (tmp_path / "m.json").exists()


def test_score_refuses_patch_model_options_with_a_vlm(tmp_path: Path) -> None:
    done = run("score", tmp_path, "--out", tmp_path / "o", "--vlm-url",
               "http://127.0.0.1:9/v1", "--model", "vit-s16", "--strategy", "random")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--model, --strategy belong to scoring with a patch model" in done.stderr
