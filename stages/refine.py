"""Refine: where the image differs in colour from its object-free background is the object
(maskmint's Lab rule, or the concept-distillation paper's GMM rule)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from maskmint.schemas.config import RefineConfig
from maskmint.schemas.records import BACKGROUND_ID, IGNORE_INDEX
from maskmint.stages.masks import clean, count_components, dilate, erode, nearest_lab_distance, orphan_filter, to_lab
from maskmint.stages.weak_mask import gmm_midpoint


def refine_mask(
    image: np.ndarray,
    background: np.ndarray,
    weak: np.ndarray,
    heat: np.ndarray,
    config: RefineConfig,
    class_ids: list[int] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Final class mask [H, W] (0, class ids, 255) and its quality scores for one sample.

    heat is the sample's normalised maps [C, H, W] for `class_ids` (in that order; default:
    the classes of the weak mask, in id order); weak its class-index weak mask (255 there is
    uncertain foreground). A changed pixel goes to the class whose dilated weak region covers
    it with the highest heat; the 255 band follows every class outline, so it separates
    classes from each other as well as from the background.
    """
    image_lab, background_lab = to_lab(image), to_lab(background)
    delta = np.linalg.norm(image_lab - background_lab, axis=-1)
    weak_fg = weak != BACKGROUND_ID
    if class_ids is None:
        class_ids = [int(c) for c in np.unique(weak) if c not in (BACKGROUND_ID, IGNORE_INDEX)]
    assign = fgbg_classes if config.method == "fgbg" else changed_classes
    changed_by = nearest_lab_distance(image_lab, background_lab, config.shift_px) if config.shift_px else delta
    mask = assign(image, background, changed_by, weak, heat, class_ids, config)
    foreground = mask != BACKGROUND_ID

    if config.ignore_band:
        band = np.zeros(mask.shape, bool)
        for class_id in class_ids:
            region = mask == class_id
            band |= dilate(region, config.boundary_px) & ~erode(region, config.boundary_px)
        hottest = heat.max(axis=0)
        disagree = (foreground & (hottest < config.disagree_low)) | (~foreground & (hottest > config.disagree_high))
        mask[band | disagree] = IGNORE_INDEX

    union = np.logical_or(weak_fg, foreground).sum()
    quality = {
        "mask_fraction": float(foreground.mean()),
        "weak_fraction": float(weak_fg.mean()),
        "ignore_fraction": float((mask == IGNORE_INDEX).mean()),
        "components": float(count_components(foreground)),
        "weak_refined_iou": float(np.logical_and(weak_fg, foreground).sum() / union) if union else 0.0,
        "removal_delta": float(delta[weak_fg].mean()) if weak_fg.any() else 0.0,
        "missing_concepts": float(sum(not (mask == c).any() for c in class_ids)),
    }
    return mask, quality


def changed_classes(image, background, delta, weak, heat, class_ids, config: RefineConfig) -> np.ndarray:
    """maskmint's rule: a pixel whose colour removal changed, within reach of the weak mask,
    goes to the class whose dilated weak region covers it with the highest heat."""
    changed = clean((delta > config.delta_e) & dilate(weak != BACKGROUND_ID, config.dilate_px),
                    config.open_px, config.close_px, config.min_area)
    mask = np.full(weak.shape, BACKGROUND_ID, dtype=np.uint8)
    if class_ids:
        reach = np.stack([dilate(weak == class_id, config.dilate_px) for class_id in class_ids])
        claim = np.where(reach, heat[: len(class_ids)], -np.inf)
        winner = claim.argmax(axis=0)
        taken = changed & reach.any(axis=0)
        if config.segment_vote is not None and len(class_ids) > 1:
            winner = segment_winners(image, taken, reach, winner, config)
        mask[taken] = np.asarray(class_ids, dtype=np.uint8)[winner[taken]]
    return mask


def segment_winners(image, taken, reach, winner, config: RefineConfig) -> np.ndarray:
    """Heat maps are a few times coarser than the image, so near a boundary between two
    objects the per-pixel argmax strays; a colour segment that mostly votes for one class
    gives it the rest of its pixels that the class reaches."""
    segments = felzenszwalb(image, scale=config.segment_scale, sigma=0.5, min_size=10)
    votes = np.zeros((segments.max() + 1, reach.shape[0]), dtype=np.int64)
    np.add.at(votes, (segments[taken], winner[taken]), 1)
    totals = votes.sum(axis=1)
    leader = votes.argmax(axis=1)
    decided = votes.max(axis=1) >= config.segment_vote * np.maximum(totals, 1)
    seg_winner, seg_decided = leader[segments], decided[segments]
    within_reach = np.take_along_axis(reach, seg_winner[None], axis=0)[0]
    return np.where(taken & seg_decided & within_reach, seg_winner, winner)


def fgbg_classes(image, background, delta, weak, heat, class_ids, config: RefineConfig) -> np.ndarray:
    """The concept-distillation paper's rule: each class's weak region AND a GMM-midpoint
    threshold of the mean RGB |image - background|, orphan-filtered; then each class closed
    and its holes filled. With `mask.threshold: gmm_midpoint` and `mask.orphan_filter` the
    weak regions are the paper's too. Nothing leaves a class's dilated weak region, so the
    drops decided before removal stay exact."""
    difference = np.abs(image.astype(np.float32) - background.astype(np.float32)).mean(axis=-1) / 255.0
    changed = orphan_filter(difference > gmm_midpoint(difference))
    mask = np.full(weak.shape, BACKGROUND_ID, dtype=np.uint8)
    for class_id in class_ids:
        own = weak == class_id
        region = own & changed
        if config.fgbg_fill:
            region = ndimage.binary_fill_holes(ndimage.binary_closing(region)) & dilate(own, config.dilate_px)
        mask[region & (mask == BACKGROUND_ID)] = class_id
    return mask


class Refine:
    """Batch stage: adds `mask` (uint8 [B, H, W]) and `quality` (list of dicts)."""

    def __init__(self, config: RefineConfig):
        self.config = config

    def __call__(self, batch: dict) -> dict:
        results = [
            refine_mask(image, background, weak, heat, self.config, [c.class_id for c in spans])
            for image, background, weak, heat, spans in zip(
                batch["image"], batch["background"], batch["weak_mask"], batch["heat"], batch["concepts"]
            )
        ]
        return {"mask": np.stack([m for m, _ in results]), "quality": [q for _, q in results]}
