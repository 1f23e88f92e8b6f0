"""``ckptd export``: a checkpoint's model weights as the model's own tools load them (SPEC §13)."""

from __future__ import annotations

import json
import os
import sys

import click

from ckptd.cli.base import main
from ckptd.core.units import format_bytes
from ckptd.disk import manifest as mf
from ckptd.disk.export import FORMATS, ExportError, export

LARGE = 1 << 30  # exports above this show their progress


@main.command("export")
@click.argument("unit", type=click.Path(exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="safetensors",
    show_default=True,
    help="safetensors: model.safetensors; hf: and config.json (from_pretrained); peft: the adapter "
    "(PeftModel.from_pretrained)",
)
@click.option("--adapter", default="default", show_default=True, help="with --format peft: which adapter")
@click.option("--job", default=None, help="with a directory: the newest verified checkpoint of this job")
@click.option("--rank", type=int, default=None, help="a sharded unit of per-rank state: export this rank's")
@click.option("--json", "as_json", is_flag=True, help="print what was written as JSON")
def export_cmd(
    unit: str, out_dir: str, fmt: str, adapter: str, job: str | None, rank: int | None, as_json: bool
) -> None:
    """Write UNIT's model weights alone into OUT_DIR, under the model's own state_dict keys (no ckptd
    prefixes, no optimizer or RNG state), frozen tensors stored elsewhere included. UNIT is a
    checkpoint file, a sharded unit (FSDP2/DTensor units are consolidated into one state dict), or
    a directory (its newest checkpoint that verifies)."""
    path = _resolve(unit, job)
    shown = [0]

    def progress(done: int, total: int) -> None:
        if total >= LARGE and (done * 20 // total > shown[0] or done == total):
            shown[0] = done * 20 // total
            click.echo(f"export: {format_bytes(done)} of {format_bytes(total)} ({100 * done // total}%)", err=True)

    try:
        done = export(path, out_dir, fmt, adapter, progress, rank)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"exporting {path} into {out_dir} failed: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps(done.to_json(), indent=2))
        return
    click.echo(f"exported {path} ({fmt}): {done.tensors} tensors, {format_bytes(done.bytes)}")
    for f in done.files:
        click.echo(f"  {f}")


def _resolve(unit: str, job: str | None) -> str:
    if os.path.isfile(unit) or mf.is_unit(unit):
        return unit
    from ckptd.save.newest import newest_verified

    found = newest_verified(unit, job)
    if found is None:
        click.echo(f"no verified checkpoint in {unit}" + (f" of job {job}" if job else ""), err=True)
        sys.exit(1)
    return found.path
