"""Detection recipes (YAML): the COCO Mask R-CNN 1x/3x schedules of the peer configs and the embedded default."""
