"""One lookup over the model registries, so every script takes `--model DiC-XL`, `--model DiCo-XL` or `--model DiT-XL/2`.

SiT's and REPA's names `SiT-{S,B,L,XL}/{2,4,8}` are aliases of DiT's: the same network (SiT and REPA
train DiT's architecture), so one registered name per architecture. What an alias cannot say is the
training convention (DDPM, SiT's flow, REPA's rectified flow): the checkpoint decides that
(helpers/utils/releases.py), the SiT name only where the file does not.
"""
import ast

from dic_models import DiC_models
from dico_models import DiCo_models
from dit_models import DiT_models

# Prefix of command-line model overrides, as the official DiC training script spells them
# (e.g. `--network_g__skip_stride=1`).
OVERRIDE_PREFIX = "--network_g__"


# SiT-XL/2 -> DiT-XL/2, ...: SiT's and REPA's spelling of DiT's variants.
MODEL_ALIASES = {"SiT" + name[len("DiT"):]: name for name in DiT_models}


def canonical_name(name):
    """The registered name of `name` (SiT-XL/2 -> DiT-XL/2); other names unchanged."""
    return MODEL_ALIASES.get(name, name)


def is_sit_name(name):
    """True for SiT's/REPA's spelling of a DiT variant (SiT-XL/2)."""
    return name in MODEL_ALIASES


def all_models():
    """Name -> constructor for every registered DiC, DiT and DiCo variant."""
    return {**DiC_models, **DiT_models, **DiCo_models}


def model_names():
    """Every registered name, DiC first, then DiT, then DiCo (each architecture once: no aliases)."""
    return list(all_models())


def is_model_name(name):
    """True for a valid `--model` value: a registered name or a SiT alias of one."""
    return canonical_name(name) in all_models()


def unknown_model_message(name):
    """The one line for a `--model` that names nothing."""
    return (f"unknown model {name!r}: choose one of {', '.join(model_names())} (SiT-S/B/L/XL with /2, /4, /8 "
            f"name the DiT variant of the same size)")


def is_dit(name):
    """True for a DiT variant (they use patch embeddings, so sizes must divide the patch)."""
    return canonical_name(name) in DiT_models


def module_of(name):
    """The file that defines a registered variant's constructor."""
    return "dit_models.py" if is_dit(name) else "dico_models.py" if name in DiCo_models else "dic_models.py"


def create_model(name, **kwargs):
    """Build a registered model by name; unknown names raise one clear error listing the valid ones."""
    registry = all_models()
    if not is_model_name(name):
        raise ValueError(unknown_model_message(name))
    try:
        return registry[canonical_name(name)](**kwargs)
    except TypeError as e:  # an override the constructor does not take, e.g. a typo
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"{name} does not take {str(e).split('argument')[-1].strip()}: check the "
                         f"spelling of the model override (see the constructor in "
                         f"{module_of(name)})") from e


def _parse_value(text):
    """Read an override's value as a Python literal (1, 0.5, (2, 2), True), else keep the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args_with_overrides(parser, argv=None):
    """`parser.parse_known_args` plus the official `--network_g__key=value` model overrides.

    Returns (args, overrides); any other leftover argument is reported by `parser.error` (exit 2).
    """
    args, extra = parser.parse_known_args(argv)
    try:
        return args, parse_model_overrides(extra)
    except ValueError as e:
        parser.error(str(e))


def parse_model_overrides(extra_args):
    """Turn leftover `--network_g__key=value` arguments into constructor keywords.

    Anything else left over is a typo the user must hear about, so it is an error.
    """
    overrides = {}
    args = list(extra_args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith(OVERRIDE_PREFIX):
            raise ValueError(f"unrecognised argument {arg!r}: model overrides are spelled "
                             f"{OVERRIDE_PREFIX}<keyword>=<value>, e.g. {OVERRIDE_PREFIX}skip_stride=1")
        key, sep, value = arg[len(OVERRIDE_PREFIX):].partition("=")
        if not sep:  # "--network_g__key value"
            if i + 1 >= len(args):
                raise ValueError(f"model override {arg!r} has no value: write {arg}=<value>")
            value = args[i + 1]
            i += 1
        overrides[key.replace("-", "_")] = _parse_value(value)
        i += 1
    return overrides
