"""ToMoE: dynamic structural pruning of a frozen dense model into a top-1 Mixture-of-Experts.

A hypernetwork (bidirectional GRU over the layers) produces E expert embeddings per layer; per-layer
heads decode them into channel masks over the SwiGLU intermediate (one mask per expert) and into
head-dim masks for attention (static Q/K, per-token V). A top-1 router per MLP picks one expert per
token. Only the hypernetwork, routers and decoders train; every model weight stays frozen.
"""
