"""Named networks: their factories, hyperparameters, symbols and defaults."""

from __future__ import annotations

import importlib
import inspect
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from convtally.models.colourization import ConvTransposeNet, PoolUpsampleNet, UNet
from torch import nn


@dataclass(frozen=True)
class Hyperparameter:
    """A constructor argument of a registered network, with its formula symbol and default."""

    name: str
    symbol: str
    default: int
    probe_step: int = 1  # how far a probe moves it (kernel moves by 2 to keep 'same' padding)


_SIZES: dict[tuple, int | None] = {}  # (spec name, settings) -> bytes of its parameters

# in-place fills that leave a tensor's shape as it is: on the meta device they do nothing, yet
# cost as much as the build itself (torch runs their Python reference implementations)
_META_FILLS = frozenset({
    "normal_", "uniform_", "zero_", "fill_", "random_", "exponential_", "bernoulli_", "cauchy_",
    "log_normal_", "geometric_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_",
    "clamp_min_", "clamp_max_",
})


def _skip_initialisation():
    """Return a torch function mode that skips torch.nn.init's in-place fills on any tensor and
    the scalar in-place fills of meta tensors: a build whose weights are thrown away (only
    their shapes are kept)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipInitialisation(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            # nn.init's functions pass their tensor by keyword (tensor=...) to this mode
            first = args[0] if args else kwargs.get("tensor")
            if isinstance(first, torch.Tensor) and name.endswith("_"):
                if getattr(func, "__module__", None) == "torch.nn.init":
                    return first
                scalars = not any(isinstance(a, torch.Tensor) for a in (*args[1:],
                                                                         *kwargs.values()))
                if first.is_meta and name in _META_FILLS and scalars:
                    return first
            return func(*args, **kwargs)

    return SkipInitialisation()


@dataclass(frozen=True)
class ModelSpec:
    """A network that can be built by name, with the hyperparameters its formulas use."""

    name: str
    factory: Callable[..., nn.Module]
    hyperparameters: tuple[Hyperparameter, ...] = ()
    input_channels: str | int | None = 3  # a hyperparameter symbol, a count, or None: read
    # from the network (its first convolution's in_channels; a user's module may take 1)
    description: str = ""
    defaults_override: Mapping[str, int] = field(default_factory=dict)
    # the factory takes the builder's keyword arguments (torchvision builders, timm's
    # create_model): --set names that are not hyperparameters go to it (with_builder_keywords)
    builder_keywords: bool = False

    def settings(self, overrides: Mapping[str, int] | None = None) -> dict[str, int]:
        """Return symbol -> value: the defaults with `overrides` (by symbol or name) applied."""
        values = {hp.symbol: hp.default for hp in self.hyperparameters}
        by_name = {hp.name: hp.symbol for hp in self.hyperparameters}
        for key, value in (overrides or {}).items():
            symbol = by_name.get(key, key)
            if symbol not in values:
                known = ", ".join(f"{hp.symbol} ({hp.name})" for hp in self.hyperparameters)
                raise ValueError(
                    f"unknown hyperparameter {key!r} for {self.name}; "
                    f"known: {known or 'none (this model takes no --set)'}"
                )
            values[symbol] = int(value)
        return values

    def build(self, settings: Mapping[str, int] | None = None) -> nn.Module:
        """Return a fresh network built at `settings` (symbol->value; defaults where missing)."""
        from convtally.analysis.limits import meta_parameter_bytes

        values = self.settings(settings)
        kwargs = {hp.name: values[hp.symbol] for hp in self.hyperparameters}
        key = (self.name, tuple(sorted(values.items())))
        # one analysis may build the same setting more than once; size it on the first only
        if key not in _SIZES:
            _SIZES[key] = meta_parameter_bytes(lambda: self.factory(**kwargs))
        self._check_fits(values, _SIZES[key])
        return self.factory(**kwargs)

    def build_meta(self, settings: Mapping[str, int] | None = None) -> nn.Module | None:
        """Return the network built on the meta device (its structure and shapes, no weights,
        no memory, no initialisation), or None when the factory cannot build there.

        The memory check `build` makes is made here too, so a setting too large to build is
        refused the same way whether or not its weights are ever made.
        """
        import torch

        values = self.settings(settings)
        kwargs = {hp.name: values[hp.symbol] for hp in self.hyperparameters}
        try:
            with torch.device("meta"), _skip_initialisation():
                network = self.factory(**kwargs)
        except Exception:  # a factory that computes with tensors while building (regnet)
            try:  # built on the CPU without its random initialisation, then made meta
                with _skip_initialisation():
                    network = self.factory(**kwargs).to("meta")
            except Exception:
                return None
        tensors = [*network.parameters(), *network.buffers()]
        key = (self.name, tuple(sorted(values.items())))
        _SIZES.setdefault(key, sum(t.numel() * t.element_size() for t in tensors))
        self._check_fits(values, _SIZES[key])
        return network

    def _check_fits(self, values: Mapping[str, int], needed: int | None) -> None:
        from convtally.analysis.limits import check_fits

        if needed is not None:
            at = ", ".join(f"{s}={v}" for s, v in values.items())
            check_fits(
                needed,
                f"building {self.name}{f' at {at}' if at else ''} (its parameters and buffers)",
                "choose smaller hyperparameters (--set)"
                if self.hyperparameters
                else "analyse a smaller network, or on a machine with more memory",
            )

    def input_channel_count(self, settings: Mapping[str, int] | None = None) -> int:
        """Return the number of input channels at `settings`."""
        if self.input_channels is None:
            values = self.settings(settings)
            network = self.build_meta(values)
            return declared_input_channels(network if network is not None
                                           else self.build(values))
        if isinstance(self.input_channels, int):
            return self.input_channels
        return self.settings(settings)[self.input_channels]


def declared_input_channels(network: nn.Module, default: int = 3) -> int:
    """Return the input channels the network declares (timm's pretrained_cfg input_size), else
    its first convolution's (csatv2's first conv reads 64 DCT planes), else `default`."""
    config = getattr(network, "pretrained_cfg", None)
    if isinstance(config, dict) and config.get("input_size"):
        return int(config["input_size"][0])
    for module in network.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            return module.in_channels
    return default


def declared_input_rank(network: nn.Module) -> int:
    """Return the number of sizes after the channels the network's input has: 1 (C x T) or 3
    (C x D x H x W) when its first convolution is 1-d or 3-d and it has no 2-d one, else 2."""
    first = None
    for module in network.modules():  # stops at the first 2-d convolution
        if isinstance(module, nn.modules.conv._ConvNd):
            if len(module.kernel_size) == 2:
                return 2
            first = first or module
    return 2 if first is None else len(first.kernel_size)


COLOURIZATION_HYPERPARAMETERS = (
    Hyperparameter("kernel", "K", 3, probe_step=2),
    Hyperparameter("num_in_channels", "NIC", 3),
    Hyperparameter("num_filters", "NF", 32),
    Hyperparameter("num_colours", "NC", 24),
)

REGISTRY: dict[str, ModelSpec] = {
    "poolupsample": ModelSpec(
        "poolupsample",
        PoolUpsampleNet,
        COLOURIZATION_HYPERPARAMETERS,
        "NIC",
        "PoolUpsampleNet (write-up Part A): max-pooling and nearest upsampling",
    ),
    "convtranspose": ModelSpec(
        "convtranspose",
        ConvTransposeNet,
        COLOURIZATION_HYPERPARAMETERS,
        "NIC",
        "ConvTransposeNet (write-up Part B): strided and transposed convolutions",
    ),
    "unet": ModelSpec(
        "unet",
        UNet,
        COLOURIZATION_HYPERPARAMETERS,
        "NIC",
        "UNet (write-up Part C): PoolUpsampleNet with two concatenation skips",
    ),
    "deeplabv3_flowers": ModelSpec(
        "deeplabv3_flowers",
        lambda: _deeplabv3_flowers(),
        (),
        3,
        "DeepLabV3-ResNet101 fine-tuned for 2-class flower segmentation (write-up Part D): "
        "everything frozen but the new classifier.4 = Conv2d(256, 2, 1)",
    ),
}


def _deeplabv3_flowers() -> nn.Module:
    from convtally.models.segmentation import build_finetune_model

    return build_finetune_model("resnet101", weights="none", num_classes=2)


def resolve(model: str) -> ModelSpec:
    """Return the spec for a registry name, `torchvision:NAME` or `package.module:callable`."""
    if model in REGISTRY:
        return REGISTRY[model]
    if model.startswith("torchvision:"):
        return _torchvision_spec(model.split(":", 1)[1])
    if model.startswith("timm:"):
        return _timm_spec(model.split(":", 1)[1])
    if ":" in model:
        return _callable_spec(model)
    known = ", ".join(sorted(REGISTRY))
    raise ValueError(
        f"unknown model {model!r}; use a registry name ({known}), "
        "torchvision:NAME (e.g. torchvision:resnet18) or package.module:callable"
    )


def with_builder_keywords(spec: ModelSpec, settings: Mapping[str, int] | None
                          ) -> tuple[ModelSpec, Mapping[str, int] | None]:
    """Return (spec, settings) with the settings that are not hyperparameters bound into the
    factory as keyword arguments (image_size=518 for vit_h_14's published crop) and named in
    the spec's name; a spec whose factory takes no keywords is returned as it is."""
    if not spec.builder_keywords or not settings:
        return spec, settings
    known = {hp.name for hp in spec.hyperparameters} | {hp.symbol for hp in spec.hyperparameters}
    keywords = {key: int(value) for key, value in settings.items() if key not in known}
    if not keywords:
        return spec, settings
    for key in keywords:
        if not key.isidentifier():
            raise ValueError(f"--set {key}=...: a builder keyword must be a Python name, "
                             f"e.g. image_size=518")
    label = ", ".join(f"{key}={value}" for key, value in keywords.items())

    def factory(**hyperparameters: int) -> nn.Module:
        return spec.factory(**hyperparameters, **keywords)

    rest = {key: value for key, value in settings.items() if key in known}
    return replace(spec, name=f"{spec.name}({label})", factory=factory,
                   builder_keywords=False), rest


def _build_with_keywords(builder: Callable[..., nn.Module], where: str, **keywords: Any
                         ) -> nn.Module:
    """Return builder(**keywords), a keyword the builder does not take said in one line."""
    try:
        return builder(**keywords)
    except TypeError as error:
        if "keyword argument" not in str(error):
            raise
        raise ValueError(f"{where} refused a --set keyword: {error}; see its signature") from None


def _torchvision_spec(name: str) -> ModelSpec:
    import torchvision.models as tvm

    try:
        builder = tvm.get_model_builder(name)
    except ValueError:
        raise ValueError(
            f"unknown torchvision model {name!r}; see torchvision.models.list_models() "
            "(e.g. resnet18, mobilenet_v3_large, deeplabv3_resnet101)"
        ) from None

    def factory(**keywords: Any) -> nn.Module:
        # weights=None: the structure is what we count; no download is needed.
        kwargs = {"weights": None}
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs["weights_backbone"] = None
        return _build_with_keywords(builder, f"torchvision.models.{name}",
                                    **kwargs, **keywords)

    return ModelSpec(f"torchvision:{name}", factory, (), 3, f"torchvision.models.{name}",
                     builder_keywords=True)


def _timm_spec(name: str) -> ModelSpec:
    try:
        import timm
    except ImportError:
        raise ValueError(
            f"timm:{name} needs timm, the optional extra: pip install 'convtally[zoo]'"
        ) from None
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r}; see timm.list_models() (e.g. resnet18, "
            "convnext_atto, vit_tiny_patch16_224)"
        )

    def factory(**keywords: Any) -> nn.Module:
        # pretrained=False: the structure is what we count; no download is needed.
        return _build_with_keywords(timm.create_model, f"timm.create_model({name!r})",
                                    model_name=name, pretrained=False, **keywords)

    return ModelSpec(f"timm:{name}", factory, (), 3, f"timm.create_model({name!r})",
                     builder_keywords=True)


def _callable_spec(reference: str) -> ModelSpec:
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            raise ValueError(
                f"cannot import {module_name!r} for model {reference!r}: no module named "
                f"{error.name!r} (is it on PYTHONPATH, or installed?)"
            ) from None
        raise ValueError(
            f"importing {module_name!r} for model {reference!r} failed: {user_error(error)}"
        ) from None
    except Exception as error:  # the user's module: its own error, file and line, in one line
        raise ValueError(
            f"importing {module_name!r} for model {reference!r} failed: {user_error(error)}"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"{module_name!r} has no callable {attribute!r} (model {reference!r})")

    def build() -> nn.Module:
        try:
            inspect.signature(factory).bind()
        except TypeError as error:
            raise ValueError(
                f"cannot call {reference}() without arguments ({error}); point MODEL at a "
                "function that builds the network, or register it in models/registry.py"
            ) from None
        except ValueError:
            pass  # no signature to inspect (a builtin): just call it
        try:
            network = factory()
        except Exception as error:  # the user's factory: any failure is reported in one line
            raise ValueError(f"{reference}() failed: {user_error(error)}") from None
        if not isinstance(network, nn.Module):
            raise ValueError(f"{reference}() returned {type(network).__name__}, not an nn.Module")
        return network

    return ModelSpec(reference, build, (), None, f"{reference}()")


def user_error(error: BaseException) -> str:
    """Return 'Type: message (file, line N)' for an exception raised in a user's own code."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"SyntaxError: {error.msg} ({error.filename}, line {error.lineno})"
    message = str(error).splitlines()[0] if str(error) else ""
    frames = traceback.extract_tb(error.__traceback__)
    user_frames = [f for f in frames if not _is_library_file(f.filename)]
    where = f" ({user_frames[-1].filename}, line {user_frames[-1].lineno})" if user_frames else ""
    return f"{type(error).__name__}: {message}{where}"


def _is_library_file(filename: str) -> bool:
    """Return True for files of Python, installed packages or convtally itself."""
    root = Path(__file__).resolve().parent.parent
    own = tuple(str(root / package) + "/" for package in ("analysis", "models"))
    return filename.startswith(("<frozen", *own)) or "site-packages" in filename
