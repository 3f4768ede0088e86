#!/usr/bin/env python3
"""Checks that wasm modules follow avail's guest ABI v1 (docs/guest-abi.md).

Usage: check_wasm.py MODULE.wasm...  Prints each module's size, imports and exports
with their types; exits 1 if a required export is missing or has the wrong type, or if
the module imports anything but the optional `avail` functions.
"""

import sys

VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
            0x70: "funcref", 0x6F: "externref"}
KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}

REQUIRED_EXPORTS = {
    "memory": "memory",
    "avail_alloc": "func (i32) -> (i32)",
    "avail_handle": "func (i32, i32) -> (i64)",
}
ALLOWED_IMPORTS = {
    ("avail", "log"): "func (i32, i32) -> ()",
    ("avail", "now_ms"): "func () -> (i64)",
    ("avail", "random"): "func (i32, i32) -> ()",
}


class Reader:
    def __init__(self, data, pos=0):
        self.data, self.pos = data, pos

    def byte(self):
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self):
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    def name(self):
        n = self.uleb()
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def limits(self):
        flags = self.byte()
        self.uleb()
        if flags & 1:
            self.uleb()


def sig(params, results):
    return "func (%s) -> (%s)" % (", ".join(params), ", ".join(results))


def inspect(data):
    if data[:8] != b"\0asm\x01\0\0\0":
        raise ValueError("not a wasm v1 module")
    r = Reader(data, 8)
    types, funcs, imports, exports = [], [], [], []
    while r.pos < len(data):
        sid, size = r.byte(), r.uleb()
        end = r.pos + size
        if sid == 1:  # types
            for _ in range(r.uleb()):
                assert r.byte() == 0x60, "only plain function types expected"
                params = [VALTYPES.get(r.byte(), "?") for _ in range(r.uleb())]
                results = [VALTYPES.get(r.byte(), "?") for _ in range(r.uleb())]
                types.append(sig(params, results))
        elif sid == 2:  # imports
            for _ in range(r.uleb()):
                module, name, kind = r.name(), r.name(), r.byte()
                if kind == 0:
                    desc = types[r.uleb()]
                    funcs.append(desc)
                elif kind == 1:
                    r.byte()
                    r.limits()
                    desc = "table"
                elif kind == 2:
                    r.limits()
                    desc = "memory"
                elif kind == 3:
                    r.byte()
                    r.byte()
                    desc = "global"
                else:
                    desc = KINDS.get(kind, "?")
                imports.append((module, name, desc))
        elif sid == 3:  # functions
            funcs.extend(types[r.uleb()] for _ in range(r.uleb()))
        elif sid == 7:  # exports
            for _ in range(r.uleb()):
                name, kind, index = r.name(), r.byte(), r.uleb()
                exports.append((name, funcs[index] if kind == 0 else KINDS.get(kind, "?")))
        r.pos = end
    return imports, exports


def check(path):
    data = open(path, "rb").read()
    imports, exports = inspect(data)
    problems = []
    print("%s: %d bytes" % (path, len(data)))
    for module, name, desc in imports:
        print("  import %s.%s: %s" % (module, name, desc))
        want = ALLOWED_IMPORTS.get((module, name))
        if want != desc:
            problems.append("import %s.%s (%s) not allowed" % (module, name, desc))
    exported = dict(exports)
    for name, desc in exports:
        print("  export %s: %s" % (name, desc))
    for name, want in REQUIRED_EXPORTS.items():
        if exported.get(name) != want:
            problems.append("export %s missing or not %s" % (name, want))
    for p in problems:
        print("  PROBLEM: " + p)
    return not problems


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    ok = all([check(p) for p in sys.argv[1:]])
    sys.exit(0 if ok else 1)
