"""Flow-matching samplers: the official Wan2.2 sigma schedule, FlowUniPC (bh2, order 2) and Euler.

Solvers are pure functions over a small state pytree, so one jitted step serves every step
(``step_index`` may be traced)::

    from wanjax.sampling import flow_schedule, unipc_init, unipc_step
    sched = flow_schedule(40, shift=5.0)          # sched.timesteps[:3] == [999, 994, 989]
    state = unipc_init(sched.sigmas, x.shape)
    for i, t in enumerate(sched.timesteps):
        x, state = unipc_step(state, i, model(x, t), x)

The guided velocity of one expert (classifier-free guidance, cond and uncond batched as 2B) is
`guided_velocity` (`wanjax.sampling.guidance`): the ``velocity_fn`` the pipeline, calibration and the quantized
experts denoise with. It is imported on first use (it needs flax), so ``import wanjax.sampling`` stays light.
"""

from wanjax.sampling.euler import EulerState, euler_init, euler_step
from wanjax.sampling.loop import SOLVERS, get_solver, sample
from wanjax.sampling.schedule import FlowSchedule, flow_schedule, num_high_noise_steps, official_sigma_max, shift_sigmas
from wanjax.sampling.unipc import UniPCState, unipc_coefficients, unipc_init, unipc_step

__all__ = [
    "FlowSchedule",
    "flow_schedule",
    "num_high_noise_steps",
    "official_sigma_max",
    "shift_sigmas",
    "UniPCState",
    "unipc_coefficients",
    "unipc_init",
    "unipc_step",
    "EulerState",
    "euler_init",
    "euler_step",
    "SOLVERS",
    "get_solver",
    "sample",
    "guided_velocity",
    "cfg_batch",
    "cfg_combine",
]

_LAZY = {"guided_velocity", "cfg_batch", "cfg_combine"}


def __getattr__(name):
    if name in _LAZY:
        from wanjax.sampling import guidance

        return getattr(guidance, name)
    raise AttributeError(f"module 'wanjax.sampling' has no attribute {name!r}")
