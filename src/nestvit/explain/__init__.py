"""Explanations: GradCAT (NesT's tree traversal), CAM, Grad-CAM, attention rollout, occlusion, localization
metrics.

``nestvit explain`` (:mod:`nestvit.explain.cli`) writes them as PNG files; every function here
returns plain tensors / arrays. See ``docs/interpretability.md``.
"""

from .cam import attention_rollout, cam_layer_default, grad_cam, nest_cam, predict, rollout
from .gradcat import GradCATResult, block_box, gradcat
from .localization import (
    THRESHOLDS,
    box_hits,
    gt_known_loc_acc,
    iou,
    largest_component,
    map_to_box,
    maps_to_boxes,
    read_boxes_csv,
    read_voc_xml,
    search_threshold,
    top1_loc_error,
)
from .occlusion import occlusion
from .synthetic import make_localization_set

__all__ = [
    "GradCATResult", "THRESHOLDS", "attention_rollout", "block_box", "box_hits", "cam_layer_default", "grad_cam",
    "gradcat", "gt_known_loc_acc", "iou", "largest_component", "make_localization_set", "map_to_box",
    "maps_to_boxes", "nest_cam", "occlusion", "predict", "read_boxes_csv", "read_voc_xml", "rollout",
    "search_threshold", "top1_loc_error",
]
