"""The diffusers phase of `bench.pipeline`: diffusers ``WanTransformer3DModel`` BF16 (torch SDPA), same shapes."""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys
import time

from bench.dit_step import RES, get_config
from bench.expert_phases import res_iters
from bench.layout import ROOT
from bench.phase_runner import PhaseRecord, brief, error_text, log
from bench.timing import torch_time
from wanjax.config import diffusers_model_kwargs

DIFFUSERS_SITE = "/tmp/wanjax_bench_site"


def import_diffusers(wheel_dir: str = os.path.join(ROOT, ".whl"), target: str = DIFFUSERS_SITE):
    """``(diffusers module, None)``, installing the carried wheels of ``wheel_dir`` into ``target`` (no index, no
    dependencies) when diffusers is not importable; ``(None, reason)`` when that is not possible."""
    try:
        return importlib.import_module("diffusers"), None
    except ImportError as e:
        first = f"{type(e).__name__}: {e}"
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        return None, f"diffusers is not importable ({first}) and there is no wheel in {wheel_dir}/"
    log(f"diffusers not importable ({first}); installing {[os.path.basename(w) for w in wheels]} into {target}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            target,
            *wheels,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        return None, f"pip install of {wheel_dir}/*.whl failed: {proc.stderr[-800:]}"
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    try:
        return importlib.import_module("diffusers"), None
    except ImportError as e:
        return None, f"diffusers still not importable after installing the wheels: {e}"


#: ``WanTransformer3DModel`` arguments of a wanjax config (the Wan2.2 I2V expert: no image branch)
diffusers_kwargs = diffusers_model_kwargs


def build_diffusers_model(diffusers, cfg, device):
    """Random-init ``WanTransformer3DModel`` made directly on ``device`` in bf16 (no fp32 copy anywhere); the
    parameters of ``_keep_in_fp32_modules`` are then cast to fp32, as ``from_pretrained(torch_dtype=bf16)`` does."""
    import torch

    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = diffusers.WanTransformer3DModel(**diffusers_kwargs(cfg))
    finally:
        torch.set_default_dtype(prev)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name.split(".") for m in keep):
                p.data = p.data.float()
    return model.eval().requires_grad_(False)


def phase_diffusers(args, workdir: str) -> dict:
    """diffusers ``WanTransformer3DModel`` BF16 forward (torch SDPA) at each resolution, same shapes as ours."""
    rec = PhaseRecord(workdir, "diffusers")
    diffusers, why = import_diffusers()
    if diffusers is None:
        rec["skipped"] = why
        log("diffusers: SKIPPED:", why)
        rec.save()
        return rec
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = get_config(args.config)
    rec.update(
        diffusers=diffusers.__version__,
        torch=torch.__version__,
        device=device,
        gpu=torch.cuda.get_device_name(0) if device == "cuda" else None,
        res={},
    )
    if device == "cuda":
        rec["sdpa_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    t0 = time.perf_counter()
    model = build_diffusers_model(diffusers, cfg, device)
    if device == "cuda":
        torch.cuda.synchronize()
    rec.update(
        init_s=time.perf_counter() - t0,
        params=sum(p.numel() for p in model.parameters()),
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        attention_backend=str(
            getattr(model.blocks[0].attn1.processor, "_attention_backend", None) or "default (native torch SDPA)"
        ),
    )
    log(
        f"diffusers {rec['diffusers']}: {rec['params']:,} params, {rec['weight_bytes'] / 1e9:.2f} GB, "
        f"init {rec['init_s']:.1f}s on {device}"
    )
    rec.save()
    variants = [("eager", model)]
    if args.diffusers_compile:
        variants.append(("compiled", torch.compile(model)))
    for res in args.res:
        f, h, w = RES[res][0]
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, cfg.in_dim, f, h, w, generator=g, device=device, dtype=torch.bfloat16)
        ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device, dtype=torch.bfloat16)
        t = torch.tensor([900.0], device=device)
        rec["res"][res] = {}
        for name, m in variants:
            r = rec["res"][res][name] = {"tokens": f * h * w // 4}
            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                out = {}

                def fwd(m=m):
                    with torch.inference_mode():
                        out["v"] = m(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

                r.update(torch_time(fwd, res_iters(args, res), device))
                r["finite"] = bool(torch.isfinite(out["v"]).all())
                if device == "cuda":
                    r["peak_bytes"] = int(torch.cuda.max_memory_allocated())
                out = None  # free the output (fwd closes over it)
            except Exception as e:
                r["error"] = error_text(e)
            log(f"diffusers {res} {name}:", brief(r))
            rec.save()
    return rec
