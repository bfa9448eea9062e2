"""httpcore (under httpx) on asyncio and threads only: no trio."""

excludedimports = ["trio"]
