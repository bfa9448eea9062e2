"""Every error edgelm raises on purpose, in one place.

Each error subclasses :class:`EdgelmError` *and* the built-in exception it resembles, so callers may catch
either (``except FileNotFoundError`` works for a missing model).  Messages name what failed, the value that
was wrong and how to fix it.  ``code`` is a stable machine-readable name used by the HTTP server and
``--json`` CLI output; the CLI and the server map error types to exit codes and HTTP statuses through tables
(``edgelm.cli.EXIT_CODES``, ``edgelm.server.errors.HTTP_STATUS``), never by parsing messages.
"""

from __future__ import annotations

from typing import Any


class EdgelmError(Exception):
    """Base class of every error edgelm raises on purpose."""

    code = "edgelm_error"

    def __init__(self, message: str, *, fix: str | None = None, **details: Any) -> None:
        self.message = message
        self.fix = fix
        self.details = details
        for key, value in details.items():
            setattr(self, key, value)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message} {self.fix}" if self.fix else self.message


# --- models and files -----------------------------------------------------------------------------------

class ModelNotFoundError(EdgelmError, FileNotFoundError):
    code = "model_not_found"


class InvalidModelFileError(EdgelmError, ValueError):
    """The file exists but is not a model edgelm can read (wrong magic, truncated, corrupt)."""

    code = "invalid_model_file"


class UnsupportedModelError(EdgelmError, ValueError):
    """A well-formed model this backend/build cannot run (unknown architecture, unsupported quantization)."""

    code = "unsupported_model"


class NoChatTemplateError(UnsupportedModelError):
    """Chat was asked of a model whose files carry no chat template; edgelm never guesses one (the fix names
    ``chat_template=`` and ``generate``)."""

    code = "no_chat_template"


class DefaultModelMissingError(ModelNotFoundError):
    code = "default_model_missing"


# --- backends -------------------------------------------------------------------------------------------

class BackendNotInstalledError(EdgelmError, ImportError):
    """An optional backend's package is missing; the message names the extra to install."""

    code = "backend_not_installed"


class UnknownBackendError(EdgelmError, ValueError):
    code = "unknown_backend"


class BackendError(EdgelmError, RuntimeError):
    """The backend failed while loading or running a model."""

    code = "backend_error"


class ExecutionProviderError(EdgelmError, RuntimeError):
    """An onnxruntime execution provider was asked for that is not available."""

    code = "execution_provider_unavailable"


class ModelClosedError(EdgelmError, RuntimeError):
    code = "model_closed"


# --- generation -----------------------------------------------------------------------------------------

class InvalidParameterError(EdgelmError, ValueError):
    """A generation or load parameter has a bad type or value; ``parameter`` names it."""

    code = "invalid_parameter"


class ContextLengthExceededError(EdgelmError, ValueError):
    """The prompt does not fit the context window; ``prompt_tokens`` and ``n_ctx`` say by how much."""

    code = "context_length_exceeded"


class StateMismatchError(EdgelmError, ValueError):
    """A saved KV-cache state belongs to another model, build or context size."""

    code = "state_mismatch"


# --- conversion -----------------------------------------------------------------------------------------

class ConversionError(EdgelmError, RuntimeError):
    code = "conversion_failed"


class GraphLintError(ConversionError):
    """An exported graph breaks a rule of the execution provider it is meant for (a dynamic dimension, an op the EP
    does not list, an illegal MatMul type pair, int64 arithmetic); ``node`` names the offending node."""

    code = "graph_lint_failed"


class InvalidSourceError(EdgelmError, ValueError):
    """A conversion source is not a usable Hugging Face checkpoint (no config.json, no tokenizer, ...)."""

    code = "invalid_source"


class UnsafeWeightsError(EdgelmError, PermissionError):
    """Pickle weights were refused because they can run code when loaded."""

    code = "unsafe_weights"


class OutputExistsError(EdgelmError, FileExistsError):
    code = "output_exists"


class InsufficientDiskSpaceError(EdgelmError, OSError):
    code = "insufficient_disk_space"


class QualityBudgetError(ConversionError):
    """A conversion lost more quality (or needs more size) than the budget allows."""

    code = "quality_budget_exceeded"


class UnknownQuantizationError(EdgelmError, ValueError):
    code = "unknown_quantization"


class HubError(EdgelmError, OSError):
    """A Hugging Face Hub id could not be resolved (offline and not cached, unknown id, ...)."""

    code = "hub_error"


class QuantNotFoundError(HubError):
    """A Hub repository has no file for the quantization asked for; ``available`` lists the ones it has."""

    code = "quant_not_found"


class DownloadCorruptError(HubError):
    """A downloaded (or cached) file does not match its sha256 / size from the Hub; it has been deleted."""

    code = "download_corrupt"


# --- platforms ------------------------------------------------------------------------------------------

class UnknownDeviceError(EdgelmError, LookupError):
    code = "unknown_device"

    def __str__(self) -> str:  # LookupError subclasses KeyError-like repr; keep the plain message
        return EdgelmError.__str__(self)


class DoesNotFitError(EdgelmError, ValueError):
    """No deployment plan fits the device's memory."""

    code = "does_not_fit"


# --- offline bundles (edgelm bundle / verify) -------------------------------------------------------------

class ToolchainMissingError(EdgelmError, FileNotFoundError):
    """A compiler or build tool a bundle needs (a cross compiler for the device's CPU, cmake, zstd) is not
    installed; the fix names the command or the packages that install it."""

    code = "toolchain_missing"


class BundleBuildError(EdgelmError, RuntimeError):
    """Building a bundle failed (llama.cpp's cross build, fetching the device's wheels); nothing was left behind."""

    code = "bundle_build_failed"


class BundleCorruptError(EdgelmError, ValueError):
    """A bundle's files do not match its manifest (changed, missing or extra); ``files`` names them."""

    code = "bundle_corrupt"


# --- serving --------------------------------------------------------------------------------------------

class UnknownModelNameError(EdgelmError, LookupError):
    """A server request named a model that is not configured (never silently replaced by another)."""

    code = "model_not_found"

    def __str__(self) -> str:
        return EdgelmError.__str__(self)


class InsecureBindError(EdgelmError, PermissionError):
    code = "insecure_bind"


# --- workers (llama.cpp RPC) ----------------------------------------------------------------------------

class WorkerUnreachableError(EdgelmError, ConnectionError):
    """An RPC worker (``edgelm worker``) could not be reached or did not answer; ``endpoint`` names it."""

    code = "worker_unreachable"


class WorkerLostError(WorkerUnreachableError):
    """A worker stopped answering while a model split across it was in use; the model must be loaded again."""

    code = "worker_lost"


class WorkerStartError(EdgelmError, OSError):
    """``edgelm worker`` could not start (address in use, no RPC backend in this build, ...)."""

    code = "worker_start_failed"


__all__ = [name for name, value in globals().items() if isinstance(value, type) and issubclass(value, EdgelmError)]
