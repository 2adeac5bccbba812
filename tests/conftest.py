import os
import socket

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("INCEPTIONNEXT_NO_PROGRESS", "1")  # keep test logs free of progress bars


def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun rendezvous (``from conftest import free_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """A small real-image ImageFolder (ImageNet layout) made from scikit-learn's digits: 4 classes, 24 train and
    6 val images per class, 32x32 RGB PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits_folder")
    for c in range(4):
        idx = np.flatnonzero(digits.target == c)[:30]
        for split, part in (("train", idx[:24]), ("val", idx[24:])):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in part:
                img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
                img.convert("RGB").save(d / f"{i}.png")
    return root
