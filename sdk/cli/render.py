"""Human-readable tables for the CLI (rich). Scripts use ``--json`` instead."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeopt.profiles import format_size


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _ratio(a: float | None, b: float | None, fmt: str = "{:.2f}x") -> str:
    if not a or b is None:
        return "-"
    return fmt.format(b / a)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def print_convert_report(report: dict[str, Any]) -> None:
    con = _console()
    src, art, acc, lat, par, fit = (report[k] for k in ("source", "artifact", "accuracy", "latency", "parity", "fit"))
    recipe = next((r for r in report["recipe"] if r["pass"].startswith("compile:")), {"params": {}})
    title = (f"{src['path']} → {art['path']}  [{art['format']}, quantize {recipe['params'].get('quantize', 'none')}"
             f"{', profile ' + fit['profile'] if fit['profile'] else ''}]")
    table = Table(title=escape(title), title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("original", justify="right")
    table.add_column("converted", justify="right")
    table.add_column("change", justify="right")
    table.add_row("size", format_size(src["size_bytes"]), format_size(art["size_bytes"]),
                  _ratio(src["size_bytes"], art["size_bytes"]))
    table.add_row("parameters", f"{src['params']:,}", f"{art['params']:,}", "")
    if acc["metric"]:
        unit = " %" if acc["metric"] == "top1_percent" else ""
        drop = f"{-acc['drop']:+.2f} pts" if acc["metric"] == "top1_percent" else f"{acc['drop']:+.4f}"
        table.add_row(f"accuracy ({acc['metric']})", f"{acc['original']:.2f}{unit}", f"{acc['converted']:.2f}{unit}", drop)
    else:
        table.add_row("accuracy", "-", "-", "not measured" if par["max_abs_err"] is None else "no labels")
    speed = lat.get("speedup_vs_source")
    change = "-" if not speed else (f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower")
    table.add_row(f"latency p50, batch {lat['batch'] or '-'}", _ms(lat.get("source_p50_ms")), _ms(lat["p50_ms"]),
                  change)
    con.print(table)
    _print_compression_steps(con, report)
    if lat["p50_ms"] is None:  # the converted model could not run here
        con.print(f"latency and parity: not measured ({lat['runtime']} cannot run on this host; see the notes)")
    else:
        con.print(f"latency: {lat['runtime']}, {lat['threads'] or 'auto'} thread(s), p95 {_ms(lat['p95_ms'])}, "
                  f"p99 {_ms(lat['p99_ms'])}, {lat['throughput_per_s']:,.0f} samples/s (measured on this host)")
    if lat["p50_ms"] is not None and par["max_abs_err"] is None:
        con.print("parity: not measured (no validation sample gave finite outputs from both models)")
    elif par["max_abs_err"] is not None:
        top1 = f", top-1 agreement {par['top1_agreement']:.2%}" if par["top1_agreement"] is not None else ""
        con.print(escape(f"parity: max abs err {par['max_abs_err']:.3g}, mean abs err {par['mean_abs_err']:.3g}, "
                  f"cosine {par['cosine']:.6f}{top1}  ({report['validation']['samples']} samples: "
                  f"{report['validation']['source']})"))
    if mixed := report.get("mixed_precision"):
        con.print(escape(_mixed_line(mixed)))
    if micro := report.get("pass_details", {}).get("tflite-micro"):
        con.print(escape(_micro_line(micro)))
    if fit["profile"]:
        verdict = "fits" if fit["ok"] else "DOES NOT FIT"
        if fit.get("arena_bytes") is not None:  # a microcontroller: flash and the measured arena
            con.print(f"fit on {fit['profile']}: flash {format_size(fit['flash_bytes'])} (model "
                      f"{format_size(fit['model_bytes'])} + TFLite Micro code, est. "
                      f"{format_size(fit['code_bytes_estimate'])}) of {format_size(fit['storage_budget_bytes'])}, "
                      f"tensor arena {format_size(fit['arena_bytes'])} of {format_size(fit['ram_budget_bytes'])} RAM "
                      f"budget: {verdict}")
        else:
            con.print(f"fit on {fit['profile']}: model {format_size(fit['model_bytes'])} of "
                      f"{format_size(fit['storage_budget_bytes'])} storage budget, est. peak memory "
                      f"{format_size(fit['peak_memory_bytes'])} of {format_size(fit['ram_budget_bytes'])} RAM budget: "
                      f"{verdict}")
    for note in report.get("notes", []):
        con.print(f"note: {note}")
    status = {"ok": "[green]ok[/green]",
              "warning": "[yellow]warning[/yellow]: " + escape("; ".join(report.get("warnings", [])))}.get(
        report["status"], "[red]FAILED[/red]: " + escape("; ".join(report["failures"])))
    con.print(f"status: {status}  ({report['duration_s']:.1f} s)")
    if report.get("hint"):
        con.print(f"hint: {escape(report['hint'])}")
    if analysis := report.get("analysis"):
        top = ", ".join(f"{r['node']} ({r['sensitivity']:.1e})" for r in analysis["layers"][:3]
                        if r.get("sensitivity") is not None)
        searched = analysis["source"].startswith("the mixed-precision search")
        con.print(escape(f"most sensitive to INT8 ({analysis['source']}): {top}; try --keep-float "
                         f"{analysis['keep_float']}" + ("" if searched else ", or let --min-cosine / "
                                                        "--max-accuracy-drop choose the layers")))


def _micro_line(micro: dict[str, Any]) -> str:
    p = micro["parity_vs_litert"]
    agree = ("identical to LiteRT's" if p["identical"] else
             f"within {p['max_abs_quanta']} quantum of LiteRT's ({p['values_differing']:,} of {p['values']:,} values "
             f"differ)")
    return (f"TFLite Micro: {len(micro['kernels'])} kernel(s), arena {micro['arena_measured_bytes']:,} B measured "
            f"({micro['arena_bytes']:,} B declared), outputs on {p['samples']} samples {agree}; C++ in micro/")


def _mixed_line(mixed: dict[str, Any]) -> str:
    nodes = [k["node"] for k in mixed["kept"]]
    shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
    precision = mixed["kept"][0]["precision"] if mixed["kept"] else "float32"
    kept = "kept float" if precision.startswith("float") else f"kept at {precision}"
    line = f"mixed precision: {len(nodes)} node(s) {kept} ({shown})"
    budget = mixed.get("budget") or {}
    if budget:
        asked = [f"cosine >= {budget['min_cosine']}"] if "min_cosine" in budget else []
        asked += [f"accuracy drop <= {budget['max_accuracy_drop']}"] if "max_accuracy_drop" in budget else []
        line += f" for {' and '.join(asked)}"
    changes = []
    if mixed.get("accuracy_drop_all_int8") is not None and mixed.get("accuracy_drop") is not None:
        changes.append(f"accuracy drop {mixed['accuracy_drop_all_int8']:.2f} -> {mixed['accuracy_drop']:.2f} pts")
    if mixed.get("cosine_all_int8") is not None and mixed.get("cosine") is not None:
        changes.append(f"cosine {mixed['cosine_all_int8']:.4f} -> {mixed['cosine']:.4f}")
    if changes:
        line += f": {', '.join(changes)} (all-INT8 -> mixed)"
    if "size_increase" in mixed:
        line += f", {mixed['size_increase']:.2f}x the all-INT8 size"
    if (latency := mixed.get("latency")) and latency.get("slowdown_vs_all_int8"):
        line += f", {latency['slowdown_vs_all_int8']:.2f}x its latency"
    return line


def _print_compression_steps(con: Console, report: dict[str, Any]) -> None:
    """One row per model-changing step (canonical model, each compression pass, compiled artifact)."""
    rows = [r for r in report["steps"] if "macs" in r]
    if len(rows) < 3:  # only canonicalize + compile: nothing was compressed
        return
    table = Table(title="compression steps", title_justify="left")
    for col in ("step", "size", "params", "MACs", "accuracy", "agreement", "p50, batch 1"):
        table.add_column(col, justify="left" if col == "step" else "right", no_wrap=col == "step")
    for r in rows:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        agree = "-" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.2%}"
        table.add_row(r["step"], format_size(r["size_bytes"]), f"{r['params']:,}",
                      "-" if r["macs"] is None else f"{r['macs']:,}", acc, agree, _ms(r.get("latency_p50_ms")))
    con.print(table)


def print_bench(result: dict[str, Any]) -> None:
    con = _console()
    table = Table(title=f"{result['model']}  [{result['runtime']}, {result['threads'] or 'auto'} threads]",
                  title_justify="left")
    for col in ("batch", "p50", "p95", "p99", "throughput"):
        table.add_column(col, justify="right")
    for row in result["results"]:
        if row.get("skipped"):
            table.add_row(str(row["batch"]), "-", "-", "-", row["skipped"])
        else:
            table.add_row(str(row["batch"]), _ms(row["p50_ms"]), _ms(row["p95_ms"]), _ms(row["p99_ms"]),
                          f"{row['throughput_per_s']:,.0f}/s")
    con.print(table)


def print_agent_status(status: dict[str, Any]) -> None:
    """``edgeopt agent status``: the agent's state and counters, then where each thread's time goes."""
    con = _console()
    t = status["telemetry"]
    model = t.get("model") or {}
    lat = t.get("latency_ms") or {}
    dropped = {k: v for k, v in (t.get("dropped") or {}).items() if v}
    con.print(f"[bold]{escape(str(t.get('device')))}[/bold]: {escape(str(t['status']))}"
              + (f" [red]{escape(str(t['error']))}[/red]" if t.get("error") else "")
              + (f" — model {escape(str(model.get('name')))} {escape(str(model.get('version')))}" if model else "")
              + f", up {t.get('uptime_s', 0):.0f} s")
    con.print(f"windows in {t.get('windows_in', 0):,}, out {t.get('windows_out', 0):,} "
              f"({t.get('windows_per_s', 0):,.1f}/s), batches {t.get('batches', 0):,}, queue {t.get('queue_depth', 0)}; "
              f"inference p50 {_ms(lat.get('p50_ms'))}, p95 {_ms(lat.get('p95_ms'))}; "
              f"RSS {format_size(t.get('rss_bytes'))} (peak {format_size(t.get('peak_rss_bytes'))})"
              + (f"; dropped {', '.join(f'{k} {v:,}' for k, v in dropped.items())}" if dropped else ""))
    profile = t.get("profile") or {}
    if not profile:
        con.print("no profile yet (no model running)")
        return
    table = Table(title="where the time goes (µs per window, waits included)", title_justify="left")
    for col, justify in (("thread", "left"), ("stage", "left"), ("µs/window", "right"), ("share", "right"),
                         ("windows", "right")):
        table.add_column(col, justify=justify)
    for thread, p in profile.items():
        stages = p["us_per_window"]
        total = sum(v for v in stages.values() if v is not None)
        for i, (stage, us) in enumerate(sorted(stages.items(), key=lambda kv: -(kv[1] or 0))):
            table.add_row(escape(thread) if i == 0 else "", escape(stage), "-" if us is None else f"{us:,.2f}",
                          f"{us / total:.0%}" if us is not None and total else "-",
                          f"{p['windows']:,}" if i == 0 else "")
        table.add_row("", "[bold]total[/bold]", f"[bold]{total:,.2f}[/bold]" if stages and p["windows"] else "-", "",
                      "", end_section=True)
    con.print(table)


def print_inspect(info: dict[str, Any]) -> None:
    con = _console()
    facts = [format_size(info["size_bytes"])]
    if info.get("params") is not None:
        facts.append(f"{info['params']:,} parameters")
    if info.get("macs") is not None:
        facts.append(f"{info['macs']:,} MACs at batch 1")
    if info.get("nodes") is not None:
        facts.append(f"{info['nodes']} nodes")
    if info.get("opset") is not None:
        upgraded = info.get("source_opset")
        facts.append(f"opset {info['opset']}" + (f" (from {upgraded})" if upgraded and upgraded != info["opset"] else ""))
    if "producer" in info:
        facts.append(f"producer {info['producer'] or '-'}")
    con.print(f"[bold]{escape(info['path'])}[/bold]  {escape(', '.join(facts))}")
    if art := info.get("artifact"):
        con.print(escape(f"artifact {art['name']} {art['version']}: {art['format']}, quantize {art['quantize']}, "
                         f"status {art['status'] or '-'}, profile {art['target_profile'] or '-'}"))
    io = Table(title="inputs / outputs", title_justify="left")
    for col in ("", "name", "shape", "dtype", "batch axis"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            axis = t.get("batch_axis", 0)
            io.add_row(kind[:-1], escape(str(t["name"])), escape(str(t["shape"])), escape(str(t["dtype"])),
                       "none" if axis is None else str(axis))
    con.print(io)
    if info.get("state"):
        con.print(escape("recurrent state: " + ", ".join(f"{p['input']} ← {p['output']}" for p in info["state"])))
    if info.get("ops"):
        ops = Table(title="operators", title_justify="left")
        ops.add_column("op", no_wrap=True)
        ops.add_column("count", justify="right")
        for op, n in info["ops"].items():
            ops.add_row(escape(op), str(n))
        con.print(ops)
    if info.get("layers"):
        lt = Table(title="layers with weights (names for --prune-layer)", title_justify="left")
        for col, just in (("node", "left"), ("op", "left"), ("params", "right"), ("MACs", "right")):
            lt.add_column(col, justify=just, no_wrap=col == "node")
        for row in info["layers"]:
            lt.add_row(escape(row["name"]), row["op"], f"{row['params']:,}", "-" if row["macs"] is None else f"{row['macs']:,}")
        con.print(lt)
    if info.get("targets"):
        tg = Table(title="targets", title_justify="left")
        tg.add_column("target", no_wrap=True)
        tg.add_column("supports every op")
        for name, t in info["targets"].items():
            if t["supported"]:
                cell = "[green]yes[/green]"
            else:
                cell = "[red]no[/red]: " + escape(t.get("error") or "; ".join(
                    f"{op} ({', '.join(nodes[:3])}{'…' if len(nodes) > 3 else ''})"
                    for op, nodes in t["unsupported"].items()))
            if t.get("board"):
                cell += f" [yellow]({escape(t['board'])})[/yellow]"
            tg.add_row(name, cell)
        con.print(tg)
    for note in info.get("notes") or []:
        con.print(f"note: {escape(note)}")


def print_profiles(profiles: list[dict[str, Any]]) -> None:
    table = Table(title="hardware profiles", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("cpu", "RAM", "model RAM budget", "formats", "default recipe"):
        table.add_column(col)
    for p in profiles:
        table.add_row(p["name"], f"{p['cores']}x {p['cpu']} ({p['arch']})", format_size(p["ram_bytes"]),
                      format_size(p["model_ram_budget_bytes"]), ", ".join(p["formats"]),
                      f"{p['default_recipe']['target']} {p['default_recipe']['quantize']}")
    _console().print(table)


def print_profile(p: dict[str, Any]) -> None:
    con = _console()
    con.print(f"[bold]{p['name']}[/bold]: {p['description']}")
    rows = [
        ("cpu", f"{p['cores']}x {p['cpu']} ({p['arch']}; {', '.join(p['cpu_features']) or '-'})"),
        ("RAM / storage", f"{format_size(p['ram_bytes'])} / {format_size(p['storage_bytes'])}"),
        ("model budgets", f"RAM {format_size(p['model_ram_budget_bytes'])}, "
                          f"storage {format_size(p['model_storage_budget_bytes'])}"),
        ("accelerators", ", ".join(p["accelerators"]) or "-"),
        ("formats", ", ".join(p["formats"])),
        ("default recipe", f"--target {p['default_recipe']['target']} --quantize {p['default_recipe']['quantize']}"),
        ("quantize by target", ", ".join(f"{t}: {q}" for t, q in p["default_recipe"]["quantize_by_target"].items())),
        ("latency budget", f"{p['latency_budget_ms']} ms" if p["latency_budget_ms"] else "-"),
        ("TVM target", str(p["tvm_target"]) if p["tvm_target"] else "-"),
        ("Core ML target", p["coreml_deployment_target"] or "-"),
    ]
    if p.get("runtime") == "tflite-micro":  # docs/tflite-micro.md
        rows[2] = ("model budgets", f"tensor arena {format_size(p['model_ram_budget_bytes'])}, flash "
                                    f"{format_size(p['model_storage_budget_bytes'])} (model + TFLite Micro's "
                                    f"code, est. {format_size(p['code_bytes'])})")
        rows.append(("runtime", "TFLite Micro: full-integer int8, C++ sources, arena measured"))
    for k, v in rows:
        con.print(f"  {k:<21} {v}")
