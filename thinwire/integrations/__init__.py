"""Recipes for training frameworks (docs/library.md, "Integrations"): ``lightning`` (a
callback; needs the ``lightning`` package). Accelerate needs no module of its own: register
``thinwire.comm_hook`` on the model ``Accelerator.prepare`` returns."""
