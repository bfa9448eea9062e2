"""Offline bundles: size against the model plus its wheels, build time with a warm cache, the cold cross-build time
(from the cached wheel's build.json), and optionally decode speed under emulation.

- size: the whole bundle folder / (model + wheels)                               (goal: <= 1.2x)
- warm build: `edgelm.bundle(...)` with llama-cpp-python's wheel already cached   (goal: <= 120 s), median of --runs
- cold cross-build: llama.cpp for the profile's CPU, as measured when it was built (build.json "seconds")
- --rootfs DIR: an arm64 userland (see tests/test_bundle_device.py) to install the bundle into and decode 32 tokens
  under QEMU_CPU=<the profile's core>: emulated tokens/s, which says nothing about a real Pi's speed.

Usage: python benchmarks/bench_bundle.py [MODEL.gguf] [--profile raspberry-pi-5] [--runs 3] [--rootfs DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import edgelm
from edgelm.deploy import api, crossbuild


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--profile", default="raspberry-pi-5")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rootfs", default=None, help="an arm64 userland to install into and decode under QEMU")
    args = parser.parse_args()
    model = Path(args.model) if args.model else edgelm.default_model_path()
    work = Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    try:
        # the first build fills the cache (or finds it): not timed as warm
        first = edgelm.bundle(model, profile=args.profile, output=work / "b0", jobs=args.jobs)
        warm = []
        for i in range(args.runs):
            start = time.perf_counter()
            report = edgelm.bundle(model, profile=args.profile, output=work / f"b{i + 1}", jobs=args.jobs)
            warm.append(time.perf_counter() - start)
            shutil.rmtree(work / f"b{i + 1}")
        ratio = report.size_bytes / (report.model_bytes + report.wheel_bytes)
        t = api.target(args.profile)
        from importlib import metadata
        cached = crossbuild.cached_wheel(metadata.version("llama-cpp-python"), t.machine, t.cpu_target, t.cmake)
        cold = json.loads((cached.parent / "build.json").read_text())["seconds"] if cached else None
        print(f"profile {args.profile}: llama.cpp for {t.cpu_target}")
        print(f"size: bundle {report.size_bytes / 1e6:.1f} MB, model {report.model_bytes / 1e6:.1f} MB + wheels "
              f"{report.wheel_bytes / 1e6:.1f} MB: ratio {ratio:.3f} (goal <= 1.2)")
        print(f"warm build: median {statistics.median(warm):.1f} s of {len(warm)} (goal <= 120 s; {report.timings})")
        print(f"cold cross-build of llama.cpp (build.json): {cold} s; the first build here took {first.seconds} s")
        if args.rootfs and t.qemu_cpu:
            root = Path(args.rootfs)
            shutil.rmtree(root / "root" / "bench", ignore_errors=True)
            shutil.copytree(work / "b0", root / "root" / "bench")
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "QEMU_CPU": t.qemu_cpu}
            start = time.perf_counter()
            subprocess.run(["unshare", "-n", "chroot", str(root), "/bin/sh", "/root/bench/install.sh", "/opt/bench"],
                           env=env, check=True, capture_output=True)
            print(f"emulated install ({t.qemu_cpu}): {time.perf_counter() - start:.0f} s")
            gguf = f"/opt/bench/models/{model.name}"
            proc = subprocess.run(["unshare", "-n", "chroot", str(root), "/opt/bench/bin/edgelm", "run", gguf,
                                   "Once upon a time", "--raw", "-t", "0", "-n", "32", "--threads", "2", "--stats"],
                                  env=env, capture_output=True, text=True)
            speed = re.findall(r"([\d.]+) tok(?:ens)?/s", proc.stderr)
            print(f"emulated decode ({t.qemu_cpu}, 2 threads): {speed[-1] if speed else proc.stderr[-300:]} tokens/s "
                  "(emulation: says nothing about a real Pi)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
