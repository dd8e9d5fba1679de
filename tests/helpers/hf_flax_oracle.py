"""The Hugging Face Flax oracle, run in a subprocess with transformers 4.47.1 (the last line
with Flax classes; `dev.py` installs it in `.venv/hf-flax-oracle`) first on the path:

    make OUT          tiny Flax models, every parameter random, saved as transformers saves
                      them (msgpack, sharded msgpack, Flax safetensors), with their outputs on
                      OUT/images.npy in OUT/<name>.npy
    load JOBS.json    each job's folder loaded by its Flax class with from_pretrained: the
                      stored keys against a fresh model's (none missing, none unexpected) and
                      the outputs on the job's images, saved where the job says

Outputs are what a user reads from each class: logits, or the pooled / CLS features a
headless port computes (`OUTPUTS`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ORACLE = Path(__file__).resolve().parents[2] / ".venv" / "hf-flax-oracle"


def output(name: str, model, images: np.ndarray) -> np.ndarray:
    """What our port of `model` gives as logits (NCHW images, as the Flax classes take them)."""
    if name.startswith("FlaxCLIPModel"):
        return np.asarray(model.get_image_features(images))
    out = model(images)
    if name in ("FlaxViTModel",):  # identity head: the final-norm CLS features
        return np.asarray(out.last_hidden_state[:, 0])
    if name in ("FlaxCLIPVisionModel", "FlaxDinov2Model"):
        return np.asarray(out.pooler_output)
    return np.asarray(out.logits)


def randomised(params, seed: int):
    """Every parameter random (a fresh model's norms are ones and its biases zeros)."""
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    rng = np.random.default_rng(seed)
    flat = flatten_dict(params)
    return unflatten_dict(
        {
            k: jnp.asarray(
                (rng.standard_normal(v.shape) * 0.3 + (1.0 if k[-1] == "scale" else 0.0)).astype(
                    np.float32
                )
            )
            for k, v in flat.items()
        }
    )


def make(out: Path) -> None:
    import transformers as T

    vit = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    clip = T.CLIPVisionConfig(**vit, projection_dim=12)
    fixtures = {
        # name: (class, config, save_pretrained keywords)
        "vit_cls": (T.FlaxViTForImageClassification, T.ViTConfig(**vit, num_labels=5), {}),
        "vit_model": (T.FlaxViTModel, T.ViTConfig(**vit, hidden_act="gelu_new"), {}),
        "vit_safetensors": (T.FlaxViTModel, T.ViTConfig(**vit), {"safe_serialization": True}),
        "vit_sharded": (
            T.FlaxViTForImageClassification,
            T.ViTConfig(**vit, num_labels=5),
            {"max_shard_size": "40KB"},
        ),
        "clip_vision": (T.FlaxCLIPVisionModel, clip, {}),
        "clip_whole": (
            T.FlaxCLIPModel,
            T.CLIPConfig(
                text_config=dict(
                    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
                ),
                vision_config=clip.to_dict(),
                projection_dim=12,
            ),
            {},
        ),
        "dinov2_model": (T.FlaxDinov2Model, T.Dinov2Config(**vit, mlp_ratio=2), {}),
        "dinov2_cls": (
            T.FlaxDinov2ForImageClassification,
            T.Dinov2Config(**vit, mlp_ratio=2, num_labels=5, layerscale_value=0.5),
            {},
        ),
    }
    images = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(out / "images.npy", images)
    index = {}
    for seed, (name, (cls, config, save)) in enumerate(fixtures.items()):
        model = cls(config, seed=seed)
        model.params = randomised(model.params, seed)
        model.save_pretrained(out / name, **save)
        np.save(out / f"{name}.npy", output(cls.__name__, model, images))
        index[name] = cls.__name__
    (out / "index.json").write_text(json.dumps(index))


def load(jobs_file: Path) -> None:
    """Each job: {"folder", "class", "images", "out"}; writes {"missing", "unexpected"} and the
    outputs beside `out`."""
    import transformers as T
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict

    for job in json.loads(jobs_file.read_text()):
        cls = getattr(T, job["class"])
        folder = Path(job["folder"])
        model = cls.from_pretrained(folder)
        fresh = cls(model.config, seed=0)
        want = {"/".join(k): v.shape for k, v in flatten_dict(fresh.params).items()}
        stored = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
        got = {"/".join(k): v.shape for k, v in flatten_dict(stored).items()}
        report = {
            "missing": sorted(set(want) - set(got)),
            "unexpected": sorted(set(got) - set(want)),
            "shapes": sorted(k for k in set(want) & set(got) if want[k] != tuple(got[k])),
        }
        Path(job["out"]).with_suffix(".json").write_text(json.dumps(report))
        np.save(job["out"], output(job["class"], model, np.load(job["images"])))


if __name__ == "__main__":
    {"make": make, "load": load}[sys.argv[1]](Path(sys.argv[2]))
