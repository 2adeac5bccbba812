"""Object detection and instance segmentation with InceptionNeXt backbones on torchvision's detectors (Mask R-CNN,
Faster R-CNN, RetinaNet with FPN), COCO data and metrics, on the shared training engine."""
