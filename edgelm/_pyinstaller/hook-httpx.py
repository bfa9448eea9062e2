"""httpx (an HTTP client some packages import) without its command-line front-end (rich, pygments, click) and trio."""

excludedimports = ["rich", "pygments", "click", "trio", "httpx._main"]
