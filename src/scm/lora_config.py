"""The settings of LoRA students (`scm.diffusers.lora`): plain data, shared by a run's configuration (`lora`) and
the diffusers student's (`DiffusersNetConfig.lora`), importable without diffusers, peft or the diffusers interop."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LORA_TARGETS", "LoRAConfig"]

# LoRA's default targets (`peft` module-name suffixes): the attention projections and feed-forward layers of every
# family's blocks (joint attention's context stream, Flux's single-block MLP, Sana's GLU convolutions included);
# the embeddings, norms and final layer stay the teacher's
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                        "conv_inverted", "conv_point")


@dataclass
class LoRAConfig:
    """Low-rank adapters on a diffusers student (`scm.diffusers.lora`): rank 0 trains the whole network."""

    rank: int = 0                                       # r of every adapter (0: no adapters, full fine-tuning)
    alpha: float | None = None                          # scale alpha/r of the adapters' output (None: alpha = r)
    targets: tuple[str, ...] = ()                       # module-name suffixes to adapt (empty: DEFAULT_LORA_TARGETS)
    dropout: float = 0.0                                # dropout on the adapters' input (training only)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 0):
            raise ValueError(f"LoRAConfig.rank must be an int >= 0, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRAConfig.alpha must be > 0 (or None: the rank), got {self.alpha!r}")
        if not all(isinstance(t, str) and t.strip(".") for t in self.targets):
            raise ValueError(f"LoRAConfig.targets must be module names, got {self.targets!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"LoRAConfig.dropout must lie in [0, 1), got {self.dropout!r}")

    def validate(self) -> None:
        self.__post_init__()

    @property
    def module_names(self) -> tuple[str, ...]:
        return self.targets or DEFAULT_LORA_TARGETS
