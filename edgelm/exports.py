"""The public names ``edgelm`` imports on first use, each with the module that defines it.

One table for the package root's ``__getattr__`` (PEP 562) and for the PyInstaller hook, which bundles these
modules because a frozen app reaches them only through that lookup.
"""

from __future__ import annotations

# public name -> "module", or "module:attribute" where it has another name there
LAZY = {
    "load": "edgelm.loader",
    "Model": "edgelm.model",
    "collect": "edgelm.model",
    "GenerationParams": "edgelm.params",
    "Constraint": "edgelm.constraints",
    "default_model_path": "edgelm.default_model",
    "recommend": "edgelm.planning",
    "Plan": "edgelm.plan",
    "serve": "edgelm.server",
    "convert": "edgelm.conversion",
    "compress": "edgelm.compression",
    "pull": "edgelm.hub",
    "worker": "edgelm.rpc.worker:serve_worker",
    "recommend_cluster": "edgelm.cluster",
    "bundle": "edgelm.deploy",
    "verify_bundle": "edgelm.deploy",
    "__version__": "edgelm.version",  # read from the package metadata: importlib.metadata costs ~20 ms
}
