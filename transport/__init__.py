"""Flow matching / stochastic interpolants for DiC: same public API and numbers as SiT's
`transport` package (t = 0 noise, t = 1 data).

    from transport import create_transport, Sampler
    transport = create_transport("Linear", "velocity")      # SiT's default
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    sampler = Sampler(transport)
    x = sampler.sample_ode(num_steps=50)(z, model, y=y)[-1]
    x = sampler.sample_sde(diffusion_form="sigma")(z, model, y=y)[-1]
"""

from .transport import ModelType, PathType, Sampler, Transport, WeightType


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None):
    """Build a Transport from SiT's command-line style settings.

    :param path_type: "Linear", "GVP" or "VP".
    :param prediction: "velocity" (default; anything else unknown also means velocity),
        "noise" or "score".
    :param loss_weight: None, "velocity" or "likelihood" (noise/score predictions only).
    :param train_eps, sample_eps: distance kept from singular ends of [0, 1]. Defaults:
        VP 1e-5 / 1e-3; Linear/GVP with noise or score 1e-3 / 1e-3; Linear/GVP with
        velocity always 0 / 0 (given values are ignored there, as in SiT). As in SiT the
        sample_eps default applies only when train_eps is None too: passing train_eps alone
        leaves sample_eps None, which breaks sampling with that transport.
    """
    model_type = {"noise": ModelType.NOISE, "score": ModelType.SCORE}.get(prediction, ModelType.VELOCITY)
    loss_type = {"velocity": WeightType.VELOCITY, "likelihood": WeightType.LIKELIHOOD}.get(loss_weight, WeightType.NONE)
    path_type = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}[path_type]

    if path_type == PathType.VP:
        train_eps, sample_eps = (1e-5 if train_eps is None else train_eps), (1e-3 if train_eps is None else sample_eps)
    elif model_type != ModelType.VELOCITY:
        train_eps, sample_eps = (1e-3 if train_eps is None else train_eps), (1e-3 if train_eps is None else sample_eps)
    else:  # velocity on Linear/GVP is finite on all of [0, 1]
        train_eps, sample_eps = 0, 0

    return Transport(
        model_type=model_type, path_type=path_type, loss_type=loss_type, train_eps=train_eps, sample_eps=sample_eps
    )


__all__ = ["create_transport", "Transport", "Sampler", "ModelType", "PathType", "WeightType"]
