"""huggingface_hub (models by name, the Hub cache in edgelm's store) without the frameworks its optional helpers
import inside functions (serialization, mixins, the file system, the TensorBoard logger)."""

excludedimports = ["torch", "tensorflow", "keras", "fastai", "safetensors", "fsspec", "IPython", "ipywidgets",
                   "matplotlib", "PIL", "tensorboardX", "gradio", "fastapi", "pydantic", "numpy.testing", "pytest",
                   "setuptools", "pkg_resources", "boto3", "botocore", "rich",
                   "starlette", "openai"]
