"""Where activations come from: text sources (text, hub), the language model (models), the
activation cache and harvest (activations), and the planted-dictionary source (sources)."""
