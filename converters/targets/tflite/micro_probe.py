"""Run a .tflite in TFLite Micro's own interpreter (the ``tflite-micro`` wheel), in a process of its own:

    python micro_probe.py MODEL INPUTS.npz OUTPUTS.npz ARENA_BYTES OUTPUT_COUNT

INPUTS.npz holds one int8 array per model input, by input index ("0", "1", ...), samples along axis 0;
OUTPUTS.npz gets one array per output index. TFLite Micro reports only through its C stderr (fd 2):
the arena it allocated (RecordingMicroAllocator's "Arena allocation total N bytes", printed last) and,
when it fails, why ("Didn't find op for builtin opcode 'GELU'"); ``micro.py`` reads both from there.
Run by file path, not as a module of the package: it needs numpy and tflite_micro only, and a crash in
TFLite Micro ends this process, not the conversion.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import numpy as np
    from tflite_micro import runtime

    model, inputs, outputs, arena, count = argv
    with open(model, "rb") as f:
        interpreter = runtime.Interpreter.from_bytes(f.read(), arena_size=int(arena))
    data = np.load(inputs)
    arrays = [data[str(i)] for i in range(len(data.files))]
    results: list[list] = [[] for _ in range(int(count))]
    for s in range(len(arrays[0])):
        for i, a in enumerate(arrays):
            interpreter.set_input(a[s], i)
        interpreter.invoke()
        for j in range(int(count)):
            results[j].append(interpreter.get_output(j).copy())
    np.savez(outputs, **{str(j): np.stack(r) for j, r in enumerate(results)})
    sys.stdout.flush()
    interpreter.print_allocations()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except RuntimeError as exc:  # TFLite Micro's own log (fd 2) says why; this line says where
        print(f"tflite-micro: {exc}", file=sys.stderr)
        sys.exit(3)
