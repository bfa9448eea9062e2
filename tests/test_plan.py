"""Deployment plans per device profile: memory that fits with head-room, honest refusals, speed estimates."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import edgelm
from edgelm.plan import recommend
from edgelm.platforms import detect
from edgelm.platforms.profiles import resolve

from .conftest import run_cli
from .test_platforms import fake_m2, fake_phone, fake_pi4


def _kv(key: str, type_id: int, value) -> bytes:
    k = key.encode()
    out = struct.pack("<Q", len(k)) + k + struct.pack("<I", type_id)
    if type_id == 8:
        v = value.encode()
        return out + struct.pack("<Q", len(v)) + v
    return out + struct.pack("<I", value)


def sparse_gguf(path: Path, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, rows=1_750_000) -> Path:
    """A GGUF whose header describes a ~7B-parameter Q4_0 model; its data is a hole (a sparse file)."""
    kvs = [("general.architecture", 8, "llama"), ("general.file_type", 4, 2), ("llama.block_count", 4, n_layer),
           ("llama.embedding_length", 4, n_embd), ("llama.attention.head_count", 4, n_head),
           ("llama.attention.head_count_kv", 4, n_head_kv), ("llama.context_length", 4, 8192)]
    name = b"token_embd.weight"
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(_kv(*kv) for kv in kvs)
    header += struct.pack("<Q", len(name)) + name + struct.pack("<I", 2) + struct.pack("<QQ", n_embd, rows)
    header += struct.pack("<IQ", 2, 0)  # Q4_0, offset 0
    data_start = (len(header) + 31) // 32 * 32
    size = data_start + n_embd * rows // 32 * 18
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(size)
    return path


def test_profiles_resolve_with_ram_variants():
    d = resolve("raspberry-pi-5-8gb")
    assert d.ram_bytes == 8 * 1024**3 and d.performance_cores == 4 and d.name == "raspberry-pi-5-8gb"
    assert resolve("raspberry-pi-zero-2-w").ram_bytes == 512 * 1024**2
    with pytest.raises(edgelm.UnknownDeviceError, match="raspberry-pi-5-2gb"):
        resolve("raspberry-pi-5-3gb")
    with pytest.raises(edgelm.UnknownDeviceError, match="raspberry-pi-zero-2-w") as err:
        resolve("commodore-64")
    assert isinstance(err.value, LookupError)


@pytest.mark.parametrize("device", ["raspberry-pi-zero-2-w", "raspberry-pi-4-2gb", "raspberry-pi-5-8gb", "apple-m1",
                                    "android-snapdragon", "x86-laptop", "jetson-orin-nano"])
def test_default_model_plan_fits_every_profile(default_gguf, device):
    plan = recommend(default_gguf, device)
    d = resolve(device)
    assert plan.memory_bytes <= d.usable_bytes * 0.85  # head-room kept
    assert plan.memory_bytes == sum(plan.memory_breakdown.values())
    assert plan.memory_breakdown["weights"] > 90 * 1024**2
    assert plan.threads == d.performance_cores and plan.backend == "llamacpp"
    assert plan.tokens_per_second > 1


def test_small_device_gets_a_smaller_context_and_slower_estimate(default_gguf):
    zero = recommend(default_gguf, "raspberry-pi-zero-2-w")
    pi5 = recommend(default_gguf, "raspberry-pi-5-8gb")
    assert zero.n_ctx < pi5.n_ctx == 4096
    assert any("n_ctx reduced" in n for n in zero.notes)
    assert zero.tokens_per_second < pi5.tokens_per_second < recommend(default_gguf, "apple-m2").tokens_per_second


def test_gpu_profiles_offload_all_layers(default_gguf):
    assert recommend(default_gguf, "apple-m2").n_gpu_layers == -1
    assert recommend(default_gguf, "jetson-orin-nano").n_gpu_layers == -1
    assert recommend(default_gguf, "raspberry-pi-4").n_gpu_layers == 0


def test_seven_billion_model_is_refused_on_a_pi_zero_and_requantized_for_a_pi_4(tmp_path):
    big = sparse_gguf(tmp_path / "big.gguf")
    with pytest.raises(edgelm.DoesNotFitError) as err:
        recommend(big, "raspberry-pi-zero-2-w")
    msg = str(err.value)
    assert "needs" in msg and "GB" in msg and "362 MB usable" in msg and "smallest option" in msg
    plan = recommend(big, "raspberry-pi-4-8gb")
    assert plan.quant == "Q4_0" and not plan.needs_conversion
    small = recommend(big, "raspberry-pi-4-4gb")  # 3.9 GB of Q4_0 weights do not fit 4 GB: a smaller quant does
    assert small.needs_conversion and small.quant in ("Q3_K_M", "Q2_K")
    assert small.convert_command.startswith("edgelm convert")


def test_plan_for_this_machine_uses_injected_detection(default_gguf, tmp_path):
    pi = detect(fake_pi4(tmp_path))
    plan = recommend(default_gguf, "auto", host=pi, bandwidth_gbs=4.0)
    assert plan.threads == 4 and plan.n_gpu_layers == 0
    mac = recommend(default_gguf, "auto", host=detect(fake_m2(tmp_path)), bandwidth_gbs=80.0)
    assert mac.n_gpu_layers == -1 and mac.tokens_per_second > plan.tokens_per_second
    phone = recommend(default_gguf, "auto", host=detect(fake_phone(tmp_path)), bandwidth_gbs=30.0)
    assert phone.threads == 5


def test_recommend_cli(default_gguf):
    r = run_cli("recommend", str(default_gguf), "--profile", "raspberry-pi-4-2gb")
    assert r.returncode == 0, r.stderr
    assert "Raspberry Pi 4" in r.stdout and "tokens/s" in r.stdout
    r = run_cli("recommend", "--profile", "toaster")
    assert r.returncode == 2 and "toaster" in r.stderr
