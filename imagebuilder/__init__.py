"""imagebuilder: turns flow.yaml into content-addressed image layers and a signed manifest."""
