"""wanjax.quant: W4A4 quantization of the Wan2.2 experts - calibrate, quantize, save / load / attach, QLinear.

The workflow, from one import::

    from wanjax.quant import CalibConfig, CalibrationSource, attach_to_pipeline, calibrate, quantize
    stats = calibrate(pipe, samples, CalibConfig(gen=pipe.generation_defaults), work_dir="calib/")
    experts, reports = quantize(pipe, "default", CalibrationSource(stats))   # {"high": ..., "low": ...}
    attach_to_pipeline(pipe, experts["high"], experts["low"], stats.bins)   # pipe now denoises in W4A4

``pipe`` is a `wanjax.pipeline.WanI2VPipeline`, ``samples`` a list of `CalibSample` (image, prompt, seed).
`save_artifact` writes the quantized experts to a directory (as ``wanjax quantize`` does; pass
``recipe=recipe_to_dict(get_recipe("default"))``, ``bins=stats.bins.to_dict()`` and ``source=pipe``), and
`attach_artifact` loads one into a pipeline (as ``wanjax generate --quant``); `load_artifact` returns the experts.
Recipes (`RECIPES`, `get_recipe`, `Recipe` with `WeightQuantSpec` / `ActQuantSpec`) say which formats and
transforms are used; `QLinear` / `QLinearConfig` are the quantized layer. ``docs/QUANTIZATION.md`` has the details.

The names are imported on first use (module ``__getattr__``), so ``import wanjax.quant`` loads no JAX code. The
submodules stay importable as before (``wanjax.quant.recipes``, ``wanjax.quant.artifact``, ...). ``calibrate`` and
``quantize`` are also the names of their submodules: ``wanjax.quant.calibrate`` is that module, and calling it
calls its function (``wanjax.quant.calibrate(pipe, ...)`` is ``wanjax.quant.calibrate.calibrate(pipe, ...)``), so
both ``from wanjax.quant import calibrate`` and ``import wanjax.quant.calibrate as qc`` work.
"""

import sys
import types

from wanjax._lazy import lazy_getattr

#: public name -> (submodule, attribute)
_LAZY = {
    "calibrate": ("calibrate", "calibrate"),
    "CalibConfig": ("calibrate", "CalibConfig"),
    "CalibSample": ("calibrate", "CalibSample"),
    "CalibStats": ("calibrate", "CalibStats"),
    "quantize": ("quantize", "quantize"),
    "CalibrationSource": ("quantize", "CalibrationSource"),
    "get_recipe": ("recipes", "get_recipe"),
    "RECIPES": ("recipes", "RECIPES"),
    "Recipe": ("recipes", "Recipe"),
    "recipe_to_dict": ("recipes", "recipe_to_dict"),
    "ActQuantSpec": ("rtn", "ActQuantSpec"),
    "WeightQuantSpec": ("rtn", "WeightQuantSpec"),
    "save_artifact": ("artifact", "save_artifact"),
    "load_artifact": ("artifact", "load_artifact"),
    "attach_artifact": ("artifact", "attach_artifact"),
    "QLinear": ("qlinear", "QLinear"),
    "QLinearConfig": ("qlinear", "QLinearConfig"),
    "attach_to_pipeline": ("apply", "attach_to_pipeline"),
}

#: workflow functions that share their name with the submodule defining them
_CALLABLE_SUBMODULES = ("calibrate", "quantize")

__all__ = list(_LAZY)


class _WorkflowModule(types.ModuleType):
    """A submodule that, called, calls its function of the same name (looked up at call time)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """``wanjax.quant`` itself: when the import system binds the submodule ``calibrate`` / ``quantize`` to it, that
    submodule becomes callable (`_WorkflowModule`), however it was first imported."""

    def __setattr__(self, name, value):
        if name in _CALLABLE_SUBMODULES and type(value) is types.ModuleType:
            value.__class__ = _WorkflowModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__getattr__ = lazy_getattr(__name__, _LAZY, prefix=f"{__name__}.", whole_modules=_CALLABLE_SUBMODULES)


def __dir__():
    return sorted(set(globals()) | set(__all__))
