"""Which machine made a figure: CPU model, cores, instruction sets, runtime versions, thread settings (torch-free).

Benchmark results key their rows by ``machine_key`` (CPU model + the ISA flags that decide which kernels run), so a
results file measured on several machines keeps each machine's rows. An ISA cap such as ``ONEDNN_MAX_CPU_ISA=AVX2``
is part of the key and of the label: figures measured under it are an *emulation* of an older CPU, not one.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

#: CPU flags (as /proc/cpuinfo spells them) that decide which int8 / fp32 / bf16 kernels oneDNN, MLAS and OpenVINO use.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
)
#: Environment variables that change kernel choice or threading; recorded when set.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "ORT_NUM_THREADS",
)
PACKAGES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "nncf",
    "torch",
    "tensorrt",
    "opencv-python-headless",
)


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if info:
                    break
                continue
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs from sysfs; None where sysfs is missing."""
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores) or None


def package_versions() -> dict[str, str]:
    """Installed versions of the runtimes, read from package metadata: nothing is imported (torch stays out)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def isa_cap() -> str | None:
    """The ISA cap in effect (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``), None when the CPU runs uncapped."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None


def describe_machine() -> dict[str, Any]:
    """A JSON-ready description of this machine and of the settings that change the figures."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    isa = {flag: flag in flags for flag in ISA_FLAGS}
    cap = isa_cap()
    machine = {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": info.get("vendor_id"),
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cpus": affinity,
        "isa": isa,
        "isa_cap": cap,
        "emulation": f"{cap}-only emulated by capping oneDNN's ISA on a CPU with more" if cap else None,
        "platform": platform.platform(),
        "versions": package_versions(),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        # other work on the machine slows absolute figures (ratios of interleaved runs much less)
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    machine["key"] = machine_key(machine)
    return machine


def isa_summary(isa: dict[str, bool]) -> str:
    """``avx2+avx512f+avx512_vnni`` style summary of the flags a machine has."""
    return "+".join(flag for flag in ISA_FLAGS if isa.get(flag)) or "baseline"


def machine_key(machine: dict[str, Any]) -> str:
    """``<cpu model> | <isa flags>[ | cap <ISA>]``: rows measured on different machines never overwrite each other."""
    key = f"{machine.get('cpu_model')} | {isa_summary(machine.get('isa') or {})}"
    return key + (f" | cap {machine['isa_cap']}" if machine.get("isa_cap") else "")


def machine_markdown(machine: dict[str, Any]) -> str:
    """One paragraph for a results .md file."""
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    threads = ", ".join(f"{k}={v}" for k, v in machine.get("thread_env", {}).items()) or "none set"
    text = (
        f"Machine: {machine['cpu_model']} (vendor {machine.get('cpu_vendor')}, family {machine.get('cpu_family')}, "
        f"model {machine.get('cpu_model_number')}), {machine.get('physical_cores')} physical cores, "
        f"{machine.get('logical_cpus')} logical CPUs ({machine.get('usable_cpus')} usable); ISA: "
        f"{isa_summary(machine.get('isa') or {})}; thread env: {threads}; {versions}."
    )
    if machine.get("load_average_1m") is not None:
        text += f" Load average (1 min) when recorded: {machine['load_average_1m']}."
    if machine.get("emulation"):
        text += f" **Emulation**: {machine['emulation']}."
    return text


if __name__ == "__main__":  # pragma: no cover - a convenience for humans
    import json

    json.dump(describe_machine(), sys.stdout, indent=1)
    print()
