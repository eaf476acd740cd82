"""esosae: sparse autoencoders on language-model activations, with the E-SOSAE method."""
