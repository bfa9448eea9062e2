"""httpcore2 (under httpx2) on asyncio and threads only: no trio."""

excludedimports = ["trio"]
