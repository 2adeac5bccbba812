"""Semantic segmentation with InceptionNeXt backbones: UperNet and Semantic FPN on ADE20K (Tables 6, 7, 10)."""
