"""``edgelm.bundle``: everything a device with no network needs to run a model, in one folder, checked; and
``edgelm.verify_bundle``: the check again, on the workstation or on the device.

A bundle holds the model (the plan's quantization for the device profile, converted when needed), every wheel the
device installs (edgelm, llama-cpp-python built for the device's CPU, their dependencies for its platform and
Python), ``install.sh`` (no network: ``pip --no-index --find-links``; refuses a copy whose hashes fail), a launcher
and a systemd unit for ``edgelm serve`` with the plan's settings, and ``manifest.json`` + ``SHA256SUMS``.  It is
written to a temporary folder next to the output and renamed at the end: a failure leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypedDict

from edgelm.conversion import convert
from edgelm.declarations import check_names, from_dataclass, setting
from edgelm.errors import (BundleBuildError, BundleCorruptError, DoesNotFitError, InvalidParameterError,
                           OutputExistsError, ToolchainMissingError)
from edgelm.formats import gguf
from edgelm.platforms.profiles import Device
from edgelm.platforms.profiles import resolve as resolve_device
from edgelm.plan import Plan
from edgelm.server import check_bind
from edgelm.settings import LOAD
from edgelm.planning import recommend
from edgelm.sources import resolve_model_path
from edgelm.version import __version__

from . import crossbuild, manifest, scripts, wheels

if TYPE_CHECKING:
    from typing_extensions import Unpack

Progress = Callable[[str, float], None]
ARCHIVES = ("tar.gz", "tar.zst")


@dataclass(frozen=True, kw_only=True)
class BundleOptions:
    """bundle()'s options, each declared once (type, default, help, flag); `edgelm bundle` derives its flags."""

    profile: str | None = setting(
        None, "The device profile to build for (`edgelm devices`): raspberry-pi-5, raspberry-pi-4-4gb, x86-laptop.",
        kind="str", cli=("--profile",), example="raspberry-pi-4")
    output: str | os.PathLike[str] | None = setting(None, "The bundle folder to write.", kind="path",
                                                    cli=("-o", "--output"), example="pi5-bundle")
    quant: str | None = setting(
        None, "GGUF quantization of the bundled model (q4_k_m, q8_0, ...) [default: the plan's for the profile].",
        kind="str", cli=("-q", "--quant"), example="q8_0")
    platform: str | None = setting(
        None, "Wheel platform of the device (linux_aarch64, or tags comma-separated) [default: the profile's].",
        kind="str", cli=("--platform",), example="linux_aarch64")
    python: str | None = setting(None, "The device's Python version, e.g. 3.11 or 3.13 [default: the profile's].",
                                 kind="str", cli=("--python",), example="3.13")
    n_ctx: int | None = setting(None, "Context window the plan should give the server [default: the plan's].",
                                kind="int", cli=("--n-ctx",), example=1024)
    serve_host: str = setting("127.0.0.1", "Address the device's server binds (other than loopback: with --api-key).",
                        kind="str", cli=("--host",), example="0.0.0.0")
    port: int = setting(8080, "Port the device's server listens on.", kind="int", cli=("--port",), example=9000)
    api_key: str | None = setting(None, "Key the device's server requires (kept in serve.env, mode 600).",
                                  kind="str", cli=("--api-key",), example="secret")
    archive: str | None = setting(None, "Also write the bundle as one file next to the folder: tar.gz or tar.zst.",
                                  kind="choice", choices=ARCHIVES, cli=("--archive",), example="tar.gz")
    overwrite: bool = setting(False, "Replace an existing output.", kind="bool", cli=("--overwrite",), example=True)
    jobs: int | None = setting(None, "Parallel compile jobs for llama.cpp [default: all cores].", kind="int",
                               cli=("--jobs", "-j"), example=2)
    llama_cpp_source: str | os.PathLike[str] | None = setting(
        None, "The llama-cpp-python sdist (.tar.gz) to build from [default: fetched with pip].", kind="path",
        cli=("--llama-cpp-source",), example="llama_cpp_python-0.3.36.tar.gz")


BUNDLE = from_dataclass(BundleOptions)


class BundleKwargs(TypedDict, total=False):
    """The keyword arguments of :func:`bundle`: :class:`BundleOptions`' fields (a test checks they match)."""

    profile: str | None
    output: str | os.PathLike[str] | None
    quant: str | None
    platform: str | None
    python: str | None
    n_ctx: int | None
    serve_host: str
    port: int
    api_key: str | None
    archive: str | None
    overwrite: bool
    jobs: int | None
    llama_cpp_source: str | os.PathLike[str] | None


@dataclass
class BundleReport:
    output: str
    archive: str | None
    profile: str
    machine: str
    python: str
    cpu_target: str
    model: str
    quant: str
    converted: bool
    size_bytes: int  # the whole folder
    model_bytes: int
    wheel_bytes: int
    files: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    bundle: str
    profile: str
    files: int
    memory_bytes: int
    device_memory_bytes: int
    machine: str
    python: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Target:
    """What the device is, for the wheels: from the profile's "bundle" facts and the overrides."""

    device: Device
    machine: str
    python: str
    platforms: list[str]
    cpu_target: str
    cmake: list[str]
    qemu_cpu: str | None


def target(profile: str, platform: str | None = None, python: str | None = None) -> Target:
    """The profile's bundle facts, with ``platform`` / ``python`` overriding its own."""
    device = resolve_device(profile)
    facts = device.bundle
    if not facts:
        raise InvalidParameterError(f"The profile {device.name!r} says nothing about building bundles for it.",
                                    fix="Use a profile with a \"bundle\" section (raspberry-pi-5, raspberry-pi-4, "
                                    "x86-laptop), or add one to its JSON.", parameter="profile", value=profile)
    tags = wheels.platform_tags(platform) if platform else list(facts["platforms"])
    machine = wheels.machine_of(tags)
    if machine != facts["machine"]:
        raise InvalidParameterError(
            f"--platform {platform} is for {machine}, but {device.title} is {facts['machine']}: llama.cpp is built for "
            "the profile's CPU.", fix="Choose the profile of that machine, or leave --platform out.",
            parameter="platform", value=platform)
    version, _ = wheels.python_tag(python or facts["python"])
    return Target(device=device, machine=machine, python=version, platforms=tags, cpu_target=facts["cpu_target"],
                  cmake=list(facts["cmake"]), qemu_cpu=facts.get("qemu_cpu"))


def _serve_args(plan: Plan, host: str, port: int) -> list[str]:
    """`edgelm serve` flags for the plan's load settings (flags from the load table: declared once)."""
    flags = {s.name: s.flag for s in LOAD}
    args = ["--host", host, "--port", str(port)]
    for name, value in plan.load_kwargs().items():
        if name == "backend" or value is None or not flags.get(name) or (name == "n_gpu_layers" and value == 0):
            continue
        args += [str(flags[name]), str(value)]
    return args


def _model(src: str | os.PathLike[str], t: Target, quant: str | None, n_ctx: int | None, work: Path,
           report: Progress) -> tuple[Path, Plan, bool]:
    """The GGUF to bundle (converted into ``work`` when the plan or ``quant`` asks for it), its plan, converted?"""
    plan = recommend(src, t.device.name, n_ctx=n_ctx)
    if plan.backend != "llamacpp" or plan.format != "gguf":
        raise InvalidParameterError(f"Bundles carry GGUF models for llama.cpp; the plan for {src} is {plan.format}.",
                                    fix="Pass a .gguf, a Hub GGUF repository or a Hugging Face checkpoint.",
                                    parameter="model", value=str(src))
    want = (quant or plan.quant).lower()
    path = None if plan.source_format == "hf" else resolve_model_path(src)
    own = gguf.read_header(path).quantization.lower() if path else None
    if path is not None and own == want:
        return path, plan, False
    stem = Path(str(src).rstrip("/")).name.removesuffix(".gguf").replace(":", "-")
    stem = stem.rsplit("-" + own.upper(), 1)[0].rsplit("." + own.upper(), 1)[0] if own else stem
    out = work / f"{stem}-{want}.gguf"
    report(f"converting {src} to {want} (the plan for {t.device.title})", 0.05)
    convert(str(path or src), to="gguf", quant=want, output=str(out), eval=False,
            progress=lambda message, fraction: report(f"convert: {message}", 0.05 + 0.1 * fraction))
    plan = recommend(out, t.device.name, n_ctx=n_ctx)
    return out, plan, True


def _archive(folder: Path, kind: str, report: Progress) -> Path:
    out = folder.parent / f"{folder.name}.{kind}"
    tmp = folder.parent / f".{out.name}.partial"
    if kind == "tar.zst":
        if not shutil.which("zstd"):
            raise ToolchainMissingError("--archive tar.zst needs the zstd program, which is not installed.",
                                        fix="sudo apt-get install zstd, or use --archive tar.gz.", packages=["zstd"])
        cmd = ["tar", "-I", "zstd -T0 -10", "-cf", str(tmp), "-C", str(folder.parent), folder.name]
    else:
        cmd = ["tar", "-czf", str(tmp), "-C", str(folder.parent), folder.name]
    report(f"writing {out.name}", 0.97)
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BundleBuildError(f"Writing {out.name} failed: {proc.stderr.strip()[-300:]}",
                               fix="Check the free space next to the bundle.")
    os.replace(tmp, out)
    return out


def bundle(model: str | os.PathLike[str], *, progress: Progress | None = None,
           **options: Unpack[BundleKwargs]) -> BundleReport:
    """Build an offline bundle of ``model`` (a .gguf, a Hub name, or a Hugging Face checkpoint) for the device
    ``profile`` in the folder ``output``; see :class:`BundleOptions` for the options.  Returns what was written."""
    check_names(BUNDLE, dict(options), "bundle option")
    o = BundleOptions(**options)
    if not o.profile:
        raise InvalidParameterError("No device profile given.", fix="Pass profile= (--profile), e.g. raspberry-pi-5 "
                                    "(`edgelm devices` lists them).", parameter="profile", value=None)
    if o.output is None:
        raise InvalidParameterError("No output folder given.", fix="Pass output= (-o on the command line).",
                                    parameter="output", value=None)
    check_bind(o.serve_host, o.api_key, False)
    report = progress or (lambda message, fraction: None)
    t = target(o.profile, o.platform, o.python)
    out = Path(o.output).expanduser().resolve()
    if out.exists() and not o.overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise OutputExistsError(f"The output {out} already exists.", fix="Choose another folder or pass --overwrite.",
                                path=str(out))
    try:
        llama_version = metadata.version(crossbuild.PACKAGE)
    except metadata.PackageNotFoundError:
        raise InvalidParameterError("llama-cpp-python is not installed here, so edgelm does not know which release "
                                    "to build for the device.", fix='pip install "edgelm[llamacpp]"',
                                    parameter="model", value=str(model)) from None
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        clock = time.perf_counter()
        src, plan, converted = _model(model, t, o.quant, o.n_ctx, tmp / ".work", report)
        timings["model"] = time.perf_counter() - clock
        if plan.memory_bytes > plan.device_memory_bytes:
            raise DoesNotFitError(f"{src.name} needs {plan.memory_bytes / 2**20:.0f} MiB on {t.device.title}, which "
                                  f"has {plan.device_memory_bytes / 2**20:.0f} MiB usable.",
                                  fix="Choose a smaller --quant or a profile with more memory.", device=t.device.name)
        (tmp / "model").mkdir()
        model_path = tmp / "model" / src.name
        if converted:
            os.replace(src, model_path)
        else:
            report(f"copying {src.name}", 0.15)
            shutil.copyfile(src, model_path)  # a copy, never a link: the bundle must not share the user's file
        clock = time.perf_counter()
        built = tmp / ".work" / "built"
        built.mkdir(parents=True)
        llama_wheel = crossbuild.build_wheel(
            llama_version, t.machine, t.cpu_target, t.cmake, jobs=o.jobs, sdist=o.llama_cpp_source,
            progress=lambda message, fraction: report(message, 0.2 + 0.5 * fraction))
        shutil.copy2(llama_wheel, built / llama_wheel.name)
        timings["llama_cpp_wheel"] = time.perf_counter() - clock
        clock = time.perf_counter()
        own = wheels.edgelm_wheel(built, progress=lambda message, fraction: report(message, 0.72))
        timings["edgelm_wheel"] = time.perf_counter() - clock
        clock = time.perf_counter()
        version = own.name.split("-")[1]
        requirement = wheels.requirement(version)
        wheels.download([requirement], tmp / "wheels", platforms=t.platforms, python=t.python, find_links=[built],
                        progress=lambda message, fraction: report(message, 0.75))
        timings["wheels"] = time.perf_counter() - clock
        shutil.rmtree(tmp / ".work")
        header = gguf.read_header(model_path)
        title = f"{model_path.name} for {t.device.title}"
        model_name = model_path.stem.lower()
        serve = _serve_args(plan, o.serve_host, o.port)
        _write(tmp / scripts.INSTALL, scripts.install_script(
            title=title, machine=t.machine, python=t.python, requirement=requirement, model_file=model_path.name,
            host=o.serve_host, port=o.port), executable=True)
        _write(tmp / scripts.LAUNCHER, scripts.launcher(title=title, model_name=model_name,
                                                        model_file=model_path.name, args=serve), executable=True)
        _write(tmp / scripts.UNIT, scripts.unit(title=title, model_name=model_name))
        if o.api_key:
            _write(tmp / scripts.ENV_FILE, scripts.env_file(o.api_key), mode=0o600)
        _write(tmp / "README.txt", _readme(title, t))
        facts = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "edgelm": __version__,
            "profile": t.device.name, "device": t.device.title,
            "target": {"machine": t.machine, "python": t.python, "platforms": t.platforms, "cpu_target": t.cpu_target,
                       "qemu_cpu": t.qemu_cpu, "llama_cpp_python": llama_version,
                       "llama_cpp_cmake": [*crossbuild.COMMON_CMAKE, *t.cmake]},
            "model": {"file": f"model/{model_path.name}", "source": str(model), "converted": converted,
                      "architecture": header.architecture, "quant": header.quantization,
                      "parameters": header.parameters, "license": header.metadata.get("general.license"),
                      "license_name": header.metadata.get("general.license.name"),
                      "chat_template": header.chat_template},
            "plan": plan.to_dict(),
            "serve": {"name": model_name, "host": o.serve_host, "port": o.port, "api_key": bool(o.api_key),
                      "args": serve, "load": plan.load_kwargs()},
            "requirement": requirement,
        }
        manifest.write(tmp, facts, progress=lambda message, fraction: report(message, 0.9 + 0.05 * fraction))
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        wheel_bytes = sum(p.stat().st_size for p in (tmp / "wheels").glob("*.whl"))
        files = sum(1 for p in tmp.rglob("*") if p.is_file())
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    archive = None
    if o.archive:
        clock = time.perf_counter()
        archive = _archive(out, o.archive, report)
        timings["archive"] = time.perf_counter() - clock
    report(f"wrote {out}", 1.0)
    return BundleReport(output=str(out), archive=str(archive) if archive else None, profile=t.device.name,
                        machine=t.machine, python=t.python, cpu_target=t.cpu_target, model=model_path.name,
                        quant=header.quantization, converted=converted, size_bytes=size,
                        model_bytes=(out / "model" / model_path.name).stat().st_size, wheel_bytes=wheel_bytes,
                        files=files, seconds=round(time.perf_counter() - start, 1),
                        timings={k: round(v, 1) for k, v in timings.items()})


def _write(path: Path, text: str, *, executable: bool = False, mode: int | None = None) -> None:
    path.write_text(text, encoding="utf-8")
    if executable or mode is not None:
        os.chmod(path, mode if mode is not None else 0o755)


def _readme(title: str, t: Target) -> str:
    return (f"edgelm bundle: {title}\n"
            f"For {t.machine} with Python {t.python}; llama.cpp built for {t.cpu_target}.\n\n"
            "On the device (no network needed):\n"
            "  sh install.sh [PREFIX]          # checks SHA256SUMS, then installs into PREFIX (default ~/edgelm)\n"
            "  PREFIX/bin/edgelm-serve          # edgelm serve with the plan's settings\n\n"
            "manifest.json holds the plan, the model's licence and chat template, and the sha256 of every file.\n")


def verify_bundle(path: str | os.PathLike[str], profile: str | None = None, *,
                  progress: Progress | None = None) -> VerifyReport:
    """Check a bundle folder (or its .tar.gz / .tar.zst): every file against its manifest (BundleCorruptError names what differs), and that it
    fits the device ``profile`` (default: the one it was built for): memory, machine, Python, wheel platforms."""
    root = Path(path).expanduser()
    if root.is_file() and root.name.endswith(tuple(f".{kind}" for kind in ARCHIVES)):
        with tempfile.TemporaryDirectory(prefix="edgelm-verify-") as tmp:
            flags = ["-I", "zstd"] if root.name.endswith(".zst") else ["-z"]
            proc = subprocess.run(["tar", *flags, "-xf", str(root), "-C", tmp], capture_output=True, text=True,
                                  errors="replace")
            folders = [p for p in Path(tmp).iterdir() if p.is_dir()]
            if proc.returncode != 0 or len(folders) != 1:
                raise BundleCorruptError(f"{root} could not be unpacked into one bundle folder: "
                                         f"{proc.stderr.strip()[-300:]}", fix="Copy the archive again.",
                                         files=[root.name])
            report = verify_bundle(folders[0], profile, progress=progress)
            report.bundle = str(root)
            return report
    if not root.is_dir():
        raise InvalidParameterError(f"{root} is not a bundle folder or archive.",
                                    fix="Pass the folder (or the .tar.gz / .tar.zst) `edgelm bundle` wrote.",
                                    parameter="bundle", value=str(root))
    data = manifest.read(root)
    files = manifest.check_files(root, data, progress)
    name = profile or data["profile"]
    device = resolve_device(name)
    built = data["target"]
    plan = data["plan"]
    problems = []
    facts = device.bundle or {}
    if facts and facts.get("machine") != built["machine"]:
        problems.append(f"it is for {built['machine']}, {device.title} is {facts.get('machine')}")
    if facts and facts.get("cpu_target") != built["cpu_target"] and profile is not None:
        problems.append(f"its llama.cpp is built for {built['cpu_target']}, {device.title} needs "
                        f"{facts.get('cpu_target')}")
    if problems:
        raise InvalidParameterError(f"The bundle {root} does not suit {device.title}: {'; '.join(problems)}.",
                                    fix=f"Build one for it: edgelm bundle MODEL --profile {device.name} -o DIR.",
                                    parameter="profile", value=name)
    memory = int(plan["memory_bytes"])
    if memory > device.usable_bytes:
        raise DoesNotFitError(f"The bundle's plan needs {memory / 2**20:.0f} MiB, and {device.title} has "
                              f"{device.usable_bytes / 2**20:.0f} MiB usable.",
                              fix="Build it again with a smaller --quant or --n-ctx.", device=device.name,
                              needed=memory, available=device.usable_bytes)
    wheel_names = [rel.split("/", 1)[1] for rel in data["files"] if rel.startswith("wheels/")]
    tags = set(built["platforms"]) | {"any"}
    _, abi = wheels.python_tag(built["python"])
    for wheel in wheel_names:
        parts = wheel[:-len(".whl")].split("-")
        py, wabi, plat = parts[-3], parts[-2], parts[-1]
        if not set(plat.split(".")) & tags or wabi not in ("none", "abi3", abi) or \
                not any(p in ("py3", abi) or (p.startswith("cp3") and wabi == "abi3") for p in py.split(".")):
            raise BundleBuildError(f"The bundle's wheel {wheel} does not install on {built['machine']} with Python "
                                   f"{built['python']}.", fix="Build the bundle again.", wheel=wheel)
    if not any(w.startswith("llama_cpp_python-") for w in wheel_names):
        raise BundleBuildError("The bundle carries no llama-cpp-python wheel.", fix="Build the bundle again.")
    notes = [f"llama.cpp built for {built['cpu_target']}; the plan: {plan['quant']}, n_ctx {plan['n_ctx']}, "
             f"{plan['threads']} threads, about {plan['tokens_per_second']} tokens/s on {device.title}."]
    return VerifyReport(bundle=str(root), profile=device.name, files=files, memory_bytes=memory,
                        device_memory_bytes=device.usable_bytes, machine=built["machine"], python=built["python"],
                        notes=notes)


__all__ = ["bundle", "verify_bundle", "BundleOptions", "BundleReport", "VerifyReport", "BUNDLE"]
