"""Training-quality options (augmentation, edge-weighted loss, LR schedule) as ``TrainConfig.hooks``.

``unet-deploy train`` and ``unet-deploy experiment`` both describe a run with :class:`QualityOptions`
and hand :meth:`QualityOptions.hooks` to :class:`unet_deploy.train.TrainConfig`.

``unet-deploy train`` starts from a recipe (:data:`RECIPES`): :func:`resolve_recipe` fills every flag the
command line left out from it, giving a record of plain types that checkpoints store;
:func:`merge_stored_recipe` puts the explicit flags of a ``-f`` resume on top of the stored record, and
:func:`recipe_hooks` turns a record into ``TrainConfig.hooks`` (albumentations stays optional).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unet_deploy.errors import UserError
from unet_deploy.images.augment import AugmentConfig, augmentation_missing, build_transform, preset

__all__ = ["QualityOptions", "SCHEDULES", "EDGE_CACHE_BYTES", "RECIPES", "resolve_recipe", "merge_stored_recipe",
           "options_from_record", "recipe_hooks", "recipe_help"]

SCHEDULES = ("plateau", "cosine")
EDGE_CACHE_BYTES = 256 * 2**20  # per DataLoader process, for edge maps of un-augmented masks


@dataclass(frozen=True)
class QualityOptions:
    """``augment``: what to randomise; ``edge_weight`` (1 = off) and ``edge_width`` (pixels at the training
    scale) shape the per-pixel loss weights; ``schedule`` is ``plateau`` (Pytorch-UNet's
    ReduceLROnPlateau on validation dice, per epoch) or ``cosine`` (``warmup_steps`` of linear warm-up,
    then cosine decay to ``min_lr_ratio`` of the learning rate, per step)."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    edge_weight: float = 1.0
    edge_width: float = 3.0
    schedule: str = "plateau"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def validate(self) -> QualityOptions:
        self.augment.validate()
        if self.edge_weight < 1:
            raise UserError(f"--edge-weight {self.edge_weight}: must be >= 1 (1 = off, 5 = edges weigh 5x)")
        if self.edge_width <= 0:
            raise UserError(f"--edge-width {self.edge_width}: must be > 0 pixels")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule {self.schedule}: use {' or '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps {self.warmup_steps}: must be >= 0")
        if self.warmup_steps and self.schedule != "cosine":
            raise UserError(f"--warmup-steps {self.warmup_steps}: add --schedule cosine (plateau has none)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio {self.min_lr_ratio}: must be in [0, 1]")
        return self

    def hooks(self, seed: int, max_steps: int | None = None) -> dict[str, Any]:
        """The ``TrainConfig.hooks`` dict; empty when every option is off (plain Pytorch-UNet training)."""
        from unet_deploy.train.losses import (  # torch: training only; predict imports this module
            EdgeWeight,
            warmup_cosine,
        )

        self.validate()
        out: dict[str, Any] = {}
        transform = build_transform(self.augment, seed)
        if transform is not None:
            out["transform"] = transform
        if self.edge_weight > 1:
            cache = 0 if self.augment.geometric else EDGE_CACHE_BYTES
            out["extras"] = EdgeWeight(self.edge_width, self.edge_weight, key="weight", cache_bytes=cache)
            out["loss_weight_key"] = "weight"
        if self.schedule == "cosine":
            warmup, ratio = self.warmup_steps, self.min_lr_ratio

            def scheduler(optimizer, total_steps: int):
                total = min(total_steps, max_steps) if max_steps else total_steps
                return warmup_cosine(optimizer, max(total, 1), warmup, ratio)

            out["scheduler"] = scheduler
        return out

    def describe(self) -> str:
        parts = []
        a = self.augment
        if a.active:
            parts.append(f"augment(hflip {a.hflip:g}, vflip {a.vflip:g}, scale ±{a.scale:g}, "
                         f"shift ±{a.shift:g}, rotate ±{a.rotate:g}°, warp p {a.geometric_p:g}, "
                         f"jitter b/c/s/h "
                         f"{a.brightness:g}/{a.contrast:g}/{a.saturation:g}/{a.hue:g} p {a.color_p:g})")
        if self.edge_weight > 1:
            parts.append(f"edge weight {self.edge_weight:g} within ~{self.edge_width:g} px")
        if self.schedule == "cosine":
            parts.append(f"cosine schedule, {self.warmup_steps} warm-up steps")
        return ", ".join(parts) or "no augmentation, unweighted loss, plateau schedule"



# ------------------------------------------------------------------------------------------ recipes
#: What ``unet-deploy train`` uses for each quality/optimiser setting the command line leaves out.
#: ``pytorch-unet`` is Pytorch-UNet's train.py exactly (RMSprop, momentum 0.999, lr 1e-5, plateau LR on
#: validation dice, no augmentation); ``default`` is the recipe measured to learn well in few epochs.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"optimizer": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4, "schedule": "cosine",
                "warmup_steps": 20, "augment": "light", "edge_weight": 1.0, "edge_width": 3.0},
    "pytorch-unet": {"optimizer": "rmsprop", "learning_rate": 1e-5, "weight_decay": 1e-8, "schedule": "plateau",
                     "warmup_steps": 0, "augment": "none", "edge_weight": 1.0, "edge_width": 3.0},
}
RECIPE_KEYS = tuple(RECIPES["default"])
AUG_OVERRIDES = ("hflip", "vflip", "scale", "shift", "rotate", "brightness", "contrast", "saturation", "hue")
FLAGS = {"recipe": "--recipe", "optimizer": "--optimizer", "learning_rate": "-l", "weight_decay": "--weight-decay",
         "schedule": "--schedule", "warmup_steps": "--warmup-steps", "augment": "--augment",
         "edge_weight": "--edge-weight", "edge_width": "--edge-width", "scale": "--aug-scale",
         "shift": "--aug-shift"}


def recipe_help(key: str) -> str:
    """``default recipe: X; pytorch-unet: Y`` for a ``--help`` text."""
    return "; ".join(f"{'default recipe' if n == 'default' else n}: {r[key]:g}" if isinstance(r[key], float)
                     else f"{'default recipe' if n == 'default' else n}: {r[key]}" for n, r in RECIPES.items())


def resolve_recipe(given: dict[str, Any]) -> dict[str, Any]:
    """The training record for ``given`` (flag name -> value, ``None`` = not on the command line).

    ``given["recipe"]`` names the table row (``default`` when ``None``); every other non-``None`` value
    overrides the row; ``given["augment_overrides"]`` holds the single augmentation flags. The record
    holds plain types only (it is stored in checkpoints): the recipe name, :data:`RECIPE_KEYS` and
    ``augment_overrides``. ``warmup_steps`` only applies to ``cosine``: a schedule given without
    ``--warmup-steps`` gets none.
    """
    name = (given.get("recipe") or "default").strip().lower()
    if name not in RECIPES:
        raise UserError(f"--recipe {given.get('recipe')}: unknown recipe; use one of {', '.join(RECIPES)}")
    record: dict[str, Any] = {"recipe": name, **RECIPES[name]}
    record.update({k: given[k] for k in RECIPE_KEYS if given.get(k) is not None})
    record["augment_overrides"] = {k: float(v) for k, v in (given.get("augment_overrides") or {}).items()
                                   if v is not None}
    return normalise_record(record, explicit={k for k, v in given.items() if v is not None})


def normalise_record(record: dict[str, Any], explicit: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Lower-case names, plain number types; drop a warm-up the schedule has no use for (unless given)."""
    out = dict(record)
    for k in ("optimizer", "schedule", "augment"):
        out[k] = str(out[k]).strip().lower()
    out["learning_rate"], out["weight_decay"] = float(out["learning_rate"]), float(out["weight_decay"])
    out["edge_weight"], out["edge_width"] = float(out["edge_weight"]), float(out["edge_width"])
    out["warmup_steps"] = int(out["warmup_steps"])
    if out["schedule"] != "cosine" and "warmup_steps" not in explicit:
        out["warmup_steps"] = 0
    out["augment_overrides"] = dict(out.get("augment_overrides") or {})
    options_from_record(out)  # one-line errors for bad values now, before any data is read
    return out


def merge_stored_recipe(record: dict[str, Any], stored: dict[str, Any] | None,
                        explicit: tuple[str, ...] | set[str]) -> tuple[dict[str, Any], list[str]]:
    """Resume: the checkpoint's stored record, with the flags given on this command line on top.

    Returns (record, the overridden flags as ``flag value`` texts). Without a stored record (older
    checkpoints) ``record`` is returned unchanged. An explicit ``--recipe`` naming another recipe than the
    stored one replaces the stored record altogether.
    """
    if not stored:
        return record, []
    explicit = set(explicit)
    stored = {**RECIPES.get(stored.get("recipe") or "default", RECIPES["default"]), **stored}
    if "recipe" in explicit and record["recipe"] != stored.get("recipe"):
        return record, [f"--recipe {record['recipe']}"]
    merged = {k: stored[k] for k in ("recipe", *RECIPE_KEYS)}
    merged["augment_overrides"] = dict(stored.get("augment_overrides") or {})
    changed = []
    for key in RECIPE_KEYS:
        if key in explicit and record[key] != stored[key]:
            merged[key] = record[key]
            changed.append(f"{FLAGS[key]} {record[key]:g}" if isinstance(record[key], float)
                           else f"{FLAGS[key]} {record[key]}")
    for key, value in record["augment_overrides"].items():
        if merged["augment_overrides"].get(key) != value:
            merged["augment_overrides"][key] = value
            changed.append(f"{FLAGS.get(key, '--' + key)} {value:g}")
    return normalise_record(merged, explicit), changed


def options_from_record(record: dict[str, Any]) -> QualityOptions:
    """The :class:`QualityOptions` a training record describes (validated)."""
    aug = preset(record["augment"], **record.get("augment_overrides", {}))
    return QualityOptions(aug, record["edge_weight"], record["edge_width"], record["schedule"],
                          record["warmup_steps"]).validate()


def recipe_hooks(record: dict[str, Any], explicit: tuple[str, ...] | set[str], seed: int,
                 max_steps: int | None, say) -> tuple[dict[str, Any], dict[str, Any]]:
    """``TrainConfig.hooks`` for a record, and the record actually used.

    albumentations is optional: when the augmentation comes from the recipe (or a resumed checkpoint)
    and it is not installed, training goes on without augmentation after one warning line; when
    ``--augment`` or a single augmentation flag was given, that is a one-line error.
    """
    options = options_from_record(record)
    missing = augmentation_missing() if options.augment.active or options.edge_weight > 1 else None
    if missing is not None:
        asked = [FLAGS.get(k, "--" + k) for k in ("augment", "edge_weight", *AUG_OVERRIDES) if k in explicit]
        if asked:
            raise UserError(f"{asked[0]}: needs {missing}, which is not installed; pip install albumentations "
                            f"(or train without {asked[0]})")
        say(f"warning: {missing} is not installed, so the {record['recipe']} recipe trains without "
            "augmentation (and edge weights); pip install albumentations to use them")
        record = {**record, "augment": "none", "augment_overrides": {}, "edge_weight": 1.0}
        options = options_from_record(record)
    return options.hooks(seed, max_steps), record
