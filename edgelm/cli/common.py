"""What every command shares: the exit code of each error type, the error handler, the progress bar."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click

from edgelm import errors

# error type -> exit code; the first matching entry (in order) wins
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (errors.InvalidParameterError, 2),
    (errors.UnknownBackendError, 2),
    (errors.UnknownQuantizationError, 2),
    (errors.UnknownDeviceError, 2),
    (errors.ModelNotFoundError, 3),
    (errors.InvalidSourceError, 3),
    (errors.DownloadCorruptError, 4),  # a download that does not match its sha256 (deleted)
    (errors.HubError, 3),
    (errors.InvalidModelFileError, 4),
    (errors.BundleCorruptError, 4),  # a bundle whose files do not match its manifest
    (errors.NoChatTemplateError, 4),  # chat asked of a model without a chat template (--chat-template, or run)
    (errors.UnsupportedModelError, 4),
    (errors.BackendNotInstalledError, 5),
    (errors.ToolchainMissingError, 5),  # a cross compiler / cmake / zstd `edgelm bundle` needs
    (errors.ExecutionProviderError, 5),  # an onnxruntime execution provider's package is not installed
    (errors.ContextLengthExceededError, 6),
    (errors.QualityBudgetError, 7),
    (errors.DoesNotFitError, 8),
    (errors.OutputExistsError, 9),
    (errors.InsecureBindError, 10),
    (errors.WorkerUnreachableError, 11),  # an RPC worker unreachable at load, or lost during generation
    (errors.WorkerStartError, 12),
    (errors.EdgelmError, 1),
]


def exit_code_for(exc: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn edgelm's typed errors into a one-line message and the exit code from EXIT_CODES."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.EdgelmError as exc:
            if os.environ.get("EDGELM_DEBUG"):
                raise
            click.secho(f"Error: {exc}", fg="red", err=True)
            sys.exit(exit_code_for(exc))
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)

    return wrapper


def with_progress(label: str, work: Callable[[Callable[[str, float], None]], Any]) -> Any:
    """Run ``work(progress)`` under a progress bar on stderr (reports go to stdout); ``progress(message,
    fraction)`` is the library's progress callback: the bar follows the fraction done and shows the message."""
    steps = 1000
    with click.progressbar(length=steps, label=label, file=sys.stderr, show_eta=False,
                           item_show_func=lambda s: s) as bar:
        state = {"done": 0}

        def progress(message: str, fraction: float) -> None:
            target = int(max(0.0, min(1.0, fraction)) * steps)
            bar.update(max(0, target - state["done"]), message)
            state["done"] = max(state["done"], target)

        result = work(progress)
        bar.update(steps - state["done"], "done")
    return result
