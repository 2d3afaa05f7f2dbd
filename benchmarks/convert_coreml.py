"""Core ML target: package size and conversion time per weight compression (fp32, fp16, int8, int4,
palettize 4/6/8, 50% sparse), on the digits CNN (trained), a MobileNet-style CNN and an LSTM sensor
model, all built for iOS 18 so every scheme shares one deployment target.

Core ML cannot run on Linux, so there is no latency here. The digits CNN's held-out top-1 accuracy
of each package is computed by evaluating the saved program with the test suite's MIL reference
evaluator (numpy; float16 results rounded per op) — an estimate of what Core ML computes, not a
Core ML measurement.

    python benchmarks/convert_coreml.py     # prints a table, writes benchmarks/results/convert_coreml.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeopt.converters.pipeline import ConvertOptions, convert
from edgeopt.fsutil import tree_size

from common import ROOT, cli, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))  # the test suite's model builders and MIL reference evaluator

VARIANTS = {
    "fp32": ("none", {"compute_precision": "fp32"}),
    "fp16": ("none", {}),
    "int8": ("int8", {}),
    "int4": ("int4", {}),
    "palettize-8": ("none", {"palettize": 8}),
    "palettize-6": ("none", {"palettize": 6}),
    "palettize-4": ("none", {"palettize": 4}),
    "sparse-50%": ("none", {}),  # --prune-sparsity 0.5 (the pruning pass), stored as Core ML sparse weights
}


def _models(tmp: Path) -> dict[str, tuple[Path, Path, str]]:
    import arch_models

    import digits  # examples/ is on sys.path once `common` is imported

    made = digits.make("cnn", tmp / "digits")
    mobilenet = arch_models.export(arch_models.mobilenet_style(), tmp / "mobilenet.onnx",
                                   arch_models.sample((2, 3, 32, 32)))
    np.savez(tmp / "mobilenet_val.npz", x=arch_models.sample((16, 3, 32, 32), seed=1))
    lstm = arch_models.export(arch_models.lstm_sensor(), tmp / "lstm.onnx", arch_models.sample((2, 50, 6)))
    np.savez(tmp / "lstm_val.npz", x=arch_models.sample((16, 50, 6), seed=1))
    return {"digits CNN (47k)": (made["model"], made["validation"], "image"),
            "MobileNet-style (0.64M)": (mobilenet, tmp / "mobilenet_val.npz", "x"),
            "LSTM sensor (0.2M)": (lstm, tmp / "lstm_val.npz", "x")}


def _accuracy(package: Path, validation: Path, limit: int = 200) -> float:
    from mil_reference import run_package

    data = np.load(validation)
    x, y = data["image"][:limit], data["labels"][:limit]
    preds = [next(iter(run_package(package, {"image": x[i:i + 1]}).values())).argmax() for i in range(len(x))]
    return float((np.array(preds) == y).mean() * 100)


def main() -> None:
    cli(__doc__)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "out").mkdir()
        for name, (model, validation, _) in _models(tmp).items():
            sizes = {}
            for variant, (quantize, params) in VARIANTS.items():
                out = tmp / "out" / f"{name[:6]}-{variant}"
                t0 = time.perf_counter()
                res = convert(ConvertOptions(model=model, output=out, target="coreml", quantize=quantize,
                                             validation=validation, prune_sparsity=0.5 if variant == "sparse-50%" else None,
                                             target_params={"minimum_deployment_target": "iOS18", **params}))
                seconds = time.perf_counter() - t0
                package = out / "model.mlpackage"
                sizes[variant] = tree_size(package)
                program_bytes = (package / "Data/com.apple.CoreML/model.mlmodel").stat().st_size
                details = res.report["pass_details"]["coreml"]
                acc = _accuracy(package, validation) if name.startswith("digits") else None
                row = {"model": name, "variant": variant, "size_bytes": sizes[variant],
                       "program_bytes": program_bytes, "size_ratio_vs_fp16": None,
                       "compressed_tensors": details["verification"]["compressed_weights_checked"],
                       "convert_seconds": round(seconds, 2), "top1_percent_reference_eval": acc}
                results.append(row)
            for row in results[-len(VARIANTS):]:
                row["size_ratio_vs_fp16"] = round(row["size_bytes"] / sizes["fp16"], 4)
                rows.append([row["model"], row["variant"], row["size_bytes"], row["size_ratio_vs_fp16"],
                             row["program_bytes"], row["compressed_tensors"], row["convert_seconds"],
                             row["top1_percent_reference_eval"]])
    print_table("Core ML target (iOS 18): .mlpackage size per compression",
                ["model", "variant", "bytes", "x fp16", "program bytes", "compressed tensors", "convert s",
                 "top-1 % (ref. eval)"], rows)
    write_json("convert_coreml", {"deployment_target": "iOS18", "results": results})


if __name__ == "__main__":
    main()
