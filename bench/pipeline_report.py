"""The summary and the markdown tables of a `bench.pipeline` run."""

from __future__ import annotations

from bench.pipeline_phase import PIPELINE_PHASES, pipeline_summary, pipeline_tables


def summarize(results: dict) -> dict:
    """Speed-ups per resolution from the phases' medians: ours vs our BF16 and vs diffusers BF16 eager."""
    ph = results["phases"]
    out = {}
    for res in results["res"]:

        def med(phase, *keys):
            r = ph.get(phase, {}).get("res", {}).get(res, {})
            for k in keys:
                r = r.get(k, {}) if isinstance(r, dict) else {}
            return r.get("median_s") if isinstance(r, dict) else None

        b, q, d = med("bf16"), med("w4a4"), med("diffusers", "eager")
        s = {"bf16_median_s": b, "w4a4_median_s": q, "diffusers_eager_median_s": d}
        s["w4a4_speedup_vs_bf16"] = b / q if b and q else None
        s["w4a4_speedup_vs_diffusers"] = d / q if d and q else None
        s["bf16_speedup_vs_diffusers"] = d / b if d and b else None
        if res == "480p":
            s["targets"] = {
                "w4a4_vs_bf16_ge_1.4": None if s["w4a4_speedup_vs_bf16"] is None else s["w4a4_speedup_vs_bf16"] >= 1.4,
                "w4a4_vs_diffusers_ge_1.5": None
                if s["w4a4_speedup_vs_diffusers"] is None
                else s["w4a4_speedup_vs_diffusers"] >= 1.5,
            }
        out[res] = s
    p = pipeline_summary(ph.get("pipeline", {}))  # the W4A4 pipeline (the keys of earlier result files)
    out["pipeline_peak_bytes"] = p["peak_bytes"]
    out["pipeline_meets_24GB"] = p["meets_24GB"]
    out["pipeline_cfg_step_warm_s"] = p["step_warm_s"]
    out["pipelines"] = {
        v: pipeline_summary(ph[name]) for v, name in PIPELINE_PHASES.items() if ph.get(name) and "stages" in ph[name]
    }
    return out


def _fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def table(results: dict) -> str:
    """The markdown table: variant | compile s | median s | x vs our BF16 | x vs diffusers BF16 | peak GB."""
    ph = results["phases"]
    lines = [
        "| variant | compile s | median s | × vs our BF16 | × vs diffusers BF16 | peak GB |",
        "|---|---|---|---|---|---|",
    ]
    for res in results["res"]:
        s = results["summary"][res]
        b, d = s["bf16_median_s"], s["diffusers_eager_median_s"]
        bf = ph.get("bf16", {}).get("res", {}).get(res, {})
        rows = [
            (f"ours BF16 ({bf.get('attention', '?')} attention)", bf, "peak_bytes_in_use"),
            ("ours W4A4 real kernels", ph.get("w4a4", {}).get("res", {}).get(res, {}), "peak_bytes_in_use"),
        ]
        for name, r in ph.get("diffusers", {}).get("res", {}).get(res, {}).items():
            rows.append((f"diffusers BF16 SDPA {name}", r, "peak_bytes"))
        for name, r, pk in rows:
            if r.get("error") or r.get("median_s") is None:
                why = (r.get("error") or "not run").splitlines()[0][:70]
                lines.append(f"| {res} {name} | - | failed/skipped: {why} | - | - | - |")
                continue
            m = r["median_s"]
            comp = r.get("compile_s", r.get("first_call_s"))
            lines.append(
                f"| {res} {name} | {_fmt(comp, '.1f')} | {m:.3f} | {_fmt(b / m if b else None, '.2f')} | "
                f"{_fmt(d / m if d else None, '.2f')} | {_fmt((r.get(pk) or 0) / 1e9 or None, '.1f')} |"
            )
    lines += pipeline_tables(results)
    return "\n".join(lines)
