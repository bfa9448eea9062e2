"""tqdm (huggingface_hub's download progress) without its notebook, GUI and integration front-ends, which its
package imports for old names (tqdm.gui pulls matplotlib, tqdm.notebook IPython and ipywidgets)."""

excludedimports = ["matplotlib", "IPython", "ipywidgets", "pandas", "rich", "keras", "tensorflow", "dask",
                   "tkinter", "telegram", "slack_sdk", "discord", "requests"]
