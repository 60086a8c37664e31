"""The eval report: tables, plots, the self-contained report.html (and that it renders in headless Chromium),
and the speed measurement. Report tests use a small synthetic results dict in the runner's schema."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from patchattn.eval.html import render_html
from patchattn.eval.plots import render_accuracy_vs_sparsity, render_png, render_speed_vs_length
from patchattn.eval.report import FILES, render_markdown, write_report
from patchattn.eval.runner import SCHEMA_VERSION
from patchattn.eval.tables import all_tables, device_label, other_table, speed_table, summary_table
from patchattn.eval.tasks import measure_speed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LENGTHS = [1024, 2048]
VARIANTS = {"dense": 0.0, "mine": 0.6, "mine-uniform": 0.6}


def _row(length, task, variant, value, **extra):
    row = {"length": length, "task": task, "variant": variant, "value": value, "sparsity": VARIANTS[variant] * (length / 2048),
           "metric": {"ppl": "perplexity", "speed": "ttft_ms"}.get(task, "accuracy"), "trials": 2, "scores": [value],
           "replies": [], "prompt_tokens": [length], "seconds": 0.1, "kv_bytes": None}
    row.update(extra)
    return row


def synthetic_results(lm_eval: bool = True) -> dict:
    rows = []
    for length in LENGTHS:
        for i, variant in enumerate(VARIANTS):
            kv = length * 4096 * (1 - 0.5 * VARIANTS[variant])
            rows.append(_row(length, "ppl", variant, 20.0 + i + length / 1024))
            rows.append(_row(length, "passkey", variant, 1.0 - 0.25 * i, kv_bytes=kv))
            rows.append(_row(length, "speed", variant, length / 20 / (1 + VARIANTS[variant]), ms_per_token=5.0 - i, ms_per_token_runs=[5.0 - i] * 3,
                             decode_tokens=16, peak_bytes=int(2e8 + length * 1e4), peak_memory="process_rss", device="cpu", kv_bytes=kv))
    if lm_eval:  # rows another part of the eval adds, with tasks the report does not know
        rows += [{"task": "lmeval:hellaswag", "variant": v, "metric": "acc_norm", "value": 0.41 - 0.01 * i, "stderr": 0.02,
                  "length": None, "sparsity": None} for i, v in enumerate(VARIANTS)]
    return {
        "schema_version": SCHEMA_VERSION, "model": "tiny <model> & co", "lengths": LENGTHS, "tasks": ["ppl", "passkey", "speed"],
        "trials": 2, "seed": 0, "speed_runs": 3, "created": "2026-11-24T10:00:00+00:00",
        "environment": {"torch": "2.13", "transformers": "5", "device": "cpu", "device_name": "Test CPU", "threads": 2, "dtype": "float32"},
        "variants": {"dense": {"recipe": None, "dense": True}, "mine": {"recipe": "mine", "strategy_counts": {"streaming": 4}},
                     "mine-uniform": {"recipe": "mine-uniform", "strategy_counts": {"streaming": 4}, "uniform": "streaming {'window_tokens': 64}"}},
        "complete": True, "results": rows,
    }


def _image(png: bytes) -> np.ndarray:
    import matplotlib.image

    assert png[:8] == PNG_MAGIC
    return matplotlib.image.imread(io.BytesIO(png), format="png")


# ---- tables ---------------------------------------------------------------------------------------
def test_tables_label_device_and_compare_with_dense():
    results = synthetic_results()
    assert device_label(results) == "CPU figures (Test CPU, 2 threads)"
    summary = summary_table(results)
    assert [r[0] for r in summary.rows] == list(VARIANTS)
    dense, mine = summary.rows[0], summary.rows[1]
    assert dense[1] == "0.0%" and mine[1] == "45.0%"  # mean of 30% and 60%
    assert mine[2].endswith("(-30%)") and mine[3] == "64.0 (1.60x)" and mine[4] == "4.00 (1.25x)"
    speed = speed_table(results)
    assert "CPU figures" in speed.title and "peak process RSS" in speed.columns and "Medians of 3 timed runs" in speed.note
    assert len(speed.rows) == len(LENGTHS) * len(VARIANTS)
    lm = other_table(results)
    assert lm.rows == [["lmeval:hellaswag", "acc_norm", "–", "0.410 ± 0.020", "0.400 ± 0.020", "0.390 ± 0.020"]]
    assert other_table(synthetic_results(lm_eval=False)) is None
    assert len(all_tables(results)) == 1 + len(LENGTHS) + 2
    results["results"] = [r for r in results["results"] if r["task"] != "speed"]  # unmeasured columns are left out
    assert summary_table(results).columns == ["variant", "prefill sparsity", "KV cache at 2048 tokens"]
    assert "Speed" not in summary_table(results).note and speed_table(results) is None


def test_accuracy_cells_count_prompts_lost_and_won():
    from patchattn.eval.tables import accuracy_tables, paired_flips

    results = synthetic_results(lm_eval=False)
    for row in results["results"]:
        if row["task"] == "passkey" and row["length"] == 1024:
            row["scores"] = {"dense": [1, 1, 0, 0], "mine": [1, 0, 0, 1], "mine-uniform": [0, 0, 0, 0]}[row["variant"]]
            row["value"] = sum(row["scores"]) / 4
    table = accuracy_tables(results)[0]
    passkey = next(r for r in table.rows if r[0].startswith("passkey"))
    assert passkey[1:] == ["0.50", "0.50 (+0.00, 1 lost / 1 won, p=1)", "0.00 (−0.50, 2 lost / 0 won, p=0.5)"]
    ppl = next(r for r in table.rows if r[0] == "perplexity")
    assert "lost" not in ppl[2] and ppl[2].endswith("%)")
    row = {"metric": "accuracy", "scores": [0.5, 1.0]}  # partial credit: no flips to count
    assert paired_flips(row, {"metric": "accuracy", "scores": [1, 1]}) is None
    assert paired_flips({"metric": "accuracy", "scores": [1]}, {"metric": "accuracy", "scores": [1, 0]}) is None


def test_flip_p_value_is_mcnemars_exact_test():
    from patchattn.eval.cells import flip_p_value

    assert flip_p_value(0, 0) == 1.0 and flip_p_value(3, 3) == 1.0
    assert flip_p_value(6, 1) == flip_p_value(1, 6) == 2 * (1 + 7) / 2**7  # 0.125: six of seven one way is chance often
    assert flip_p_value(9, 0) == 2 / 2**9
    assert flip_p_value(9, 2) < 0.07 < flip_p_value(8, 2)  # two-sided, from the binomial tail


def test_markdown_has_every_section():
    md = render_markdown(synthetic_results(), ["results.png"])
    for heading in ("## Variants", "## 1024 tokens", "## 2048 tokens", "## Speed and memory — CPU figures", "## lm-eval tasks", "## Plots"):
        assert heading in md
    assert "| task | dense | mine | mine-uniform |" in md and "![results.png](results.png)" in md
    assert "transformers 5 on cpu (float32)" in md


def test_markdown_names_every_device_of_a_spread_model():
    results = synthetic_results()
    results["environment"] = dict(results["environment"], device="cuda:0", devices=["cuda:0", "cuda:1"], dtype="bfloat16")
    assert "on cuda:0 + cuda:1 (layers placed by accelerate) (bfloat16)" in render_markdown(results)


# ---- plots ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("render", [render_png, render_accuracy_vs_sparsity, render_speed_vs_length])
def test_plots_are_pngs_with_content(render):
    image = _image(render(synthetic_results()))
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20  # lines, text and axes, not a blank canvas


def test_plots_without_data_are_left_out():
    results = synthetic_results()
    results["results"] = [r for r in results["results"] if r["task"] != "speed"]
    assert render_speed_vs_length(results) is None
    results["tasks"], results["results"] = ["speed"], []
    assert render_png(results) is None and render_accuracy_vs_sparsity(results) is None


# ---- html -----------------------------------------------------------------------------------------
def test_html_is_self_contained_and_escaped():
    results = synthetic_results()
    results["variants"]["<script>alert(1)</script>"] = {"recipe": "x"}
    results["results"].append(_row(1024, "passkey", "dense", 1.0) | {"variant": "<script>alert(1)</script>"})
    png = render_png(synthetic_results())
    page = render_html(results, {"results.png": png})
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "&lt;script&gt;" in page and "tiny &lt;model&gt; &amp; co" in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.I)  # nothing fetched from a network
    assert "@import" not in page and "url(" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == png
    for section in ("Variants", "Plots", "Accuracy and perplexity", "Speed and memory — CPU figures", "lm-eval tasks"):
        assert f"<h2>{section}" in page
    assert "lmeval:hellaswag" in page and "0.410 ± 0.020" in page
    assert "No lm-eval tasks in this run" in render_html(synthetic_results(lm_eval=False), {})


def test_write_report_embeds_every_plot(tmp_path):
    paths = write_report(synthetic_results(), tmp_path)
    assert set(paths) == set(FILES) and sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES.values())
    page = paths["html"].read_text()
    embedded = [base64.b64decode(s) for s in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]
    assert embedded == [paths[kind].read_bytes() for kind in ("png", "accuracy_png", "speed_png")]


# ---- the page in a browser ------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _tab10_pixels(image: np.ndarray, colour: str) -> int:
    """Pixels within a small distance of one of matplotlib's default line colours (the page's CSS uses none)."""
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.06).sum())


def test_report_html_renders_in_headless_chromium(tmp_path):
    """The page opens from a file:// URL with the network off, and its plots are drawn (their line colours show
    up in the screenshot; a missing image would leave only the page's greys)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium/Chrome binary on PATH (.ci/run installs Debian's chromium)")
    paths = write_report(synthetic_results(), tmp_path / "report")
    shot = tmp_path / "shot.png"
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
        "--window-size=1200,2400", paths["html"].resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.exists(), done.stderr[-2000:]
    assert shot.stat().st_size > 50_000
    image = _image(shot.read_bytes())
    assert image.shape[:2] == (2400, 1200)
    assert len(np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 100  # not one colour
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # the plots' first three line colours, i.e. the images loaded
        assert _tab10_pixels(image, colour) > 500, colour


# ---- speed ----------------------------------------------------------------------------------------
def test_measure_speed_medians_and_memory():
    from conftest import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    calls = []
    real_generate = model.generate
    model.generate = lambda *args, **kwargs: calls.append(kwargs["max_new_tokens"]) or real_generate(*args, **kwargs)
    result = measure_speed(model, ids, decode_tokens=4, repeats=3)
    assert calls == [5] * 4  # a warm-up, then three timed generations of 1 + 4 tokens
    assert len(result.ttft_runs_ms) == 3 and result.ttft_ms == sorted(result.ttft_runs_ms)[1] > 0
    assert len(result.ms_per_token_runs) == 3 and result.ms_per_token == sorted(result.ms_per_token_runs)[1] > 0
    assert result.device == "cpu" and result.kv_bytes > 0
    if Path("/proc/self/clear_refs").exists():  # Linux: the process's peak RSS of one generation
        assert result.peak_memory == "process_rss" and result.peak_bytes > 10 * 2**20
    with pytest.raises(ValueError):
        measure_speed(model, ids, repeats=0)
