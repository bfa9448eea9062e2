"""`edgelm bundle`, `edgelm verify`, `edgelm install-cross-toolchain`."""

from __future__ import annotations

import json
from typing import Any

import click

from edgelm.deploy import BUNDLE, bundle, verify_bundle
from edgelm.deploy.crossbuild import apt_packages, host_machine, install_toolchain, toolchain

from .common import handle_errors, with_progress
from .options import pop_given, table_options


@click.command("bundle")
@click.argument("model")
@table_options(BUNDLE, required=("profile", "output"))  # --profile, -o, --quant, ... (edgelm.deploy.BundleOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def bundle_command(model: str, as_json: bool, **kwargs: Any) -> None:
    """Write everything a device with no network needs to run MODEL: an offline bundle folder.

    MODEL is a .gguf, a Hub name (ORG/REPO[:QUANT]) or a Hugging Face checkpoint (converted to the plan's GGUF
    quantization for the profile, or --quant).  The folder holds the model, every wheel the device installs
    (llama-cpp-python compiled here for the profile's CPU, cached in ~/.cache/edgelm/wheels), install.sh, the
    launcher edgelm-serve and a systemd unit with the plan's settings, and manifest.json + SHA256SUMS.  It is written
    to a temporary folder and renamed at the end: a failure leaves nothing behind.

    \b
    Examples:
      edgelm bundle model.gguf --profile raspberry-pi-5 -o pi5-bundle/
      edgelm bundle HuggingFaceTB/SmolLM2-360M-Instruct --profile raspberry-pi-4-4gb -o pi4/ --archive tar.zst
      edgelm bundle model.gguf --profile x86-laptop --python 3.12 -o laptop/
      edgelm bundle model.gguf --profile raspberry-pi-5 --host 0.0.0.0 --api-key KEY -o pi5/
    \b
    Then: copy the folder to the device (scp -r pi5-bundle pi@raspberrypi:) and run `sh pi5-bundle/install.sh`.
    """
    options = pop_given(kwargs, BUNDLE)
    label = f"bundling {model} for {options.get('profile')}"
    report = with_progress(label, lambda progress: bundle(model, progress=progress, **options))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(f"bundle       {report.output}" + (f" (and {report.archive})" if report.archive else ""))
    click.echo(f"for          {report.profile}: {report.machine}, Python {report.python}, llama.cpp built for "
               f"{report.cpu_target}")
    click.echo(f"model        {report.model} ({report.quant}{', converted' if report.converted else ''})")
    click.echo(f"size         {report.size_bytes / 1e6:.1f} MB: model {report.model_bytes / 1e6:.1f} MB, wheels "
               f"{report.wheel_bytes / 1e6:.1f} MB; {report.files} files; built in {report.seconds:.0f} s")
    click.echo(f"on the device: sh {report.output.rstrip('/').rsplit('/', 1)[-1]}/install.sh")


@click.command("verify")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--profile", default=None, help="Check it against this device profile [default: the one it was built "
              "for].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def verify_command(bundle_dir: str, profile: str | None, as_json: bool) -> None:
    """Check an offline bundle (its folder, or the .tar.gz / .tar.zst --archive wrote): every file's sha256 against its manifest (changed, missing and extra files named),
    and that it fits the device profile (memory, machine, Python, wheel platforms).  Exit code 4 when a file
    differs."""
    report = verify_bundle(bundle_dir, profile)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(f"ok: {report.files} files match the manifest of {report.bundle}")
    click.echo(f"fits {report.profile}: needs {report.memory_bytes / 2**20:.0f} MiB of "
               f"{report.device_memory_bytes / 2**20:.0f} MiB usable; {report.machine}, Python {report.python}")
    for note in report.notes:
        click.echo(note)


@click.command("install-cross-toolchain")
@click.option("--machine", default="aarch64", show_default=True,
              help="The device's machine (aarch64 for a Raspberry Pi 4/5, x86_64 for a laptop).")
@click.option("--dry-run", is_flag=True, help="Only print the command.")
@handle_errors
def install_cross_toolchain_command(machine: str, dry_run: bool) -> None:
    """Install the compilers `edgelm bundle` builds llama.cpp for a device with (Debian/Ubuntu: apt-get, as root or
    through sudo): crossbuild-essential-arm64 and cmake for an arm64 device on an x86-64 workstation."""
    try:
        found = toolchain(machine)
    except Exception:
        found = None
    if found and not dry_run:
        click.echo(f"already installed for {machine} on this {host_machine()} machine: {found['cxx']}, cmake")
        return
    command = install_toolchain(machine, dry_run=dry_run,
                                progress=lambda message, fraction: click.echo(f"+ {message}", err=True))
    if dry_run:
        click.echo(" ".join(command))
        return
    toolchain(machine)
    click.echo(f"installed {' '.join(apt_packages(machine))}")


COMMANDS = [bundle_command, verify_command, install_cross_toolchain_command]
