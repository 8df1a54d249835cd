"""A trained model's weights on disk: safetensors (no pickle), tagged with the architecture's
fingerprint so weights are never loaded into another architecture."""

from __future__ import annotations

import pathlib

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from qkvsearch.models import ArchConfig, build_model
from qkvsearch.models.attention import upgrade_state_dict
from qkvsearch.models.errors import QkvError

#: the safetensors metadata key that holds the architecture's fingerprint
ARCH_TAG = "arch_hash"


def save_weights(state: dict[str, torch.Tensor], path: pathlib.Path, fingerprint: str) -> None:
    """Writes ``state`` to ``path``, tagged with the architecture's fingerprint; tensors that share
    memory (tied embeddings) are written as copies, which safetensors requires.

    Raises:
        OSError: naming the file, when it cannot be written (a full disk); no partial file is left.
    """
    try:
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path), metadata={ARCH_TAG: fingerprint})
    except (SafetensorError, OSError) as error:
        pathlib.Path(path).unlink(missing_ok=True)
        raise OSError(f"cannot write weights to {path}: {error}") from None


def load_trained(arch: ArchConfig, weights: pathlib.Path) -> torch.nn.Module:
    """The model with saved weights (no pickle), after checking that the file's
    ``arch_hash`` is this architecture's.

    Raises:
        ValueError: the file is missing, or holds weights of another architecture.
    """
    if not pathlib.Path(weights).is_file():
        raise QkvError(f"no weights at {weights}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(ARCH_TAG)
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:  # a truncated or foreign file; its payload never runs
        raise QkvError(f"{weights}: not a readable safetensors file ({error}); train the trial again "
                       "(qkv export retrain=true) or restore the file") from None
    if recorded != arch.fingerprint():
        raise QkvError(
            f"{weights} holds weights of architecture {recorded or 'unknown'}, not of this trial's "
            f"({arch.fingerprint()}); the trial folder belongs to another study or was overwritten"
        )
    model = build_model(arch)
    model.load_state_dict(upgrade_state_dict(state))  # files from before the fused projections load too
    return model.eval()
