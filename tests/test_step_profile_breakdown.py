"""bench.step_profile's kernel classes and breakdown (CPU: pure functions over kernel names and times)."""

from bench.step_profile import breakdown, kernel_class


def test_kernel_classes():
    assert kernel_class("cudnn_flash_fprop_sm90") == "attention"
    assert kernel_class("_attn8_kernel_mosaic") == "attention"  # attn8's Mosaic kernel: "attn" before "mosaic"
    assert kernel_class("_act_quant_lowrank_kernel") == "act_quant"
    assert kernel_class("mosaic_gpu_w4a4_kernel") == "w4a4_gemm"
    assert kernel_class("nvjet_hsh_128x256") == "cublas_gemm"
    assert kernel_class("loop_multiply_fusion_3") == "fusion_other"


def test_breakdown_totals_and_non_attention():
    b = breakdown([("cudnn_flash", 10.0), ("cudnn_flash", 5.0), ("nvjet_x", 3.0), ("add_fusion", 2.0)])
    assert b["total_ms"] == 20.0
    assert b["classes_ms"] == {"attention": 15.0, "cublas_gemm": 3.0, "fusion_other": 2.0}
    assert b["non_attention_ms"] == 5.0
    assert b["top"][0] == {"name": "cudnn_flash", "count": 2, "total_ms": 15.0}
    assert breakdown([("nvjet_x", 1.5)])["non_attention_ms"] == 1.5  # no attention kernel at all
