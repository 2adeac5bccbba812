"""torch.hub entry points: ``torch.hub.load("path/to/clone", "inceptionnext_tiny", source="local", pretrained=True)``.

Every registered model is an entry point taking ``create_model``'s arguments (``pretrained``, ``checkpoint_path``,
``num_classes``, ``features_only``, ...).
"""

import os
import sys

dependencies = ["torch", "torchvision", "timm", "yaml"]

_src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if _src not in sys.path:  # a plain clone, without `pip install`
    sys.path.insert(0, _src)

from inceptionnext.models import create_model, get_entry, list_models  # noqa: E402


def _entry(name):
    def entry(pretrained=False, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__doc__ = get_entry(name).description
    return entry


for _name in list_models():
    globals()[_name] = _entry(_name)
