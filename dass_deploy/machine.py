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


def isa_cap_env(cap: str, aten: bool = False) -> dict[str, str]:
    """Environment variables that cap oneDNN (torch's and OpenVINO's convolutions) at ``cap``, and with ``aten``
    ATen's own vectorised kernels (elementwise, reductions) too. Both are read when the library loads: set them in
    the environment of a new process. ONNX Runtime's MLAS reads neither."""
    env = {"ONEDNN_MAX_CPU_ISA": cap}
    if aten:
        env["ATEN_CPU_CAPABILITY"] = cap.lower()
    return env


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
    """One paragraph for a results .md file. Any stored record shape is accepted (``describe_stored_machine``): an
    old one is described by what it recorded, so Markdown can be rebuilt from results that cannot be re-measured."""
    if not is_full_record(machine):
        return _old_record_markdown(machine)
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


# ---------------------------------------------------------------------------------------------- stored records
# Results measured before every benchmark script used ``describe_machine`` keep the machine in the shape their script
# wrote then; those runs took hours and cannot be redone to upgrade a record, so readers accept every shape below.
#: shape name -> (the flags that script checked, the count its ``cores`` field held)
OLD_SHAPES: dict[str, tuple[tuple[str, ...], str]] = {
    "bench_video": (("avx2", "avx512f", "avx512_vnni", "amx_tile"), "logical_cpus"),
    "proxy_regime": (("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"), "usable_cpus"),
    "synth_tables": (("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"), "logical_cpus"),
    "unrecorded": ((), "logical_cpus"),  # dass_deploy.benchmark's rows from before machines were recorded
}
#: What a reader is told is missing from an old record, by field.
_FIELD_NAMES = {
    "cpu_model": "CPU model",
    "cpu_vendor": "vendor",
    "cpu_family": "family",
    "cpu_model_number": "model number",
    "physical_cores": "physical cores",
    "thread_env": "thread env",
}


def is_full_record(record: Any) -> bool:
    """True for a record written by ``describe_machine`` (what ``machine_markdown`` formats field by field)."""
    return isinstance(record, dict) and "logical_cpus" in record and "cpu_model" in record


def _old_shape(record: dict[str, Any]) -> str:
    """Which script's old shape ``record`` is; the shapes differ in their keys (see ``OLD_SHAPES``)."""
    if "load_average_1_5_15min_at_start" in record or "cpu_model" in record:
        return "bench_video"
    if "cpu" in record and ("python" in record or "numpy" in record):
        return "proxy_regime"
    if "cpu" in record:
        return "synth_tables"
    return "unrecorded"


def describe_stored_machine(record: dict[str, Any] | None) -> dict[str, Any]:
    """A stored machine record of any shape this repository has written, in ``describe_machine``'s shape.

    A full record comes back as it is (plus ``recorded_by`` / ``isa_checked``). An old one keeps what it recorded;
    what it did not record is None (never guessed from this machine), ``isa`` holds only the flags its script
    checked (``isa_checked``), and ``recorded_by`` names the old shape.
    """
    record = record if isinstance(record, dict) else {}
    if is_full_record(record):
        return {"recorded_by": "describe_machine", "isa_checked": list(ISA_FLAGS), **record}
    shape = _old_shape(record)
    checked, cores_field = OLD_SHAPES[shape]
    isa = record.get("isa")
    present = {flag for flag, on in isa.items() if on} if isinstance(isa, dict) else set(isa or ())
    if isinstance(isa, dict):
        checked = tuple(isa)
    env = record.get("env") if isinstance(record.get("env"), dict) else {}
    versions = {k: str(v) for k, v in env.items() if k not in ("platform", "cpu_count")}
    versions.update({k: str(record[k]) for k in ("python", "torch", "numpy", "opencv") if k in record})
    load = record.get("load_average_1_5_15min_at_start")
    machine: dict[str, Any] = {
        "cpu_model": record.get("cpu_model") or record.get("cpu"),
        "cpu_vendor": None,
        "cpu_family": None,
        "cpu_model_number": None,
        "logical_cpus": None,
        "physical_cores": None,
        "usable_cpus": None,
        "isa": {flag: flag in present for flag in checked},
        "isa_checked": list(checked),
        "isa_cap": None,
        "emulation": None,
        "platform": record.get("platform") or env.get("platform"),
        "versions": versions,
        "thread_env": None,
        "load_average_1m": load[0] if isinstance(load, list) and load else None,
        "recorded_by": "no machine record, older results" if shape == "unrecorded" else f"old {shape} record",
    }
    machine[cores_field] = record.get("cores", env.get("cpu_count"))
    machine["key"] = record.get("key") or machine_key(machine)
    return machine


def _old_record_markdown(record: dict[str, Any] | None) -> str:
    """An old record's paragraph: what it recorded, which flags it checked and what it did not record (so a reader
    does not take a gap in the record for an absent feature)."""
    m = describe_stored_machine(record)
    cpus = ", ".join(
        f"{m[field]} {label}"
        for field, label in (("logical_cpus", "logical CPUs"), ("usable_cpus", "usable CPUs"))
        if m[field] is not None
    )
    if m["isa_checked"]:
        isa = f"{isa_summary(m['isa'])} (of {', '.join(m['isa_checked'])} checked)"
    else:
        isa = "not recorded"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items()) or "not recorded"
    missing = [name for field, name in _FIELD_NAMES.items() if m[field] is None]
    text = f"Machine ({m['recorded_by']}): {m['cpu_model'] or 'CPU model not recorded'}"
    text += f", {cpus}" if cpus else ""
    text += f"; ISA: {isa}; versions: {versions}"
    text += f"; {m['platform']}" if m["platform"] else ""
    text += "."
    if m["load_average_1m"] is not None:
        text += f" Load average (1 min) when recorded: {m['load_average_1m']}."
    if missing:
        text += f" Not recorded: {', '.join(missing)}."
    return text


if __name__ == "__main__":  # pragma: no cover - a convenience for humans
    import json

    json.dump(describe_machine(), sys.stdout, indent=1)
    print()
