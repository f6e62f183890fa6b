"""A small torch model and its flax linen twin holding the same weights.

The twin covers every PEFT layer kind lora_jax exports: an ``Embedding``, a
multi-head projection (flax ``DenseGeneral`` ``(d, heads, head_dim)`` <-> torch
``Linear(d, heads * head_dim)``) and its output projection ``(heads,
head_dim, d)``, a plain ``Linear``, a stack of ``nn.scan``-ed Dense layers
(torch ``ModuleList``), a ``Conv2d`` and a classifier head (trained in full).
``torch`` is imported inside the functions, as the library never needs it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VOCAB, D, HEADS, HEAD_DIM, LAYERS, CLASSES, C_IN, C_OUT = 11, 8, 2, 4, 2, 3, 3, 4

#: flax parameter path -> torch module name (the scanned stack places the layer index)
NAME_MAP = {
    "embed": "embed",
    "q_proj": "q_proj",
    "o_proj": "o_proj",
    "fc": "fc",
    "stack/dense": "layers.{i}",
    "conv": "conv",
    "head": "head",
}
AXES = {"q_proj": "ioo", "o_proj": "iio", "stack": "bio", "conv": "iiio"}


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D, name="dense")(h)), None


class Twin(nn.Module):
    """Flax side: ``(tokens (B, T), image (B, H, W, C)) -> (logits (B, T, classes), conv (B, H', W', C_out))``."""

    @nn.compact
    def __call__(self, tokens, image):
        h = nn.Embed(VOCAB, D, name="embed")(tokens)
        q = nn.DenseGeneral((HEADS, HEAD_DIM), name="q_proj")(h)
        h = h + nn.DenseGeneral(D, axis=(-2, -1), name="o_proj")(jnp.tanh(q))
        h = jnp.tanh(nn.Dense(D, name="fc")(h))
        stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        h, _ = stack(name="stack")(h, None)
        return nn.Dense(CLASSES, name="head")(h), nn.Conv(C_OUT, (3, 3), padding="VALID", name="conv")(image)


def inputs(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """A batch of tokens and images (NHWC)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, VOCAB, (2, 5))), jnp.asarray(rng.normal(size=(2, 6, 6, C_IN)), jnp.float32)


def init_params(seed: int = 0):
    """The flax twin's parameters."""
    tokens, image = inputs()
    return jax.jit(Twin().init)(jax.random.key(seed), tokens, image)["params"]  # one compile, not one per op


def torch_model(params):
    """The torch model, with the flax twin's weights copied in."""
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, D)
            self.q_proj = torch.nn.Linear(D, HEADS * HEAD_DIM)
            self.o_proj = torch.nn.Linear(HEADS * HEAD_DIM, D)
            self.fc = torch.nn.Linear(D, D)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(D, D) for _ in range(LAYERS))
            self.head = torch.nn.Linear(D, CLASSES)
            self.conv = torch.nn.Conv2d(C_IN, C_OUT, 3)

        def forward(self, tokens, image):
            h = self.embed(tokens)
            h = h + self.o_proj(torch.tanh(self.q_proj(h)))
            h = torch.tanh(self.fc(h))
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return self.head(h), self.conv(image)

    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    weights = {
        "embed.weight": p["embed"]["embedding"],
        "q_proj.weight": p["q_proj"]["kernel"].reshape(D, -1).T,
        "q_proj.bias": p["q_proj"]["bias"].reshape(-1),
        "o_proj.weight": p["o_proj"]["kernel"].reshape(-1, D).T,
        "o_proj.bias": p["o_proj"]["bias"],
        "fc.weight": p["fc"]["kernel"].T,
        "fc.bias": p["fc"]["bias"],
        "head.weight": p["head"]["kernel"].T,
        "head.bias": p["head"]["bias"],
        "conv.weight": p["conv"]["kernel"].transpose(3, 2, 0, 1),
        "conv.bias": p["conv"]["bias"],
    }
    for i in range(LAYERS):
        weights[f"layers.{i}.weight"] = p["stack"]["dense"]["kernel"][i].T
        weights[f"layers.{i}.bias"] = p["stack"]["dense"]["bias"][i]
    model = Model()
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()})
    return model.eval()


def torch_outputs(model, tokens, image) -> tuple[np.ndarray, np.ndarray]:
    """The torch model's outputs in the flax twin's layout (conv output NHWC)."""
    import torch

    with torch.no_grad():
        logits, conv = model(
            torch.from_numpy(np.array(tokens)).long(), torch.from_numpy(np.array(image)).permute(0, 3, 1, 2)
        )
    return logits.numpy(), conv.permute(0, 2, 3, 1).numpy()


@jax.jit
def _apply(params, tokens, image):
    return Twin().apply({"params": params}, tokens, image)


def flax_outputs(params, tokens, image) -> tuple[np.ndarray, np.ndarray]:
    """The flax twin's outputs."""
    logits, conv = _apply(params, tokens, image)
    return np.asarray(logits), np.asarray(conv)


def torch_weights_as_flax(state: dict) -> dict:
    """A torch state dict of the model (e.g. after ``merge_and_unload``) as flax params."""
    s = {k: v.detach().numpy() for k, v in state.items()}
    return {
        "embed": {"embedding": s["embed.weight"]},
        "q_proj": {
            "kernel": s["q_proj.weight"].T.reshape(D, HEADS, HEAD_DIM),
            "bias": s["q_proj.bias"].reshape(HEADS, HEAD_DIM),
        },
        "o_proj": {"kernel": s["o_proj.weight"].T.reshape(HEADS, HEAD_DIM, D), "bias": s["o_proj.bias"]},
        "fc": {"kernel": s["fc.weight"].T, "bias": s["fc.bias"]},
        "stack": {
            "dense": {
                "kernel": np.stack([s[f"layers.{i}.weight"].T for i in range(LAYERS)]),
                "bias": np.stack([s[f"layers.{i}.bias"] for i in range(LAYERS)]),
            }
        },
        "head": {"kernel": s["head.weight"].T, "bias": s["head.bias"]},
        "conv": {"kernel": s["conv.weight"].transpose(2, 3, 1, 0), "bias": s["conv.bias"]},
    }
