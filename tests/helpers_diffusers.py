"""Shared by the tests that compare with diffusers: its UniPC scheduler set up as the official Wan2.2 sampler, and
the parameter perturbation that makes a random ``AutoencoderKLWan`` non-trivial."""


def official_unipc(diffusers, shift):
    """diffusers' ``UniPCMultistepScheduler`` configured as the official Wan2.2 sampler (flow prediction, order 2,
    bh2, ``flow_shift=shift``); its sigmas are still to be set."""
    return diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )


def perturb_vae_norms(model):
    """Make the norm scales (``gamma``: 1 + 0.3 N(0,1)) and biases (0.1 N(0,1)) of a torch VAE non-trivial, in place
    (drawn from torch's global generator, in parameter order); returns ``model``."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model
