#!/usr/bin/env bash
# Validates the SPIR-V of the fused kernel's cooperative-matrix keys with spirv-val, which
# must know SPV_KHR_cooperative_matrix (SPIRV-Tools 2023.3 or later; Debian bookworm's 2023.1
# does not: build SPIRV-Tools' spirv-val target from source and pass its path as $1).
#
# naga decorates workgroup, private and function arrays with ArrayStride, which recent
# validators reject (VUID-StandaloneSpirv-None-10684) although drivers accept it; those
# decorations are stripped first, so that the rest of the module is validated.
#
#   bash scripts/validate-cooperative-spirv.sh path/to/spirv-val
set -euo pipefail
val=${1:-spirv-val}
dir=$(mktemp -d)
WGPU_ATTENTION_SPV_DIR=$dir cargo test -q --release --test shaders dump_cooperative_spirv \
    -- --ignored >/dev/null
python3 - "$dir" <<'PY'
import pathlib, struct, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.spv")):
    words = list(struct.unpack("<%dI" % (path.stat().st_size // 4), path.read_bytes()))
    body, insts, i = words[5:], [], 0
    while i < len(body):
        insts.append(body[i:i + (body[i] >> 16)])
        i += body[i] >> 16
    # Types reached from Workgroup (4), Private (6) and Function (7) pointers.
    arrays = {x[1]: [x[2]] for x in insts if x[0] & 0xffff == 28}
    structs = {x[1]: x[2:] for x in insts if x[0] & 0xffff == 30}
    todo = [x[3] for x in insts if x[0] & 0xffff == 32 and x[2] in (4, 6, 7)]
    seen = set()
    while todo:
        t = todo.pop()
        if t not in seen:
            seen.add(t)
            todo += arrays.get(t, []) + list(structs.get(t, []))
    keep = [x for x in insts
            if not (x[0] & 0xffff == 71 and x[1] in seen and x[2] == 6)
            and not (x[0] & 0xffff == 72 and x[1] in seen and x[3] == 35)]
    out = words[:5] + [w for x in keep for w in x]
    path.write_bytes(struct.pack("<%dI" % len(out), *out))
PY
fail=0
for f in "$dir"/*.spv; do
    if "$val" --target-env vulkan1.3 "$f"; then
        echo "ok: $(cat "${f%.spv}.txt")"
    else
        echo "FAILED: $(cat "${f%.spv}.txt")"
        fail=1
    fi
done
rm -rf "$dir"
exit $fail
