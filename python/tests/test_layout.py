"""The ctypes structs have the C header's layout: every field's offset and every struct's size
equal those a C compiler computes from include/fp4moe.h (and fp4moe_checkpoint.h)."""
import ctypes
import os
import pathlib
import shutil
import subprocess

import pytest

import fp4moe
from fp4moe import _lib, checkpoint

REPO = pathlib.Path(__file__).resolve().parents[2]
HEADERS = {"fp4moe.h": _lib.STRUCTS, "fp4moe_checkpoint.h": checkpoint.STRUCTS}


def _probe_source(header, structs):
    lines = ["#include <stddef.h>", "#include <stdio.h>", f'#include "{header}"', "int main(void) {"]
    for cname, cls in structs.items():
        lines.append(f'    printf("{cname} sizeof %zu\\n", sizeof({cname}));')
        for field, _ in cls._fields_:
            lines.append(f'    printf("{cname} {field} %zu\\n", offsetof({cname}, {field}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("header", sorted(HEADERS))
def test_struct_layouts_match_the_c_header(tmp_path, header):
    if not (REPO / "include" / header).exists():
        pytest.skip(f"include/{header} not present")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build the layout probe")
    structs = HEADERS[header]
    src = tmp_path / "probe.c"
    src.write_text(_probe_source(header, structs))
    exe = tmp_path / "probe"
    subprocess.run([cc, "-std=c11", "-I", str(REPO / "include"), str(src), "-o", str(exe)],
                   check=True)
    printed = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    c_values = {}
    for line in printed.splitlines():
        name, field, value = line.split()
        c_values[(name, field)] = int(value)
    for cname, cls in structs.items():
        assert ctypes.sizeof(cls) == c_values[(cname, "sizeof")], cname
        for field, _ in cls._fields_:
            assert getattr(cls, field).offset == c_values[(cname, field)], f"{cname}.{field}"
        # every C field is mirrored: the struct sizes agree and no field is missing
        assert len(cls._fields_) == sum(1 for (n, f) in c_values if n == cname and f != "sizeof")


def test_config_init_defaults_land_on_the_mirrored_fields():
    s = fp4moe.Config(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16).to_struct()
    assert s.swiglu_alpha == 1.0 and s.swiglu_beta == 0.0 and s.swiglu_limit == float("inf")
    assert s.n_group == 1 and s.topk_group == 1 and s.norm_topk_prob == 1
    assert s.routed_scaling_factor == 1.0
    assert s.decode_threshold == -1 and s.max_tokens == 16384  # -1: FP4MOE_DECODE_THRESHOLD_AUTO
    raw = _lib.ConfigStruct()
    _lib.lib().fp4moe_config_init(ctypes.byref(raw))
    assert raw.max_tokens == 16384 and raw.decode_threshold == -1 and raw.n_group == 1


def test_forward_args_and_context_options_init():
    a = _lib.ForwardArgs()
    ctypes.memset(ctypes.byref(a), 0xFF, ctypes.sizeof(a))
    _lib.lib().fp4moe_forward_args_init(ctypes.byref(a))
    assert a.output_dtype == fp4moe.DType.F32 and a.skip_finalize == 0
    assert a.hidden_states is None and a.topk_ids_out is None and a.num_tokens == 0
    o = _lib.ContextOptions()
    ctypes.memset(ctypes.byref(o), 0xFF, ctypes.sizeof(o))
    _lib.lib().fp4moe_context_options_init(ctypes.byref(o))
    assert o.backend == fp4moe.Backend.AUTO and o.num_threads == 0 and o.cuda_device == 0
