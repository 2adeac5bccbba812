"""User-facing tools on top of the models: prediction, class activation maps, model hubs."""
