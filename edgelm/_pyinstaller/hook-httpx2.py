"""httpx2 (huggingface_hub's HTTP client) without its command-line front-end (rich, pygments, click) and trio."""

excludedimports = ["rich", "pygments", "click", "trio", "httpx2._main"]
