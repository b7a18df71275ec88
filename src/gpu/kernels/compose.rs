//! Composition of a kernel's complete WGSL from its key (the order is in the module docs of
//! [`kernels`](super)).

use std::fmt::Write as _;

use super::{KernelKey, ParamsIn, Slot, Storage, uniforms};

/// The complete source of `key`, its parameter blocks bound as `params` says.
/// `mods` is the WGSL of the call's score mod (`ScoreMod::wgsl`), appended to kernels that mask.
pub(super) fn source(key: &KernelKey, params: ParamsIn, mods: &str) -> String {
    let kernel = key.kernel();
    let mut src = String::new();
    for feature in key.enables() {
        let _ = writeln!(src, "enable {feature};");
    }
    src.push_str(&uniforms::shared_constants());
    for (name, value) in key.source_constants() {
        let _ = writeln!(src, "const {name}: u32 = {value}u;");
    }
    for (name, ty) in key.aliases() {
        let _ = writeln!(src, "alias {name} = {ty};");
    }
    // Each parameter block's struct once, even when two slots bind the same type.
    let mut declared = Vec::new();
    for slot in kernel.slots() {
        if let Slot::Uniform { ty, decl, .. } = *slot
            && !declared.contains(&ty)
        {
            declared.push(ty);
            src.push_str(decl);
        }
    }
    let storages = key.storages();
    let mut next = storages.iter();
    for (binding, slot) in kernel.slots().iter().enumerate() {
        match *slot {
            Slot::Uniform { name, ty, .. } => {
                let space = match params {
                    ParamsIn::Uniform => "uniform",
                    ParamsIn::ReadOnlyStorage => "storage, read",
                };
                let _ = writeln!(
                    src,
                    "@group(0) @binding({binding}) var<{space}> {name}: {ty};"
                );
            }
            Slot::Storage {
                name,
                ty,
                read_only,
            } => {
                let access = if read_only { "read" } else { "read_write" };
                let _ = writeln!(
                    src,
                    "@group(0) @binding({binding}) var<storage, {access}> {name}: {ty};"
                );
            }
            Slot::Tensor { name, read_only } => {
                let storage = *next.next().expect("a storage per tensor slot");
                match key.grouped_tensors().iter().find(|(n, _)| *n == name) {
                    Some(&(_, group)) if read_only => {
                        prelude_grouped(&mut src, name, binding, storage, group)
                    }
                    _ => prelude(&mut src, name, binding, storage, read_only),
                }
            }
        }
    }
    let fragments = key.fragments();
    for fragment in &fragments {
        src.push_str(fragment.source());
    }
    src.push_str(kernel.source());
    if fragments.contains(&super::Fragment::Masking) {
        src.push_str(mods);
    }
    src
}

/// Declares tensor `name` at `binding` in `storage`, with its f32 accessors: `load_<name>(i)`,
/// and `store_<name>(i, x)` when writable; a read-only tensor also gets `load4_<name>(i)`,
/// elements `i .. i + 3` as a `vec4<f32>` (16-bit types read two words when `i` is even, 8-bit
/// ones one word when `i` is a multiple of 4). Packed types store through atomics on the word
/// that holds the element, because the rest of it may belong to another invocation.
fn prelude(src: &mut String, name: &str, binding: usize, storage: Storage, read_only: bool) {
    let access = if read_only { "read" } else { "read_write" };
    let decl = |ty: &str| {
        format!("@group(0) @binding({binding}) var<storage, {access}> {name}_buf: {ty};\n")
    };
    // Packed types: words, atomic where writable (see packed_store).
    let packed_decl = decl(if read_only {
        "array<u32>"
    } else {
        "array<atomic<u32>>"
    });
    // The 32-bit word holding element i, as a value.
    let word = if read_only {
        format!("{name}_buf[i >> 1u]")
    } else {
        format!("atomicLoad(&{name}_buf[i >> 1u])")
    };
    let packed_store = |bits: &str| {
        format!(
            "fn store_{name}(i: u32, x: f32) {{\n    let bits = {bits};\n    let shift = (i & 1u) * 16u;\n    \
             atomicAnd(&{name}_buf[i >> 1u], ~(0xffffu << shift));\n    \
             atomicOr(&{name}_buf[i >> 1u], bits << shift);\n}}\n"
        )
    };
    match storage {
        // Unpacked: the element type and its conversions to and from f32.
        Storage::F32 | Storage::F16 => {
            let (ty, to_f32, from_f32) = match storage {
                Storage::F32 => ("f32", "", ""),
                _ => ("f16", "f32", "f16"),
            };
            src.push_str(&decl(&format!("array<{ty}>")));
            let _ = writeln!(
                src,
                "fn load_{name}(i: u32) -> f32 {{ return {to_f32}({name}_buf[i]); }}"
            );
            if read_only {
                let _ = writeln!(
                    src,
                    "fn load4_{name}(i: u32) -> vec4<f32> {{\n    return vec4<f32>({to_f32}({name}_buf[i]), \
                     {to_f32}({name}_buf[i + 1u]), {to_f32}({name}_buf[i + 2u]), {to_f32}({name}_buf[i + 3u]));\n}}"
                );
            } else {
                let _ = writeln!(
                    src,
                    "fn store_{name}(i: u32, x: f32) {{ {name}_buf[i] = {from_f32}(x); }}"
                );
            }
        }
        Storage::F16Packed => {
            src.push_str(&packed_decl);
            let _ = writeln!(
                src,
                "fn load_{name}(i: u32) -> f32 {{\n    let pair = unpack2x16float({word});\n    \
                 return select(pair.x, pair.y, (i & 1u) != 0u);\n}}"
            );
            if read_only {
                load4_packed(src, name, "unpack2x16float(w0), unpack2x16float(w1)");
            } else {
                src.push_str(&packed_store("pack2x16float(vec2<f32>(x, 0.0)) & 0xffffu"));
            }
        }
        Storage::F8E4M3 => {
            src.push_str(&packed_decl);
            f8_helpers(src, name, !read_only);
            // Four to a word.
            let word = if read_only {
                format!("{name}_buf[i >> 2u]")
            } else {
                format!("atomicLoad(&{name}_buf[i >> 2u])")
            };
            let _ = writeln!(
                src,
                "fn load_{name}(i: u32) -> f32 {{ return f8_{name}(({word} >> ((i & 3u) * 8u)) & 0xffu); }}"
            );
            if read_only {
                let _ = writeln!(
                    src,
                    "fn load4_{name}(i: u32) -> vec4<f32> {{\n    if (i & 3u) == 0u {{\n        \
                     return f8x4_{name}({name}_buf[i >> 2u]);\n    }}\n    \
                     return vec4<f32>(load_{name}(i), load_{name}(i + 1u), load_{name}(i + 2u), load_{name}(i + 3u));\n}}"
                );
            } else {
                let _ = writeln!(
                    src,
                    "fn store_{name}(i: u32, x: f32) {{\n    let shift = (i & 3u) * 8u;\n    \
                     atomicAnd(&{name}_buf[i >> 2u], ~(0xffu << shift));\n    \
                     atomicOr(&{name}_buf[i >> 2u], f8_bits_{name}(x) << shift);\n}}"
                );
            }
        }
        Storage::Bf16 => {
            src.push_str(&packed_decl);
            let _ = writeln!(
                src,
                "fn load_{name}(i: u32) -> f32 {{ return bitcast<f32>((({word} >> ((i & 1u) * 16u)) & 0xffffu) << 16u); }}"
            );
            if read_only {
                load4_packed(
                    src,
                    name,
                    "bitcast<f32>(w0 << 16u), bitcast<f32>(w0 & 0xffff0000u), \
                     bitcast<f32>(w1 << 16u), bitcast<f32>(w1 & 0xffff0000u)",
                );
            } else {
                // Round to nearest even; NaN stays a (quiet) NaN.
                let _ = writeln!(
                    src,
                    "fn bf16_bits_{name}(x: f32) -> u32 {{\n    let u = bitcast<u32>(x);\n    \
                     if (u & 0x7fffffffu) > 0x7f800000u {{ return 0x7fc0u; }}\n    \
                     return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;\n}}"
                );
                src.push_str(&packed_store(&format!("bf16_bits_{name}(x)")));
            }
        }
    }
}

/// The FP8 E4M3 conversions of tensor `name` (`spec::f8e4m3_to_f32` and, with `store`,
/// `spec::f8e4m3_from_f32`: change one, change the other): `f8_<name>(b)` the value of byte
/// `b` (0x7f, NaN, reads as 480: the host writes it only for a NaN), `f8x4_<name>(w)` the four
/// bytes of a word, lowest first, and `f8_bits_<name>(x)`, `x` rounded to nearest even and
/// saturated at ±448.
fn f8_helpers(src: &mut String, name: &str, store: bool) {
    let _ = writeln!(
        src,
        "fn f8_{name}(b: u32) -> f32 {{\n    let e = (b >> 3u) & 15u;\n    let m = b & 7u;\n    \
         var x = f32(m) * 0.001953125;\n    \
         if e != 0u {{ x = bitcast<f32>(((e + 120u) << 23u) | (m << 20u)); }}\n    \
         return select(x, -x, (b & 0x80u) != 0u);\n}}\n\
         fn f8x4_{name}(w: u32) -> vec4<f32> {{\n    \
         return vec4<f32>(f8_{name}(w & 0xffu), f8_{name}((w >> 8u) & 0xffu), \
         f8_{name}((w >> 16u) & 0xffu), f8_{name}(w >> 24u));\n}}"
    );
    if store {
        let _ = writeln!(
            src,
            "fn f8_bits_{name}(x: f32) -> u32 {{\n    let u = bitcast<u32>(x);\n    \
             let sign = (u >> 24u) & 0x80u;\n    let a = abs(x);\n    \
             if (u & 0x7fffffffu) > 0x7f800000u {{ return 0x7fu; }}\n    \
             if a >= 448.0 {{ return sign | 0x7eu; }}\n    \
             if a < 0.015625 {{\n        let m = a * 512.0;\n        var r = u32(floor(m));\n        \
             let f = m - floor(m);\n        \
             if f > 0.5 || (f == 0.5 && (r & 1u) == 1u) {{ r += 1u; }}\n        return sign | r;\n    }}\n    \
             let e = ((u >> 23u) & 0xffu) - 120u;\n    let mant = u & 0x7fffffu;\n    \
             var r = mant >> 20u;\n    let rem = mant & 0xfffffu;\n    \
             if rem > 0x80000u || (rem == 0x80000u && (r & 1u) == 1u) {{ r += 1u; }}\n    \
             return sign | ((e << 3u) + r);\n}}"
        );
    }
}

/// `load4_<name>` of a type packed two to a word: from words `w0`, `w1` when `i` is even
/// (`unpack` builds the four elements from them), else element by element.
fn load4_packed(src: &mut String, name: &str, unpack: &str) {
    let _ = writeln!(
        src,
        "fn load4_{name}(i: u32) -> vec4<f32> {{\n    if (i & 1u) == 0u {{\n        \
         let w0 = {name}_buf[i >> 1u];\n        let w1 = {name}_buf[(i >> 1u) + 1u];\n        \
         return vec4<f32>({unpack});\n    }}\n    \
         return vec4<f32>(load_{name}(i), load_{name}(i + 1u), load_{name}(i + 2u), load_{name}(i + 3u));\n}}"
    );
}

/// Declares read-only tensor `name` at `binding` for a kernel that reads it `group` elements at
/// a time (1: element by element; 4 or 8: one load per group, see `prelude_vec4` and
/// `prelude_vec8`), with `const <NAME>_G4` (vec4s per group: 1 or 2) and
/// `loadg_<name>(i) -> array<vec4<f32>, <NAME>_G4>`, elements `i .. i + 4 * <NAME>_G4`.
fn prelude_grouped(src: &mut String, name: &str, binding: usize, storage: Storage, group: u32) {
    match group {
        8 => prelude_vec8(src, name, binding, storage),
        4 => prelude_vec4(src, name, binding, storage),
        _ => prelude(src, name, binding, storage, true),
    }
    let upper = name.to_uppercase();
    if group == 8 {
        let _ = writeln!(src, "const {upper}_G4: u32 = 2u;");
    } else {
        let _ = writeln!(
            src,
            "const {upper}_G4: u32 = 1u;\n\
             fn loadg_{name}(i: u32) -> array<vec4<f32>, 1> {{ return array<vec4<f32>, 1>(load4_{name}(i)); }}"
        );
    }
}

/// Declares read-only tensor `name` at `binding` as an array of 8-element groups where that
/// is one load (16 bytes: `vec4<u32>` of f16 or bf16 pairs; 8 bytes: `vec2<u32>` of 8-bit
/// quadruples), `loadg_<name>(i)` the elements `i .. i + 7` (`i` a multiple of 8), and
/// `load_<name>` / `load4_<name>` from a group. For buffers whose length is a multiple of the
/// group's bytes and kernels whose grouped indices are multiples of 8. An f32 tensor reads its 8 elements as two `vec4<f32>` (`prelude_vec4`).
fn prelude_vec8(src: &mut String, name: &str, binding: usize, storage: Storage) {
    let pair = match storage {
        Storage::F32 => {
            prelude_vec4(src, name, binding, storage);
            let _ = writeln!(
                src,
                "fn loadg_{name}(i: u32) -> array<vec4<f32>, 2> {{\n    \
                 return array<vec4<f32>, 2>({name}_buf[i >> 2u], {name}_buf[(i >> 2u) + 1u]);\n}}"
            );
            return;
        }
        Storage::F16 | Storage::F16Packed => "unpack2x16float(w)",
        Storage::Bf16 => "vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u))",
        Storage::F8E4M3 => {
            // Eight elements are two words.
            f8_helpers(src, name, false);
            let _ = writeln!(
                src,
                "@group(0) @binding({binding}) var<storage, read> {name}_buf: array<vec2<u32>>;\n\
                 fn loadg_{name}(i: u32) -> array<vec4<f32>, 2> {{\n    let w = {name}_buf[i >> 3u];\n    \
                 return array<vec4<f32>, 2>(f8x4_{name}(w.x), f8x4_{name}(w.y));\n}}\n\
                 fn load_{name}(i: u32) -> f32 {{ return f8_{name}(({name}_buf[i >> 3u][(i >> 2u) & 1u] >> ((i & 3u) * 8u)) & 0xffu); }}\n\
                 fn load4_{name}(i: u32) -> vec4<f32> {{ return f8x4_{name}({name}_buf[i >> 3u][(i >> 2u) & 1u]); }}"
            );
            return;
        }
    };
    let _ = writeln!(
        src,
        "@group(0) @binding({binding}) var<storage, read> {name}_buf: array<vec4<u32>>;\n\
         fn pair_{name}(w: u32) -> vec2<f32> {{ return {pair}; }}\n\
         fn loadg_{name}(i: u32) -> array<vec4<f32>, 2> {{\n    let w = {name}_buf[i >> 3u];\n    \
         return array<vec4<f32>, 2>(vec4<f32>(pair_{name}(w.x), pair_{name}(w.y)), \
         vec4<f32>(pair_{name}(w.z), pair_{name}(w.w)));\n}}\n\
         fn load_{name}(i: u32) -> f32 {{ return pair_{name}({name}_buf[i >> 3u][(i >> 1u) & 3u])[i & 1u]; }}\n\
         fn load4_{name}(i: u32) -> vec4<f32> {{\n    let w = {name}_buf[i >> 3u];\n    \
         return select(vec4<f32>(pair_{name}(w.x), pair_{name}(w.y)), \
         vec4<f32>(pair_{name}(w.z), pair_{name}(w.w)), (i & 4u) != 0u);\n}}"
    );
}

/// Declares read-only tensor `name` at `binding` as an array of 4-element groups (16 bytes of
/// f32, 8 of f16 or bf16, 4 of 8-bit), so that `load4_<name>(i)` is one load: for kernels whose every
/// `load4` index is a multiple of 4 (the planner checks the head dims), on buffers whose length
/// is a multiple of the group (every tensor whose rows are). `load_<name>(i)` reads one element
/// of a group.
fn prelude_vec4(src: &mut String, name: &str, binding: usize, storage: Storage) {
    let (ty, load4, load) = match storage {
        Storage::F32 => (
            "vec4<f32>",
            format!("{name}_buf[i >> 2u]"),
            format!("{name}_buf[i >> 2u][i & 3u]"),
        ),
        Storage::F16 => (
            "vec4<f16>",
            format!("vec4<f32>({name}_buf[i >> 2u])"),
            format!("f32({name}_buf[i >> 2u][i & 3u])"),
        ),
        Storage::F16Packed => (
            "vec2<u32>",
            format!(
                "vec4<f32>(unpack2x16float({name}_buf[i >> 2u].x), unpack2x16float({name}_buf[i >> 2u].y))"
            ),
            format!("unpack2x16float({name}_buf[i >> 2u][(i >> 1u) & 1u])[i & 1u]"),
        ),
        Storage::F8E4M3 => (
            "u32",
            format!("f8x4_{name}({name}_buf[i >> 2u])"),
            format!("f8_{name}(({name}_buf[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu)"),
        ),
        Storage::Bf16 => (
            "vec2<u32>",
            format!("bf16x4_{name}({name}_buf[i >> 2u])"),
            format!(
                "bitcast<f32>((({name}_buf[i >> 2u][(i >> 1u) & 1u] >> ((i & 1u) * 16u)) & 0xffffu) << 16u)"
            ),
        ),
    };
    let _ = writeln!(
        src,
        "@group(0) @binding({binding}) var<storage, read> {name}_buf: array<{ty}>;"
    );
    if storage == Storage::F8E4M3 {
        f8_helpers(src, name, false);
    }
    if storage == Storage::Bf16 {
        let _ = writeln!(
            src,
            "fn bf16x4_{name}(w: vec2<u32>) -> vec4<f32> {{\n    return vec4<f32>(bitcast<f32>(w.x << 16u), \
             bitcast<f32>(w.x & 0xffff0000u), bitcast<f32>(w.y << 16u), bitcast<f32>(w.y & 0xffff0000u));\n}}"
        );
    }
    let _ = writeln!(src, "fn load_{name}(i: u32) -> f32 {{ return {load}; }}");
    let _ = writeln!(
        src,
        "fn load4_{name}(i: u32) -> vec4<f32> {{ return {load4}; }}"
    );
}
