"""Run an artifact's golden vectors through its TVM library and compare with the golden outputs.

A standalone script (it imports only numpy and tvm, not edgeopt) so it runs wherever a TVM runtime
does: on a board, or on this host inside an emulated aarch64 Python (tools/make_aarch64_emulation_env.sh):

    qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11 golden_check.py ARTIFACT_DIR

Prints one JSON line: samples, max_abs_err per output, the manifest's atol, ok.
"""

import json
import platform
import sys

import numpy as np


def main(artifact: str) -> int:
    import tvm
    from tvm import relax

    with open(f"{artifact}/manifest.json") as f:
        manifest = json.load(f)
    vm = relax.VirtualMachine(tvm.runtime.load_module(f"{artifact}/{manifest['model']['file']}"), tvm.cpu())
    sig = json.loads(str(vm["edgeopt_signature"]()))
    golden = np.load(f"{artifact}/{manifest['golden']['file']}")
    inputs = {s["name"]: golden[f"input:{s['name']}"] for s in sig["inputs"]}
    batch = sig["inputs"][0]["shape"][0]
    count = len(next(iter(inputs.values())))
    outs: dict[str, list] = {s["name"]: [] for s in sig["outputs"]}
    for start in range(0, count, batch):
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[s["name"]][start:start + batch])) for s in sig["inputs"]]
        result = vm["main"](*args)
        items = list(result) if len(sig["outputs"]) > 1 else [result]
        for spec, item in zip(sig["outputs"], items, strict=True):
            outs[spec["name"]].append(item.numpy())
    errors = {name: float(np.abs(np.concatenate(parts) - golden[f"output:{name}"]).max()) for name, parts in outs.items()}
    atol = manifest["golden"]["atol"]
    print(json.dumps({"machine": platform.machine(), "samples": count, "max_abs_err": errors, "atol": atol,
                      "ok": all(e <= atol for e in errors.values())}))
    return 0 if all(e <= atol for e in errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
