"""anyio (under httpx, which huggingface_hub downloads with) on asyncio only: its trio back-end and pytest plugin
would pull trio, cffi, setuptools and pytest into the app.  Replaces pyinstaller-hooks-contrib's hook, which
collects every back-end."""

hiddenimports = ["anyio._backends._asyncio"]
excludedimports = ["trio", "pytest", "_pytest", "anyio._backends._trio", "anyio.pytest_plugin"]
