"""The model registry (GTO on git): register, promote through a gate, roll back, serve the stage.

    from components.registry import Registry
    reg = Registry.init("registry")
    v = reg.register("runs/finetune/model", "lm").version
    reg.promote("lm", v, to="staging"); reg.promote("lm", v, to="production")
    reg.rollback("lm")

See registry.py for the layout and tag formats, config.py for the gate's thresholds, and
cli.py for the `distillery promote / rollback / registry` commands.
"""

from components.registry.errors import ArtifactRefused, GateError, RegistryError, RollbackError
from components.registry.registry import Registration, Registry, StageChange

__all__ = ["Registry", "Registration", "StageChange", "RegistryError", "ArtifactRefused", "GateError", "RollbackError"]
