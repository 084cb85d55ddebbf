"""An example of a user's own project for thinwire: a model (Hugging Face causal LM built from
a config; a torchvision-style CNN) and a data set (your own text files), plus config presets
for them in ``configs/`` (``hydra.searchpath=[pkg://my_project.configs]``). See
docs/your_model.md; tests/test_your_model.py runs every command shown there."""
