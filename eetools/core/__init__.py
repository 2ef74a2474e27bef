"""The mechanism: exit heads on a TransformerLens bridge, frozen residuals, decoding with exits.

Imports nothing from the rest of eetools. `model` holds `EarlyExitModel` (its
`run_with_exits` is the one forward with exits), `state` the hooks that freeze exited
residuals, `heads` the exit heads and stick-breaking, `generation` batched decoding,
`rollout` what decoding returns, `rule` the exit settings (`ExitRule`), `options` the checks of
every run's settings, `seeding` seeded initialisation, `encoding` token batches, `adapters` LoRA
on the bridge, and `fast/` the optional paths that make exits save time (skipping, bypass, norm shortcut).
"""

from eetools.core.encoding import encode_prompts, encode_sequences
from eetools.core.generation import generate
from eetools.core.heads import exit_log_probs, stick_breaking
from eetools.core.model import EarlyExitModel, PrescribedOutput, TeacherOutput, attach_exit_heads
from eetools.core.rollout import Rollout
from eetools.core.rule import ExitRule

__all__ = [
    "EarlyExitModel",
    "ExitRule",
    "PrescribedOutput",
    "Rollout",
    "TeacherOutput",
    "attach_exit_heads",
    "encode_prompts",
    "encode_sequences",
    "exit_log_probs",
    "generate",
    "stick_breaking",
]
