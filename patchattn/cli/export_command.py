"""``patchattn export``: write a directory that loads back as the patched model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import DEBUG_OPTION, DEVICE_MAP_HELP, MODEL_HELP, _run, app, console


@app.command()
def export(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe JSON from `patchattn calibrate`."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier patchattn export there (anything else is refused)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16 (weights are saved in it)."),
    device: str = typer.Option("cpu", "--device"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    debug: bool = DEBUG_OPTION,
):
    """Write a directory that loads back as the patched model (safetensors, config, recipe, model card)."""

    def body():
        from ..export import check_output_dir
        from ..export import export as run_export
        from ..models import load_model
        from ..recipe import Recipe

        plan = Recipe.load(recipe)
        check_output_dir(output, overwrite)
        with console.status("loading model"):
            lm, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map)
        plan.check_model(lm.config)
        with console.status(f"writing {output}"):
            run_export(lm, tokenizer, plan, output, overwrite=overwrite)
        console.print(f"patched model written to [bold]{output}[/]; load it with `patchattn.load({str(output)!r})`")

    _run(body)
