"""GPT-2/3 model arguments and named flavors. Torch-free (the config loader validates with it)."""

from __future__ import annotations

from dataclasses import dataclass

from deepsuite.config.errors import ConfigError


@dataclass
class GPTConfig:
    """Sizes and options of a GPT-2/3 style decoder."""

    vocab_size: int = 50257
    """Vocabulary size (GPT-2: 50257)."""

    max_seq_len: int = 1024
    """Number of learned absolute positions (GPT-2: 1024)."""

    d_model: int = 768
    """Hidden size."""

    n_layers: int = 12
    """Transformer blocks."""

    n_heads: int = 12
    """Attention heads; must divide d_model."""

    d_ffn: int = 0
    """MLP hidden size; 0 means 4 × d_model."""

    dropout: float = 0.0
    """Dropout on embeddings, attention output and MLP output."""

    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2: true)."""

    tie_embeddings: bool = True
    """Share the token embedding with the LM head (GPT-2: true)."""

    init_std: float = 0.02
    """Standard deviation of the normal initialisation; residual projections use std / sqrt(2 · n_layers)."""

    @property
    def ffn_dim(self) -> int:
        """The MLP hidden size actually used."""
        return self.d_ffn or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        """Per-head dimension."""
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise `ConfigError` on inconsistent sizes."""
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0")
        if self.d_ffn < 0:
            raise ConfigError(f"model.d_ffn={self.d_ffn} must be >= 0 (0 = 4 × d_model)")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                "choose n_heads so that d_model / n_heads is an integer"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        # torch refuses a negative std when it initialises; a negative epsilon makes LayerNorm NaN
        if self.init_std < 0:
            raise ConfigError(
                f"model.init_std={self.init_std} must be >= 0 (a standard deviation), e.g. 0.02"
            )
        if self.layer_norm_eps < 0:
            raise ConfigError(f"model.layer_norm_eps={self.layer_norm_eps} must be >= 0, e.g. 1e-05")


# Sizes from the GPT-2 paper / OpenAI's released checkpoints (seed 004's table); counts with tied embeddings.
FLAVORS: dict[str, GPTConfig] = {
    "gpt2-debug": GPTConfig(vocab_size=4096, max_seq_len=256, d_model=64, n_layers=2, n_heads=4),
    "gpt2-small": GPTConfig(d_model=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": GPTConfig(d_model=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": GPTConfig(d_model=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": GPTConfig(d_model=1600, n_layers=48, n_heads=25),  # 1.56B
}
