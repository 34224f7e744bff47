"""Benchmark results say which machine made them, in every record shape this repository has stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dass_deploy.machine import describe_machine, describe_stored_machine, machine_key, machine_markdown

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_a_new_record_is_read_back_as_it_was_written():
    machine = json.loads(json.dumps(describe_machine()))  # what a results file stores
    stored = describe_stored_machine(machine)
    assert {k: stored[k] for k in machine} == machine and stored["recorded_by"] == "describe_machine"
    text = machine_markdown(machine)
    assert machine["cpu_model"] in text and "thread env" in text and "Not recorded" not in text


@pytest.mark.parametrize(
    "path, checked",
    [
        ("table3_seeds/seed0.json", ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]),
        ("proxy_regime.json", ["avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"]),
        ("video_pipeline.json", ["avx2", "avx512f", "avx512_vnni", "amx_tile"]),
    ],
)
def test_old_records_keep_what_they_recorded_and_say_what_they_did_not(path, checked):
    """Seed files that took an hour each are read as stored: nothing is filled in from the machine at hand."""
    old = json.loads((RESULTS / path).read_text())["machine"]
    stored = describe_stored_machine(old)
    assert stored["cpu_model"] == (old.get("cpu") or old.get("cpu_model")) == "AMD EPYC"
    assert stored["isa_checked"] == checked
    present = [f for f, on in old["isa"].items() if on] if isinstance(old["isa"], dict) else old["isa"]
    assert [f for f, on in stored["isa"].items() if on] == present
    assert stored["physical_cores"] is None and stored["thread_env"] is None and stored["recorded_by"].startswith("old")
    assert stored["key"] == machine_key(stored)
    text = machine_markdown(old)
    assert text.startswith(f"Machine ({stored['recorded_by']}): {stored['cpu_model']}")
    assert "Not recorded: " in text and "physical cores" in text and "of " + ", ".join(checked) in text


def test_no_record_at_all_is_described_as_missing():
    text = machine_markdown(None)
    assert "CPU model not recorded" in text and "ISA: not recorded" in text
