"""One measurement-only edit of cuda_grouped_gemm.cu (scripts/prefill-ablate.sh): base (none),
nodecode (A fragments are the raw code words), nomma (no wgmma issued), noepi (no epilogue loop:
only the accumulators' trip through shared memory), noload (no copies: the stages keep what they
hold). Results are wrong on purpose; a pattern that no longer matches fails loudly."""
import sys

v, path = sys.argv[1], sys.argv[2]
s = open(path).read()


def sub(old, new):
    global s
    if old not in s:
        sys.exit(f"ablate_patch {v}: pattern not found: {old[:60]!r}")
    s = s.replace(old, new, 1)


if v == "nodecode":
    sub("    a[0] = hmul2_bits(decode_pair(words[s], 0), s_g);",
        "    a[0] = words[s]; a[1] = words[s] ^ sc.x; a[2] = words[s] ^ sc.y; a[3] = words[s] + s;\n"
        "    if (s < 0) {\n    a[0] = hmul2_bits(decode_pair(words[s], 0), s_g);")
    sub("    a[3] = hmul2_bits(decode_pair(words[s], 3), s_g8);\n}",
        "    a[3] = hmul2_bits(decode_pair(words[s], 3), s_g8);\n    }\n}")
elif v == "nomma":
    sub("            if (BN == 256) wgmma_m64n256k16(acc, a[s], desc);",
        "            asm volatile(\"\" ::\"r\"(a[s][0]), \"r\"(a[s][1]), \"r\"(a[s][2]), \"r\"(a[s][3]), \"l\"(desc));\n"
        "            if (s < 0) wgmma_m64n256k16(acc, a[s], desc);")
    sub("            else if (BN == 128) wgmma_m64n128k16(acc, a[s], desc);",
        "            else if (s < -1) wgmma_m64n128k16(acc, a[s], desc);")
    sub("            else wgmma_m64n64k16(acc, a[s], desc);",
        "            else if (s < -2) wgmma_m64n64k16(acc, a[s], desc);")
elif v == "noepi":
    sub("    epilogue<BN, FC2, S::rows, THREADS>(p, c, ws, t, e, row0, epi, slot_of, xs_of);",
        "    if (epi[threadIdx.x] == 1.2345f) ws.y[threadIdx.x] = epi[threadIdx.x + 1];")
elif v == "noload":
    sub("                                                  const b_chunks<BN, PARTS, THREADS> &b, int64_t kg)\n{",
        "                                                  const b_chunks<BN, PARTS, THREADS> &b, int64_t kg)\n{\n"
        "    if (kg >= 0) return;")
elif v != "base":
    sys.exit(f"ablate_patch: unknown variant {v}")
open(path, "w").write(s)
