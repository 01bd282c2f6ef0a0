"""Which precision a training runs in (``components.precision``), and the rule that says why.

Only this machine's processor exists here, so other processors are named through ``decide``'s
``processor=`` (an unmeasured one is then measured on this one)."""

import json

import pytest
import torch

from components.machine import processor_id
from components.precision import EPYC_ZEN4, XEON_AMX, decide, measured_table

on_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="auto follows the GPU where there is one")
XEON = "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz [amx_bf16 avx512_bf16]"
EPYC = "AMD EPYC 9B14 [avx512_bf16]"
UNMEASURED_BF16 = "Imaginary Neoverse [bf16]"


def test_an_explicit_request_wins_with_a_rule_naming_the_param():
    assert decide("32-true", "autoencoder", processor=XEON).rule == "asked for (ae.precision=32-true)"
    chosen = decide("bf16-mixed", "ldm", 4, processor="Old CPU [no bf16]")
    assert chosen.value == "bf16-mixed" and chosen.rule == "asked for (ldm.precision=bf16-mixed)"


@on_cpu
def test_this_machines_processor_follows_its_measured_table():
    here = processor_id()
    print("processor_id():", here)
    if measured_table(here) is None:
        pytest.skip(f"{here} has no measured table")
    assert decide("auto", "autoencoder").value == "bf16-mixed"
    assert decide("auto", "ldm", 8).value == "32-true"
    assert decide("auto", "ldm", 16).value == "bf16-mixed"
    assert decide("auto", "ldm", 16).rule.startswith("auto: measured table for ")


@on_cpu
def test_both_measured_processors_follow_their_tables_and_name_the_figure():
    assert measured_table(XEON) is XEON_AMX and measured_table(EPYC) is EPYC_ZEN4
    ae = decide("auto", "autoencoder", processor=XEON)
    assert ae.value == "bf16-mixed"
    assert ae.rule == "auto: measured table for Xeon with AMX-BF16 (autoencoder bf16 1.28-1.43x at f=4..16)"
    assert decide("auto", "ldm", 16, processor=XEON).rule.endswith("(LDM bf16 1.19x on 16x16 latents)")
    eight = decide("auto", "ldm", 8, processor=EPYC)
    assert eight.value == "32-true" and eight.rule.endswith("(LDM bf16 0.95x on 8x8 latents)")
    assert decide("auto", "ldm", 32, processor=EPYC).value == "bf16-mixed"  # 16x16's figure, the largest measured
    assert decide("auto", "ldm", 2, processor=EPYC).value == "32-true"


@on_cpu
def test_bf16_instructions_without_a_table_are_measured_once_and_cached(tmp_path):
    first = decide("auto", "ldm", 4, processor=UNMEASURED_BF16, cache_dir=tmp_path, steps=2)
    (cached,) = tmp_path.glob("*.json")
    record = json.loads(cached.read_text())
    assert record["key"] == {"processor": UNMEASURED_BF16, "torch": torch.__version__, "model": "ldm", "size": 4}
    speedup = record["bf16_speedup"]
    assert first.value == ("bf16-mixed" if speedup > 1.05 else "32-true")
    assert first.rule.startswith(f"auto: measured on this processor (Imaginary Neoverse): bf16 {speedup:.2f}x")
    assert str(cached) in first.rule
    written = cached.stat()

    again = decide("auto", "ldm", 4, processor=UNMEASURED_BF16, cache_dir=tmp_path, steps=2)
    assert again == first
    assert (cached.stat().st_mtime_ns, cached.stat().st_ino) == (written.st_mtime_ns, written.st_ino)  # not rewritten
    assert len(list(tmp_path.glob("*.json"))) == 1


@on_cpu
def test_a_corrupt_cache_file_is_measured_again(tmp_path):
    decide("auto", "autoencoder", 32, processor=UNMEASURED_BF16, cache_dir=tmp_path, steps=1)
    (cached,) = tmp_path.glob("*.json")
    cached.write_text('{"key": ')  # a half-written file (from before write_atomically, or edited by hand)
    rebuilt = decide("auto", "autoencoder", 32, processor=UNMEASURED_BF16, cache_dir=tmp_path, steps=1)
    speedup = json.loads(cached.read_text())["bf16_speedup"]
    assert rebuilt.rule.startswith(f"auto: measured on this processor (Imaginary Neoverse): bf16 {speedup:.2f}x")


@on_cpu
def test_a_processor_without_bf16_instructions_is_fp32_without_measuring(tmp_path):
    for processor in ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz [no bf16]", "AMD EPYC 7B13 [no bf16]"):
        chosen = decide("auto", "ldm", 16, processor=processor, cache_dir=tmp_path)
        assert chosen.value == "32-true"
        assert chosen.rule == f"auto: no bf16 instructions on {processor.removesuffix(' [no bf16]')}"
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing cached
