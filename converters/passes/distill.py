"""Knowledge distillation: train a smaller student to reproduce the original model's outputs.

The teacher is the model before compression (``ctx.reference``), run by ONNX Runtime once over the
data; the student is the model this pass receives (the structurally pruned one) or ``student``, an
ONNX file with the same inputs and output shapes. The student is imported into torch
(``edgeopt.converters.torch_import``), trained on CPU with the temperature-softened KL divergence to
the teacher (Hinton et al.) — plus cross-entropy when the data has labels — and its trained weights
are written back into its ONNX graph, so the pipeline continues (quantize, compile) on a model of
the same structure. A ``validation_fraction`` of the data is held out: training stops once its
distillation loss has not improved for ``patience`` epochs, and the best weights are kept.

Runs are reproducible for a given ``seed`` (seeded init-free training: shuffling from a seeded
generator, deterministic torch algorithms, ``threads`` CPU threads).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from edgeopt.converters import torch_import
from edgeopt.converters.passes import Pass, PassContext, get_pass
from edgeopt.data import Dataset, load_dataset
from edgeopt.errors import MissingDependency, UserInputError
from edgeopt.onnx_io import input_specs, load_model, output_specs
from edgeopt.params import Param, in_range

MIN_SAMPLES = 20


def _at_least(n: int):
    return lambda v: None if v >= n else f"must be >= {n}"


class Distill(Pass):
    name: ClassVar[str] = "distill"
    summary: ClassVar[str] = "knowledge distillation of the original model into the (pruned) student, on CPU"
    params: ClassVar[tuple[Param, ...]] = (
        Param("data", str, None, "distillation inputs (.npz with an array per input, or .npy); labels optional"),
        Param("epochs", int, 30, "maximum training epochs (early stopping may end sooner)", check=_at_least(1)),
        Param("student", str, None, "student ONNX model (default: the model being converted, e.g. pruned)"),
        Param("temperature", float, 4.0, "softens teacher and student outputs in the KL loss",
              check=in_range(0.0, 100.0, lo_open=True)),
        Param("alpha", float, 0.7, "weight of the distillation loss; 1 - alpha goes to cross-entropy "
              "when the data has labels", check=in_range(0.0, 1.0)),
        Param("learning_rate", float, 3e-3, "Adam learning rate", check=in_range(0.0, 1.0, lo_open=True)),
        Param("batch_size", int, 64, "training batch size", check=_at_least(1)),
        Param("validation_fraction", float, 0.15, "part of the data held out for early stopping",
              check=in_range(0.0, 0.5, lo_open=True)),
        Param("patience", int, 5, "stop after this many epochs without a lower validation loss",
              check=_at_least(1)),
        Param("seed", int, 0, "seed for the split and the shuffling (same seed, same weights)"),
        Param("threads", int, 1, "torch CPU threads", check=_at_least(1)),
        Param("preserve_sparsity", bool, True, "weights that are exactly zero (unstructured pruning) stay zero"),
    )

    def preflight(self) -> None:
        _import_torch()
        if not self.config["data"]:
            raise UserInputError("distill needs data: pass --distill DATA (.npz with an array per model input)")
        for what, path in (("distillation data", self.config["data"]), ("student model", self.config["student"])):
            if path is not None and not Path(path).is_file():
                raise UserInputError(f"{what} not found: {path}")

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        self.preflight()
        torch = _import_torch()

        teacher = ctx.reference if ctx.reference is not None else model
        student = self._student(model, ctx)
        if student is teacher and self.config["student"] is None:
            raise UserInputError("distill: nothing to train — the model is its own teacher; compress it first "
                                 "(--prune-channels) or give --student MODEL.onnx")
        self._check_compatible(teacher, student)
        if unsupported := torch_import.unsupported_ops(student):
            listed = "; ".join(f"{op} (node {', '.join(repr(n) for n in nodes[:3])})"
                               for op, nodes in sorted(unsupported.items()))
            raise UserInputError(f"distill: the student uses ops the ONNX → torch importer does not support: {listed}")
        data = ctx.distillation if ctx.distillation is not None else load_dataset(
            self.config["data"], input_specs(teacher), outputs=output_specs(teacher))
        if len(data) < MIN_SAMPLES:
            raise UserInputError(f"{data.source}: {len(data)} samples; distillation needs at least {MIN_SAMPLES}")
        started, cpu_started = time.perf_counter(), time.process_time()
        with _torch_settings(torch, self.config["threads"], self.config["seed"]):
            details = self._train(torch, torch_import, teacher, student, data, ctx)
        details["seconds"] = round(time.perf_counter() - started, 2)
        details["cpu_seconds"] = round(time.process_time() - cpu_started, 2)
        ctx.details[self.name] = details
        return details.pop("model")

    # -- models ----------------------------------------------------------------------------------
    def _student(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        if self.config["student"] is None:
            return model
        path = Path(self.config["student"])
        raw = load_model(path)
        canon = get_pass("canonicalize")()
        sub = PassContext(workdir=ctx.workdir)
        return canon.apply(raw, sub)

    def _check_compatible(self, teacher: onnx.ModelProto, student: onnx.ModelProto) -> None:
        who = f"student {self.config['student']}" if self.config["student"] else "the student"
        t_in = {s.name: s.sample_shape() for s in input_specs(teacher)}
        s_in = {s.name: s.sample_shape() for s in input_specs(student)}
        if t_in != s_in:
            raise UserInputError(f"{who}: inputs {_describe(s_in)} differ from the teacher's {_describe(t_in)}")
        t_out, s_out = output_specs(teacher), output_specs(student)
        if len(t_out) != len(s_out):
            raise UserInputError(f"{who} has {len(s_out)} outputs, the teacher {len(t_out)}")
        for t, s in zip(t_out, s_out, strict=True):
            if t.sample_shape() != s.sample_shape():
                raise UserInputError(f"{who}: output '{s.name}' has shape [N, {_dims(s.sample_shape())}], the "
                                     f"teacher's '{t.name}' has [N, {_dims(t.sample_shape())}]")

    # -- training --------------------------------------------------------------------------------
    def _train(self, torch, torch_import, teacher, student, data: Dataset, ctx: PassContext) -> dict[str, Any]:
        cfg = self.config
        F = torch.nn.functional
        targets = _teacher_outputs(teacher, data)
        probabilities = _ends_in_softmax(teacher)
        classifier = targets.ndim == 2 and targets.shape[1] >= 2
        labels = data.labels if data.task == "classification" and classifier else None
        if data.labels is not None and labels is None:  # cross-entropy needs class scores
            ctx.notes.append(f"distill: the labels in {data.source} are regression targets; the student learns "
                             f"from the teacher's outputs alone")

        module = torch_import.import_model(student)
        module.train()
        names = [s.name for s in input_specs(student)]
        xs = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in data.inputs.items()}
        t_all = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        y_all = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))

        gen = torch.Generator().manual_seed(cfg["seed"])
        order = torch.randperm(len(data), generator=gen)
        n_val = max(1, int(round(len(data) * cfg["validation_fraction"])))
        val_idx, train_idx = order[:n_val], order[n_val:]
        temperature, alpha = cfg["temperature"], cfg["alpha"]

        def logits(out):
            return torch.log(out.clamp_min(1e-8)) if probabilities else out

        def forward(idx):
            return logits(module(**{n: xs[n][idx] for n in names})[0])

        batch_size = self._batch_size(torch, student, forward, order, ctx)

        def batches(idx):
            """Chunks of ``idx``; a graph with a fixed batch gets exactly that many (the last chunk padded)."""
            for chunk in idx.split(batch_size):
                real = len(chunk)
                if batch_size != cfg["batch_size"] and real < batch_size:
                    chunk = torch.cat([chunk, chunk[-1:].repeat(batch_size - real)])
                yield chunk, real

        def distill_loss(s, t):
            if not classifier:
                return F.mse_loss(s, t)
            return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(logits(t) / temperature, 1),
                            log_target=True, reduction="batchmean") * temperature ** 2

        def evaluate():
            with torch.no_grad():
                s = torch.cat([forward(chunk)[:real] for chunk, real in batches(val_idx)])
                t = t_all[val_idx]
                agree = float((s.argmax(1) == t.argmax(1)).float().mean()) if classifier else None
                return float(distill_loss(s, t)), agree

        params = [p for p in module.parameters() if p.requires_grad]
        masks = [(p, p.detach() != 0) for p in params] if cfg["preserve_sparsity"] else []
        masks = [(p, m) for p, m in masks if not bool(m.all())]
        opt = torch.optim.Adam(params, lr=cfg["learning_rate"])
        best_loss, agreement_before = evaluate()
        best = {k: v.detach().clone() for k, v in module.state_dict().items()}
        best_epoch, epochs_run, since_best = 0, 0, 0
        history = []
        with ctx.progress("distilling", cfg["epochs"]) as advance:
            for epoch in range(1, cfg["epochs"] + 1):
                train_loss = 0.0
                for batch, _ in batches(train_idx[torch.randperm(len(train_idx), generator=gen)]):
                    opt.zero_grad()
                    s = forward(batch)
                    loss = distill_loss(s, t_all[batch])
                    if y_all is not None:
                        loss = alpha * loss + (1 - alpha) * F.cross_entropy(s, y_all[batch])
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for p, m in masks:
                            p.mul_(m)
                    train_loss += float(loss.detach()) * len(batch)
                epochs_run = epoch
                val_loss, agreement = evaluate()
                history.append({"epoch": epoch, "train_loss": round(train_loss / len(train_idx), 5),
                                "val_loss": round(val_loss, 5), "val_agreement": agreement})
                if val_loss < best_loss - 1e-6:
                    best_loss, best_epoch, since_best = val_loss, epoch, 0
                    best = {k: v.detach().clone() for k, v in module.state_dict().items()}
                else:
                    since_best += 1
                status = f"loss {val_loss:.4f}" + (f", agreement {agreement:.1%}" if agreement is not None else "")
                advance(1, status=status)
                if since_best >= cfg["patience"]:
                    break
        module.load_state_dict(best)
        _, agreement_after = evaluate()
        return {
            "model": torch_import.write_back(student, module),
            "student": self.config["student"] or "the compressed model",
            "train_samples": len(train_idx), "validation_samples": n_val, "labels_used": y_all is not None,
            "loss": "kl+ce" if y_all is not None else ("kl" if classifier else "mse"),
            "epochs_run": epochs_run, "best_epoch": best_epoch, "stopped_early": epochs_run < cfg["epochs"],
            "validation_loss": round(best_loss, 5),
            "validation_agreement_before": agreement_before, "validation_agreement_after": agreement_after,
            "history": history, "threads": cfg["threads"], "seed": cfg["seed"], "batch_size": batch_size,
        }

    def _batch_size(self, torch, student, forward, order, ctx: PassContext) -> int:
        """The configured batch size, unless the student's graph only runs at its fixed input batch
        (a Reshape to [1, -1] after a profile fixed batch 1): then exactly that batch."""
        fixed = input_specs(student)[0].shape[0]
        wanted = self.config["batch_size"]
        if not isinstance(fixed, int) or fixed == wanted or len(order) <= fixed:
            return wanted
        try:
            with torch.no_grad():
                forward(order[:fixed + 1])
            return wanted
        except RuntimeError:
            ctx.notes.append(f"distill: the student's graph fixes the batch at {fixed}; trained with batches "
                             f"of {fixed} instead of {wanted}")
            return fixed


def _import_torch():
    try:
        import torch
    except ImportError:
        raise MissingDependency("torch", "train", "distillation (--distill)") from None
    return torch


def _describe(shapes: dict[str, tuple]) -> str:
    return ", ".join(f"'{k}' [N, {_dims(v)}]" for k, v in shapes.items())


def _dims(shape: tuple) -> str:
    return ", ".join(str(d) for d in shape)


def _ends_in_softmax(model: onnx.ModelProto) -> bool:
    first = model.graph.output[0].name
    return any(n.op_type == "Softmax" and first in n.output for n in model.graph.node)


def _teacher_outputs(teacher: onnx.ModelProto, data: Dataset) -> np.ndarray:
    """The teacher's first output for every sample, from ONNX Runtime."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(teacher.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fixed = sess.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) and fixed > 0 else 256
    outs = []
    for start in range(0, len(data), batch):
        feeds = {k: v[start:start + batch] for k, v in data.inputs.items()}
        if len(next(iter(feeds.values()))) < batch and batch == fixed:  # pad a last partial fixed-size batch
            n = len(next(iter(feeds.values())))
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], batch - n, 0)]) for k, v in feeds.items()}
            outs.append(sess.run(None, feeds)[0][:n])
        else:
            outs.append(sess.run(None, feeds)[0])
    return np.concatenate(outs).astype(np.float32)


@contextlib.contextmanager
def _torch_settings(torch, threads: int, seed: int):
    """Seeded, deterministic, ``threads`` CPU threads; the caller's torch settings come back after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
