"""bench.two_level on CPU: it exits cleanly without a GPU, and every path it times runs on the XLA backend with the
operands it builds (the same call signatures the GPU run uses)."""

import jax.numpy as jnp
import numpy as np

from bench import two_level as B


def test_no_gpu_exit_and_paths_run_on_xla():
    from wanjax.kernels import dispatch as d
    from wanjax.kernels.reference import unpack_int4
    from wanjax.numerics import formats
    from wanjax.numerics.two_level import quantize_int4_two_level

    assert B.main([]) == 0  # no GPU here: prints and returns
    x, w, down, up, bias, sm = B.operands(64, 256, 128)
    tl = quantize_int4_two_level(w, B.G, levels=B.LEVELS)
    cw, uw = tl.carried(), tl.unit[:, 0]
    pc = formats.quantize_int4(w).pack()
    g = formats.quantize_int4(w, group_size=B.G).pack()
    kw = dict(smooth=sm, down=down, up=up, bias=bias, clip=B.CLIP, backend="xla")
    outs = [
        d.w4a4_linear(x, cw, uw, a_qmax=127, **kw),
        d.w4a4_linear(x, unpack_int4(pc.codes), pc.scales[:, 0], a_qmax=127, **kw),
        d.w4a4_linear(x, g.codes, g.scales, a_qmax=127, group_size=B.G, **kw),
    ]
    q, sx, xl = d.act_quant_two_level(x, sm, down, B.CLIP, group_size=B.G, levels=B.LEVELS)
    outs.append(d.w4a4_matmul(q, sx, cw, uw, xl, up, bias, a_qmax=127, backend="xla"))
    for o in outs:
        assert o.shape == (64, 128) and np.isfinite(np.asarray(o, np.float32)).all()
    # two-level weights are closer to the float32 group-scaled ones than per-channel weights are
    f32 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    assert np.linalg.norm(f32(outs[0]) - f32(outs[2])) < np.linalg.norm(f32(outs[1]) - f32(outs[2]))
    assert jnp.max(jnp.abs(q.astype(jnp.int32))) > 7  # carried activation codes use the int8 range
